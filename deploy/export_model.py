"""One model -> an edge bundle: `papm export pruned.pt` (a `papm prune` or `papm train` checkpoint).

The bundle has the layout of a run's: one part (the model's feature extractor, image -> pooled features) and a
head that is the model's own classifier (features -> logits), so `papm infer` and `papm bench` run it as they run a
split, without PyTorch. The base model the checkpoint was pruned from (``--base``, else the path `papm prune`
recorded) is added as the bundle's base for comparison when it is found; a bundle without one has no base rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from ..export.onnx_export import export_base, export_head, export_part
from ..export.quantize import int8_settings, quantize_int8
from ..shared.checkpoint import load_checkpoint, read_checkpoint
from ..shared.datasets import load_dataset_like, normalise
from ..shared.errors import PapmError
from ..shared.files import new_temp_dir
from .bundle import sha256_file
from .bundle_write import (base_entry, bundle_folder, calibration_images, check_inputs, check_out, finish_bundle, head_entry,
                           input_entry, part_entry)


def _base_problem(path: Path, want_sha: str | None) -> str | None:
    """Why ``path`` is not usable as the base (None: it is): a base-kind checkpoint, the recorded one when known."""
    try:
        kind = read_checkpoint(path).get("kind")
    except PapmError as e:
        return str(e).split(";")[0]
    if kind != "base":
        return f"{path} is a {kind} checkpoint, not a base model"
    if want_sha is not None and sha256_file(path) != want_sha:
        return f"{path} is not the base it was pruned from (its SHA-256 differs from the one papm prune recorded)"
    return None


def find_base(checkpoint: Path, raw: dict, base: Path | str | None, log: Callable[[str], None]) -> Path | None:
    """The base checkpoint to put beside the model: ``base`` when given, else the one `papm prune` recorded (its
    absolute path, or the path as typed then, beside the pruned file or where the export runs) when it is still
    there, is a base model and has the SHA-256 recorded."""
    meta = raw.get("meta") or {}
    want_sha = meta.get("base_sha256")
    if base is not None:
        base = Path(base)
        if not base.is_file():
            raise PapmError(f"--base {base} is {'a folder' if base.is_dir() else 'not found'}; give the checkpoint file "
                            "the model was pruned from, or leave --base out")
        problem = _base_problem(base, None)
        if problem:
            raise PapmError(f"--base: {problem}; give the checkpoint `papm train` wrote, or leave --base out")
        if want_sha is not None and sha256_file(base) != want_sha:
            log(f"note: --base {base} is not the file this model was pruned from (SHA-256 differs); it is compared as given")
        return base
    where, typed = (n if isinstance(n, str) and n else None for n in (meta.get("base_checkpoint_path"),
                                                                      meta.get("base_checkpoint")))
    candidates = ([Path(where)] if where else []) + ([checkpoint.parent / typed, Path(typed)] if typed else []) + \
                 [checkpoint.parent / Path(n).name for n in (where, typed) if n]  # moved along with the model
    seen, refused = set(), []
    for candidate in candidates:
        if candidate.resolve() in seen or not candidate.is_file():
            continue
        seen.add(candidate.resolve())
        problem = _base_problem(candidate, want_sha)
        if problem is None:
            log(f"base: {candidate}" + (" (the file it was pruned from: SHA-256 checked)" if want_sha else ""))
            return candidate
        refused.append(problem)
    log("no base model in the bundle (" + ("; ".join(refused) if refused else "the checkpoint names none that exists here")
        + "; --base adds one): papm bench shows no base rows")
    return None


def export_checkpoint(
    checkpoint: Path | str,
    out: Path | str | None = None,
    *,
    base: Path | str | None = None,
    int8: bool = False,
    sign_key: Path | str | None = None,
    force: bool = False,
    calib_samples: int = 256,
    parity_samples: int = 64,
    int8_activations: str = "u8",
    int8_reduce_range: bool | None = None,
    data_root: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Export one checkpoint into a one-part edge bundle (``out``, default ``<name>-bundle`` beside it).

    Parity inputs, INT8 calibration (training images of the model's classes: a pruned model's group, else all) and
    the reported test accuracy come from the data the checkpoint was trained on (``data_root``: where it is now).
    The same ``--out`` rules as a run's export: only a bundle is replaced, only with ``force``, once the new one is
    complete. Returns {"bundle", "parity", "accuracy", "base"}."""
    checkpoint = Path(checkpoint)
    out = bundle_folder(checkpoint, out)
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve().is_relative_to(out.resolve()):
        raise PapmError(f"{checkpoint} is inside --out {out}; give the bundle a folder of its own, e.g. "
                        f"{checkpoint.with_name(checkpoint.stem + '-bundle')}")
    model, info, raw = load_checkpoint(checkpoint)  # what is being exported first: a wrong file is named as such
    check_out(out, force=force, sign_key=sign_key, calib_samples=calib_samples)
    classes = [int(c) for c in (raw.get("meta") or {}).get("classes") or range(info.num_classes)]
    base_path = find_base(checkpoint, raw, base, log)
    base_model = None
    if base_path is not None:
        base_model, base_info, _ = load_checkpoint(base_path)
        if (base_info.class_names, base_info.image_size, base_info.in_channels) != (info.class_names, info.image_size,
                                                                                 info.in_channels):
            raise PapmError(f"base {base_path} has classes {base_info.class_names} at {base_info.in_channels}x"
                            f"{base_info.image_size}x{base_info.image_size}, {checkpoint} {info.class_names} at "
                            f"{info.in_channels}x{info.image_size}x{info.image_size}; give --base the model it was pruned from")
    splits = load_dataset_like(info, root=data_root)
    x_check, checked_on = check_inputs(splits, info, parity_samples)

    stage = new_temp_dir(out.parent, out.name)
    try:
        with torch.no_grad():  # measured, not read from an attribute: what the exported graph will output
            features = model.features(x_check)
        feature_size = int(features.shape[1])
        part = part_entry(0, classes, info, model, feature_size, "parts/device-0.onnx")
        reports = [{**export_part(model, stage / "parts/device-0.onnx", x_check), "file": "parts/device-0.onnx",
                    "precision": "fp32"},
                   {**export_head(model.fc, stage / "head.onnx", features), "file": "head.onnx", "precision": "fp32"}]
        base_files = {}
        if base_model is not None:
            reports.append({**export_base(base_model, stage / "base.onnx", x_check), "file": "base.onnx", "precision": "fp32"})
            base_files["fp32"] = "base.onnx"
        log(f"exported {', '.join(r['file'] for r in reports)}")
        if int8:
            quantize_int8(stage / "parts/device-0.onnx", stage / "parts/device-0.int8.onnx",
                          calibration_images(splits.train, info, classes, calib_samples, 0), int8_activations, int8_reduce_range)
            part["files"]["int8"] = "parts/device-0.int8.onnx"
            part["int8_calibration"] = {"samples": calib_samples, "source": "training images of its classes (papm export)"}
            part["int8_settings"] = int8_settings(int8_activations, int8_reduce_range)
            if base_model is not None:
                quantize_int8(stage / "base.onnx", stage / "base.int8.onnx",  # the base: every class, as a run's export
                              calibration_images(splits.train, info, [], calib_samples, 1), int8_activations, int8_reduce_range)
                base_files["int8"] = "base.int8.onnx"
            log(f"quantised to INT8 (QDQ, {int8_activations} activations, per-channel weights; calibrated on training "
                "images of its classes" + (", the base's on those of every class)" if base_model is not None else ")"))
        manifest = {
            "dataset": info.name, "class_names": list(info.class_names), "groups": [classes], "input": input_entry(info),
            "parts": [part],
            "head": head_entry(model.fc, [0], feature_size, info.num_classes, stage),
            "source": {"checkpoint": checkpoint.name, "kind": raw.get("kind"),
                       "base_checkpoint": None if base_path is None else base_path.name},
        }
        if base_model is not None:
            manifest["base"] = base_entry(base_model, base_files, stage)
        x_test = normalise(splits.test.x, info)
        with torch.no_grad():
            reference = model(x_test).argmax(1)
        accuracy = finish_bundle(stage, out, manifest, reports, x_test, splits.test.y, reference, sign_key, log,
                                 checked_on, classes if len(classes) < info.num_classes else None)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return {"bundle": out, "parity": reports, "accuracy": accuracy, "base": base_path}
