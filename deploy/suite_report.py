"""`papm report DIR`: the tables and plots of a suite, regenerated from its run directories.

Writes ``summary_all.csv`` (one row per run: every varying key, seed, base and fusion accuracy,
fusion minus base, mean/max part parameters, part size, split latency, wall time),
``summary_all.md`` (mean and standard deviation over seeds per configuration, the baselines'
comparisons, a per-class table per configuration with the device group holding each class) and
PNG plots: fusion accuracy vs K, accuracy vs budget per criterion, accuracy vs split latency
(each when the suite varies what it shows). Nothing here trains: the numbers are read from
``evaluation.json``, ``devices/device-k/prune.json`` and the bundle, where the split latency is
measured (ONNX Runtime, batch 1, 1 thread, median, slowest part + head).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from ..shared.config import RunConfig
from ..shared.errors import PapmError
from ..shared.files import atomic_write_bytes, atomic_write_text
from ..shared.plots import figure_png, pyplot

IGNORED_KEYS = ("run-dir", "device", "timeout", "stop-after", "sign-key", "base-checkpoint")
REPORT_FILES = ("summary_all.csv", "summary_all.md")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def split_latency_ms(bundle_dir: Path, runs: int = 30, precision: str = "fp32") -> float | None:
    """Slowest part + head, batch 1, 1 thread, median over ``runs`` (None without a bundle, or without parts of
    that ``precision``: the INT8 parts run with the fp32 head, as `papm infer` runs them)."""
    import numpy as np

    from .bundle import load_bundle
    from .runtime import make_session

    if not (bundle_dir / "manifest.json").is_file():
        return None
    bundle = load_bundle(bundle_dir, quiet=True)
    if not all(precision in p["files"] for p in bundle.parts):
        return None
    inp = bundle.manifest["input"]

    def median_ms(entry: dict, shape: tuple) -> float:
        sess = make_session(bundle.read_verified(entry), 1, entry["file"])
        feed = {sess.get_inputs()[0].name: np.zeros(shape, np.float32)}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    parts = [median_ms(p["files"][precision], (1, inp["channels"], inp["image_size"], inp["image_size"])) for p in bundle.parts]
    head = median_ms(bundle.manifest["head"]["files"]["fp32"], (1, bundle.manifest["head"]["feature_size"]))
    return max(parts) + head


def collect(root: Path, measure_latency: bool = True) -> tuple[list[dict], list[str], list[dict]]:
    """(rows of finished runs, the varying keys, failed or unfinished runs) of the run folders under ``root``."""
    suite = _json(root / "suite.json") or {}
    run_dirs = sorted(p.parent for p in root.glob("*/config.json"))
    if not run_dirs:
        raise PapmError(f"{root} holds no run directories (*/config.json); point papm report at a suite's folder")
    # a run made before a key existed behaved as its default: without this, adding a run with a new key to an
    # older suite would show the old runs' value as None (a varying column of nothing)
    defaults = RunConfig().to_flower()
    configs = {d.name: {**defaults, **(_json(d / "config.json") or {})} for d in run_dirs}
    keys = sorted({k for c in configs.values() for k in c})
    varying = [k for k in keys if k not in IGNORED_KEYS and k != "fingerprint"
               and len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    if "seed" not in varying:
        varying.append("seed")
    rows, failed = [], []
    for d in run_dirs:
        ev, state = _json(d / "evaluation.json"), _json(d / "state.json") or {}
        entry = suite.get("runs", {}).get(d.name, {})
        if not ev or "bundle" not in state.get("completed", []):
            failed.append({"run": d.name, "error": entry.get("error", "unfinished (no evaluation or bundle)")})
            continue
        cfg = configs[d.name]
        parts = [_json(d / "devices" / f"device-{g}" / "prune.json") or {} for g in range(len(ev["devices"]))]
        manifest = _json(d / "bundle" / "manifest.json") or {}
        sizes = [p["files"]["fp32"]["bytes"] for p in manifest.get("parts", [])]
        params = [p.get("params_after", 0) for p in parts]
        # sparse parts keep their shapes: what shrinks is the non-zero count and the compressed size
        nonzero = [p.get("size", {}).get("nonzero_params", p.get("params_after", 0)) for p in parts]
        zipped = [p["size"]["compressed_bytes"] for p in parts if "size" in p]
        row = {"run": d.name, **{k: cfg.get(k) for k in varying},
               "base_accuracy": ev["base"]["accuracy"], "fusion_accuracy": ev["fusion"]["accuracy"],
               "fusion_minus_base": ev["fusion"]["accuracy"] - ev["base"]["accuracy"],
               "mean_part_params": round(statistics.mean(params)) if params else None, "max_part_params": max(params, default=None),
               "max_part_nonzero": max(nonzero, default=None),
               "base_params": ev["base"]["params"], "max_part_kb": round(max(sizes) / 1024, 1) if sizes else None,
               "max_part_zlib_kb": round(max(zipped) / 1024, 1) if zipped else None,
               "split_latency_ms": split_latency_ms(d / "bundle") if measure_latency else None,
               # int8=true: the INT8 split through ONNX Runtime (the bundle phase's accuracy on the test split)
               "int8_split_accuracy": ((ev.get("bundle") or {}).get("accuracy") or {}).get("int8", {}).get("split"),
               "int8_split_latency_ms": split_latency_ms(d / "bundle", precision="int8") if measure_latency else None,
               "wall_seconds": round(sum(v.get("seconds", 0) for v in state.get("phases", {}).values()), 1),
               "per_class": {c: (ev["base"]["per_class"].get(c), ev["fusion"]["per_class"].get(c)) for c in ev["base"]["per_class"]},
               "groups": [p.get("class_names", []) for p in parts]}
        rows.append(row)
    started = {d.name for d in run_dirs}  # a run refused before it wrote anything (a partition it cannot make) has no folder
    failed += [{"run": name, "error": e.get("error", "not run")} for name, e in sorted(suite.get("runs", {}).items())
               if e.get("status") != "done" and name not in started]
    return rows, varying, failed


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pct(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.2f} +- {100 * std:.2f}"


def configurations(rows: list[dict], varying: list[str]) -> dict[tuple, list[dict]]:
    """Runs grouped by every varying key but the seed."""
    keys = [k for k in varying if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(json.dumps(r.get(k)) for k in keys), []).append(r)
    return groups


def markdown(rows: list[dict], varying: list[str], failed: list[dict], root: Path) -> str:
    keys = [k for k in varying if k != "seed"]
    groups = configurations(rows, varying)
    # storage columns where some part is sparse or low-bit (the dense size says it all otherwise)
    sizes = any(r["max_part_nonzero"] != r["max_part_params"] for r in rows)
    int8 = any(r.get("int8_split_accuracy") is not None for r in rows)  # INT8 columns where some run exported INT8
    lines = [f"# Suite report: {root}", "", f"{len(rows)} finished runs, {len(failed)} failed or unfinished; mean +- "
             "standard deviation over seeds (accuracy in %, server-side test split). Regenerate with "
             f"`papm report {root}`.", "",
             "| " + " | ".join(keys + ["seeds", "base", "fusion", "fusion - base", "max part params"]
                               + (["max part non-zero", "max part zlib KiB"] if sizes else []) + ["split latency ms"]
                               + (["INT8 split (ONNX Runtime)", "INT8 split latency ms"] if int8 else [])) + " |",
             "|" + "---|" * (len(keys) + 6 + 2 * sizes + 2 * int8)]
    for combo, runs in groups.items():
        b, f, dlt = (_mean_std([r[k] for r in runs]) for k in ("base_accuracy", "fusion_accuracy", "fusion_minus_base"))
        lat = _mean_std([r["split_latency_ms"] for r in runs])
        q, qlat = _mean_std([r.get("int8_split_accuracy") for r in runs]), _mean_std([r.get("int8_split_latency_ms") for r in runs])
        lines.append("| " + " | ".join([json.loads(v) if isinstance(json.loads(v), str) else v for v in combo]
                                       + [str(len(runs)), _pct(*b), _pct(*f), _pct(*dlt),
                                          f"{max(r['max_part_params'] or 0 for r in runs):,}",
                                          *([f"{max(r['max_part_nonzero'] or 0 for r in runs):,}",
                                             "-" if any(r["max_part_zlib_kb"] is None for r in runs)
                                             else f"{max(r['max_part_zlib_kb'] for r in runs):.1f}"] if sizes else []),
                                          "-" if math.isnan(lat[0]) else f"{lat[0]:.3f}",
                                          *([_pct(*q), "-" if math.isnan(qlat[0]) else f"{qlat[0]:.3f}"] if int8 else [])]) + " |")
    lines += ["", "A difference between two configurations smaller than the larger of their standard deviations is "
              "within seed noise.", ""]
    for combo, runs in groups.items():
        title = ", ".join(f"{k}={json.loads(v)}" for k, v in zip(keys, combo)) or "all runs"
        lines += [f"## Per class: {title}", "", "| class | base | fusion | device group |", "|---|---:|---:|---|"]
        for c in runs[0]["per_class"]:
            b = _mean_std([r["per_class"][c][0] for r in runs])
            f = _mean_std([r["per_class"][c][1] for r in runs])
            group = next((str(g) for g, names in enumerate(runs[0]["groups"]) if c in names), "-")
            lines.append(f"| {c} | {_pct(*b)} | {_pct(*f)} | {group} |")
        lines.append("")
    if failed:
        lines += ["## Failed or unfinished runs", ""] + [f"- {f['run']}: {f['error']}" for f in failed] + [""]
    return "\n".join(lines)


def _plot(rows: list[dict], varying: list[str], x: str, title: str, xlabel: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # one line per combination of every other varying key (never pooling, say, random and similarity grouping)
    others = [k for k in varying if k not in ("seed", x)]
    by_series: dict[str, dict[Any, list[dict]]] = {}
    for r in rows:
        label = ", ".join(f"{k}={r.get(k)}" for k in others) or "fusion"
        by_series.setdefault(label, {}).setdefault(r[x], []).append(r)
    for name, points in sorted(by_series.items()):
        xs = sorted(points)
        means = [100 * _mean_std([r["fusion_accuracy"] for r in points[v]])[0] for v in xs]
        stds = [100 * _mean_std([r["fusion_accuracy"] for r in points[v]])[1] for v in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    xs_all = sorted({r[x] for r in rows})
    if all(isinstance(v, int) and not isinstance(v, bool) for v in xs_all):
        ax.set_xticks(xs_all)  # K is a count: no 2.5 devices on the axis
    base = 100 * _mean_std([r["base_accuracy"] for r in rows])[0]
    ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="unsplit base")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy %")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return figure_png(fig)


def write_report(root: Path | str, out: Path | str | None = None, measure_latency: bool = True) -> dict[str, Path]:
    root = Path(root)
    if not root.is_dir():
        raise PapmError(f"{root} is not a folder; give the folder of a suite (runs/suite-<name>)")
    out = Path(out) if out else root
    rows, varying, failed = collect(root, measure_latency)
    if not rows:
        raise PapmError(f"no run under {root} has finished ({len(failed)} failed or unfinished); nothing to report")
    columns = ["run", *varying, "base_accuracy", "fusion_accuracy", "fusion_minus_base", "mean_part_params",
               "max_part_params", "max_part_nonzero", "base_params", "max_part_kb", "max_part_zlib_kb", "split_latency_ms",
               "int8_split_accuracy", "int8_split_latency_ms", "wall_seconds"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {"summary_all.csv": atomic_write_text(out / "summary_all.csv", buf.getvalue()),
             "summary_all.md": atomic_write_text(out / "summary_all.md", markdown(rows, varying, failed, root))}
    if "devices" in varying:
        paths["fusion_vs_k.png"] = atomic_write_bytes(out / "fusion_vs_k.png", _plot(
            rows, varying, "devices", "fusion accuracy vs K (devices)", "K"))
    if "budget" in varying:
        paths["accuracy_vs_budget.png"] = atomic_write_bytes(out / "accuracy_vs_budget.png", _plot(
            rows, varying, "budget", "fusion accuracy vs budget, per criterion", "budget (fraction of parameters removed)"))
    paths["fusion_minus_base.png"] = atomic_write_bytes(out / "fusion_minus_base.png", _delta_plot(rows, varying))
    if measure_latency and any(r["split_latency_ms"] for r in rows):
        paths["accuracy_vs_latency.png"] = atomic_write_bytes(out / "accuracy_vs_latency.png", _latency_plot(rows, varying))
    return paths


def config_labels(rows: list[dict], varying: list[str]) -> dict[tuple, str]:
    """A short label per configuration: only the keys whose value differs from the value most configurations
    share (an alpha sweep plus a random-grouping variant reads "alpha=0.25" and "grouping=random")."""
    keys = [k for k in varying if k != "seed"]
    combos = list(configurations(rows, varying))
    usual = {}
    for i, k in enumerate(keys):
        values = [c[i] for c in combos]
        usual[k] = max(set(values), key=values.count)
    return {c: ", ".join(f"{k}={json.loads(v)}" for k, v in zip(keys, c) if v != usual[k]) or "the defaults"
            for c in combos}


def _latency_plot(rows: list[dict], varying: list[str]) -> bytes:
    plt = pyplot()
    labels = config_labels(rows, varying)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for combo, runs in configurations(rows, varying).items():
        lat, lat_sd = _mean_std([r["split_latency_ms"] for r in runs])
        acc, acc_sd = (100 * v for v in _mean_std([r["fusion_accuracy"] for r in runs]))
        ax.errorbar([lat], [acc], xerr=[lat_sd], yerr=[acc_sd], marker="o", capsize=3, label=labels[combo])
    ax.set_xlabel("split latency ms (slowest part + head, batch 1, 1 thread)")
    ax.set_ylabel("fusion test accuracy %")
    ax.set_title("accuracy vs split latency (mean +- std over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure_png(fig)


def _delta_plot(rows: list[dict], varying: list[str]) -> bytes:
    """Fusion minus base per configuration, mean +- std over seeds: the suite's headline at a glance."""
    plt = pyplot()
    labels = config_labels(rows, varying)
    groups = configurations(rows, varying)
    stats = [(labels[c], *(100 * v for v in _mean_std([r["fusion_minus_base"] for r in runs])), len(runs))
             for c, runs in groups.items()]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(stats) + 1.2))
    ys = list(range(len(stats)))[::-1]
    ax.barh(ys, [m for _, m, _, _ in stats], xerr=[sd for _, _, sd, _ in stats], capsize=3,
            color=["tab:green" if m >= 0 else "tab:red" for _, m, _, _ in stats])
    ax.set_yticks(ys, [f"{name} ({n} seeds)" for name, _, _, n in stats], fontsize=8)
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_xlabel("fusion - unsplit base, accuracy points (mean +- std over seeds)")
    ax.set_title("what each configuration costs against the unsplit base", fontsize=10)
    return figure_png(fig)
