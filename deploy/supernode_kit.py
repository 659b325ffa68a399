"""A SuperNode deployment kit: TLS material, node keys, node configs, the `flwr`
connection entry and the exact commands to start a SuperLink and its SuperNodes.

Torch-free: only ``cryptography`` and ``tomli_w`` (a Flower dependency). Layout of a kit::

    DIR/tls/ca.crt ca.key server.crt server.key    TLS (server cert valid for the given hosts)
    DIR/keys/node0 node0.pub ...                   SuperNode auth keys (ECDSA P-384, OpenSSH)
    DIR/nodes/node0.toml ...                       node config (partition-id, num-partitions, data-root)
    DIR/signing/papm-signing-key.pem, .pub.pem    Ed25519 pair: the run signs its edge bundle, devices verify it
    DIR/COMMANDS.md                                the commands, in the order to run them
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, shipped with flwr
    import tomli as tomllib  # type: ignore[no-redef]

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..shared.errors import PapmError
from ..shared.files import atomic_write_bytes, atomic_write_text

ALWAYS_HOSTS = ("127.0.0.1", "localhost")  # loopback always works, also for tests
# Flower's SuperExec polls for new app processes to start every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds
# (1 s by default, 0.01-60 allowed); every message of a run waits for one poll, so the commands shorten it
POLL_ENV, POLL_SECONDS = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", 0.1
FIRST_NODE_PORT = 9094  # flower-supernode's default; node i gets 9094 + i (ports clash on one machine)
INSECURE_WARNING = ("WARNING: --insecure kit: no TLS and no SuperNode authentication. Anyone who can reach the "
                    "SuperLink can read the traffic and join as a node. Use it only for local experiments.")


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address (IPv4 or IPv6), ASCII only."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return (0 < len(host) <= 253 and all(0 < len(label) <= 63 and label.isascii() and label[0] != "-" and label[-1] != "-"
                                         and all(c.isalnum() or c == "-" for c in label) for label in labels))


@dataclass
class KitSpec:
    """What `papm deploy init` was asked for."""

    directory: Path
    hosts: list[str] = field(default_factory=list)
    nodes: int = 3
    superlink: str = "127.0.0.1:8000"
    data_root_template: str = ""  # e.g. "/data/node{id}"; {id} is the partition-id
    flwr_home: Path | None = None  # default: $FLWR_HOME or ~/.flwr (as flwr itself resolves it)
    connection: str = "papm"
    insecure: bool = False
    force: bool = False
    days: int = 365
    project_root: Path | None = None  # where `flwr run .` runs (the folder with pyproject.toml)
    warm_worker: bool = True  # a `papm node` worker beside each SuperNode (torch and data stay loaded)

    def validate(self) -> "KitSpec":
        if self.nodes < 1:
            raise PapmError(f"--nodes must be >= 1, got {self.nodes}")
        if self.days < 1:
            raise PapmError(f"--days must be >= 1, got {self.days}")
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise PapmError(f"--superlink must be HOST:PORT, got {self.superlink!r}")
        if not 1 <= int(port) <= 65535:
            raise PapmError(f"--superlink port must be 1-65535, got {port}")
        for h in [host.strip("[]"), *self.hosts]:
            if not _valid_host(h.strip()):
                raise PapmError(f"{h.strip()!r} is not a host name or IP address (letters, digits, '-' and '.' in ASCII); "
                                "fix --superlink / --hosts")
        if self.days > 36500:
            raise PapmError(f"--days must be at most 36500, got {self.days}")
        if self.directory.exists() and not self.directory.is_dir():
            raise PapmError(f"kit folder {self.directory} is a file; give a folder for the kit")
        bad = [c for c in ('"', "'", "\n", "\r", "\\", "`", "$") if c in self.data_root_template]
        if bad:  # it is written into command lines and TOML: a quote would inject keys or commands
            raise PapmError(f"--data-root-template must not contain {' or '.join(repr(c) for c in bad)}; give a plain path "
                            "such as /data/node{id}")
        if not self.connection.replace("-", "").replace("_", "").isalnum():
            raise PapmError(f"--connection must be letters, digits, - or _, got {self.connection!r}")
        if self.data_root_template and "{id}" not in self.data_root_template and self.nodes > 1:
            raise PapmError(f"--data-root-template needs {{id}} (the partition-id) so each node gets its own data, "
                            f"got {self.data_root_template!r}")
        return self

    @property
    def superlink_host(self) -> str:
        return self.superlink.rpartition(":")[0].strip("[]")

    @property
    def superlink_port(self) -> int:
        return int(self.superlink.rpartition(":")[2])

    def all_hosts(self) -> list[str]:
        """The server certificate's names: loopback, the SuperLink's host and the asked ones, deduplicated."""
        out: list[str] = []
        for h in [*ALWAYS_HOSTS, self.superlink_host, *self.hosts]:
            h = h.strip()
            if h and h not in out:
                out.append(h)
        return out


@dataclass
class Kit:
    """Paths of a written kit and its commands (for tests and the CLI)."""

    directory: Path
    ca_cert: Path | None
    node_keys: list[Path]  # private keys; the public key is beside it with .pub
    node_configs: list[Path]
    flwr_config: Path
    connection: str
    commands: list[tuple[str, str]]  # (what, command)
    commands_md: Path


# ---- key material ------------------------------------------------------------------------
def _write_secret(path: Path, data: bytes) -> None:
    """A private key: atomic, and 0600 from the start (never readable by others, not even for a moment)."""
    atomic_write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_text(path, data.decode())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PAPM-FL"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("PAPM-FL deployment CA")).issuer_name(_name("PAPM-FL deployment CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate whose subjectAltName lists every host (TLS clients check SANs, not the CN)."""
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_node_key(comment: str) -> tuple[bytes, bytes]:
    """ECDSA P-384 in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes it: the private key for
    ``flower-supernode --auth-supernode-private-key``, the public one for ``flwr supernode register``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---- flwr connection ---------------------------------------------------------------------
def flwr_home(explicit: Path | None) -> Path:
    """The folder `flwr` reads config.toml from: --flwr-home, else $FLWR_HOME, else ~/.flwr (flwr's own rule)."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("FLWR_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".flwr"


def connection_entry(spec: KitSpec, ca_cert: Path | None) -> dict:
    if spec.insecure:
        return {"address": spec.superlink, "insecure": True}
    # flwr needs an absolute root-certificates path (a relative one fails when run from another folder)
    return {"address": spec.superlink, "root-certificates": str(ca_cert.resolve())}


def _connection_config(home: Path, name: str, entry: dict, force: bool) -> dict:
    """flwr's config.toml with ``[superlink.<name>]`` set, every other entry kept.

    A missing file starts from flwr's own default (so `flwr` finds its usual `local` connection);
    the default connection is left alone, the kit's commands always name their connection.
    Raises (before anything is written) if a different entry of that name exists.
    """
    path = home / "config.toml"
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise PapmError(f"{path} is not valid TOML ({e}); fix it or pass another --flwr-home") from None
    else:
        try:
            from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

            data = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
        except Exception:  # noqa: BLE001 - a different flwr layout: start empty
            data = {}
    superlink = data.setdefault("superlink", {})
    old = superlink.get(name)
    if isinstance(old, dict) and old != entry and not force:
        raise PapmError(f"{path} already has a different connection [superlink.{name}]; pass --force to replace it "
                        "or choose another --connection")
    superlink[name] = entry
    return data


def write_connection(home: Path, name: str, entry: dict, force: bool) -> Path:
    import tomli_w

    data = _connection_config(home, name, entry, force)
    return atomic_write_text(home / "config.toml", tomli_w.dumps(data))


# ---- commands ----------------------------------------------------------------------------
def find_project_root() -> Path | None:
    """The folder holding this app's pyproject.toml (``flwr run .`` packs it); None for a wheel install."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def worker_socket(spec: KitSpec, pid: int) -> Path:
    """Where node ``pid``'s warm worker listens (a folder of the kit closed to other users)."""
    return spec.directory.resolve() / "workers" / f"node{pid}.sock"


def node_config(spec: KitSpec, pid: int) -> dict:
    cfg: dict = {"partition-id": pid, "num-partitions": spec.nodes}
    if spec.data_root_template:
        cfg["data-root"] = spec.data_root_template.replace("{id}", str(pid))
    if spec.warm_worker:
        cfg["worker-socket"] = str(worker_socket(spec, pid))
    return cfg


def _node_config_arg(cfg: dict) -> str:
    # flower-supernode parses "k=v k=v" as TOML values: strings need their double quotes
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())


def build_commands(spec: KitSpec, d: Path, project_root: Path | None) -> list[tuple[str, str]]:
    q = shlex.quote
    home_env = f"FLWR_HOME={q(str(flwr_home(spec.flwr_home)))} " if spec.flwr_home is not None else ""
    loopback = spec.superlink_host in ALWAYS_HOSTS
    # beyond loopback the SuperLink must listen on every interface, not only 127.0.0.1
    listen = "127.0.0.1" if loopback else "0.0.0.0"
    link = ["flower-superlink", "--host", listen, "--port", str(spec.superlink_port),
            # app dependencies are installed on every machine beforehand (pip install papm-fl), never fetched at run time
            "--disable-runtime-dependency-installation",
            # registered nodes survive a SuperLink restart
            "--database", str(d / "superlink.db")]
    if spec.insecure:
        link.append("--insecure")
    else:
        link += ["--ssl-ca-certfile", str(d / "tls/ca.crt"), "--ssl-certfile", str(d / "tls/server.crt"),
                 "--ssl-keyfile", str(d / "tls/server.key"), "--enable-supernode-auth"]
    # each message starts a ClientApp/ServerApp process that the SuperExec looks for every second by default
    poll = f"{POLL_ENV}={POLL_SECONDS} "
    cmds = [("Start the SuperLink (on the coordinator; keep it running)", poll + " ".join(map(q, link)))]
    if not spec.insecure:
        for i in range(spec.nodes):
            cmds.append((f"Register node {i}'s public key (once, while the SuperLink runs)",
                         f"{home_env}flwr supernode register {q(str(d / f'keys/node{i}.pub'))} {q(spec.connection)}"))
    for i in range(spec.nodes):
        node = ["flower-supernode", "--superlink", spec.superlink, "--port", str(FIRST_NODE_PORT + i)]
        if spec.insecure:
            node.append("--insecure")
        else:
            node += ["--root-certificates", str(d / "tls/ca.crt"), "--auth-supernode-private-key", str(d / f"keys/node{i}")]
        node += ["--node-config", _node_config_arg(node_config(spec, i))]
        needs = "" if spec.insecure else f"; needs tls/ca.crt and keys/node{i}"
        if spec.warm_worker:
            cmds.append((f"Start node {i}'s warm worker (on device {i}, beside its SuperNode, supervised the same way; "
                         "without it the SuperNode still works, loading torch and the data for every message)",
                         f"papm node --socket {q(str(worker_socket(spec, i)))}"))
        cmds.append((f"Start SuperNode {i} (on device {i}{needs})", poll + " ".join(map(q, node))))
    run_cfg = (f'run-dir="{d / "runs/deploy"}" nodes={spec.nodes}' + (f" devices={spec.nodes}" if spec.nodes < 3 else "")
               + f' sign-key="{d / "signing/papm-signing-key.pem"}"')
    cd = f"cd {q(str(project_root))} && " if project_root else "cd /path/to/papm-fl && "  # the folder with pyproject.toml
    cmds.append(("Run PAPM-FL on the federation (from the project folder)",
                 f"{cd}{home_env}flwr run . {q(spec.connection)} --stream --run-config {q(run_cfg)}"))
    cmds.append(("Check the run's final status: finished:completed or finished:failed "
                 "(`flwr run --stream` exits 0 even when the run failed)",
                 f"{home_env}flwr ls {q(spec.connection)}"))
    cmds.append(("On a device: predictions from the signed bundle (copy runs/deploy/bundle/ and "
                 "signing/papm-signing-key.pub.pem there; the edge install needs no torch)",
                 f"papm infer {q(str(d / 'runs/deploy/bundle'))} photo.png --verify-key "
                 f"{q(str(d / 'signing/papm-signing-key.pub.pem'))}"))
    return cmds


def commands_markdown(spec: KitSpec, kit_dir: Path, cmds: list[tuple[str, str]]) -> str:
    lines = ["# PAPM-FL deployment commands", ""]
    if spec.insecure:
        lines += [f"**{INSECURE_WARNING}**", ""]
    lines += [f"Kit: `{kit_dir}`. SuperLink: `{spec.superlink}`, {spec.nodes} SuperNodes, `flwr` connection "
              f"`{spec.connection}`.", "",
              "Every machine needs PAPM-FL installed (`pip install papm-fl`). "
              + ("" if spec.insecure else "A device needs only `tls/ca.crt` and its own `keys/nodeN` from this kit "
                 "(copy them and adjust the paths). Keep `tls/*.key` and `keys/node*` (without .pub) secret. ")
              + "`--node-config nodes/nodeN.toml` is the same as the inline node config below.", "",
              "If a device restarts mid-run, start its SuperNode again with the same key (it gets its node id "
              "back), then submit the same `flwr run` again: the run resumes after its last completed phase.", ""]
    for what, cmd in cmds:
        lines += [f"{what}:", "", "```bash", cmd, "```", ""]
    return "\n".join(lines)


# ---- the kit -----------------------------------------------------------------------------
def kit_files(spec: KitSpec) -> list[Path]:
    d = spec.directory
    files = [d / "COMMANDS.md", *(d / f"nodes/node{i}.toml" for i in range(spec.nodes)),
             d / "signing/papm-signing-key.pem", d / "signing/papm-signing-key.pub.pem"]
    if not spec.insecure:
        files += [d / f"tls/{n}" for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
        files += [d / f"keys/node{i}{s}" for i in range(spec.nodes) for s in ("", ".pub")]
    return files


def init_kit(spec: KitSpec) -> Kit:
    spec.validate()
    d = spec.directory.expanduser().resolve()
    spec.directory = d
    if not spec.force:
        existing = [str(p) for p in kit_files(spec) if p.exists()]
        if existing:
            raise PapmError(f"{d} already holds a kit ({existing[0]}, ...); pass --force to overwrite it or choose another folder")
    home = flwr_home(spec.flwr_home)
    entry = connection_entry(spec, d / "tls/ca.crt")
    _connection_config(home, spec.connection, entry, spec.force)  # refuse a clashing entry before writing anything
    ca_path: Path | None = None
    keys: list[Path] = []
    if not spec.insecure:
        ca_key, ca_cert = make_ca(spec.days)
        srv_key, srv_cert = make_server_cert(ca_key, ca_cert, spec.all_hosts(), spec.days)
        ca_path = d / "tls/ca.crt"
        _write_secret(d / "tls/ca.key", _pem_key(ca_key))
        atomic_write_text(ca_path, _pem_cert(ca_cert).decode())
        _write_secret(d / "tls/server.key", _pem_key(srv_key))
        atomic_write_text(d / "tls/server.crt", _pem_cert(srv_cert).decode())
        (d / "keys").mkdir(parents=True, exist_ok=True)
        os.chmod(d / "keys", 0o700)  # private keys: only their owner may even list them
        for i in range(spec.nodes):
            private, public = make_node_key(f"papm-node{i}")
            _write_secret(d / f"keys/node{i}", private)
            _write_public(d / f"keys/node{i}.pub", public)
            keys.append(d / f"keys/node{i}")
    from .bundle import generate_keypair

    # the bundle signing pair: the server signs the run's manifest, devices verify with the public half
    generate_keypair(d / "signing", force=True)
    os.chmod(d / "signing", 0o700)
    configs = []
    import tomli_w

    for i in range(spec.nodes):
        path = d / f"nodes/node{i}.toml"
        atomic_write_text(path, tomli_w.dumps(node_config(spec, i)))
        configs.append(path)
    flwr_config = write_connection(home, spec.connection, entry, spec.force)
    project_root = spec.project_root or find_project_root()
    cmds = build_commands(spec, d, project_root)
    md = atomic_write_text(d / "COMMANDS.md", commands_markdown(spec, d, cmds))
    return Kit(d, ca_path, keys, configs, flwr_config, spec.connection, cmds, md)
