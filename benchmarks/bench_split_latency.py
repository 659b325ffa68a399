"""Split INT8 latency against the unsplit fp32 base model, at batch 1, on this CPU.

    python benchmarks/bench_split_latency.py                       # width 1.0, 3x32x32, K=3, budget 0.77
    python benchmarks/bench_split_latency.py --checkpoint base.pt  # a trained base instead of random weights

Latency does not depend on what the weights learned, so by default the base is a
freshly initialised ResNet-18 (width 1.0 = 11.17M parameters); K copies are pruned
to the budget with L1 scores (PAPM needs data; its channel counts differ, the cut
is the same size), exported to ONNX and quantised to INT8 (static QDQ, per-channel,
calibrated on random normal inputs here). The goal of the export issue: split INT8
latency (slowest part + head) <= 0.2x the unsplit fp32 base model. Accuracy is
measured on real runs by ``papm export`` and ``papm bench``, not here.
Writes benchmarks/bench_split_latency.json and appends to benchmarks/bench_split_latency.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
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
    parts = []
    for k in range(args.devices):
        model = copy.deepcopy(base)
        torch.manual_seed(k)  # copies differ as class-specialised ones would
        for p in model.parameters():
            p.data.mul_(1 + 0.1 * torch.randn_like(p))
        prune_to_budget(model, margs, x[:1], make_importance("l1", model), args.budget, round_to=args.round_to)
        export_part(model, work / f"part{k}.onnx", x)
        quantize_int8(work / f"part{k}.onnx", work / f"part{k}.int8.onnx", x.numpy())
        parts.append(model)
    with torch.no_grad():
        feats = torch.cat([m.features(x) for m in parts], dim=1)
    head = FusionHead([m.fc.in_features for m in parts], args.classes)
    export_head(head, work / "head.onnx", feats)
    xs = x.numpy()
    base_ms = batch1_ms(work / "base.onnx", xs, args.runs, args.threads)
    part_fp32 = [batch1_ms(work / f"part{k}.onnx", xs, args.runs, args.threads) for k in range(args.devices)]
    part_int8 = [batch1_ms(work / f"part{k}.int8.onnx", xs, args.runs, args.threads) for k in range(args.devices)]
    head_ms = batch1_ms(work / "head.onnx", feats.numpy(), args.runs, args.threads)
    split_fp32 = max(m for m, _ in part_fp32) + head_ms[0]
    split_int8 = max(m for m, _ in part_int8) + head_ms[0]
    row = {
        "width": float(margs["width"]), "input": "x".join(map(str, shape)), "devices": args.devices, "budget": args.budget, "round_to": args.round_to,
        "base_params": count_params(base), "part_params": [count_params(m) for m in parts], "threads": args.threads,
        "runs": args.runs, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "base_fp32_ms": round(base_ms[0], 3), "base_fp32_p95_ms": round(base_ms[1], 3),
        "parts_fp32_ms": [round(m, 3) for m, _ in part_fp32], "parts_int8_ms": [round(m, 3) for m, _ in part_int8],
        "head_ms": round(head_ms[0], 3), "split_fp32_ms": round(split_fp32, 3), "split_int8_ms": round(split_int8, 3),
        "ratio_int8_split_vs_base": round(split_int8 / base_ms[0], 3), "ratio_fp32_split_vs_base": round(split_fp32 / base_ms[0], 3),
        "weights": "trained checkpoint" if args.checkpoint else "random init",
    }
    print(f"unsplit base fp32 ({row['base_params']:,} params): {base_ms[0]:.3f} ms median, {base_ms[1]:.3f} ms p95 (batch 1, {args.threads} thread)")
    for k in range(args.devices):
        print(f"part {k} ({row['part_params'][k]:,} params): fp32 {part_fp32[k][0]:.3f} ms, int8 {part_int8[k][0]:.3f} ms")
    print(f"head: {head_ms[0]:.3f} ms")
    print(f"split fp32 (slowest part + head): {split_fp32:.3f} ms = {row['ratio_fp32_split_vs_base']:.3f}x base")
    print(f"split int8 (slowest part + head): {split_int8:.3f} ms = {row['ratio_int8_split_vs_base']:.3f}x base (goal <= 0.2x)")
    js, md = record(args.out, "bench_split_latency", row, {
        "width": "width", "input": "input", "K": "devices", "budget": "budget", "round-to": "round_to", "threads": "threads",
        "base fp32 ms": "base_fp32_ms", "split fp32 ms": "split_fp32_ms", "split int8 ms": "split_int8_ms",
        "int8 split / base": "ratio_int8_split_vs_base", "weights": "weights"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
