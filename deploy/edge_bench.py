"""`papm bench`: latency, throughput, size and accuracy of a bundle's base model, each part and the split model,
on ONNX Runtime. Torch-free, as the rest of the edge runtime; the command's arguments are in ``edge_cli.py``."""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import numpy as np

from ..shared.errors import PapmError


def _latency(sess, name: str, x: np.ndarray, runs: int, warmup: int) -> tuple[float, float]:
    """(median, p95) seconds of ``sess.run`` on ``x`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.percentile(times, 95))


def _throughput(sess, name: str, x: np.ndarray, runs: int, warmup: int) -> float:
    med, _ = _latency(sess, name, x, max(3, runs // 10), max(1, warmup // 2))
    return len(x) / med


class _Call:
    """A callable timed like a session (``run(None, {name: x})``): the whole split pipeline."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, _outputs, feed: dict):
        return self.fn(next(iter(feed.values())))


def load_test_data(path: Path | str, rt) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, S, S) images and labels from an .npz (x, y) or an ImageFolder-style folder."""
    path = Path(path)
    names = rt.bundle.class_names
    if path.suffix == ".npz":
        try:
            data = np.load(path, allow_pickle=False)
            x, y = data["x"], data["y"]
        except (OSError, ValueError, KeyError) as e:
            raise PapmError(f"cannot read test data {path} ({str(e).splitlines()[0][:80]}); give an .npz with arrays x and y") from None
        x = x[:, None] if x.ndim == 3 else x
        want = (rt.in_channels, rt.image_size, rt.image_size)
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != want or len(x) != len(y):
            raise PapmError(f"{path}: x must be uint8 (N, {want[0]}, {want[1]}, {want[2]}) with N labels y, "
                            f"got x {x.dtype}{tuple(x.shape)} and {len(y)} labels")
        return x, y.astype(np.int64)
    if path.is_file():
        raise PapmError(f"test data {path} is neither an .npz nor a folder; give an ImageFolder-style folder or an .npz")
    if not path.is_dir():
        raise PapmError(f"test data not found: {path}; give an ImageFolder-style folder or an .npz")
    root = path / "test" if (path / "test").is_dir() else path
    from ..shared.images import class_folders, image_files

    files, labels = [], []
    for d in (root / name for name in class_folders(root)):  # as training reads them
        if d.name not in names:
            raise PapmError(f"{d} is not a class of this bundle ({names}); name the class folders after the classes")
        found = image_files(d)
        files += found
        labels += [names.index(d.name)] * len(found)
    if not files:
        raise PapmError(f"{root} holds no class folders with images; give a folder with one subfolder of images per class "
                        "(named as the bundle's classes), or an .npz")
    return rt.load_images(files), np.asarray(labels, dtype=np.int64)


def bench_rows(bundle, runs: int, warmup: int, batch: int, threads_all: int, test=None) -> list[dict]:
    """One row per model and precision, plus the derived split totals."""
    from .runtime import EdgeRuntime, make_session

    m = bundle.manifest
    inp = m["input"]
    rng = np.random.default_rng(0)
    image1 = rng.standard_normal((1, inp["channels"], inp["image_size"], inp["image_size"])).astype(np.float32)
    image_b = np.repeat(image1, batch, axis=0)

    def measure(entry: dict, name: str, x1: np.ndarray, xb: np.ndarray) -> dict:
        model = bundle.read_verified(entry)
        s1, sn = make_session(model, 1, entry["file"]), make_session(model, threads_all, entry["file"])
        med1, p951 = _latency(s1, name, x1, runs, warmup)
        medn, p95n = _latency(sn, name, x1, runs, warmup)
        return {"size_kb": round(entry["bytes"] / 1024, 1), "lat1_ms": med1 * 1e3, "lat1_p95_ms": p951 * 1e3,
                "latn_ms": medn * 1e3, "latn_p95_ms": p95n * 1e3, "throughput": _throughput(sn, name, xb, runs, warmup)}

    rows: list[dict] = []
    # without --test-dir: the accuracy the export measured on the run's test split (ONNX Runtime)
    stored = m.get("accuracy", {}) if test is None else {}
    feat_total = int(m["head"]["feature_size"])
    f1 = rng.standard_normal((1, feat_total)).astype(np.float32)
    head = {"model": "head", "precision": "fp32", "params": m["head"]["params"],
            "nonzero_params": m["head"].get("nonzero_params", m["head"]["params"]),
            **measure(m["head"]["files"]["fp32"], m["head"]["input_name"], f1, np.repeat(f1, batch, axis=0))}
    for precision in bundle.precisions():
        rt = EdgeRuntime(bundle, precision, threads_all)
        xt = rt.normalise(test[0]) if test is not None else None
        acc = (lambda logits: float((logits.argmax(1) == test[1]).mean())) if test is not None else (lambda _: None)
        base = m.get("base") or {}
        if precision in base.get("files", {}):
            rows.append({"model": "base (unsplit)", "precision": precision, "params": base["params"],
                         "nonzero_params": base.get("nonzero_params", base["params"]),
                         **measure(base["files"][precision], base["input_name"], image1, image_b),
                         "accuracy": acc(rt.base_logits(xt)) if xt is not None else stored.get(precision, {}).get("base")})
        parts = []
        for k, part in enumerate(m["parts"]):
            parts.append({"model": f"part {k} (device {part['device']})", "precision": precision, "params": part["params"],
                          "nonzero_params": part.get("nonzero_params", part["params"]),
                          **measure(part["files"][precision], part["input_name"], image1, image_b)})
        rows += parts
        rows.append({**head, "precision": "fp32"})
        split_acc = acc(rt.logits(xt)) if xt is not None else stored.get(precision, {}).get("split")
        size = round(sum(r["size_kb"] for r in parts) + head["size_kb"], 1)
        params = sum(r["params"] for r in parts) + head["params"]
        nonzero = sum(r["nonzero_params"] for r in parts) + head["nonzero_params"]
        # devices in parallel: the slowest part, then the head (derived from the stage timings)
        slow = {key: max(r[key] for r in parts) + head[key] for key in ("lat1_ms", "lat1_p95_ms", "latn_ms", "latn_p95_ms")}
        par_tp = min([r["throughput"] for r in parts] + [head["throughput"]])
        one_model = len(parts) == 1  # `papm export pruned.pt` or a one-part run: nothing runs in parallel
        if not one_model:
            rows.append({"model": "split: slowest part + head", "precision": precision, "params": params,
                         "nonzero_params": nonzero, "size_kb": size, **slow, "throughput": par_tp, "accuracy": split_acc})
        # one machine runs the whole split pipeline (every part in turn, then the head): measured as such
        rt1 = EdgeRuntime(bundle, precision, 1)
        med1, p951 = _latency(_Call(rt1.logits), "image", image1, runs, warmup)
        medn, p95n = _latency(_Call(rt.logits), "image", image1, runs, warmup)
        rows.append({"model": "model: part + head (measured)" if one_model else "split: all parts in turn + head (measured)",
                     "precision": precision, "params": params,
                     "nonzero_params": nonzero, "size_kb": size, "lat1_ms": med1 * 1e3, "lat1_p95_ms": p951 * 1e3,
                     "latn_ms": medn * 1e3, "latn_p95_ms": p95n * 1e3,
                     "throughput": _throughput(_Call(rt.logits), "image", image_b, runs, warmup), "accuracy": split_acc})
    base_params = (m.get("base") or {}).get("params")
    # the fair latency comparison: against the unsplit base at fp32 and at INT8 (a user could quantise it too)
    base_lat = {r["precision"]: r["lat1_ms"] for r in rows if r["model"] == "base (unsplit)"}
    for r in rows:
        r.setdefault("nonzero_params", r["params"])
        r["sparsity"] = 1.0 - r["nonzero_params"] / r["params"] if r["params"] else 0.0
        r["vs_base"] = r["params"] / base_params if base_params else None
        r["lat_vs_base_fp32"] = r["lat1_ms"] / base_lat["fp32"] if base_lat.get("fp32") else None
        r["lat_vs_base_int8"] = r["lat1_ms"] / base_lat["int8"] if base_lat.get("int8") else None
    return rows


COLUMNS = [("model", "model"), ("precision", "precision"), ("params", "params"), ("nonzero_params", "non-zero params"),
           ("sparsity", "sparsity"), ("vs_base", "params vs base"), ("size_kb", "size KiB"),
           ("lat1_ms", "b1 1-thread median ms"), ("lat1_p95_ms", "b1 1-thread p95 ms"),
           ("latn_ms", "b1 all-threads median ms"), ("latn_p95_ms", "b1 all-threads p95 ms"),
           ("lat_vs_base_fp32", "1-thread latency vs base fp32"), ("lat_vs_base_int8", "1-thread latency vs base INT8"),
           ("throughput", "img/s at batch"), ("accuracy", "accuracy")]


def _cell(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("lat1_ms", "lat1_p95_ms", "latn_ms", "latn_p95_ms"):
        return f"{v:.3f}"
    if key == "size_kb":
        return f"{v:.1f}"
    if key == "throughput":
        return f"{v:.0f}"
    if key in ("lat_vs_base_fp32", "lat_vs_base_int8"):
        return f"{v:.3f}x"
    if key in ("accuracy", "sparsity", "vs_base"):
        return f"{v:.4f}"
    if key in ("params", "nonzero_params"):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict], batch: int) -> str:
    heads = [h.replace("at batch", f"at batch {batch}") for _, h in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    from ..shared.files import atomic_write_text, check_writable, refuse_existing
    from .bundle import load_bundle, warn_if_unsigned
    from .runtime import EdgeRuntime, default_threads

    bundle = load_bundle(args.bundle, args.verify_key, quiet=True)
    threads_all = args.threads or default_threads()
    test = None
    if args.test_dir:
        test = load_test_data(args.test_dir, EdgeRuntime(bundle, "fp32"))
    out = Path(args.out) if args.out else bundle.path
    check_writable(out, "--out", folder=True)
    refuse_existing(out / "bench.csv", out / "bench.md", force=args.force)  # an earlier bench is a result too
    rows = bench_rows(bundle, args.runs, max(0, args.warmup), args.batch, threads_all, test)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for k, _ in COLUMNS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k, _ in COLUMNS})
    table = markdown_table(rows, args.batch)
    import onnxruntime

    from ..shared.cpu import cpu_features

    note = (f"CPU {cpu_features()['isa']}; onnxruntime {onnxruntime.__version__}. "
            f"Batch-1 latency over {args.runs} runs after {args.warmup} warm-up runs, 1 thread and {threads_all} threads; "
            f"throughput at batch {args.batch} with {threads_all} threads. "
            + ("'model: part + head' is measured end to end on this CPU. " if len(bundle.parts) == 1 else
               "'slowest part + head' is derived from the stage timings (devices run in parallel); 'all parts in turn + "
               "head' is measured end to end on this CPU. ") +
            "The head always runs fp32. Non-zero params count the weights as exported (structured pruning removes "
            "channels, so sparsity stays near 0 and the parameter cut shows in 'params vs base'). "
            + (f"Accuracy on {len(test[1])} test images from {args.test_dir}." if test is not None
               else "Accuracy: what the export measured on the test split (give --test-dir to measure here).")
            + " Inputs for timing are synthetic; ONNX Runtime CPU.")
    atomic_write_text(out / "bench.csv", buf.getvalue())
    atomic_write_text(out / "bench.md", f"# papm bench: {bundle.path}\n\n{note}\n\n{table}\n")
    print(table)
    print(note)
    print(f"wrote {out / 'bench.csv'} and {out / 'bench.md'}")
    warn_if_unsigned(bundle)
    return 0
