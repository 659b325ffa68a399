"""Bundle assembly: a run directory (base.pt, devices/device-k/pruned.pt, fusion/head.pt) -> an edge bundle.

The parts are the ONNX files the devices made in the run's export phase where they exist
(checked against the run's PyTorch checkpoints), exported here otherwise (``export/`` converts
and checks the graphs); the manifest, checksums and signature come from :mod:`.bundle`; the
accuracy is measured through the torch-free runtime exactly as the edge runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..export import onnx_export
from ..export.onnx_export import (OPSET, PARITY_TOL, check_parity, export_base, export_head, export_part, feature_graph,
                                  parity, parity_inputs)
from ..export.quantize import int8_settings, quantize_int8
from ..shared.checkpoint import load_checkpoint, load_head
from ..shared.datasets import load_dataset_like, normalise
from ..shared.errors import PapmError
from ..shared.files import atomic_write_json, fsync_tree, new_temp_dir, replace_dir
from ..shared.fusion import SplitModel
from .bundle import BUNDLE_FORMAT, BUNDLE_VERSION, Bundle, file_entry, write_manifest
from .runtime import EdgeRuntime


def _feature_params(model: nn.Module) -> int:
    """Parameters a part actually runs (the extractor without its classifier)."""
    fc = getattr(model, "fc", None)
    return sum(p.numel() for p in model.parameters()) - (sum(p.numel() for p in fc.parameters()) if fc is not None else 0)


def _nonzero_params(module: nn.Module, skip_fc: bool = False) -> int:
    """Parameters that are not exactly zero (what a sparse format could drop)."""
    return int(sum(int((p != 0).sum()) for name, p in module.named_parameters() if not (skip_fc and name.startswith("fc."))))


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


def export_run(
    run_dir: Path | str,
    out: Path | str | None = None,
    *,
    int8: bool = False,
    sign_key: Path | str | None = None,
    force: bool = False,
    calib_samples: int = 256,
    parity_samples: int = 64,
    log: Callable[[str], None] = print,
    test_split=None,
    from_run: bool = False,
    int8_activations: str = "u8",
    int8_reduce_range: bool | None = None,
    data_root: Path | str | None = None,
) -> dict:
    """Export a run directory (base.pt, devices/device-k/pruned.pt, fusion/head.pt) into an edge bundle.

    Parts: the ONNX files the devices made in the run's export phase
    (``devices/device-k/extractor[.int8].onnx``, ``base[.int8].onnx``) are used as they are
    (after a parity check against the run's PyTorch checkpoints); a missing fp32 file is
    exported here. A missing INT8 file is quantised here, calibrated on the training images of
    the device's classes that this machine can load (the run's dataset): run with
    ``int8 = true`` to have every device calibrate on its own data instead. ``data_root``: where that
    dataset is now (default: the folder the base checkpoint names).

    ``from_run``: called by the ServerApp, which has only the held-out ``test_split`` (used
    for parity inputs and the reported accuracy, never fitted on); nothing is calibrated then.
    The bundle is assembled in a temporary folder beside ``out`` and swapped into place at the
    end, so a failed export (a parity failure included) never leaves a half-written bundle.
    An existing folder is replaced only if it is a bundle: the run's own ``bundle/`` is
    regenerated on request (keeping its INT8 files; a signed one needs a key again), any other
    one only with ``force``.
    Returns {"bundle", "parity", "accuracy"}.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "bundle"
    if not run_dir.is_dir():
        raise PapmError(f"run directory not found: {run_dir}; create one with `papm simulate`")
    if not (run_dir / "base.pt").is_file() and not (run_dir / "state.json").is_file():
        raise PapmError(f"{run_dir} is not a run directory (no base.pt or state.json); give a folder `papm simulate` wrote")
    if out.exists() and not out.is_dir():
        raise PapmError(f"{out} is a file; give --out a folder for the bundle")
    if out.resolve() == run_dir.resolve() or run_dir.resolve().is_relative_to(out.resolve()):
        raise PapmError(f"--out {out} would replace the run directory itself; give a folder for the bundle, e.g. {run_dir / 'bundle'}")
    own = out.resolve() == (run_dir / "bundle").resolve()  # the run's own bundle: regenerated from the run on request
    if out.exists() and any(out.iterdir()):
        old = _bundle_manifest(out)
        if old is None:
            raise PapmError(f"{out} is not a PAPM edge bundle (no manifest.json of a bundle); --force replaces only bundles "
                            "and nothing was changed; choose another --out")
        if not (force or own):
            raise PapmError(f"{out} already exists; pass --force to replace the bundle or choose another --out")
        if own and not from_run:
            int8 = int8 or any("int8" in p.get("files", {}) for p in old.get("parts", []))  # add, never drop, precisions
        if not from_run and (out / "manifest.sig").exists() and not sign_key:  # --force included: devices verify it
            raise PapmError(f"{out} is signed; give --sign-key (or --new-key) to sign the new bundle, or --out elsewhere")
    if calib_samples < 1:
        raise PapmError(f"--calib-samples must be >= 1, got {calib_samples}; give a positive count (default 256)")
    base, info, _ = load_checkpoint(run_dir / "base.pt")
    head, _, head_raw = load_head(run_dir / "fusion" / "head.pt")
    devices = head_raw.get("meta", {}).get("devices")
    if not isinstance(devices, list) or not devices:
        raise PapmError(f"{run_dir / 'fusion' / 'head.pt'} does not name its devices (meta['devices']); re-run the fusion phase")
    extractors, groups = [], []
    for k in devices:
        model, pinfo, raw = load_checkpoint(run_dir / "devices" / f"device-{k}" / "pruned.pt")
        if pinfo.class_names != info.class_names:
            raise PapmError(f"device {k}'s checkpoint has classes {pinfo.class_names}, the base has {info.class_names}; "
                            "use checkpoints of one run")
        extractors.append(model)
        groups.append([int(c) for c in raw.get("meta", {}).get("classes", [])])
    probe = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    with torch.no_grad():  # measured, not read from an attribute: what the exported graph will output
        dims = [int(m.features(probe).shape[1]) for m in extractors]
    if dims != list(head.feature_dims):
        raise PapmError(f"the fusion head expects feature sizes {head.feature_dims} but the devices give {dims}; "
                        "re-run the fusion phase for these devices")

    if from_run:
        if test_split is None:
            raise PapmError("export_run(from_run=True) needs the server's test split")
        splits, test = None, test_split
        x_check = parity_inputs(test.x, parity_samples, normalise=lambda x: normalise(x, info))
    else:
        splits = load_dataset_like(info, root=data_root)
        test = splits.test
        x_check = parity_inputs(splits.val.x if len(splits.val) else splits.train.x, parity_samples,
                                normalise=lambda x: normalise(x, info))

    def from_devices(rel_in_run: str, dest: Path) -> bool:
        """Copy a file the devices made in the run (True), or report that there is none (False)."""
        src = run_dir / rel_in_run
        if not src.is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return True

    def calibration(classes: list[int], seed: int):
        if splits is None:
            raise PapmError(f"INT8 files missing in {run_dir} (the run's export phase made none); run with int8=true "
                            "so the devices calibrate on their own data, or run `papm export RUN_DIR --int8` where the data is")
        local = splits.train.of_classes(classes) if classes else splits.train
        if not len(local):
            local = splits.train
        return normalise(local.sample(calib_samples, seed).x, info).numpy()
    stage = new_temp_dir(out.parent, out.name)  # the bundle gets the usual permissions
    try:
        reports = []
        parts = []
        for i, (k, model) in enumerate(zip(devices, extractors)):
            rel = f"parts/device-{k}.onnx"
            if from_devices(f"devices/device-{k}/extractor.onnx", stage / rel):
                report = parity(feature_graph(model), stage / rel, x_check)
                check_parity(report, f"{run_dir}/devices/device-{k}/extractor.onnx")
                log(f"{rel}: the device's export, parity checked")
            else:
                report = export_part(model, stage / rel, x_check)
                log(f"exported {rel}")
            reports.append({**report, "file": rel, "precision": "fp32"})
            parts.append({"device": int(k), "classes": groups[i], "class_names": [info.class_names[c] for c in groups[i]],
                          "input_name": "image", "output_name": "features",
                          "input_shape": [None, info.in_channels, info.image_size, info.image_size],
                          "mean": list(info.mean), "std": list(info.std), "feature_size": dims[i],
                          "params": _feature_params(model), "nonzero_params": _nonzero_params(model, skip_fc=True),
                          "files": {"fp32": rel}})
        with torch.no_grad():
            feats = torch.cat([m.features(x_check) for m in extractors], dim=1)
        reports.append({**export_head(head, stage / "head.onnx", feats), "file": "head.onnx", "precision": "fp32"})
        if from_devices("base.onnx", stage / "base.onnx"):
            report = parity(base, stage / "base.onnx", x_check)
            check_parity(report, f"{run_dir}/base.onnx")
        else:
            report = export_base(base, stage / "base.onnx", x_check)
        reports.append({**report, "file": "base.onnx", "precision": "fp32"})
        log("exported head.onnx; base.onnx ready")
        base_files = {"fp32": "base.onnx"}

        if int8:
            made_by = run_dir / "devices" / "extractors.json"
            device_reports = {}
            if made_by.is_file():
                doc = json.loads(made_by.read_text())
                device_reports = {f"device-{p['device']}": p.get("node_report", {}) for p in doc.get("parts", [])}

            for i, part in enumerate(parts):
                rel = f"parts/device-{part['device']}.int8.onnx"
                if from_devices(f"devices/device-{part['device']}/extractor.int8.onnx", stage / rel):
                    report = device_reports.get(f"device-{part['device']}", {})
                    made = report.get("calibration", {})
                    part["int8_calibration"] = made or {"source": "the run's export phase"}
                    part["int8_settings"] = report.get("int8", {"activations": "s8", "weights": "s8"})  # runs before the option: S8S8
                    log(f"{rel}: the device's INT8 file (calibrated on {made.get('source', 'its own training images')})")
                else:  # never on test data: training images of the device's classes
                    quantize_int8(stage / part["files"]["fp32"], stage / rel, calibration(part["classes"], seed=i), int8_activations,
                                  int8_reduce_range)
                    part["int8_calibration"] = {"samples": calib_samples, "source": "training images of its classes (papm export)"}
                    part["int8_settings"] = int8_settings(int8_activations, int8_reduce_range)
                    log(f"quantised {rel} (INT8 QDQ, {int8_activations} activations, per-channel weights; "
                        "calibrated on training images of its classes)")
                part["files"]["int8"] = rel
            if not from_devices("base.int8.onnx", stage / "base.int8.onnx"):
                quantize_int8(stage / "base.onnx", stage / "base.int8.onnx", calibration([], seed=len(parts)), int8_activations,
                              int8_reduce_range)
            base_files["int8"] = "base.int8.onnx"

        atomic_write_json(stage / "parity.json", {"tolerance": PARITY_TOL, "tolerance_is": "per unit of output scale (each file's "
                                                  "tolerance: this times max(1, its largest output magnitude))", "files": reports,
                                                  "inputs": ("held-out test images + random" if from_run else "validation images + random")})
        # the manifest: every file with its sha256 (the runtime verifies them before opening any session)
        for part in parts:
            part["precisions"] = list(part["files"])
            part["files"] = {p: file_entry(stage, rel) for p, rel in part["files"].items()}
        manifest = {
            "dataset": info.name,
            "class_names": list(info.class_names),
            "groups": groups,
            "input": {"layout": "NCHW", "dtype": "float32", "channels": info.in_channels, "image_size": info.image_size,
                      "shape": [None, info.in_channels, info.image_size, info.image_size],
                      "mean": list(info.mean), "std": list(info.std), "preprocess": "papm.shared.images.load_image + normalise_array"},
            "parts": parts,
            "head": {"input_name": "features", "output_name": "logits", "feature_order": [int(k) for k in devices],
                     "feature_size": sum(dims), "num_classes": info.num_classes,
                     "params": sum(p.numel() for p in head.parameters()), "nonzero_params": _nonzero_params(head),
                     "files": {"fp32": file_entry(stage, "head.onnx")}},
            "base": {"input_name": "image", "output_name": "logits", "params": sum(p.numel() for p in base.parameters()),
                     "nonzero_params": _nonzero_params(base),
                     "files": {p: file_entry(stage, rel) for p, rel in base_files.items()}},
            "opset": OPSET,
            "exporter": f"torch {torch.__version__} (torch.onnx, {onnx_export.LAST_EXPORTER} exporter)",
            "reports": {"parity": file_entry(stage, "parity.json")},
        }
        # accuracy on the test split, through ONNX Runtime exactly as the edge runs it
        bundle = Bundle(stage, {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **manifest}, signed=False)
        x_test = normalise(test.x, info)
        y_test = test.y.numpy()
        with torch.no_grad():
            ref = SplitModel(extractors, head).eval()(x_test).argmax(1).numpy()
        accuracy: dict = {"split": "test", "samples": int(len(y_test)), "pytorch_split": float((ref == y_test).mean())}
        for precision in bundle.precisions():
            rt = EdgeRuntime(bundle, precision)
            xs = x_test.numpy()
            accuracy[precision] = {"split": float((rt.logits(xs).argmax(1) == y_test).mean()),
                                   "base": float((rt.base_logits(xs).argmax(1) == y_test).mean())}
        manifest["accuracy"] = accuracy
        write_manifest(stage, manifest, sign_key)
        kept = _carry_foreign_files(out, stage)
        if kept:
            log(f"kept {', '.join(kept[:5])}{f' and {len(kept) - 5} more' if len(kept) > 5 else ''} from the earlier bundle "
                "(files no export writes; a papm bench table there measured the earlier bundle)")
        fsync_tree(stage)  # every file on the disk before the bundle is swapped in
        replace_dir(stage, out)  # --force: the old bundle goes only once the new one is complete
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return {"bundle": out, "parity": reports, "accuracy": accuracy}
