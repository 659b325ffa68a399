"""Bundle assembly: a run directory (base.pt, devices/device-k/pruned.pt, fusion/head.pt) -> an edge bundle.

The parts are the ONNX files the devices made in the run's export phase where they exist
(checked against the run's PyTorch checkpoints), exported here otherwise (``export/`` converts
and checks the graphs); the manifest, checksums and signature come from :mod:`.bundle` and :mod:`.bundle_write`; the
accuracy is measured through the torch-free runtime exactly as the edge runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..export.onnx_export import check_parity, export_base, export_head, export_part, feature_graph, parity, parity_inputs
from ..export.quantize import int8_settings, quantize_int8
from ..shared.checkpoint import load_checkpoint, load_head
from ..shared.datasets import load_dataset_like, normalise
from ..shared.errors import PapmError
from ..shared.files import new_temp_dir
from ..shared.fusion import SplitModel
from .bundle_write import (base_entry, bundle_folder, calibration_images, check_inputs, check_out, finish_bundle, head_entry,
                           input_entry, part_entry)


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
    out = bundle_folder(run_dir, out)
    if not run_dir.is_dir():
        raise PapmError(f"run directory or checkpoint not found: {run_dir}; give a folder `papm simulate` wrote or a "
                        "`papm prune` / `papm train` checkpoint")
    if not (run_dir / "base.pt").is_file() and not (run_dir / "state.json").is_file():
        raise PapmError(f"{run_dir} is not a run directory (no base.pt or state.json); give a folder `papm simulate` wrote")
    if out.resolve() == run_dir.resolve() or run_dir.resolve().is_relative_to(out.resolve()):
        raise PapmError(f"--out {out} would replace the run directory itself; give a folder for the bundle, e.g. {run_dir / 'bundle'}")
    own = out.resolve() == (run_dir / "bundle").resolve()  # the run's own bundle: regenerated from the run on request
    old = check_out(out, force=force or own, sign_key=sign_key or from_run, calib_samples=calib_samples)
    if old is not None and own and not from_run:
        int8 = int8 or any("int8" in p.get("files", {}) for p in old.get("parts", []))  # add, never drop, precisions
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
        checked_on = "held-out test images + random"
    else:
        splits = load_dataset_like(info, root=data_root)
        test = splits.test
        x_check, checked_on = check_inputs(splits, info, parity_samples)

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
        return calibration_images(splits.train, info, classes, calib_samples, seed)
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
            parts.append(part_entry(int(k), groups[i], info, model, dims[i], rel))
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

        manifest = {
            "dataset": info.name,
            "class_names": list(info.class_names),
            "groups": groups,
            "input": input_entry(info),
            "parts": parts,
            "head": head_entry(head, [int(k) for k in devices], sum(dims), info.num_classes, stage),
            "base": base_entry(base, base_files, stage),
        }
        x_test = normalise(test.x, info)
        with torch.no_grad():
            reference = SplitModel(extractors, head).eval()(x_test).argmax(1)
        accuracy = finish_bundle(stage, out, manifest, reports, x_test, test.y, reference, sign_key, log, checked_on)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return {"bundle": out, "parity": reports, "accuracy": accuracy}
