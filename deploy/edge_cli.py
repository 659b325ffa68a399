"""`papm infer` and `papm bench`: the edge commands. Torch-free (numpy, onnxruntime, Pillow, cryptography).

    papm infer BUNDLE a.png b.jpg                 top-k predictions of the split model
    papm infer BUNDLE images/ --json              a folder, JSON lines
    papm infer BUNDLE --part 2 x.png --out f2.npy one device computes only its features
    papm infer BUNDLE --fuse f0.npy f1.npy ...    the coordinator finishes from feature files
    papm bench BUNDLE [--test-dir DIR|x.npz]      latency, throughput, size, accuracy; bench.csv + bench.md
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..shared.errors import PapmError
from .edge_bench import run_bench


def whole_number(minimum: int):
    """argparse type: a whole number >= ``minimum`` (shared by the torch-free commands)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


positive_int, non_negative_int = whole_number(1), whole_number(0)


def finite_number(text: str) -> float:
    """argparse type: a finite number (nan and inf pass every range check after them, so they stop here)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def number_range(low: float, high: float = math.inf, low_included: bool = True):
    """argparse type: a finite number from ``low`` (included or not) to below ``high``."""
    def parse(text: str) -> float:
        v = finite_number(text)
        if not ((v >= low if low_included else v > low) and v < high):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if low_included else '>'} {low:g}"
                                             + (f" and below {high:g}" if high < math.inf else "") + f", got {text!r}")
        return v
    return parse


positive_number, fraction = number_range(0, low_included=False), number_range(0, 1)  # learning rates; decays, smoothing


def _add_bundle_args(p: argparse.ArgumentParser, precision: bool = True) -> None:
    p.add_argument("bundle", help="bundle folder from `papm export` (manifest.json + ONNX files)")
    p.add_argument("--verify-key", default=None, help="Ed25519 public key (PEM): refuse unsigned or altered bundles")
    if precision:
        p.add_argument("--precision", default="fp32", choices=("fp32", "int8"), help="part precision (the head runs fp32)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads (default: ORT's own, "
                   "or one per CPU this process may use under taskset, a cpuset or a CPU quota)")


class _Intermixed:
    """Lets images follow options (`infer B --part 2 x.png --out f.npy`): a `nargs="*"` positional
    is otherwise consumed (empty) before the first option and later images are rejected.
    Mixed into the subparser's own class, so it works under any top-level parser (cli.py's)."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_infer_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("infer", help="split inference with ONNX Runtime (no torch): images -> top-k classes")
    p.__class__ = type("IntermixedParser", (_Intermixed, type(p)), {})
    _add_bundle_args(p)
    p.add_argument("inputs", nargs="*", help="image files and/or folders of images")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--part", type=int, default=None, help="run only this part (device) and write its features with --out")
    p.add_argument("--out", default=None, help="with --part: .npy file for the (N, D) features")
    p.add_argument("--fuse", nargs="+", default=None, metavar="FEATURES.npy",
                   help="finish from per-part feature files (one per part, in part order)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--force", action="store_true", help="with --part: overwrite --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="latency / throughput / size / accuracy of the base model, each part and the split model")
    _add_bundle_args(p, precision=False)  # bench measures every precision the bundle has
    p.add_argument("--test-dir", default=None, help="test data: an ImageFolder-style folder (<class>/ or test/<class>/) or an .npz (x, y)")
    p.add_argument("--runs", type=positive_int, default=50, help="timed batch-1 runs per model (after warm-up)")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed runs first")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size for throughput")
    p.add_argument("--out", default=None, help="folder for bench.csv and bench.md (default: the bundle)")
    p.add_argument("--force", action="store_true", help="replace an earlier bench.csv and bench.md there")
    return p


def _print_line(text: str) -> None:
    print(text, flush=True)


def _format_top(top: list[dict]) -> str:
    return "  ".join(f"{t['class']} {t['prob']:.3f}" for t in top)


def run_infer(args: argparse.Namespace) -> int:
    from .bundle import load_bundle, warn_if_unsigned

    if args.fuse and (args.inputs or args.part is not None):
        raise PapmError("--fuse finishes from feature files: give no images and no --part with it")
    if args.part is not None and not args.out:
        raise PapmError("--part writes features to a file: add --out features.npy")
    if args.out and args.part is None:
        raise PapmError("--out is for --part (feature files); predictions go to stdout")
    if not args.fuse and not args.inputs:
        raise PapmError("no images given; pass image files or a folder (or --fuse FEATURE FILES)")
    if args.part is not None:
        from ..shared.files import refuse_existing

        refuse_existing(args.out, images_list_path(args.out), force=args.force)  # free (or --force) paths to write
    bundle = load_bundle(args.bundle, args.verify_key, quiet=True)  # verifies every file before any session exists
    code = _infer(args, bundle)
    warn_if_unsigned(bundle)  # after the work: a failed command's error stays its only line
    return code


def _infer(args: argparse.Namespace, bundle) -> int:
    from ..shared.images import unreadable_error
    from .runtime import EdgeRuntime, expand_inputs, softmax

    rt = EdgeRuntime(bundle, args.precision, args.threads)

    if args.fuse:
        feats = rt.load_feature_files(args.fuse)
        names = _fused_image_names(args.fuse)
        probs = softmax(rt.fuse(feats))
        for i, top in enumerate(rt.top_k(probs, args.top_k)):
            if names is None:  # feature files written elsewhere: rows by number
                _print_line(json.dumps({"row": i, "top_k": top}) if args.json else f"row {i}: {_format_top(top)}")
            else:
                _print_line(json.dumps({"image": names[i], "top_k": top}) if args.json else f"{names[i]}: {_format_top(top)}")
        return 0

    files = expand_inputs(args.inputs)
    if args.part is not None:
        rt.part_entry(args.part)  # range check before reading any image
        from ..shared.files import atomic_write_bytes

        chunks, bad_files = [], []
        for i in range(0, len(files), args.batch_size):  # decode on after a bad file: one error names them all
            x, bad = rt.read_images(files[i : i + args.batch_size])
            bad_files += bad
            if not bad_files:
                chunks.append(rt.part_features(args.part, rt.normalise(x)))
        if bad_files:  # rows must line up across every device's feature file: no file with holes
            raise unreadable_error(bad_files, len(files))

        features = np.concatenate(chunks).astype(np.float32)
        out = Path(args.out)
        # np.save appends .npy to names without it; write the bytes ourselves so --out is the name used
        atomic_write_bytes(out, _npy_bytes(features))
        # which image each row is: --fuse names its predictions and refuses parts computed on other images
        atomic_write_bytes(images_list_path(out), json.dumps([str(f) for f in files], indent=0).encode())
        print(f"part {args.part}: wrote {features.shape[0]} x {features.shape[1]} features ({args.precision}) to {out}",
              file=sys.stderr)
        return 0

    unreadable: list[tuple[str, str]] = []  # one bad photo in a folder does not cost the others their predictions
    for path, probs in rt.predict_files(files, args.batch_size, False if args.quiet else None, unreadable):
        top = rt.top_k(probs[None], args.top_k)[0]
        _print_line(json.dumps({"image": str(path), "top_k": top}) if args.json else f"{path}: {_format_top(top)}")
    if unreadable:
        raise PapmError(f"predicted {len(files) - len(unreadable)} of {len(files)} images; "
                        f"{unreadable_error(unreadable, len(files))}")
    return 0


def images_list_path(features: Path | str) -> Path:
    """The image list written beside a --part feature file: one entry per row."""
    return Path(features).with_name(Path(features).name + ".images.json")


def _fused_image_names(paths) -> list[str] | None:
    """The images the feature files' rows are, from the lists --part wrote beside them (None where any is missing):
    files computed on other images, or in another order, are refused (compared by file name: each device may keep
    the photos in its own folder)."""
    lists = []
    for p in paths:
        try:
            names = json.loads(images_list_path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            return None
        lists.append(names)
    for p, names in zip(paths[1:], lists[1:]):
        if len(names) != len(lists[0]):
            return None  # load_feature_files has compared the row counts; a list of another length is not this file's
        for row, (a, b) in enumerate(zip(lists[0], names)):
            if Path(a).name != Path(b).name:
                raise PapmError(f"{paths[0]} and {p} were computed on other images (row {row}: {Path(a).name} / "
                                f"{Path(b).name}); run every --part on the same images in the same order")
    return lists[0]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """A torch-free entry point for devices that install only the `edge` extra:
    ``python -m papm.deploy.edge_cli infer|bench ...`` (the same commands as `papm infer|bench`)."""
    parser = argparse.ArgumentParser(prog="papm-edge", description="PAPM edge runtime (ONNX Runtime, no torch)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_infer_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"infer": run_infer, "bench": run_bench}[args.command](args)
    except PapmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
