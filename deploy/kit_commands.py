"""The deployment kit's commands: node configs, the exact SuperLink / SuperNode / `papm node` command lines
in the order to run them, and COMMANDS.md. Torch-free."""

from __future__ import annotations

import shlex
from pathlib import Path

from .kit_spec import ALWAYS_HOSTS, KitSpec, flwr_home

INSECURE_WARNING = ("WARNING: --insecure kit: no TLS and no SuperNode authentication. Anyone who can reach the "
                    "SuperLink can read the traffic and join as a node. Use it only for local experiments.")
# Flower's SuperExec polls for new app processes to start every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds
# (1 s by default, 0.01-60 allowed); every message of a run waits for one poll, so the commands shorten it
POLL_ENV, POLL_SECONDS = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", 0.1
FIRST_NODE_PORT = 9094  # flower-supernode's default; node i gets 9094 + i (ports clash on one machine)


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
    if spec.base_checkpoint:  # dataset, image shape, classes and normalisation come from the checkpoint
        run_cfg += f' base-checkpoint="{Path(spec.base_checkpoint).expanduser().resolve()}"'
    elif spec.data_root:
        run_cfg += ' dataset="imagefolder"'
    if spec.data_root:
        run_cfg += f' data-root="{Path(spec.data_root).expanduser().resolve()}"'
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
              "Any run config key can be added to `flwr run --run-config` (`budget`, `devices`, ...); photos are read "
              "at the base checkpoint's image size, or at `image-size` (default 32) and `channels` (default 3) "
              "without one.", "",
              "If a device restarts mid-run, start its SuperNode again with the same key (it gets its node id "
              "back), then submit the same `flwr run` again: the run resumes after its last completed phase.", ""]
    for what, cmd in cmds:
        lines += [f"{what}:", "", "```bash", cmd, "```", ""]
    return "\n".join(lines)
