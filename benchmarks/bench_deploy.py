"""A loopback deployment against `papm simulate` with the same config: wall time per phase and the
overhead per message exchange, with and without the warm `papm node` workers.

    python benchmarks/bench_deploy.py [--nodes 3] [--set KEY=VALUE ...]

Three runs of the same config (digits by default, the base trained by FedAvg on the nodes):
`papm simulate` (Flower's simulation engine); a deployment on this machine from a `papm deploy
init --insecure` kit (a SuperLink, ``--nodes`` SuperNodes, `flwr run`), first without workers
(Flower starts a fresh ClientApp process, importing torch and reading the data, for every
message), then with a `papm node` worker beside every SuperNode. Each run directory's
state.json records every phase's seconds and message exchanges; the overhead of an exchange is
(deployment seconds - simulation seconds) / exchanges, per phase and in all; with workers, also the
seconds per exchange outside the nodes' handlers (the workers log each handler's time). The nodes
share this machine's cores, so each gets one torch thread (`papm node --threads 1`, OMP_NUM_THREADS=1
for the SuperNodes' app processes), as the simulation gives each client one CPU.
Writes benchmarks/bench_deploy.json and adds a row to benchmarks/bench_deploy.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from bench_record import record

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phases(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())["phases"]


def simulate(work: Path, sets: list[str]) -> tuple[float, dict]:
    run = work / "sim"
    cmd = [sys.executable, "-m", "papm.cli", "simulate", "--run-dir", str(run)] + [x for s in sets for x in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=work)
    return time.perf_counter() - t0, phases(run)


def deploy(work: Path, name: str, nodes: int, sets: list[str], workers: bool) -> tuple[float, dict]:
    base = work / name
    base.mkdir()
    home, kit, port = base / "flwr-home", base / "kit", free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
    # the nodes share this machine's cores: one torch thread each, as the simulation gives each client one CPU
    # (several nodes with a thread per core each made every handler several times slower here)
    node_env = {**env, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "papm.cli", "deploy", "init", str(kit), "--insecure", "--nodes", str(nodes),
                    "--superlink", f"127.0.0.1:{port}", "--flwr-home", str(home)] + ([] if workers else ["--no-worker"]),
                   check=True, capture_output=True, env=env, cwd=ROOT)
    procs = []

    def spawn(log: str, cmd: list[str], env: dict = env) -> subprocess.Popen:
        with open(base / log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=base, start_new_session=True)
        procs.append(p)
        return p

    try:
        spawn("superlink.log", [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--insecure",
                                "--disable-runtime-dependency-installation", "--database", str(kit / "superlink.db")])
        for i in range(nodes):
            cfg = tomllib.loads((kit / f"nodes/node{i}.toml").read_text())
            if workers:
                spawn(f"worker{i}.log", [sys.executable, "-m", "papm.cli", "node", "--socket", cfg["worker-socket"],
                                         "--threads", "1"], node_env)
            spawn(f"node{i}.log", [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--insecure",
                                   "--port", str(free_port()), "--node-config", str(kit / f"nodes/node{i}.toml")], node_env)
        time.sleep(5)
        run = base / "run"
        run_cfg = " ".join([f'run-dir="{run}"', f"nodes={nodes}"] + [
            s.split("=", 1)[0] + "=" + (s.split("=", 1)[1] if s.split("=", 1)[1].replace(".", "").isdigit()
                                        or s.split("=", 1)[1] in ("true", "false") else f'"{s.split("=", 1)[1]}"')
            for s in sets])
        t0 = time.perf_counter()
        out = subprocess.run([str(BIN / "flwr"), "run", ".", "papm", "--run-config", run_cfg, "--format", "json"],
                             capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        run_id = str(json.loads(out.stdout)["run-id"])
        while True:
            ls = subprocess.run([str(BIN / "flwr"), "ls", "papm", "--run-id", run_id, "--format", "json"],
                                capture_output=True, text=True, env=env, cwd=ROOT)
            status = json.loads(ls.stdout)["runs"][0]["status"]
            if status.startswith("finished"):
                break
            time.sleep(1)
        wall = time.perf_counter() - t0
        if status != "finished:completed":
            raise SystemExit(f"deployment run {name} ended {status}; see {base}")
        return wall, phases(run)
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


def handler_seconds(base: Path, nodes: int) -> float:
    """The nodes' handler time on the critical path of a run with workers: the k-th message of every node
    belongs to the k-th exchange (every node takes part in every exchange), which lasts as long as its slowest
    handler; each worker logs "papm node: TYPE answered in S s" per message."""
    times = []
    for i in range(nodes):
        lines = (base / f"worker{i}.log").read_text().splitlines()
        times.append([float(line.split(" answered in ")[1].split()[0]) for line in lines if " answered in " in line])
    return sum(max(t) for t in itertools.zip_longest(*times, fillvalue=0.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, run directories)")
    args = ap.parse_args(argv)
    sets = [f"nodes={args.nodes}", *args.set]
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        sim_wall, sim = simulate(work, sets)
        cold_wall, cold = deploy(work, "cold", args.nodes, args.set, workers=False)
        warm_wall, warm = deploy(work, "warm", args.nodes, args.set, workers=True)
        handlers = handler_seconds(work / "warm", args.nodes)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    exchanges = sum(p.get("exchanges", 0) for p in sim.values())
    print(f"{'phase':<12} {'exchanges':>9} {'simulate s':>11} {'deploy s':>9} {'+worker s':>10} "
          f"{'overhead/exchange s':>20} {'+worker':>8}")
    for ph, p in sim.items():
        n = max(1, p.get("exchanges", 0))
        print(f"{ph:<12} {p.get('exchanges', 0):>9} {p['seconds']:>11.1f} {cold[ph]['seconds']:>9.1f} "
              f"{warm[ph]['seconds']:>10.1f} {(cold[ph]['seconds'] - p['seconds']) / n:>20.2f} "
              f"{(warm[ph]['seconds'] - p['seconds']) / n:>8.2f}")
    sim_s = sum(p["seconds"] for p in sim.values())
    cold_s = sum(p["seconds"] for p in cold.values())
    warm_s = sum(p["seconds"] for p in warm.values())
    row = {"date": time.strftime("%Y-%m-%d"), "nodes": args.nodes, "config": " ".join(args.set) or "(digits defaults)",
           "exchanges": exchanges, "simulate_s": round(sim_s, 1), "deploy_s": round(cold_s, 1), "deploy_worker_s": round(warm_s, 1),
           "overhead_per_exchange_s": round((cold_s - sim_s) / max(1, exchanges), 2),
           "overhead_per_exchange_worker_s": round((warm_s - sim_s) / max(1, exchanges), 2),
           "deploy_vs_simulate": round(cold_s / sim_s, 2), "deploy_worker_vs_simulate": round(warm_s / sim_s, 2),
           # with workers: the seconds per exchange outside the nodes' handlers (Flower's messaging and process starts,
           # plus the server's own work: aggregation, evaluation; a few seconds in all in the simulation)
           "worker_handlers_s": round(handlers, 1),
           "outside_handlers_per_exchange_s": round((warm_s - handlers) / max(1, exchanges), 2),
           "wall_s": {"simulate": round(sim_wall, 1), "deploy": round(cold_wall, 1), "deploy_worker": round(warm_wall, 1)},
           "phases": {"simulate": sim, "deploy": cold, "deploy_worker": warm},
           "command": "python benchmarks/bench_deploy.py " + " ".join([f"--nodes {args.nodes}"] + [f"--set {s}" for s in args.set])}
    print(f"all phases: simulate {sim_s:.1f} s, deployment {cold_s:.1f} s ({row['deploy_vs_simulate']}x, "
          f"{row['overhead_per_exchange_s']} s per exchange), with workers {warm_s:.1f} s ({row['deploy_worker_vs_simulate']}x, "
          f"{row['overhead_per_exchange_worker_s']} s per exchange); {exchanges} exchanges; with workers "
          f"{handlers:.1f} s in the nodes' handlers (slowest node per exchange), "
          f"{row['outside_handlers_per_exchange_s']} s per exchange outside them")
    js, md = record(args.out, "bench_deploy", row, {
        "date": "date", "command": "command", "exchanges": "exchanges", "simulate s": "simulate_s", "deploy s": "deploy_s",
        "deploy + workers s": "deploy_worker_s", "overhead/exchange s": "overhead_per_exchange_s",
        "overhead/exchange + workers s": "overhead_per_exchange_worker_s", "deploy/simulate": "deploy_vs_simulate",
        "deploy + workers/simulate": "deploy_worker_vs_simulate",
        "per exchange outside the handlers (workers) s": "outside_handlers_per_exchange_s"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
