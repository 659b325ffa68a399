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

import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, shipped with flwr
    import tomli as tomllib  # type: ignore[no-redef]

from ..shared.errors import PapmError
from ..shared.files import atomic_write_json, atomic_write_text, check_writable
from .kit_commands import build_commands, commands_markdown, find_project_root, node_config
from .kit_keys import make_ca, make_node_key, make_server_cert, pem_cert, pem_key, write_public, write_secret
from .kit_spec import KitSpec, flwr_home

KIT_MARKER = ".papm-kit"  # written first into every kit; the only folders --force may write over


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


# ---- flwr connection ---------------------------------------------------------------------

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
    marker = d / KIT_MARKER
    if d.is_dir() and any(d.iterdir()) and not marker.is_file():  # --force never touches what papm did not write
        raise PapmError(f"{d} holds files papm deploy init did not write (no {KIT_MARKER} marker); give it a new or "
                        "empty folder (a kit from papm before 0.1 has no marker: move it away yourself)")
    if not spec.force:
        existing = [str(p) for p in kit_files(spec) if p.exists()]
        if existing:
            raise PapmError(f"{d} already holds a kit ({existing[0]}, ...); pass --force to overwrite it or choose another folder")
    home = flwr_home(spec.flwr_home)
    check_writable(d, "kit folder", folder=True)  # both before anything is written: one line, nothing half-made
    check_writable(home, "--flwr-home", folder=True)
    entry = connection_entry(spec, d / "tls/ca.crt")
    _connection_config(home, spec.connection, entry, spec.force)  # refuse a clashing entry before writing anything
    atomic_write_json(marker, {"format": "papm-kit", "version": 1})  # first: a kit cut short is still papm's
    ca_path: Path | None = None
    keys: list[Path] = []
    if not spec.insecure:
        ca_key, ca_cert = make_ca(spec.days)
        srv_key, srv_cert = make_server_cert(ca_key, ca_cert, spec.all_hosts(), spec.days)
        ca_path = d / "tls/ca.crt"
        write_secret(d / "tls/ca.key", pem_key(ca_key))
        atomic_write_text(ca_path, pem_cert(ca_cert).decode())
        write_secret(d / "tls/server.key", pem_key(srv_key))
        atomic_write_text(d / "tls/server.crt", pem_cert(srv_cert).decode())
        (d / "keys").mkdir(parents=True, exist_ok=True)
        os.chmod(d / "keys", 0o700)  # private keys: only their owner may even list them
        for i in range(spec.nodes):
            private, public = make_node_key(f"papm-node{i}")
            write_secret(d / f"keys/node{i}", private)
            write_public(d / f"keys/node{i}.pub", public)
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
