"""Peak memory of one node: `papm simulate` with the given config, every process of its tree sampled
every 0.2 s; the nodes are Ray's ClientApp actor processes.

    python benchmarks/bench_node_memory.py --set base-checkpoint=base.pt --set data-root=data/cifar10 --set nodes=3 --set devices=2

In the simulation an actor serves several nodes in turn and keeps the decoded dataset it
partitions, so its peak is an upper bound for one device's (a SuperNode holds only its own
images). Writes benchmarks/bench_node_memory.json and adds a row to benchmarks/bench_node_memory.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_procs import tree
from bench_record import record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-node-memory-"))
    cmd = [sys.executable, "-m", "papm.cli", "simulate", "--run-dir", str(work / "run")]
    for s in args.set:
        cmd += ["--set", s]
    peak: dict[str, float] = {}  # command line -> peak MiB
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def sample() -> None:
            while proc.poll() is None:
                for pid, (rss, name) in tree(proc.pid).items():
                    key = f"{pid} {name[:80]}"
                    peak[key] = max(peak.get(key, 0.0), rss / 2**20)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        sampler.join(timeout=1)
        if proc.returncode != 0:
            raise SystemExit(f"papm simulate failed:\n{err[-3000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    actors = {k: v for k, v in peak.items() if "ClientAppActor" in k or "ray::" in k and "Actor" in k}
    driver = max((v for k, v in peak.items() if "papm.cli" in k), default=0.0)
    node_peak = max(actors.values(), default=0.0)
    for k, v in sorted(peak.items(), key=lambda kv: -kv[1])[:8]:
        print(f"{v:8.1f} MiB  {k}")
    print(f"one node (the largest ClientApp actor): {node_peak:.1f} MiB; the server process: {driver:.1f} MiB")
    row = {"config": " ".join(args.set) or "(defaults)", "node_peak_mib": round(node_peak, 1), "server_peak_mib": round(driver, 1),
           "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench_node_memory.py " + " ".join(
               f"--set {s}" for s in args.set)}
    js, md = record(args.out, "bench_node_memory", row, {"date": "date", "config": "config", "node peak MiB": "node_peak_mib",
                                                          "server MiB": "server_peak_mib"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
