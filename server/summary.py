"""summary.md, summary.csv and curves.png: what a user reads after a run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..shared.config import RunConfig
from ..shared.datasets import DatasetInfo
from ..shared.files import atomic_write_bytes, atomic_write_csv, atomic_write_text
from ..shared.grouping import confusion_within
from .curves import curves_png

_HEADS = {"fedavg": "MLP head by FedAvg", "lda": "LDA head from summed statistics"}  # evaluation.json's fusion head


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def compression_text(cfg: RunConfig) -> str:
    """How the run compressed each device's model, in words."""
    c = cfg.compression()
    if c["sparsity"] == "2:4":
        what = "2:4 sparsity"
    elif c["sparsity"] == "unstructured":
        what = f"unstructured sparsity {c['budget']:g} of the conv weights"
    elif c["budget"] is None:
        what = "no cut"
    else:
        what = f"budget {c['budget']:g} ({cfg.criterion}" + (f", alpha={cfg.alpha:g}" if cfg.criterion == "papm" else "")
        what += (f", {cfg.steps} iterative cuts" if cfg.schedule == "iterative" else "")
        what += (", data-free" if cfg.data_free else "") + ")"
    if c["weight_bits"]:
        what += f", {c['weight_bits']}-bit weights ({c['weight_quant']})"
    what += f" (level {cfg.level})" if cfg.level else ""
    return what + (f"; baseline {cfg.baseline}: one model for all classes" if cfg.baseline != "none" else "")


def finetune_table(devices: list[dict]) -> list[str]:
    """Each device's test accuracy on its classes through fine-tuning: after the cut (BatchNorm re-estimated),
    after every FedAvg round, and as it ships (after BatchNorm re-estimation and any weight rounding)."""
    rounds = sorted({r["round"] for d in devices for r in d.get("test_accuracy_per_round", [])})
    if not rounds:
        return []
    lines = ["", "## Fine-tuning (each device's test accuracy on its classes)", "",
             "| after | " + " | ".join(f"device {d['device']}" for d in devices) + " |",
             "|---|" + "---:|" * len(devices)]
    bn = all(d.get("test_accuracy_after_bn_recalibrate") for d in devices)
    cut = [(d.get("test_accuracy_after_bn_recalibrate" if bn else "test_accuracy_after_cut") or {}).get("group")
           for d in devices]
    lines.append(f"| the cut{' (BatchNorm re-estimated)' if bn else ''} | " + " | ".join(_pct(a) for a in cut) + " |")
    for r in rounds:
        acc = [next((x["group"] for x in d.get("test_accuracy_per_round", []) if x["round"] == r), None) for d in devices]
        lines.append(f"| round {r} | " + " | ".join(_pct(a) for a in acc) + " |")
    lines.append("| the end (as shipped) | " + " | ".join(_pct(d["test_accuracy"]["group"]) for d in devices) + " |")
    return lines


def summary_markdown(cfg: RunConfig, info: DatasetInfo, ev: dict, curves: bool = False,
                     label_skew: float | None = None) -> str:
    base, fusion, fed = ev["base"], ev["fusion"], ev["federated"]
    lines = [
        f"# PAPM-FL run: {Path(cfg.run_dir).name}",
        "",
        f"{info.name}, {info.num_classes} classes, {cfg.nodes} nodes, K={cfg.devices} devices, {compression_text(cfg)}, "
        f"width {cfg.width:g}; test split: {ev['test_samples']} samples.",
        *([] if label_skew is None else ["", f"Label skew across the nodes' training data: {label_skew:.3f} (0: every "
                                         "node holds the same class mix; 1: no two nodes share a class)."]),
        "",
        "## Accuracy",
        "",
        "| model | params | server test accuracy | federated accuracy (nodes' local splits) |",
        "|---|---:|---:|---:|",
        f"| baseline (unsplit base model) | {base['params']:,} | {_pct(base['accuracy'])} | {_pct(fed['base_accuracy'])} |",
        f"| fusion (K pruned extractors + {_HEADS.get(fusion.get('head'), 'head')}) | {fusion['params']:,} | {_pct(fusion['accuracy'])} | {_pct(fed['fusion_accuracy'])} |",
        *(["", "![the server's test accuracy round by round](curves.png)"] if curves else []),
        "",
        "## Devices",
        "",
        "| device | classes | params | non-zero | reduction | MACs | checkpoint bytes | accuracy (all classes) | accuracy (its classes) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in ev["devices"]:
        nonzero = d.get("size", {}).get("nonzero_params", d["params_after"])
        lines.append(f"| {d['device']} | {', '.join(d['class_names'])} | {d['params_after']:,} | {nonzero:,} | {d['reduction']:.4f} | "
                     f"{d['macs_after']:,} | {d['bytes']:,} | {_pct(d['test_accuracy']['all'])} | {_pct(d['test_accuracy']['group'])} |")
    if "bundle" in ev:
        acc = ev["bundle"]["accuracy"]
        lines += ["", "## Edge bundle (ONNX Runtime, test split)", "",
                  f"`bundle/` (manifest.json with sha256 of every file; PyTorch vs ONNX max |diff| {ev['bundle']['max_abs_diff']:.2e}, "
                  "each file within its tolerance in `bundle/parity.json`).", "",
                  "| precision | split model | unsplit base |", "|---|---:|---:|"]
        for precision in ("fp32", "int8"):
            if precision in acc:
                lines.append(f"| {precision} | {_pct(acc[precision]['split'])} | {_pct(acc[precision]['base'])} |")
    lines += finetune_table(ev["devices"])
    lines += ["", "## Per-class test accuracy", "", "| class | baseline | fusion | device (its group holds the class) |",
              "|---|---:|---:|---:|"]
    holder = {name: d["device"] for d in ev["devices"] for name in d["class_names"]}
    for name in info.class_names:
        lines.append(f"| {name} | {_pct(base['per_class'].get(name))} | {_pct(fusion['per_class'].get(name))} | "
                     f"{holder.get(name, '-')} |")
    lines += errors_table(info, ev)
    lines += ["", "## What happened", ""]
    for f in ev["failures"]:
        if f.get("left_run", True):
            lines.append(f"- phase {f['phase']}: node with partition-id {f['partition_id']} failed ({f['reason']}); "
                         "it left the run")
        else:
            lines.append(f"- phase {f['phase']}: node with partition-id {f['partition_id']} could not export "
                         f"{f.get('item', 'its file')} ({f['reason']}); another node took the job over")
    for stop in ev.get("stops", []):
        lines.append(f"- the run stopped in phase {stop['phase']} ({stop['reason']}) and was resumed later; "
                     "completed phases were kept")
    if not ev["failures"] and not ev.get("stops"):
        lines.append("- every node answered in every phase")
    return "\n".join(lines) + "\n"


def errors_table(info: DatasetInfo, ev: dict, top: int = 5) -> list[str]:
    """Where the test errors go: between classes of one device's group (its specialist sees both) or between
    groups (only the fusion head can tell them apart), for the base and the split model, and the mistakes
    that grew most. Empty for runs evaluated before evaluation.json kept the confusion counts."""
    if "confusion" not in ev["base"] or "confusion" not in ev["fusion"]:
        return []
    index = {name: i for i, name in enumerate(info.class_names)}
    groups = [[index[n] for n in d["class_names"] if n in index] for d in ev["devices"]]
    group_of = {c: g for g, classes in enumerate(groups) for c in classes}
    lines = ["", "## Where the errors go (server test split)", "",
             "| model | errors | between classes of one group | between groups |", "|---|---:|---:|---:|"]
    conf = {}
    for label, key in (("baseline", "base"), ("fusion", "fusion")):
        conf[key] = np.asarray(ev[key]["confusion"], dtype=np.int64)
        errors = int(conf[key].sum() - np.trace(conf[key]))
        within = round(errors * confusion_within(conf[key], groups)) if errors else 0
        lines.append(f"| {label} | {errors:,} | {within:,} | {errors - within:,} |")
    grown = conf["fusion"] - conf["base"]
    np.fill_diagonal(grown, 0)
    pairs = [(int(grown[t, p]), t, p) for t, p in zip(*np.nonzero(grown > 0))]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    if pairs:
        lines += ["", "Mistakes that grew most (true class taken for another; baseline -> fusion):", ""]
        for n, t, p in pairs[:top]:
            where = "one group" if t in group_of and group_of.get(t) == group_of.get(p) else "between groups"
            lines.append(f"- {info.class_names[t]} taken for {info.class_names[p]}: {conf['base'][t, p]} -> "
                         f"{conf['fusion'][t, p]} (+{n}, {where})")
    return lines


def summary_rows(info: DatasetInfo, ev: dict) -> list[dict]:
    blank = {"params": "", "baseline_accuracy": "", "fusion_accuracy": "", "federated_accuracy": "", "group_accuracy": "",
             "bytes": "", "macs": ""}
    rows = [
        {"row": "accuracy", "name": "baseline", **blank, "params": ev["base"]["params"], "baseline_accuracy": ev["base"]["accuracy"],
         "federated_accuracy": ev["federated"]["base_accuracy"]},
        {"row": "accuracy", "name": "fusion", **blank, "params": ev["fusion"]["params"], "fusion_accuracy": ev["fusion"]["accuracy"],
         "federated_accuracy": ev["federated"]["fusion_accuracy"]},
    ]
    for d in ev["devices"]:  # a device's own model alone: all classes, and its group's classes
        rows.append({"row": "device", "name": f"device-{d['device']}:" + ", ".join(d["class_names"]), **blank,
                     "params": d["params_after"], "fusion_accuracy": d["test_accuracy"]["all"],
                     "group_accuracy": d["test_accuracy"]["group"], "bytes": d["bytes"], "macs": d["macs_after"]})
    for name in info.class_names:
        rows.append({"row": "class", "name": name, **blank, "baseline_accuracy": ev["base"]["per_class"].get(name),
                     "fusion_accuracy": ev["fusion"]["per_class"].get(name)})
    return rows


def write_summary(run_dir: Path, cfg: RunConfig, info: DatasetInfo, ev: dict, metrics: list[dict]) -> None:
    png = curves_png(metrics, ev["base"]["accuracy"])
    if png:
        atomic_write_bytes(run_dir / "curves.png", png)
    skew = [m["label_skew"] for m in metrics if m.get("phase") == "assignment" and "label_skew" in m]
    atomic_write_text(run_dir / "summary.md", summary_markdown(cfg, info, ev, curves=png is not None,
                                                               label_skew=skew[-1] if skew else None))
    atomic_write_csv(run_dir / "summary.csv", summary_rows(info, ev))
