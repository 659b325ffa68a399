"""Accuracy on real photos: `papm simulate` runs over a grid of K and partitioners on an ImageFolder
tree (CIFAR-10 from ../shared/data), each against the same base checkpoint.

    python3 ../shared/data/unpack_cifar10.py data/cifar10                        # 50k train / 10k test JPEGs
    papm train --dataset imagefolder --data-root data/cifar10 --width 0.25 --epochs 10 --out base.pt
    python benchmarks/bench_cifar.py --base base.pt --data-root data/cifar10 --k 2 3 5 --partitioner iid dirichlet

On a GPU machine without Flower's simulation extra (no Ray), `--engine direct` runs the very same phases
and ClientApp handlers in one process, node after node (papm.simulations.direct): the accuracies are the
run's; the wall times are that machine's, without Flower's runtime. Each row names its engine and device.
Per run: base and fusion test accuracy (server side), fusion minus base, per-class accuracy,
wall time per phase. Runs live in --runs (default runs/bench-cifar/<name>); a finished run is
read back, an unfinished one resumed, so the grid can be stopped and continued. Writes
benchmarks/bench_cifar.json (every run) and benchmarks/bench_cifar.md (the tables) after every run;
rows of earlier invocations that this one does not run are kept, each with its own command and date.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path


def run_one(name: str, sets: list[str], runs: Path, engine: str = "simulate") -> dict:
    run = runs / name
    if not (run / "evaluation.json").exists() and engine == "direct":
        # The same phases and ClientApp handlers in this process, node after node (papm.simulations.direct):
        # what a GPU machine without Ray runs; the numbers are the run's, the wall times are not Flower's.
        from papm.shared.config import RunConfig
        from papm.simulations.direct import run_direct

        print(f"[{time.strftime('%H:%M:%S')}] {name}: direct run {' '.join('--set ' + s for s in sets)}", flush=True)
        run_direct(RunConfig.from_overrides([*sets, f"run-dir={run}"]), resume=(run / "state.json").exists())
    if not (run / "evaluation.json").exists():
        cmd = [sys.executable, "-m", "papm.cli", "simulate", "--run-dir", str(run)]
        for s in sets:
            cmd += ["--set", s]
        if (run / "state.json").exists():
            cmd.append("--resume")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: papm simulate {' '.join('--set ' + s for s in sets)}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    ev = json.loads((run / "evaluation.json").read_text())
    state = json.loads((run / "state.json").read_text())
    return {
        "name": name, "settings": sets,
        "base_accuracy": ev["base"]["accuracy"], "fusion_accuracy": ev["fusion"]["accuracy"],
        "fusion_minus_base": ev["fusion"]["accuracy"] - ev["base"]["accuracy"],
        "per_class": {c: [ev["base"]["per_class"][c], ev["fusion"]["per_class"][c]] for c in ev["base"]["per_class"]},
        "devices": [{"classes": d["class_names"], "params": d["params_after"], "group_accuracy": d["test_accuracy"]["group"]}
                    for d in ev["devices"]],
        "phase_seconds": {p: v.get("seconds") for p, v in state.get("phases", {}).items()},
        "test_samples": ev["test_samples"],
    }


def _device_name(sets: list[str]) -> str:
    """What trained the run's models: the GPU's name, or the CPU and its core count (wall times depend on it)."""
    import os

    import torch

    wanted = next((s.split("=", 1)[1] for s in sets if s.startswith("device=")), "auto")
    if wanted != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {len(os.sched_getaffinity(0))} cores"


def markdown(rows: list[dict]) -> str:
    lines = [f"- {r['name']} ({r['date']}, {r.get('device', 'CPU, 2 cores')}, {r.get('engine', 'simulate')}"
             f"{', base sha256 ' + r['base_sha256'][:12] if r.get('base_sha256') else ''}): `{r['command']}`" for r in rows]
    lines += ["", "| run | base | fusion | fusion - base | part params | wall s (prune, fusion, all phases) |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        secs = r["phase_seconds"]
        lines.append(f"| {r['name']} | {100 * r['base_accuracy']:.2f}% | {100 * r['fusion_accuracy']:.2f}% | "
                     f"{100 * r['fusion_minus_base']:+.2f} | {max(d['params'] for d in r['devices']):,} | "
                     f"{secs.get('prune', 0):.0f}, {secs.get('fusion', 0):.0f}, {sum(v or 0 for v in secs.values()):.0f} |")
    classes = list(rows[0]["per_class"]) if rows else []
    lines += ["", "Per-class test accuracy, base / fusion:", "", "| class | " + " | ".join(r["name"] for r in rows) + " |",
              "|---|" + "---:|" * len(rows)]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{100 * r['per_class'][c][0]:.1f} / {100 * r['per_class'][c][1]:.1f}"
                                               for r in rows) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base checkpoint (papm train)")
    ap.add_argument("--data-root", required=True, help="the ImageFolder tree the checkpoint was trained on")
    ap.add_argument("--k", type=int, nargs="+", default=[2])
    ap.add_argument("--partitioner", nargs="+", default=["iid"], help="iid and/or dirichlet")
    ap.add_argument("--dirichlet-alpha", type=float, default=0.5)
    ap.add_argument("--nodes", type=int, default=0, help="nodes per run (default: max(3, K))")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more run config for every run")
    ap.add_argument("--runs", default="runs/bench-cifar")
    ap.add_argument("--name", default="bench_cifar", help="file name of the results in --out")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--engine", choices=["simulate", "direct"], default="simulate",
                    help="simulate: `papm simulate` (Flower, Ray); direct: the same phases in this process, no Ray "
                         "(a GPU machine without Flower's simulation extra)")
    args = ap.parse_args(argv)
    from papm.shared.files import atomic_write_text

    command = "python benchmarks/bench_cifar.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    record = out / f"{args.name}.json"

    def recorded() -> list[dict]:
        earlier = json.loads(record.read_text()) if record.exists() else {"runs": []}
        return [{"command": earlier.get("command", ""), "date": earlier.get("date", ""), **r} for r in earlier["runs"]]

    rows = recorded()
    # which base each row measured: retraining with the same command on another machine gives another base
    base_sha256 = hashlib.sha256(Path(args.base).read_bytes()).hexdigest()

    def save(row: dict) -> None:  # after every run: a grid stopped midway keeps what it finished
        # read again: a grid started beside this one (one per core) may have recorded its runs since
        rows[:] = [r for r in recorded() if r["name"] != row["name"]] + [row]
        atomic_write_text(record, json.dumps({"runs": rows}, indent=2) + "\n")
        atomic_write_text(out / f"{args.name}.md", markdown(rows))

    for part in args.partitioner:
        for k in args.k:
            nodes = args.nodes or max(3, k)
            sets = [f"base-checkpoint={Path(args.base).resolve()}", f"data-root={Path(args.data_root).resolve()}",
                    f"devices={k}", f"nodes={nodes}", f"partitioner={part}", *args.set]
            if part == "dirichlet":
                sets.append(f"dirichlet-alpha={args.dirichlet_alpha}")
            runtime = ("timeout=", "device=", "run-dir=")  # settings that do not change what a run computes
            name = f"{part}-k{k}-n{nodes}" + "".join(f"-{s.replace('=', '')}" for s in args.set if not s.startswith(runtime))
            row = {**run_one(name, sets, Path(args.runs), args.engine), "command": command, "date": time.strftime("%Y-%m-%d"),
                   "engine": args.engine, "device": _device_name(sets), "base_sha256": base_sha256}
            save(row)
            print(f"  base {100 * row['base_accuracy']:.2f}%  fusion {100 * row['fusion_accuracy']:.2f}%  "
                  f"fusion - base {100 * row['fusion_minus_base']:+.2f} points", flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
