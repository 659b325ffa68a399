"""Real Flower deployments on loopback: a SuperLink and SuperNodes started from the kit that
`papm deploy init` writes (TLS and SuperNode authentication on), runs submitted with
`flwr run . <connection>` from the project root, status read with `flwr ls` (the streaming
command's exit code does not tell a failed run), every process stopped by its PID.

Nothing touches the network: loopback addresses only, runtime dependency installation off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, shipped with flwr
    import tomli as tomllib  # type: ignore[no-redef]

import numpy as np
import pytest

from papm.shared.config import PHASES

from conftest import pattern_base, write_pattern_folder

ROOT = Path(__file__).resolve().parents[1]  # the project folder `flwr run .` packs
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode live beside python
# The shortest useful run (the brief's fast overrides).
DEPLOY_INIT = ("-m", "papm.cli", "deploy", "init")  # `papm deploy init`, run with this interpreter
FAST = "base-rounds=1 fusion-rounds=1 base-epochs=1 finetune-epochs=1 finetune-rounds=1 fusion-epochs=1 timeout=120"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """One SuperLink and its SuperNodes, all started from a `papm deploy init` kit."""

    def __init__(self, tmp: Path, nodes: int = 3, register: bool = True):
        self.tmp, self.nodes = tmp, nodes
        self.home, self.kit = tmp / "flwr-home", tmp / "kit"
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}  # as the kit's commands set it
        self.env.pop("PAPM_INJECT_FAULT", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.register = register
        self.node_ids: dict[int, int] = {}

    # ---- kit and processes ---------------------------------------------------------------
    def init_kit(self, *extra: str) -> subprocess.CompletedProcess:
        r = self.cli(*DEPLOY_INIT, str(self.kit), "--nodes", str(self.nodes),
                     "--superlink", f"127.0.0.1:{self.port}", "--flwr-home", str(self.home), *extra)
        assert r.returncode == 0, r.stderr
        return r

    def flwr_json(self, *args: str, check: bool = True) -> dict:
        """`flwr ... --format json`: errors come back as {"success": false, ...}, often with exit code 0."""
        r = self.cli("flwr", *args, "--format", "json")
        try:
            out = json.loads(r.stdout)
        except json.JSONDecodeError:
            out = {"success": False, "error-message": r.stdout + r.stderr}
        if check:
            assert r.returncode == 0 and out.get("success"), out
        return out

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *args] if args[0].startswith("-") else [str(BIN / args[0]), *args[1:]]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        # own session: the PID also names the process group, so its children (flwr-serverapp,
        # superexec, clientapps) are stopped with it
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp, start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        k = self.kit
        self.spawn("superlink", [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                                 "--disable-runtime-dependency-installation", "--database", str(k / "superlink.db"),
                                 "--ssl-ca-certfile", str(k / "tls/ca.crt"), "--ssl-certfile", str(k / "tls/server.crt"),
                                 "--ssl-keyfile", str(k / "tls/server.key"), "--enable-supernode-auth"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready when `flwr` gets an answer over TLS
            assert self.procs["superlink"].poll() is None, self.log("superlink")[-3000:]
            if self.flwr_json("supernode", "ls", "papm", check=False).get("success"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("SuperLink not ready in 60 s:\n" + self.log("superlink")[-3000:])
        if self.register:
            for i in range(self.nodes):
                out = self.flwr_json("supernode", "register", str(k / f"keys/node{i}.pub"), "papm")
                self.node_ids[i] = int(out["node-id"])

    def node_command(self, i: int) -> list[str]:
        """flower-supernode as the kit's COMMANDS.md says, with a free --port and the kit's
        node config file (flower-supernode reads a single .toml path as the node config)."""
        k = self.kit
        return [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(self.node_ports[i]),
                "--root-certificates", str(k / "tls/ca.crt"), "--auth-supernode-private-key", str(k / f"keys/node{i}"),
                "--node-config", str(k / f"nodes/node{i}.toml")]

    def start_node(self, i: int) -> subprocess.Popen:
        return self.spawn(f"node{i}", self.node_command(i))

    def start_worker(self, i: int) -> subprocess.Popen:
        """`papm node` beside SuperNode i, on the socket the kit wrote into its node config."""
        sock = tomllib.loads((self.kit / f"nodes/node{i}.toml").read_text())["worker-socket"]
        proc = self.spawn(f"worker{i}", [sys.executable, "-m", "papm.cli", "node", "--socket", sock])
        deadline = time.monotonic() + 60
        while "serving on" not in self.log(f"worker{i}"):
            assert proc.poll() is None and time.monotonic() < deadline, self.log(f"worker{i}")
            time.sleep(0.2)
        return proc

    def online(self) -> set[int]:
        nodes = self.flwr_json("supernode", "ls", "papm")["nodes"]
        return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

    def wait_online(self, count: int, timeout: float = 60) -> set[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = self.online()
            if len(ids) >= count:
                return ids
            time.sleep(1)
        raise AssertionError(f"fewer than {count} nodes online after {timeout:g} s")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)  # the group the process leads (start_new_session)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:  # nodes first: they deactivate cleanly
            self.stop(name)

    # ---- runs ------------------------------------------------------------------------------
    def submit(self, run_config: str) -> int:
        return int(self.flwr_json("run", ".", "papm", "--run-config", run_config)["run-id"])

    def status(self, run_id: int) -> dict:
        return self.flwr_json("ls", "papm", "--run-id", str(run_id))["runs"][0]

    def wait_run(self, run_id: int, timeout: float, poll: float = 3) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.status(run_id)
            if run["status"].startswith("finished"):
                return run
            time.sleep(poll)
        raise AssertionError(f"run {run_id} not finished after {timeout:g} s: {self.status(run_id)}")


@pytest.fixture
def federation(tmp_path):
    feds: list[Federation] = []

    def make(**kw) -> Federation:
        fed = Federation(tmp_path, **kw)
        feds.append(fed)
        return fed

    yield make
    for fed in feds:  # also after a failed assertion: no process outlives its test
        fed.close()


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


# ---- the kit itself (no processes) -------------------------------------------------------------
def test_deploy_init_kit(tmp_path):
    fed = Federation(tmp_path, nodes=2)
    # devices with their own photos need the coordinator's test split of them: refused at init, not at the run's hello
    r = fed.cli(*DEPLOY_INIT, str(fed.kit), "--data-root-template", "/data/node{id}", "--flwr-home", str(fed.home))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--data-root" in r.stderr and not fed.kit.exists(), r.stderr
    r = fed.cli(*DEPLOY_INIT, str(fed.kit), "--data-root-template", "/data/node{id}", "--data-root", str(tmp_path),
                "--flwr-home", str(fed.home))
    assert r.returncode == 2 and "has no test/ folder" in r.stderr and not fed.kit.exists(), r.stderr
    (tmp_path / "photos" / "test" / "cat").mkdir(parents=True)
    r = fed.init_kit("--hosts", "edge.example,10.1.2.3", "--data-root-template", "/data/node{id}",
                     "--data-root", str(tmp_path / "photos"))
    k = fed.kit
    for key in ("tls/ca.key", "tls/server.key", "keys/node0", "keys/node1", "signing/papm-signing-key.pem"):
        assert stat.S_IMODE((k / key).stat().st_mode) == 0o600, key
    assert (k / "keys/node0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    assert load_ssh_private_key((k / "keys/node1").read_bytes(), None).curve.name == "secp384r1"
    cert = x509.load_pem_x509_certificate((k / "tls/server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "localhost", "edge.example", "10.1.2.3"} <= names
    conn = tomllib.loads((fed.home / "config.toml").read_text())["superlink"]["papm"]
    assert conn == {"address": f"127.0.0.1:{fed.port}", "root-certificates": str(k / "tls/ca.crt")}
    assert tomllib.loads((k / "nodes/node1.toml").read_text()) == {"partition-id": 1, "num-partitions": 2,
                                                                   "data-root": "/data/node1",
                                                                   "worker-socket": str(k.resolve() / "workers/node1.sock")}
    commands = (k / "COMMANDS.md").read_text()
    for expected in ("--enable-supernode-auth", f"flwr supernode register {k}/keys/node1.pub papm",
                     "--port 9095", 'data-root="/data/node1"', f"cd {ROOT} && ", "flwr run . papm",
                     "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 flower-supernode", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 flower-superlink",
                     f"papm node --socket {k.resolve()}/workers/node1.sock",
                     f'sign-key="{k}/signing/papm-signing-key.pem"', f"--verify-key {k}/signing/papm-signing-key.pub.pem",
                     f'dataset="imagefolder" data-root="{tmp_path / "photos"}"'):
        assert expected in commands and expected in r.stdout, expected
    # an existing kit is never overwritten without --force; with --force it is
    again = fed.cli(*DEPLOY_INIT, str(k), "--nodes", "2", "--flwr-home", str(fed.home))
    assert again.returncode == 2 and "--force" in again.stderr
    assert fed.cli(*DEPLOY_INIT, str(k), "--nodes", "2", "--flwr-home", str(fed.home),
                   "--superlink", f"127.0.0.1:{fed.port}", "--force").returncode == 0


def test_deploy_init_insecure_says_so(tmp_path):
    fed = Federation(tmp_path, nodes=1)
    r = fed.init_kit("--insecure")
    assert "WARNING" in r.stderr and "no TLS" in r.stderr
    assert not (fed.kit / "tls").exists() and not (fed.kit / "keys").exists()
    assert tomllib.loads((fed.home / "config.toml").read_text())["superlink"]["papm"]["insecure"] is True
    assert "--insecure" in (fed.kit / "COMMANDS.md").read_text()


# ---- real deployments on loopback ------------------------------------------------------------
def test_unregistered_node_key_is_refused(federation):
    fed = federation(nodes=1, register=False)
    fed.init_kit()
    fed.start_superlink()
    node = fed.start_node(0)
    try:
        code = node.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError("an unregistered SuperNode was not refused within 60 s:\n" + fed.log("node0")[-3000:])
    # Flower 1.41: the SuperLink answers 412 and logs why; the node logs "Exit Code: 305 ... Failed
    # to activate SuperNode", exits non-zero (status 1) and does not retry
    assert code != 0, fed.log("node0")[-3000:]
    assert "Exit Code: 305" in fed.log("node0") and "Failed to activate SuperNode" in fed.log("node0")
    assert "No SuperNode found with the given public key" in fed.log("superlink")
    assert fed.online() == set()


@pytest.mark.slow
def test_deployment_with_tls_and_node_auth_whole_run(federation, tmp_path):
    """A whole run on a real federation: kit, TLS, registered keys, 3 SuperNodes that each hold their
    own ImageFolder tree (train/ only, photos of different sizes read at 48x48 RGB), `flwr run` from
    the project root with a given base checkpoint (the FedAvg base phase is exercised in simulation)
    and the coordinator's test split, every later phase over the network, a signed bundle that a
    device verifies. A failing run is reported as such by `flwr ls` (the tests never trust exit codes)."""
    coordinator, base_ckpt = pattern_base(tmp_path, size=48, channels=3)
    for i in range(3):
        write_pattern_folder(tmp_path / f"device{i}", per_class=10, size=48 + 16 * i, parts=("train",), seed=20 + i)
    fed = federation()
    r = fed.init_kit("--data-root-template", str(tmp_path / "device{id}"), "--data-root", str(coordinator),
                     "--base-checkpoint", str(base_ckpt))
    assert f'base-checkpoint="{base_ckpt}" data-root="{coordinator}"' in r.stdout  # the run the kit prints is this one
    fed.start_superlink()
    for i in range(2):  # warm workers beside nodes 0 and 1; node 2 has none and runs each message itself
        fed.start_worker(i)
    for i in range(3):
        fed.start_node(i)
    assert fed.wait_online(3) == set(fed.node_ids.values())  # the registered keys, nothing else
    run_dir = tmp_path / "run"
    key = fed.kit / "signing" / "papm-signing-key.pem"
    run_id = fed.submit(f'{FAST} base-checkpoint="{base_ckpt}" data-root="{coordinator}" run-dir="{run_dir}" sign-key="{key}"')
    run = fed.wait_run(run_id, timeout=600)
    assert run["status"] == "finished:completed", (run, fed.log("superlink")[-3000:])
    st = state(run_dir)
    assert st["completed"] == list(PHASES) and "failures" not in st
    assert (run_dir / "groups" / "groups.json").exists() and (run_dir / "summary.md").exists()
    ev = json.loads((run_dir / "evaluation.json").read_text())
    assert ev["federated"]["nodes"] == 3 and 0.0 < ev["fusion"]["accuracy"] <= 1.0 and ev["test_samples"] == 36
    nodes = json.loads((run_dir / "groups" / "assignment.json").read_text())["nodes"]
    assert sorted(int(p) for p in nodes) == [0, 1, 2]
    assert json.loads((run_dir / "bundle" / "manifest.json").read_text())["input"]["shape"] == [None, 3, 48, 48]
    exporters = {p["node_report"]["partition_id"] for p in json.loads((run_dir / "devices" / "extractors.json").read_text())["parts"]}
    assert exporters == {0, 1, 2}  # each device group's own node exported its extractor
    # the run's bundle is signed with the kit's key: a device verifies it with the public half
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray((np.arange(64, dtype=np.uint8) * 4).reshape(8, 8), mode="L").save(png)
    pub = fed.kit / "signing" / "papm-signing-key.pub.pem"
    r = fed.cli("-m", "papm.cli", "infer", str(run_dir / "bundle"), str(png), "--json", "--verify-key", str(pub))
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["top_k"], r.stderr
    for i in range(2):  # the workers answered their nodes' messages (the same handlers, kept warm)
        assert "query.hello answered" in fed.log(f"worker{i}") and "train.finetune answered" in fed.log(f"worker{i}")
    bad = fed.wait_run(fed.submit(f'{FAST} budget=1.5 run-dir="{tmp_path}/bad"'), timeout=120)
    assert bad["status"] == "finished:failed", bad


def wait_for_log(fed: Federation, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in fed.log(name):
        assert time.monotonic() < deadline, f"{text!r} not in {name}.log after {timeout:g} s"
        assert fed.procs[name].poll() is None, fed.log(name)[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_supernode_restarted_mid_run_recovers(federation, tmp_path):
    """A device reboots mid-run: its SuperNode is stopped with SIGTERM while it fine-tunes and is
    started again with the same key. Flower 1.41 gives it its node id back at once, but the
    message it was working on is lost: the server gets "Node Unavailable" if it asks while the
    node is down (the SuperLink checks liveness before it hands out replies, so even a reply sent
    just before the restart can be lost), or no reply until its timeout if the node is back
    already (the restarted process never gets the old message again). Its device group lost its only node, so the run stops with a clear
    error. The recovery procedure: restart the node with the same key, then submit the same
    `flwr run` again; the ServerApp resumes after the last completed phase and the run completes
    with all three nodes."""
    fed = federation()
    fed.init_kit()
    fed.start_superlink()
    for i in range(3):
        fed.start_node(i)
    fed.wait_online(3)
    run_dir = tmp_path / "run"
    run_config = f'{FAST} run-dir="{run_dir}"'
    first = fed.submit(run_config)
    wait_for_log(fed, "node2", "Receiving: train.finetune message", timeout=600)
    fed.stop("node2", signal.SIGTERM)  # the device goes down while it works
    (tmp_path / "node2.log").rename(tmp_path / "node2-before-restart.log")
    fed.start_node(2)  # ... and comes back with the same key
    assert fed.node_ids[2] in fed.wait_online(3, timeout=60)  # the same key gets the same node id back
    run = fed.wait_run(first, timeout=600)
    if run["status"] == "finished:failed":  # the normal case: the lost reply stopped the run
        st = state(run_dir)
        assert "prune" not in st["completed"] and st["completed"] == ["base", "statistics", "assignment"]
        assert [f["partition_id"] for f in st["failures"]] == [2]
        # down when the server looked: "Node Unavailable" at once; already back: the old message is never
        # answered (the new process does not get it again) and the server's timeout runs out
        assert any(why in st["failures"][0]["reason"] for why in ("Node Unavailable", "no reply within")), st["failures"]
        second = fed.submit(run_config)  # the recovery: the same run again resumes it
        run = fed.wait_run(second, timeout=900)
    assert run["status"] == "finished:completed", (run, fed.log("superlink")[-3000:])
    assert state(run_dir)["completed"] == list(PHASES)
    assert (run_dir / "summary.md").exists()
    assert "Receiving: train.fusion message" in fed.log("node2")  # the restarted node took part again
    assert json.loads((run_dir / "evaluation.json").read_text())["federated"]["nodes"] == 3


# ---- `flwr run .`: the same app, Flower's own way (local simulation) ---------------------------------------
def _stop_local_superlink(home: Path) -> None:
    """`flwr run` starts a detached local SuperLink (its own session) that outlives the command: stop it,
    found by its database path under this test's FLWR_HOME."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(home) in cmdline:
            pid = int(proc.name)
            try:
                pgid = os.getpgid(pid)
                if pgid != os.getpgid(0):  # never our own process group
                    os.killpg(pgid, signal.SIGTERM)
                else:
                    os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_flwr_run_local_simulation_runs_the_same_app(tmp_path):
    home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PAPM_INJECT_FAULT", None)
    try:
        r = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream",
                            "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
                            "--run-config", f'run-dir="{run_dir}" stop-after="statistics" base-rounds=1 base-epochs=1'],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert (run_dir / "state.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
        assert state(run_dir)["completed"] == ["base", "statistics"]
        # Flower's run config ([tool.flwr.app.config] + --run-config) became the run's config
        from papm.shared.config import RunConfig

        cfg = json.loads((run_dir / "config.json").read_text())
        assert cfg["base-rounds"] == 1 and cfg["base-epochs"] == 1 and cfg["nodes"] == 3
        assert cfg["budget"] == RunConfig().budget and cfg["dataset"] == "digits"
        assert (run_dir / "groups" / "report.html").exists()
    finally:
        _stop_local_superlink(home)
