"""Data-free restoration against plain weight pruning, test accuracy without fine-tuning, at several budgets.

    python benchmarks/bench_data_free.py --base base.pt [--data-root ROOT] [--budgets 0.1 0.2 0.3 0.5 0.7]
                                         [--classes all|3,5,8] [--out benchmarks] [--note TEXT]

For each budget the base is copied and cut with the weights-only criterion (``l1``: PAPM's
filter-norm term alone, i.e. alpha = 1; no APoZ, no data) through ``prune_model``. The same cut
is then evaluated four ways on the test split, with no fine-tuning in any of them:

  (a) plain       the cut model as it is (no data);
  (b) restored    ``restore_after_pruning`` on that cut: removed channels folded into the next
                  layer by least squares and BatchNorm statistics corrected, from the weights
                  alone (no data);
  (c) plain+BN    (a) with BatchNorm statistics re-estimated on 2048 training images (all of them
                  where the training split is smaller; DOES use data);
  (d) restored+BN (b) with the same re-estimation (DOES use data).

(c) and (d) are references for what a device with a little data would get; the data-free rows
are (a) and (b). Also reported: the base's accuracy, and how often (a) and (b) keep the base's
top-1 prediction. Accuracy over all classes, and over the group's classes with ``--classes``.

Determinism: the l1 cut depends on the weights only (``prune_model`` also seeds torch with 0, which
only the ``random`` criterion would use), restoration reads no data, and the 2048 BN images are a
seeded choice (seed 0) with seeded augmentation (seed 0), so a rerun on the same base gives the same
numbers (up to float summation order across machines/thread counts).

Writes ``<out>/bench_data_free.json`` (every run: metadata and rows; a rerun with the same base,
classes and budgets replaces its earlier entry) and appends a section to ``<out>/bench_data_free.md``
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
from papm.shared.bn import recalibrate_bn
from papm.shared.checkpoint import load_checkpoint
from papm.shared.datasets import load_dataset_like
from papm.shared.files import atomic_write_text
from papm.shared.models import count_params
from papm.shared.restore import restore_after_pruning
from papm.shared.specialise import PruneSettings, parse_classes, prune_model
from papm.shared.inference import predict_logits

BN_IMAGES = 2048
BN_SEED = 0
VARIANTS = ("plain", "restored", "plain_bn", "restored_bn")


def scores(logits: torch.Tensor, y: torch.Tensor, classes: list[int] | None, ref_pred: torch.Tensor | None) -> dict:
    """Accuracy on all test images, on the group's classes, and top-1 agreement with the base."""
    pred = logits.argmax(1)
    out = {"all": float((pred == y).float().mean())}
    if classes is not None:
        mask = torch.isin(y, torch.tensor(classes))
        out["group"] = float((pred[mask] == y[mask]).float().mean())
    if ref_pred is not None:
        out["agree"] = float((pred == ref_pred).float().mean())
    return out


def table(rows: list[dict], base: dict, grouped: bool) -> str:
    head = ["budget", "params", "reduction"]
    keys = []
    for v, label in zip(VARIANTS, ("plain", "restored", "plain+BN*", "restored+BN*")):
        head.append(f"{label} all %")
        keys.append(f"{v}_all")
        if grouped:
            head.append(f"{label} group %")
            keys.append(f"{v}_group")
    head += ["plain agree %", "restored agree %"]
    keys += ["plain_agree", "restored_agree"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_cells = ["base (0)", f"{base['params']:,}", "0"]
    for k in keys:
        v = k.rsplit("_", 1)[1]
        base_cells.append(pct(base.get(v)) if v in ("all", "group") else "100.00")
    lines.append("| " + " | ".join(base_cells) + " |")
    for r in rows:
        cells = [f"{r['budget']:g}", f"{r['params']:,}", f"{r['reduction']:.3f}"] + [pct(r.get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="trained base checkpoint (papm train)")
    ap.add_argument("--data-root", default=None, help="dataset root (default: the checkpoint's own source)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7])
    ap.add_argument("--classes", default="all", help="'all' or a group, e.g. 3,5,8 (ids or names)")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--note", default=None, help="a line for the Markdown section, e.g. how the base was trained")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_data_free.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()

    base, info, ckpt = load_checkpoint(args.base)
    margs = ckpt["model_args"]
    splits = load_dataset_like(info, root=args.data_root)
    test = splits.test
    classes = None if args.classes.strip().lower() == "all" else parse_classes(args.classes, info)
    bn_data = splits.train.sample(BN_IMAGES, BN_SEED)
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)

    with torch.no_grad():
        base_logits = predict_logits(base, test, info)
    base_pred = base_logits.argmax(1)
    base_row = {"params": count_params(base), **scores(base_logits, test.y, classes, None)}
    print(f"base: {base_row['params']:,} params, test accuracy {100 * base_row['all']:.2f}%"
          + (f", group {classes} {100 * base_row['group']:.2f}%" if classes else "")
          + f" ({len(test)} test images; BN re-estimation on {len(bn_data)} training images)", flush=True)

    rows = []
    for budget in args.budgets:
        t0 = time.perf_counter()
        plain = copy.deepcopy(base).eval()
        settings = PruneSettings(budget=budget, criterion="l1").validate()
        result, _ = prune_model(plain, margs, info, settings, None)
        restored = copy.deepcopy(plain)
        stats = restore_after_pruning(base, restored, result.kept, example)
        row = {"budget": budget, "params": result.params_after, "reduction": round(result.reduction, 6)}
        models = {"plain": plain, "restored": restored}
        for name in ("plain", "restored"):
            models[f"{name}_bn"] = recalibrate_bn(copy.deepcopy(models[name]), bn_data, info, "cpu", 128, BN_SEED)
        for name in VARIANTS:
            with torch.no_grad():
                s = scores(predict_logits(models[name], test, info), test.y, classes, base_pred)
            for k, v in s.items():
                row[f"{name}_{k}"] = round(v, 6)
        fits = [v["rel_error"] for v in stats.values() if "rel_error" in v]
        row["restore_mean_fit_rel_error"] = round(sum(fits) / len(fits), 4) if fits else None
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"budget {budget:g}: {row['params']:,} params (-{100 * row['reduction']:.1f}%): "
              + ", ".join(f"{v} {100 * row[f'{v}_all']:.2f}%" for v in VARIANTS) + f"  [{row['seconds']}s]", flush=True)

    grouped = classes is not None
    md_table = table(rows, base_row, grouped)
    print()
    print(md_table)

    date = time.strftime("%Y-%m-%d %H:%M %Z")
    machine = f"{cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    run = {
        "date": date, "command": command, "machine": machine, "torch": torch.__version__, "python": platform.python_version(),
        "base": str(args.base), "dataset": info.name, "data_root": args.data_root or info.source, "width": margs["width"],
        "input": f"{info.in_channels}x{info.image_size}x{info.image_size}", "test_images": len(test),
        "classes": classes if grouped else "all", "budgets": args.budgets, "criterion": "l1 (PAPM alpha=1, weights only)",
        "bn_images": len(bn_data), "bn_seed": BN_SEED, "note": args.note, "base_result": base_row, "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "bench_data_free.json"
    runs = json.loads(js.read_text()).get("runs", []) if js.exists() else []
    key = lambda r: (r["base"], json.dumps(r["classes"]), json.dumps(r["budgets"]))  # noqa: E731
    runs = [r for r in runs if key(r) != key(run)] + [run]
    atomic_write_text(js, json.dumps({"runs": runs}, indent=2) + "\n")

    md = out / "bench_data_free.md"
    text = md.read_text() if md.exists() else (
        "# Data-free restoration vs plain weight pruning (no fine-tuning)\n\n"
        "Written by `benchmarks/bench_data_free.py`; one section per run. Test accuracy (%) right after a "
        "weights-only (`l1`, PAPM alpha=1) channel cut of a trained base. *plain* and *restored* use no data; "
        "columns marked * re-estimate BatchNorm on up to 2048 training images (all of them where the split is "
        "smaller) and DO use data: a reference, not a data-free result. "
        "*agree*: share of test images on which the pruned model keeps the base's top-1 prediction.\n")
    section = [
        f"\n## {info.name} {run['input']}, width {margs['width']}, base `{args.base}` ({date})\n",
        f"- command: {code(command)}",
        *([f"- base: {args.note}"] if args.note else []),
        f"- machine: {machine}; torch {torch.__version__}, Python {run['python']}; {run['seconds']} s in all",
        f"- test images: {len(test)}" + (f"; group classes {classes}" if grouped else "; all classes")
        + f"; BN re-estimation (* columns): {len(bn_data)} training images (seed {BN_SEED}), augmented, batch 128",
        "- determinism: the l1 cut is a function of the weights alone (no seed involved) and restoration reads "
        "no data; the BN images and their augmentation are seeded, so reruns give the same numbers",
        "",
        md_table,
        "",
    ]
    atomic_write_text(md, text + "\n".join(section))
    print(f"\nwrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
