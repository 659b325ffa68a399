"""Split INT8 latency against the unsplit base model, fp32 and INT8, at batch 1, on this CPU.

    python benchmarks/bench_split_latency.py                       # width 1.0, 3x32x32, K=3, budget 0.77
    python benchmarks/bench_split_latency.py --checkpoint base.pt  # a trained base instead of random weights

Latency does not depend on what the weights learned, so by default the base is a
freshly initialised ResNet-18 (width 1.0 = 11.17M parameters); K copies are pruned
to the budget with L1 scores (PAPM needs data; its channel counts differ, the cut
is the same size), exported to ONNX and quantised to INT8 (static QDQ, per-channel,
calibrated on random normal inputs here) with unsigned (u8) and signed (s8) activations.
The unsplit base is quantised the same way: the fair comparison, since a user could
quantise the base too. Median and p95 at 1 thread and all threads, with the CPU's ISA and
the onnxruntime version. Goal: split INT8 (slowest part + head) <= 0.10x the unsplit fp32
base and <= 0.45x the unsplit INT8 base at width 1.0, 3x32x32, K=3, budget 0.77, 1 thread.
Accuracy is measured on real runs by ``papm export`` and ``papm bench``, not here.
Writes benchmarks/bench_latency.json and adds a row to benchmarks/bench_latency.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from papm.export.onnx_export import export_base, export_head, export_part
from papm.export.quantize import quantize_int8
from papm.shared.fusion import FusionHead
from papm.shared.importance import make_importance
from papm.shared.models import ResNet18, count_params, model_args
from papm.shared.pruning import prune_to_budget
from bench_record import record


def batch1_ms(path: Path, x: np.ndarray, runs: int, threads: int) -> tuple[float, float]:
    """(median, p95) milliseconds of one-image inference after warm-up."""
    from papm.deploy.runtime import make_session

    sess = make_session(path, threads)
    name = sess.get_inputs()[0].name
    feed = {name: x[:1]}
    for _ in range(max(5, runs // 10)):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 95))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.77)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--checkpoint", default=None, help="trained base checkpoint (default: random weights)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.checkpoint:
        from papm.shared.checkpoint import load_checkpoint

        base, info, ckpt = load_checkpoint(args.checkpoint)
        margs = ckpt["model_args"]
        shape = (info.in_channels, info.image_size, info.image_size)
    else:
        base = ResNet18(args.classes, args.channels, args.width).eval()
        margs = model_args(args.classes, args.channels, args.width)
        shape = (args.channels, args.image_size, args.image_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((64, *shape), generator=gen)
    work = Path(tempfile.mkdtemp(prefix="bench-split-"))
    export_base(base, work / "base.onnx", x)
    xs = x.numpy()
    quantize_int8(work / "base.onnx", work / "base.int8-u8.onnx", xs, "u8")
    quantize_int8(work / "base.onnx", work / "base.int8-s8.onnx", xs, "s8")
    parts = []
    for k in range(args.devices):
        model = copy.deepcopy(base)
        torch.manual_seed(k)  # copies differ as class-specialised ones would
        for p in model.parameters():
            p.data.mul_(1 + 0.1 * torch.randn_like(p))
        prune_to_budget(model, margs, x[:1], make_importance("l1", model), args.budget, round_to=args.round_to)
        export_part(model, work / f"part{k}.onnx", x)
        for act in ("u8", "s8"):
            quantize_int8(work / f"part{k}.onnx", work / f"part{k}.int8-{act}.onnx", xs, act)
        parts.append(model)
    with torch.no_grad():
        feats = torch.cat([m.features(x) for m in parts], dim=1)
    head = FusionHead([m.fc.in_features for m in parts], args.classes)
    export_head(head, work / "head.onnx", feats)
    import onnxruntime

    from papm.export.quantize import int8_settings
    from papm.shared.cpu import cpu_features

    all_threads = os.cpu_count() or 1
    row = {
        "date": time.strftime("%Y-%m-%d"), "width": float(margs["width"]), "input": "x".join(map(str, shape)),
        "devices": args.devices, "budget": args.budget, "round_to": args.round_to, "base_params": count_params(base),
        "part_params": [count_params(m) for m in parts], "runs": args.runs, "isa": cpu_features()["isa"],
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "reduce_range": int8_settings("u8")["reduce_range"], "weights": "trained checkpoint" if args.checkpoint else "random init",
    }
    print(f"{row['isa']}; onnxruntime {row['onnxruntime']}; batch 1, median of {args.runs} runs (p95 in the JSON)")
    for threads in sorted({1, all_threads}):
        t = f"{threads}t"
        ms = {name: batch1_ms(work / f"{name}.onnx", xs, args.runs, threads) for name in ("base", "base.int8-u8", "base.int8-s8")}
        for k in range(args.devices):
            for suffix in ("", ".int8-u8", ".int8-s8"):
                ms[f"part{k}{suffix}"] = batch1_ms(work / f"part{k}{suffix}.onnx", xs, args.runs, threads)
        head_ms = batch1_ms(work / "head.onnx", feats.numpy(), args.runs, threads)
        for key, (med, p95) in ms.items():
            row[f"{key}_{t}_ms"], row[f"{key}_{t}_p95_ms"] = round(med, 3), round(p95, 3)
        row[f"head_{t}_ms"] = round(head_ms[0], 3)
        for suffix, label in (("", "fp32"), (".int8-u8", "int8_u8"), (".int8-s8", "int8_s8")):
            split = max(ms[f"part{k}{suffix}"][0] for k in range(args.devices)) + head_ms[0]
            row[f"split_{label}_{t}_ms"] = round(split, 3)
            row[f"split_{label}_vs_base_fp32_{t}"] = round(split / ms["base"][0], 3)
            row[f"split_{label}_vs_base_int8_{t}"] = round(split / ms["base.int8-u8"][0], 3)
        print(f"{threads} thread(s): base fp32 {ms['base'][0]:.3f} ms, base INT8 u8 {ms['base.int8-u8'][0]:.3f} ms, "
              f"s8 {ms['base.int8-s8'][0]:.3f} ms; head {head_ms[0]:.3f} ms")
        for label in ("fp32", "int8_u8", "int8_s8"):
            print(f"  split {label:<8} (slowest part + head): {row[f'split_{label}_{t}_ms']:.3f} ms = "
                  f"{row[f'split_{label}_vs_base_fp32_{t}']:.3f}x base fp32, {row[f'split_{label}_vs_base_int8_{t}']:.3f}x base INT8")
    row["goal"] = "split INT8 <= 0.10x base fp32 and <= 0.45x base INT8 (1 thread, width 1.0, K=3, budget 0.77)"
    js, md = record(args.out, "bench_latency", row, {
        "date": "date", "width": "width", "K": "devices", "budget": "budget", "round-to": "round_to", "ISA": "isa",
        "base fp32 ms (1t)": "base_1t_ms", "base INT8 ms (1t)": "base.int8-u8_1t_ms", "split INT8 u8 ms (1t)": "split_int8_u8_1t_ms",
        "vs base fp32": "split_int8_u8_vs_base_fp32_1t", "vs base INT8": "split_int8_u8_vs_base_int8_1t",
        "split INT8 s8 ms (1t)": "split_int8_s8_1t_ms"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
