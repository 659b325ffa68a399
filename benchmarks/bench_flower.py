"""Flower overhead: `papm simulate` (Flower's simulation engine, Ray actors) against the
same phases run in one process without Flower's runtime, and the peak memory of a
simulation.

    python benchmarks/bench_flower.py                        # digits demo
    python benchmarks/bench_flower.py --set nodes=10 --set devices=3
    python benchmarks/bench_flower.py --set dataset=cifar10 --set data-root=DIR ...

"Without Flower" means the very same ServerApp phases and ClientApp handlers, connected
by ``papm.simulations.direct.DirectGrid``, which hands each message straight to the
ClientApp in this process, one node after another. The difference is what Flower's
runtime costs: Ray start-up, actor scheduling, message (de)serialisation.
Peak memory is the largest sum of the resident memory of the whole process tree
(driver + Ray's processes + actors), sampled every 0.2 s.
Writes benchmarks/bench_flower.json and appends a row to benchmarks/bench_flower.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_procs import tree_rss_mib
from bench_record import record


def run_in_process(cfg, threads: int) -> float:
    """The whole run, same phases and handlers, without Flower's runtime. Returns seconds.

    One torch thread by default, as each simulated node gets one CPU (and on this 2-core machine two
    intra-op threads on digits' tiny tensors were 7x slower under load, not faster). On real images the
    simulation runs one node per core at once, so compare it with as many threads as cores
    (``--direct-threads``): the same machine doing the same work, node after node.
    """
    import torch

    from papm.simulations.direct import run_direct

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_direct(cfg)
    return time.perf_counter() - t0


def run_simulated(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """`papm simulate` in a subprocess; (seconds, peak MiB of the whole process tree)."""
    cmd = [sys.executable, "-m", "papm.cli", "simulate", "--run-dir", str(run_dir), "--force"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join(timeout=1)
    if proc.returncode != 0:
        raise SystemExit(f"papm simulate failed:\n{err[-3000:]}")
    return seconds, peak[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--direct-threads", type=int, default=1, help="torch threads of the run without Flower (default 1)")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    if args.direct_threads < 1:
        raise SystemExit("error: --direct-threads must be >= 1; give the number of torch threads, e.g. the core count")
    from papm.shared.config import RunConfig

    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    try:
        cfg = RunConfig.from_overrides(args.set + [f"run-dir={work / 'direct'}"])
        direct = run_in_process(cfg, args.direct_threads)
        simulated, peak = run_simulated(args.set, work / "sim")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"config": args.set or ["(defaults: digits demo)"], "nodes": cfg.nodes, "devices": cfg.devices, "dataset": cfg.dataset,
           "simulate_seconds": round(simulated, 2), "direct_seconds": round(direct, 2), "ratio": round(simulated / direct, 3),
           "peak_rss_mib": round(peak, 1), "cpus": os.cpu_count(),
           "direct_threads": args.direct_threads}
    print(f"papm simulate (Flower, Ray):    {simulated:8.2f} s   peak memory {peak:8.1f} MiB (whole process tree)")
    print(f"same phases without Flower:     {direct:8.2f} s   ({args.direct_threads} torch thread(s))")
    print(f"ratio (simulate / direct):      {simulated / direct:.3f}")
    row["config_text"] = " ".join(row["config"])
    js, md = record(args.out, "bench_flower", row, {
        "config": "config_text", "nodes": "nodes", "simulate s": "simulate_seconds", "direct s": "direct_seconds",
        "direct threads": "direct_threads",
        "ratio": "ratio", "peak MiB": "peak_rss_mib"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
