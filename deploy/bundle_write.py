"""Writing an edge bundle, for both exports (a run's split: ``assemble.py``; one checkpoint: ``export_model.py``):
the manifest entries of the input and of a part, the checks of ``--out`` before any work, and the last steps (parity
report, test accuracy through the torch-free runtime, manifest and signature, files of an earlier bundle carried over,
the swap into place).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..export import onnx_export
from ..export.onnx_export import OPSET, PARITY_TOL, parity_inputs
from ..shared.datasets import normalise
from ..shared.errors import PapmError
from ..shared.files import atomic_write_json, fsync_tree, replace_dir
from .bundle import BUNDLE_FORMAT, BUNDLE_VERSION, Bundle, file_entry, write_manifest
from .runtime import EdgeRuntime


def bundle_folder(source: Path | str, out: Path | str | None) -> Path:
    """Where an export writes: ``out``, else ``RUN_DIR/bundle`` for a run directory and ``<name>-bundle`` beside a
    checkpoint file."""
    source = Path(source)
    if out is not None:
        return Path(out)
    return source.with_name(f"{source.stem}-bundle") if source.is_file() else source / "bundle"


def _feature_params(model: nn.Module) -> int:
    """Parameters a part actually runs (the extractor without its classifier)."""
    fc = getattr(model, "fc", None)
    return sum(p.numel() for p in model.parameters()) - (sum(p.numel() for p in fc.parameters()) if fc is not None else 0)


def nonzero_params(module: nn.Module, skip_fc: bool = False) -> int:
    """Parameters that are not exactly zero (what a sparse format could drop)."""
    return int(sum(int((p != 0).sum()) for name, p in module.named_parameters() if not (skip_fc and name.startswith("fc."))))


def input_entry(info) -> dict:
    """The manifest's ``input``: what every part and the base take (the edge preprocesses images to it)."""
    return {"layout": "NCHW", "dtype": "float32", "channels": info.in_channels, "image_size": info.image_size,
            "shape": [None, info.in_channels, info.image_size, info.image_size],
            "mean": list(info.mean), "std": list(info.std), "preprocess": "papm.shared.images.load_image + normalise_array"}


def head_entry(head: nn.Module, feature_order: list[int], feature_size: int, num_classes: int, stage: Path) -> dict:
    """The manifest's ``head`` (features of the parts in ``feature_order``, concatenated -> logits; ``head.onnx``)."""
    return {"input_name": "features", "output_name": "logits", "feature_order": feature_order, "feature_size": feature_size,
            "num_classes": num_classes, "params": sum(p.numel() for p in head.parameters()),
            "nonzero_params": nonzero_params(head), "files": {"fp32": file_entry(stage, "head.onnx")}}


def base_entry(base: nn.Module, files: dict[str, str], stage: Path) -> dict:
    """The manifest's ``base``: the unsplit model kept for comparison (``files``: precision -> path in the bundle)."""
    return {"input_name": "image", "output_name": "logits", "params": sum(p.numel() for p in base.parameters()),
            "nonzero_params": nonzero_params(base), "files": {p: file_entry(stage, rel) for p, rel in files.items()}}


def check_inputs(splits, info, samples: int) -> tuple[torch.Tensor, str]:
    """Normalised images for the parity checks (validation images, else training images; plus random ones) and what
    they are, for parity.json."""
    source = splits.val if len(splits.val) else splits.train
    return (parity_inputs(source.x, samples, normalise=lambda x: normalise(x, info)),
            f"{'validation' if len(splits.val) else 'training'} images + random")


def calibration_images(train, info, classes: list[int], samples: int, seed: int) -> np.ndarray:
    """INT8 calibration inputs, never test images: ``samples`` training images of ``classes`` (all when empty, or
    when there are none of them), normalised."""
    local = train.of_classes(classes) if classes else train
    return normalise((local if len(local) else train).sample(samples, seed).x, info).numpy()


def part_entry(device: int, classes: list[int], info, model: nn.Module, feature_size: int, rel: str) -> dict:
    """A part's manifest entry (its file still a path relative to the bundle: ``file_entry`` once it is complete)."""
    return {"device": device, "classes": classes, "class_names": [info.class_names[c] for c in classes],
            "input_name": "image", "output_name": "features", "input_shape": [None, info.in_channels, info.image_size, info.image_size],
            "mean": list(info.mean), "std": list(info.std), "feature_size": feature_size,
            "params": _feature_params(model), "nonzero_params": nonzero_params(model, skip_fc=True), "files": {"fp32": rel}}


def _bundle_manifest(folder: Path) -> dict | None:
    """The manifest of a PAPM bundle in ``folder``, or None when the folder is not one."""
    try:
        doc = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == BUNDLE_FORMAT else None


def _owned_files(manifest: Any) -> set[str]:
    """Every file a bundle's manifest lists (parts, head, base, reports), at any depth."""
    if isinstance(manifest, dict):
        own = {manifest["file"]} if isinstance(manifest.get("file"), str) and "sha256" in manifest else set()
        return own.union(*(_owned_files(v) for v in manifest.values()))
    if isinstance(manifest, list):
        return set().union(*(_owned_files(v) for v in manifest))
    return set()


def _carry_foreign_files(out: Path, stage: Path) -> list[str]:
    """Files in the earlier bundle ``out`` that no export writes (papm bench's tables, a user's notes) go into the new
    one: an export replaces its own files and nothing else. Returns them, relative to the bundle."""
    old = _bundle_manifest(out) if out.is_dir() else None
    if old is None:
        return []
    owned = {"manifest.json", "manifest.sig"} | _owned_files(old)
    kept = []
    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out).as_posix()
        if (f.is_file() or f.is_symlink()) and rel not in owned and not (stage / rel).exists():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, stage / rel, follow_symlinks=False)  # a link stays a link
            kept.append(rel)
    return kept


def check_out(out: Path, *, force: bool, sign_key, calib_samples: int) -> dict | None:
    """Refuse an ``--out`` the export may not replace, before any work; return the manifest of the bundle there (or
    None). Only a bundle is ever replaced, only with ``force``, and a signed one only by a signed one (its devices
    verify the signature)."""
    if out.exists() and not out.is_dir():
        raise PapmError(f"{out} is a file; give --out a folder for the bundle")
    old = None
    if out.exists() and any(out.iterdir()):
        old = _bundle_manifest(out)
        if old is None:
            raise PapmError(f"{out} is not a PAPM edge bundle (no manifest.json of a bundle); --force replaces only bundles "
                            "and nothing was changed; choose another --out")
        if not force:
            raise PapmError(f"{out} already exists; pass --force to replace the bundle or choose another --out")
        if (out / "manifest.sig").exists() and not sign_key:
            raise PapmError(f"{out} is signed; give --sign-key (or --new-key) to sign the new bundle, or --out elsewhere")
    if calib_samples < 1:
        raise PapmError(f"--calib-samples must be >= 1, got {calib_samples}; give a positive count (default 256)")
    return old


def finish_bundle(stage: Path, out: Path, manifest: dict, reports: list[dict], x_test: torch.Tensor, y_test: torch.Tensor,
                  reference: torch.Tensor, sign_key, log: Callable[[str], None], parity_inputs_are: str,
                  classes: list[int] | None = None) -> dict:
    """Complete the bundle assembled in ``stage`` (parity report, test accuracy, manifest, signature) and swap it into
    ``out``; returns the accuracy. ``reference``: PyTorch's predictions on ``x_test`` (normalised test images);
    ``classes``: also the accuracy on the test images of these classes (a specialist's own). Each part's ``files``
    (precision -> path in the bundle) become file entries with their sha256 here."""
    for part in manifest["parts"]:
        part["precisions"] = list(part["files"])
        part["files"] = {p: file_entry(stage, rel) for p, rel in part["files"].items()}
    atomic_write_json(stage / "parity.json", {"tolerance": PARITY_TOL, "tolerance_is": "per unit of output scale (each file's "
                                              "tolerance: this times max(1, its largest output magnitude))", "files": reports,
                                              "inputs": parity_inputs_are})
    manifest["opset"] = OPSET
    manifest["exporter"] = f"torch {torch.__version__} (torch.onnx, {onnx_export.LAST_EXPORTER} exporter)"
    manifest["reports"] = {"parity": file_entry(stage, "parity.json")}
    # accuracy on the test split, through ONNX Runtime exactly as the edge runs it
    bundle = Bundle(stage, {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **manifest}, signed=False)
    y = y_test.numpy()
    xs = x_test.numpy()
    accuracy: dict = {"split": "test", "samples": int(len(y))}
    if not len(y):  # data without a test split (papm train accepts one): nothing measured, and no NaN in the manifest
        log("test accuracy not measured: the data has no test images")
    else:
        accuracy["pytorch_split"] = float((reference.numpy() == y).mean())
    if classes is not None:
        accuracy["classes"] = classes
    own = np.isin(y, classes if classes is not None else [])
    for precision in bundle.precisions() if len(y) else []:
        rt = EdgeRuntime(bundle, precision)
        right = rt.logits(xs).argmax(1) == y
        accuracy[precision] = {"split": float(right.mean())}
        if own.any():
            accuracy[precision]["on_classes"] = float(right[own].mean())
        if manifest.get("base"):
            accuracy[precision]["base"] = float((rt.base_logits(xs).argmax(1) == y).mean())
    manifest["accuracy"] = accuracy
    write_manifest(stage, manifest, sign_key)
    kept = _carry_foreign_files(out, stage)
    if kept:
        log(f"kept {', '.join(kept[:5])}{f' and {len(kept) - 5} more' if len(kept) > 5 else ''} from the earlier bundle "
            "(files no export writes; a papm bench table there measured the earlier bundle)")
    fsync_tree(stage)  # every file on the disk before the bundle is swapped in
    replace_dir(stage, out)  # --force: the old bundle goes only once the new one is complete
    return accuracy
