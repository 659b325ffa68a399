"""Split inference on the edge with ONNX Runtime: no torch, torchvision, flwr or sklearn.

Every part (one device's pruned extractor) runs on the same normalised input; the
features are concatenated in manifest order and the fusion head turns them into
logits. A device can also compute only its own features (saved as .npy) and a
coordinator finishes from those files. Preprocessing is ``papm.shared.images``,
the very code training uses, so pixels reach the model exactly as in training.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..shared.cpu import usable_cpus
from ..shared.errors import PapmError
from ..shared.images import IMAGE_SUFFIXES, image_files, normalise_array, read_images, unreadable_error
from .bundle import Bundle

PRECISIONS = ("fp32", "int8")


def make_session(model: Path | str | bytes, threads: int | None = None, name: str = ""):
    """A CPU session of an ONNX file or of its bytes (the bytes a bundle verified: nothing is read
    again between the check and the run); ``threads`` None = ONNX Runtime's default (the machine's physical cores),
    or the CPUs this process may use where a cpuset or a cgroup quota allows fewer (``shared.cpu.usable_cpus``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    usable = usable_cpus()
    if not threads and usable < (os.cpu_count() or 1):
        # ORT would size its pool to the host and pin threads to cores outside the cpuset (pthread_setaffinity_np fails)
        threads = usable
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: the CLI's output stays readable
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PapmError(f"ONNX Runtime cannot load {name or model} ({first[:160]}); re-export the bundle") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expand_inputs(paths: Iterable[Path | str]) -> list[Path]:
    """Image files as given, folders expanded to their images (recursive, sorted, hidden files left out)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise PapmError(f"{p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give image files or a folder "
                                "that holds some")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PapmError(f"image not found: {p}; give image files or folders of images")
    if not files:
        raise PapmError("no images given; pass image files or a folder")
    return files


def progress(total: int, desc: str, enabled: bool | None = None):
    """tqdm when installed (it is optional on the edge), else a plain counter; on stderr, on a terminal only by default."""
    show = sys.stderr.isatty() if enabled is None else enabled
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not show, file=sys.stderr, leave=False)
    except ImportError:
        return _PlainBar(total, desc, show)


class _PlainBar:
    def __init__(self, total: int, desc: str, show: bool):
        self.total, self.desc, self.show, self.n = total, desc, show, 0

    def update(self, n: int) -> None:
        self.n += n
        if self.show:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="" if self.n < self.total else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EdgeRuntime:
    """Sessions for one bundle at one precision (parts fp32 or int8; the head is always fp32)."""

    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int | None = None):
        if precision not in PRECISIONS:
            raise PapmError(f"unknown precision {precision!r}; choose fp32 or int8")
        if precision not in bundle.precisions():
            raise PapmError(f"{bundle.path} has no {precision} parts (it has {', '.join(bundle.precisions())}); "
                            f"re-export with `papm export --int8` or use --precision fp32")
        self.bundle = bundle
        self.precision = precision
        self.threads = threads
        inp = bundle.manifest["input"]
        self.in_channels, self.image_size = int(inp["channels"]), int(inp["image_size"])
        self.mean, self.std = inp["mean"], inp["std"]
        self._sessions: dict[str, object] = {}

    # ---- sessions --------------------------------------------------------------------------
    def _session(self, key: str, entry: dict):
        if key not in self._sessions:
            self._sessions[key] = make_session(self.bundle.read_verified(entry), self.threads, entry["file"])
        return self._sessions[key]

    @property
    def num_parts(self) -> int:
        return len(self.bundle.parts)

    def part_entry(self, k: int) -> dict:
        if not 0 <= k < self.num_parts:
            raise PapmError(f"--part {k} is out of range; this bundle has parts 0..{self.num_parts - 1}")
        return self.bundle.parts[k]

    def feature_sizes(self) -> list[int]:
        return [int(p["feature_size"]) for p in self.bundle.parts]

    # ---- preprocessing ---------------------------------------------------------------------
    def read_images(self, paths: Sequence[Path | str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """Image files -> (uint8 (N, C, S, S) decoded and resized exactly as in training, (path, problem) of each
        file that could not be read: its slot stays black)."""
        return read_images(paths, self.in_channels, self.image_size)

    def load_images(self, paths: Sequence[Path | str]) -> np.ndarray:
        """Image files -> uint8 (N, C, S, S); every unreadable file named in one error."""
        x, failed = self.read_images(paths)
        if failed:
            raise unreadable_error(failed, len(paths))
        return x

    def normalise(self, x_uint8: np.ndarray) -> np.ndarray:
        return normalise_array(x_uint8, self.mean, self.std)

    # ---- inference -------------------------------------------------------------------------
    def part_features(self, k: int, x: np.ndarray) -> np.ndarray:
        """Features (N, D) of part ``k`` for normalised float32 images (N, C, S, S)."""
        entry = self.part_entry(k)
        sess = self._session(f"part{k}", entry["files"][self.precision])
        return sess.run(None, {entry["input_name"]: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def fuse(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Logits from per-part features given in manifest order."""
        head = self.bundle.manifest["head"]
        sess = self._session("head", head["files"]["fp32"])
        cat = np.concatenate([np.asarray(f, dtype=np.float32) for f in features], axis=1)
        return self._checked_logits(sess.run(None, {head["input_name"]: cat})[0], "head")

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.fuse([self.part_features(k, x) for k in range(self.num_parts)])

    def base_logits(self, x: np.ndarray) -> np.ndarray:
        """The unsplit base model (kept in the bundle for comparison)."""
        base = self.bundle.manifest.get("base")
        if not base:
            raise PapmError(f"{self.bundle.path} has no base model; re-export it with `papm export`")
        entry = base["files"].get(self.precision) or base["files"]["fp32"]
        return self._checked_logits(
            self._session("base", entry).run(None, {base["input_name"]: np.ascontiguousarray(x, dtype=np.float32)})[0], "base model")

    def _checked_logits(self, logits: np.ndarray, what: str) -> np.ndarray:
        """One score per class the manifest names (an edited class list would mislabel or crash the top-k)."""
        if logits.ndim != 2 or logits.shape[1] != len(self.bundle.class_names):
            raise PapmError(f"{self.bundle.path}: the {what} scores {logits.shape[-1]} classes but manifest.json names "
                            f"{len(self.bundle.class_names)}; the manifest was edited or mixed with another bundle, re-export it")
        return logits

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict]]:
        names = self.bundle.class_names
        k = max(1, min(k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"class": names[c], "index": int(c), "prob": float(p[c])} for c in row] for p, row in zip(probs, order)]

    def predict_files(self, paths: Sequence[Path], batch_size: int = 64, show_progress: bool | None = None,
                      unreadable: list[tuple[str, str]] | None = None) -> Iterator[tuple[Path, np.ndarray]]:
        """(path, probabilities) for every readable image, in batches (a bar on a terminal for long lists); a file
        that cannot be read does not stop the others: it is added to ``unreadable`` as (path, problem), or, without
        that list, all of them are named in one error after the last prediction."""
        failed: list[tuple[str, str]] = [] if unreadable is None else unreadable
        show = show_progress if show_progress is not None else (len(paths) > batch_size and sys.stderr.isatty())
        with progress(len(paths), "infer", show) as bar:
            for i in range(0, len(paths), batch_size):
                chunk = paths[i : i + batch_size]
                x, bad = self.read_images(chunk)
                failed += bad
                bad_paths = {b for b, _ in bad}
                keep = [j for j, p in enumerate(chunk) if str(p) not in bad_paths]
                if keep:
                    yield from zip((chunk[j] for j in keep), softmax(self.logits(self.normalise(x[keep]))))
                bar.update(len(chunk))
        if failed and unreadable is None:
            raise unreadable_error(failed, len(paths))

    def load_feature_files(self, paths: Sequence[Path | str]) -> list[np.ndarray]:
        """Per-part feature files (.npy, (N, D_k) or (D_k,)) for --fuse, checked against the manifest."""
        sizes = self.feature_sizes()
        if len(paths) != len(sizes):
            raise PapmError(f"--fuse needs {len(sizes)} feature files (one per part, in part order 0..{len(sizes) - 1}), "
                            f"got {len(paths)}")
        feats = []
        for k, (p, d) in enumerate(zip(paths, sizes)):
            if Path(p).suffix.lower() in IMAGE_SUFFIXES:  # images given to --fuse: numpy's message would not say so
                raise PapmError(f"{p} is an image, not a feature file; --fuse takes the .npy files of `papm infer BUNDLE "
                                f"--part K IMAGES --out fK.npy` (to classify images, give them without --fuse)")
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise PapmError(f"cannot read feature file {p} ({str(e).splitlines()[0][:80]}); "
                                f"write it with `papm infer BUNDLE --part {k} IMAGES --out {Path(p).name}`") from None
            a = a[None] if a.ndim == 1 else a
            if a.ndim != 2 or a.shape[1] != d or not np.issubdtype(a.dtype, np.floating):
                raise PapmError(f"feature file {p} has shape {tuple(a.shape)} ({a.dtype}), part {k} gives (N, {d}) floats; "
                                "pass the files in part order, from this bundle")
            feats.append(a.astype(np.float32))
        rows = {len(a) for a in feats}
        if len(rows) != 1:
            raise PapmError(f"feature files hold different numbers of images ({[len(a) for a in feats]}); "
                            "compute every part on the same images")
        return feats


def default_threads() -> int:
    return usable_cpus()
