"""Low-bit weights: test accuracy against weight bits, round-to-nearest against GPTQ, no fine-tuning.

    python benchmarks/bench_lowbit.py --base base.pt [--data-root ROOT] [--bits 8 4 3 2] [--samples 256]
                                      [--seed 0] [--out benchmarks] [--note TEXT]

For each bit width the base is copied and every Conv2d/Linear weight (the classifier included) is
fake-quantised per output channel, symmetric, to ``2**bits - 1`` levels, through
``papm.shared.compression.quantize_weights`` (what ``papm prune --weight-bits`` uses), two ways:

  rtn   round to nearest, weight by weight (no data);
  gptq  GPTQ / Optimal Brain Compression, layer by layer in forward order, each layer's rounding
        error compensated on its not-yet-rounded columns through the inverse input Hessian of
        ``--samples`` training images (a seeded choice from the train split; never val or test).

Each copy is evaluated on the whole test split (all classes), as is the unquantised fp32 base.
Biases and BatchNorm stay fp32. Everything runs in PyTorch: ONNX Runtime has no CPU kernels for
2-7 bit weights, and 8 bits here is weight-only fake quantisation (fp32 activations), not the INT8
QDQ graph of ``papm export --int8`` (weights and activations; its accuracy is in RESULTS.md).

Storage column: an estimate of a packed format, conv/linear weights x bits / 8 plus one fp32 scale
per output channel, in KiB, next to the same weights at fp32. Nothing here writes that format: a
model saved after quantisation stays an fp32 file holding the rounded values.

Determinism: RTN depends on the weights alone; GPTQ's calibration images are a seeded choice
(``--seed``), so a rerun on the same base gives the same numbers (up to float summation order across
machines/thread counts).

Writes ``<out>/bench_lowbit.json`` (every run: metadata and rows; a rerun with the same base, bits,
samples and seed replaces its earlier entry) and appends a section to ``<out>/bench_lowbit.md``
with the command, machine, torch version and date above the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_record import code, cpu_model, pct
from papm.shared.checkpoint import load_checkpoint
from papm.shared.compression import quantize_weights
from papm.shared.compression_options import ALLOWED_BITS
from papm.shared.datasets import load_dataset_like
from papm.shared.files import atomic_write_text
from papm.shared.lowbit import distinct_values_per_channel
from papm.shared.models import count_params
from papm.shared.sparsity import weight_layers
from papm.shared.training import evaluate

METHODS = ("rtn", "gptq")


def weight_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(conv/linear weight parameters, their output channels, every other parameter: biases, BatchNorm)."""
    layers = weight_layers(model, include_classifier=True)
    weights = sum(m.weight.numel() for m in layers.values())
    channels = sum(m.weight.shape[0] for m in layers.values())
    return weights, channels, count_params(model) - weights


def storage_kib(weights: int, channels: int, bits: int | None) -> float:
    """Estimated packed size of the conv/linear weights: bits/8 bytes each plus an fp32 scale per output
    channel (``bits=None``: plain fp32, no scales)."""
    if bits is None:
        return weights * 4 / 1024
    return (weights * bits / 8 + channels * 4) / 1024


def table(rows: list[dict], base: dict) -> str:
    head = ["bits", "rtn %", "gptq %", "gptq - rtn (points)", "gptq time s",
            "weight storage KiB (est., packed)", "vs fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| " + " | ".join(["fp32 (base)", pct(base["accuracy"]), pct(base["accuracy"]), "", "",
                                    f"{base['storage_kib']:.1f}", "1.00x"]) + " |")
    for r in rows:
        diff = 100 * (r["gptq_accuracy"] - r["rtn_accuracy"])
        cells = [str(r["bits"]), pct(r["rtn_accuracy"]), pct(r["gptq_accuracy"]), f"{diff:+.2f}",
                 f"{r['gptq_seconds']:.2f}", f"{r['storage_kib']:.1f}",
                 f"{r['storage_kib'] / base['storage_kib']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="trained base checkpoint (papm train)")
    ap.add_argument("--data-root", default=None, help="dataset root (default: the checkpoint's own source)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2], choices=ALLOWED_BITS, metavar="BITS",
                    help=f"weight bit widths, each one of {', '.join(map(str, ALLOWED_BITS))} (default: 8 4 3 2)")
    ap.add_argument("--samples", type=int, default=256, help="GPTQ calibration images from the train split")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration image choice")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--note", default=None, help="a line for the Markdown section, e.g. how the base was trained")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    command = "python benchmarks/bench_lowbit.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()

    base, info, ckpt = load_checkpoint(args.base)
    base.eval()
    margs = ckpt["model_args"]
    splits = load_dataset_like(info, root=args.data_root)
    test, train = splits.test, splits.train
    calib_n = min(args.samples, len(train))
    weights, channels, others = weight_counts(base)

    base_row = {"params": count_params(base), "accuracy": round(evaluate(base, test, info)["accuracy"], 6),
                "storage_kib": round(storage_kib(weights, channels, None), 2)}
    print(f"base: {base_row['params']:,} params ({weights:,} conv/linear weights in {channels:,} output channels, "
          f"{others:,} biases/BN kept fp32), test accuracy {100 * base_row['accuracy']:.2f}% ({len(test)} test images; "
          f"GPTQ calibration on {calib_n} of {len(train)} training images, seed {args.seed})", flush=True)

    rows = []
    for bits in args.bits:
        row = {"bits": bits, "storage_kib": round(storage_kib(weights, channels, bits), 2)}
        for method in METHODS:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            meta = quantize_weights(model, bits, method, train if method == "gptq" else None, info,
                                    samples=args.samples, seed=args.seed)
            seconds = time.perf_counter() - t0
            levels = max(distinct_values_per_channel(m.weight) for m in weight_layers(model).values())
            if levels > 2 ** bits - 1:  # the quantiser's contract: -qmax..qmax times one scale per channel
                raise SystemExit(f"{method} at {bits} bits left {levels} distinct values in a channel (> {2 ** bits - 1})")
            row[f"{method}_accuracy"] = round(evaluate(model, test, info)["accuracy"], 6)
            row[f"{method}_seconds"] = round(seconds, 3)
            row[f"{method}_max_levels_per_channel"] = levels
            if "calibration_samples" in meta:
                row["calibration_samples"] = meta["calibration_samples"]
        rows.append(row)
        print(f"{bits} bits: rtn {100 * row['rtn_accuracy']:.2f}%, gptq {100 * row['gptq_accuracy']:.2f}% "
              f"(GPTQ {row['gptq_seconds']:.2f} s); weights ~{row['storage_kib']:.1f} KiB packed "
              f"vs {base_row['storage_kib']:.1f} KiB fp32", flush=True)

    md_table = table(rows, base_row)
    print()
    print(md_table)

    date = time.strftime("%Y-%m-%d %H:%M %Z")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    machine = f"{cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads} (torch threads {torch.get_num_threads()})"
    run = {
        "date": date, "command": command, "machine": machine, "torch": torch.__version__, "python": platform.python_version(),
        "base": str(args.base), "dataset": info.name, "data_root": args.data_root or info.source, "width": margs["width"],
        "input": f"{info.in_channels}x{info.image_size}x{info.image_size}", "test_images": len(test),
        "classes": "all", "bits": args.bits, "samples": args.samples, "seed": args.seed,
        "calibration": f"{calib_n} seeded images of the train split ({len(train)}); never val or test",
        "quantisation": "symmetric per output channel, 2**bits-1 levels, scale max|W[c]|/qmax; every Conv2d/Linear "
                        "weight incl. classifier; biases and BatchNorm fp32; fake-quantised (fp32 tensors), PyTorch",
        "conv_linear_weights": weights, "output_channels": channels, "other_params_fp32": others,
        "storage_note": "estimate of a packed format: weights x bits/8 + one fp32 scale per output channel; "
                        "the saved model file stays fp32 holding the rounded values",
        "note": args.note, "base_result": base_row, "rows": rows, "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "bench_lowbit.json"
    runs = json.loads(js.read_text()).get("runs", []) if js.exists() else []
    key = lambda r: (r["base"], json.dumps(r["bits"]), r["samples"], r["seed"])
    runs = [r for r in runs if key(r) != key(run)] + [run]
    atomic_write_text(js, json.dumps({"runs": runs}, indent=2) + "\n")

    md = out / "bench_lowbit.md"
    text = md.read_text() if md.exists() else (
        "# Low-bit weights: accuracy against bits, RTN vs GPTQ (no fine-tuning)\n\n"
        "Written by `benchmarks/bench_lowbit.py`; one section per run. Test accuracy (%) of a trained base after "
        "fake-quantising every Conv2d/Linear weight (classifier included) per output channel, symmetric, to "
        "2^bits - 1 levels: *rtn* rounds to nearest (no data); *gptq* (Optimal Brain Compression / GPTQ) rounds "
        "layer by layer in forward order and compensates each rounding error through the inverse input Hessian of "
        "seeded training images. Biases and BatchNorm stay fp32. No fine-tuning after quantisation.\n")
    section = [
        f"\n## {info.name} {run['input']}, width {margs['width']}, base `{args.base}` ({date})\n",
        f"- command: {code(command)}",
        *([f"- base: {args.note}"] if args.note else []),
        f"- machine: {machine}; torch {torch.__version__}, Python {run['python']}; {run['seconds']} s in all",
        (f"- test images: {len(test)}, all classes (one image = {100 / len(test):.2f} points); GPTQ calibration: {calib_n} images drawn (seed {args.seed}) from "
         f"the {len(train)}-image train split, never val or test; damp 0.01, batches of 64"),
        ("- runtime: every row is evaluated in PyTorch. Bit widths below 8 have no ONNX Runtime CPU kernels; the "
         "8-bit row is weight-only fake quantisation (fp32 activations), not the INT8 QDQ graph of "
         "`papm export --int8` (weights and activations through ONNX Runtime; its accuracy is in RESULTS.md)"),
        (f"- storage: an estimate of a packed format, not a file we write: {weights:,} conv/linear weights x bits/8 "
         f"+ one fp32 scale for each of {channels:,} output channels, next to the same weights at fp32 "
         f"({others:,} biases/BatchNorm parameters, {others * 4 / 1024:.1f} KiB, stay fp32 in every row and are not "
         "counted). The model file saved after quantisation (`papm prune --weight-bits`) stays fp32, holding the "
         "rounded values"),
        ("- gptq time: the quantisation alone (calibration forward passes, Hessians, column updates) on the machine "
         f"above, OMP_NUM_THREADS={threads}; RTN took at most {max(r['rtn_seconds'] for r in rows):.3f} s"),
        ("- determinism: RTN reads no data; the calibration images are a seeded choice, so reruns give the same "
         "numbers (up to float summation order across machines/thread counts)"),
        "",
        md_table,
        "",
    ]
    atomic_write_text(md, text + "\n".join(section))
    print(f"\nwrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
