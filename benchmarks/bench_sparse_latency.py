"""Unstructured and 2:4 sparsity against channel pruning: parameters, file size and dense ONNX Runtime latency.

    python benchmarks/bench_sparse_latency.py --base base.pt [--budget 0.77] [--runs 200] [--out benchmarks]
                                              [--timing interleaved|sequential] [--note TEXT]

From one trained base checkpoint, four fp32 models are built, with no fine-tuning in any of them
(this benchmark measures size and speed, not accuracy):

  dense         the base as it is;
  unstructured  ``sparsity_masks(model, "unstructured", budget)``: the ``budget`` share of the conv
                weights with the smallest magnitude zeroed (one global threshold; the classifier stays
                dense), every shape unchanged;
  2:4           ``sparsity_masks(model, "2:4", ...)``: 2 of every 4 consecutive input-channel weights
                zeroed (channels-last groups, as sparse tensor cores use them); the 3-channel stem cannot
                carry the pattern and stays dense; every shape unchanged;
  channel       ``prune_model`` with ``PruneSettings(budget, criterion="l1")``: whole channels removed
                to the budget, a smaller dense model.

Each is exported to ONNX (fp32, ``export_base``: the same exporter and parity check as the bundle) and
reported with: parameters, non-zero parameters and sparsity (``size_report``), zeros in the ONNX conv
weights (BatchNorm is folded into them on export; a zero stays zero), the ONNX file's bytes and its
zlib (level 9) compressed bytes, ONNX Runtime CPU latency at batch 1 with 1 thread and with all
threads (median and p95), and each number's ratio to the dense base. PyTorch/ONNX parity (max abs
diff) is measured on 16 seeded random inputs so nothing is mis-exported.

Latency: sessions as ``papm bench`` makes them (``deploy.runtime.make_session``), warm-up of
max(5, runs // 10) runs, then ``runs`` timed single-image runs, median and p95, the method of
``bench_split_latency.batch1_ms``. ``--timing interleaved`` (default) times the four models
round-robin, one run each in turn, so that load from other processes falls on all four alike and the
ratios stay comparable on a busy machine; ``--timing sequential`` calls ``batch1_ms`` itself, one
model after the other.

Writes ``<out>/bench_sparse_latency.json`` (every run is kept: repeated runs show the spread) and
appends a section to ``<out>/bench_sparse_latency.md`` with the command, machine, versions, date,
the table and what it shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_split_latency, bench_data_free, bench_record

from bench_record import code, cpu_model
from bench_split_latency import batch1_ms
from papm.deploy.runtime import make_session
from papm.export.onnx_export import export_base
from papm.shared.checkpoint import load_checkpoint
from papm.shared.compression import size_report, sparsity_masks
from papm.shared.files import atomic_write_text
from papm.shared.sparsity import apply_masks
from papm.shared.specialise import PruneSettings, prune_model

VARIANTS = ("dense", "unstructured", "2:4", "channel")
PARITY_SAMPLES = 16


def isa_flags() -> str:
    """The SIMD flags that matter to ONNX Runtime's CPU kernels, as /proc/cpuinfo lists them."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        return "unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "asimddp") if f in flags]
    return " ".join(found) if found else "none of avx2/avx512f/avx512_vnni/avx_vnni/amx_tile/asimddp"


def onnx_weight_zeros(path: Path) -> tuple[int, int]:
    """(zeros, total) over the ONNX graph's conv/gemm weight initializers (rank >= 2)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    zeros = total = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim >= 2 and a.dtype.kind == "f":
            zeros += int(np.count_nonzero(a == 0))
            total += int(a.size)
    return zeros, total


def time_interleaved(paths: dict[str, Path], x: np.ndarray, runs: int, threads: int) -> dict[str, tuple[float, float]]:
    """(median, p95) ms per model at batch 1, the models timed round-robin (one run each in turn)."""
    sessions = {k: make_session(p, threads) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x[:1]} for k, s in sessions.items()}
    for _ in range(max(5, runs // 10)):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (float(np.median(t)), float(np.percentile(t, 95))) for k, t in times.items()}


def build_models(base: torch.nn.Module, margs: dict, info, budget: float) -> dict[str, dict]:
    """The four fp32 models, each with how it was made."""
    out = {"dense": {"model": copy.deepcopy(base).eval(), "how": "the base checkpoint as it is"}}
    m = copy.deepcopy(base).eval()
    masks = sparsity_masks(m, "unstructured", budget)
    apply_masks(m, masks)
    out["unstructured"] = {"model": m, "how": f"{100 * budget:g}% of the conv weights zeroed by magnitude (global threshold; "
                                              f"{len(masks)} conv layers, the classifier left dense)"}
    m = copy.deepcopy(base).eval()
    masks = sparsity_masks(m, "2:4", 0.5)
    skipped = [name for name, layer in m.named_modules() if isinstance(layer, torch.nn.Conv2d) and name not in masks]
    apply_masks(m, masks)
    out["2:4"] = {"model": m, "how": f"2 of every 4 input-channel weights zeroed in {len(masks)} conv layers "
                                     f"(dense: {', '.join(skipped) or 'none'} and the classifier)"}
    m = copy.deepcopy(base).eval()
    settings = PruneSettings(budget=budget, criterion="l1").validate()
    result, new_args = prune_model(m, margs, info, settings, None)
    out["channel"] = {"model": m.eval(), "how": f"channels cut to budget {budget:g} with the l1 criterion "
                                                f"({result.params_before:,} -> {result.params_after:,} parameters)",
                      "model_args_channels": new_args.get("channels")}
    return out


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x"


def table(rows: dict[str, dict], threads_all: int) -> str:
    t = f"all ({threads_all}t)"
    head = ["model", "params", "non-zero params", "sparsity", "ONNX weight zeros", "ONNX bytes", "ONNX zlib bytes",
            "zlib vs dense", "1t median ms", "1t p95 ms", "1t vs dense", f"{t} median ms", f"{t} p95 ms",
            f"{t} vs dense", "parity max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{100 * r['sparsity']:.1f}%",
                 f"{100 * r['onnx_weight_sparsity']:.1f}%", f"{r['onnx_bytes']:,}", f"{r['onnx_zlib_bytes']:,}", fmt_ratio(r["onnx_zlib_vs_dense"]),
                 f"{r['ms_1t']:.3f}", f"{r['p95_1t']:.3f}", fmt_ratio(r["ms_1t_vs_dense"]),
                 f"{r['ms_all']:.3f}", f"{r['p95_all']:.3f}", fmt_ratio(r["ms_all_vs_dense"]), f"{r['parity_max_abs_diff']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shows(rows: dict[str, dict], threads_all: int) -> str:
    """One plain sentence of what the run shows, from its own numbers (a sparse model within 10% of the
    dense latency at 1 thread counts as no faster)."""
    u, s, c = rows["unstructured"], rows["2:4"], rows["channel"]
    faster = min(u["ms_1t_vs_dense"], s["ms_1t_vs_dense"]) < 0.9
    speed = ("do not make dense ONNX Runtime faster" if not faster else
             "look faster in this run, which dense kernels cannot explain: rerun before trusting it")
    return (f"Unstructured ({100 * u['onnx_weight_sparsity']:.0f}% of the ONNX weights zero) and 2:4 "
            f"({100 * s['onnx_weight_sparsity']:.0f}% zero) sparsity shrink only the compressed file "
            f"({fmt_ratio(u['onnx_zlib_vs_dense'])} and {fmt_ratio(s['onnx_zlib_vs_dense'])} of the dense base's zlib bytes; "
            f"the .onnx itself stays {fmt_ratio(u['onnx_vs_dense'])} and {fmt_ratio(s['onnx_vs_dense'])}) and {speed} "
            f"({fmt_ratio(u['ms_1t_vs_dense'])} and {fmt_ratio(s['ms_1t_vs_dense'])} of the dense latency at 1 thread, "
            f"{fmt_ratio(u['ms_all_vs_dense'])} and {fmt_ratio(s['ms_all_vs_dense'])} at {threads_all}), while channel "
            f"pruning to the same budget gives a smaller dense model that is both smaller on disk "
            f"({fmt_ratio(c['onnx_vs_dense'])} raw, {fmt_ratio(c['onnx_zlib_vs_dense'])} zlib) and faster "
            f"({fmt_ratio(c['ms_1t_vs_dense'])} at 1 thread, {fmt_ratio(c['ms_all_vs_dense'])} at {threads_all}).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="trained base checkpoint (papm train)")
    ap.add_argument("--budget", type=float, default=0.77,
                    help="unstructured: share of conv weights zeroed; channel: share of parameters removed")
    ap.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per model and thread count")
    ap.add_argument("--timing", choices=("interleaved", "sequential"), default="interleaved")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--note", default=None, help="a line for the Markdown section, e.g. how the base was trained")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_sparse_latency.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " + command
    t_start = time.perf_counter()

    base, info, ckpt = load_checkpoint(args.base)
    margs = ckpt["model_args"]
    shape = (info.in_channels, info.image_size, info.image_size)
    x = torch.randn((PARITY_SAMPLES, *shape), generator=torch.Generator().manual_seed(0))
    models = build_models(base, margs, info, args.budget)

    work = Path(tempfile.mkdtemp(prefix="bench-sparse-"))
    paths: dict[str, Path] = {}
    rows: dict[str, dict] = {}
    for i, name in enumerate(VARIANTS):
        m = models[name]["model"]
        path = work / f"model{i}.onnx"
        report = export_base(m, path, x)  # raises if ONNX and PyTorch disagree beyond the tolerance
        paths[name] = path
        raw = path.read_bytes()
        zeros, weights = onnx_weight_zeros(path)
        sr = size_report(m)
        rows[name] = {
            "how": models[name]["how"], "params": sr["total_params"], "nonzero_params": sr["nonzero_params"],
            "sparsity": round(sr["sparsity"], 6), "state_dict_bytes": sr["dense_bytes"],
            "state_dict_zlib_bytes": sr["compressed_bytes"], "onnx_bytes": len(raw),
            "onnx_zlib_bytes": len(zlib.compress(raw, 9)), "onnx_weight_zeros": zeros, "onnx_weights": weights,
            "onnx_weight_sparsity": round(zeros / weights, 6) if weights else 0.0,
            "parity_max_abs_diff": report["max_abs_diff"], "parity_tolerance": report["tolerance"],
            "parity_samples": report["samples"],
        }
        if "model_args_channels" in models[name]:
            rows[name]["channels"] = models[name]["model_args_channels"]
        print(f"{name}: {models[name]['how']}; {rows[name]['nonzero_params']:,}/{rows[name]['params']:,} non-zero, "
              f"ONNX {rows[name]['onnx_bytes']:,} B (zlib {rows[name]['onnx_zlib_bytes']:,} B), "
              f"ONNX weight zeros {100 * rows[name]['onnx_weight_sparsity']:.1f}%, parity {report['max_abs_diff']:.2e}",
              flush=True)

    threads_all = os.cpu_count() or 1
    xs = x.numpy()
    for threads, key in ((1, "1t"), (threads_all, "all")):
        if args.timing == "interleaved":
            ms = time_interleaved(paths, xs, args.runs, threads)
        else:
            ms = {name: batch1_ms(p, xs, args.runs, threads) for name, p in paths.items()}
        for name, (med, p95) in ms.items():
            rows[name][f"ms_{key}"], rows[name][f"p95_{key}"] = round(med, 4), round(p95, 4)
        print(f"{threads} thread(s): " + ", ".join(f"{n} {ms[n][0]:.3f} ms (p95 {ms[n][1]:.3f})" for n in VARIANTS), flush=True)

    d = rows["dense"]
    for r in rows.values():
        for k, ratio in (("params", "params"), ("nonzero_params", "nonzero_params"), ("onnx_bytes", "onnx"),
                         ("onnx_zlib_bytes", "onnx_zlib"), ("ms_1t", "ms_1t"), ("ms_all", "ms_all")):
            r[f"{ratio}_vs_dense"] = round(r[k] / d[k], 4)

    md_table = table(rows, threads_all)
    sentence = shows(rows, threads_all)
    print()
    print(md_table)
    print()
    print(sentence)

    import onnxruntime

    date = time.strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, flags {isa_flags()}, "
               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    run = {
        "date": date, "command": command, "machine": machine, "load_average_at_end": [round(v, 2) for v in load] if load else None,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "base": str(args.base), "dataset": info.name, "width": margs["width"], "input": "x".join(map(str, shape)),
        "budget": args.budget, "runs": args.runs, "warmup": max(5, args.runs // 10), "timing": args.timing,
        "batch": 1, "threads": [1, threads_all], "precision": "fp32", "note": args.note, "rows": rows,
        "shows": sentence, "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "bench_sparse_latency.json"
    runs = json.loads(js.read_text()).get("runs", []) if js.exists() else []
    atomic_write_text(js, json.dumps({"runs": runs + [run]}, indent=2) + "\n")  # every run kept: reruns show the spread

    md = out / "bench_sparse_latency.md"
    text = md.read_text() if md.exists() else (
        "# Unstructured and 2:4 sparsity vs channel pruning: size and dense ONNX Runtime latency\n\n"
        "Written by `benchmarks/bench_sparse_latency.py`; one section per run. Four fp32 models from one base, "
        "none fine-tuned (size and speed only, not accuracy): the dense base, unstructured magnitude sparsity, "
        "2:4 sparsity (both keep every shape) and l1 channel pruning to the same budget (a smaller dense model). "
        "Latency: ONNX Runtime CPU, batch 1, median and p95 after warm-up. Ratios are to the dense base "
        "in the same run.\n\n"
        "Unstructured and 2:4 sparsity do NOT make dense ONNX Runtime faster: its dense kernels multiply the "
        "zeros like any other weight. They shrink a compressed file; 2:4 only pays off in speed on a runtime with "
        "sparse kernels (e.g. TensorRT on sparse tensor cores), which is not measured here.\n")
    section = [
        f"\n## {info.name} {run['input']}, width {margs['width']}, budget {args.budget:g}, base `{args.base}` ({date})\n",
        f"- command: {code(command)}",
        *([f"- base: {args.note}"] if args.note else []),
        (f"- machine: {machine}; onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
         f"Python {run['python']}; load average at the end {run['load_average_at_end']}; {run['seconds']} s in all"),
        (f"- timing: {args.timing}, batch 1, {args.runs} timed runs per model after {run['warmup']} warm-up runs, "
         f"1 thread and all {threads_all} threads (intra-op; inter-op 1)"),
        ("- caveat: this machine runs other experiments at the same time; the all-threads column competes with them "
         "for the cores, so its absolute times are noisy. Compare ratios within one run, not times across runs."),
        *[f"- {name}: {models[name]['how']}" for name in VARIANTS],
        "",
        md_table,
        "",
        f"What it shows: {sentence}",
        "",
    ]
    atomic_write_text(md, text + "\n".join(section))
    print(f"\nwrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
