"""ONNX export of the split model's pieces, and PyTorch/ONNX parity checks.

Three kinds of graph leave PyTorch:

- a part: one pruned extractor, normalised image float32 (N, C, H, W) -> pooled features (N, D);
- the fusion head: concatenated features (N, sum D) -> logits (N, classes);
- the unsplit base model: image -> logits (kept in the bundle for comparison).

Exporter choice: the TorchScript exporter first (7x faster here, same parity), the
torch.export-based ("dynamo") exporter where the former is gone; both exist on torch 2.11
and 2.14, and every file is checked against PyTorch. ``external_data=False`` keeps every
weight inside the .onnx file (one file per part, which the bundle checksums and ships as a unit).

These are library functions: ``papm export`` and the Flower client both call them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from papm.shared.errors import PapmError

OPSET = 18
PARITY_TOL = 1e-4  # max abs diff allowed between PyTorch and ONNX Runtime for fp32 graphs
MAX_BATCH = 1 << 16
LAST_EXPORTER = ""  # which torch.onnx exporter produced the last file (recorded in the manifest)


class _Call(nn.Module):
    """Exports ``fn(module, x)`` as the graph (e.g. ``ResNet18.features`` instead of ``forward``)."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.module, x)


def feature_graph(model: nn.Module) -> nn.Module:
    """A module whose forward is ``model.features`` (the part a device runs)."""
    return _Call(model, lambda m, x: m.features(x)).eval()


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path | str, input_name: str, output_name: str) -> Path:
    """Export ``module`` (eval mode, CPU) to a self-contained ONNX file with a dynamic batch axis."""
    global LAST_EXPORTER
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.cpu().eval()
    example = example.detach().cpu().float()
    if example.shape[0] < 2:
        # torch.export specialises a size-1 dimension to the constant 1; a batch of 2 keeps it symbolic
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    # The TorchScript exporter is ~7x faster than the dynamo one here (0.6 s vs 4 s for a small
    # ResNet) with the same parity; it is deprecated, so the dynamo exporter is the fallback for
    # torch versions that drop it. The parity check below guards either one.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        errors = []
        for dynamo in (False, True):
            try:
                if dynamo:
                    shapes = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)}
                else:
                    shapes = {"dynamic_axes": {input_name: {0: "batch"}, output_name: {0: "batch"}}}
                torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                                  opset_version=OPSET, dynamo=dynamo, external_data=False, verbose=False, **shapes)
                LAST_EXPORTER = "dynamo" if dynamo else "torchscript"
                break
            except Exception as e:  # the exporters raise many types; report one line if both fail
                errors.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        else:
            raise PapmError(f"ONNX export of {path.name} failed ({errors[-1][:200]}); check the model and torch/onnxscript versions")
    stray = path.with_name(path.name + ".data")
    if stray.exists():  # never ship a file that depends on a sidecar
        raise PapmError(f"ONNX export wrote external data {stray.name}; the bundle needs self-contained files")
    return path


def onnx_session(path: Path | str, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: Path | str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def parity(module: nn.Module, path: Path | str, inputs: torch.Tensor, tol: float = PARITY_TOL) -> dict:
    """Max abs difference between PyTorch and ONNX Runtime outputs on the same inputs."""
    module = module.cpu().eval()
    ref = module(inputs.float()).numpy()
    got = run_onnx(path, inputs.float().numpy())
    if got.shape != ref.shape:
        raise PapmError(f"{Path(path).name}: ONNX output shape {got.shape} differs from PyTorch's {ref.shape}; re-export it")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    return {"file": Path(path).name, "max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol, "samples": int(len(inputs)),
            "output_shape": list(ref.shape[1:])}


def check_parity(report: dict, where: str) -> None:
    """Raise if a parity entry exceeds its tolerance (an export we must not ship)."""
    if not report["ok"]:
        raise PapmError(f"{where}: ONNX output differs from PyTorch by {report['max_abs_diff']:.3g} > {report['tolerance']:g}; "
                        "the export is wrong, do not ship it (check the torch/onnxruntime versions)")


def export_part(model: nn.Module, path: Path | str, inputs: torch.Tensor) -> dict:
    """Export one pruned extractor (image -> features) and check parity on ``inputs`` (normalised images)."""
    graph = feature_graph(model)
    export_onnx(graph, inputs[:2], path, "image", "features")
    report = parity(graph, path, inputs)
    check_parity(report, str(path))
    return report


def export_head(head: nn.Module, path: Path | str, features: torch.Tensor) -> dict:
    """Export the fusion head (concatenated features -> logits); parity on real features."""
    export_onnx(head, features[:2], path, "features", "logits")
    report = parity(head, path, features)
    check_parity(report, str(path))
    return report


def export_base(model: nn.Module, path: Path | str, inputs: torch.Tensor) -> dict:
    """Export the unsplit base model (image -> logits) for comparison benchmarks."""
    export_onnx(model, inputs[:2], path, "image", "logits")
    report = parity(model, path, inputs)
    check_parity(report, str(path))
    return report


INT8_MAX_REL_ERROR = 0.5  # an INT8 graph whose outputs differ more than this from fp32 is broken, not just quantised


def int8_check(fp32_path: Path | str, int8_path: Path | str, inputs: torch.Tensor,
               max_rel_error: float = INT8_MAX_REL_ERROR) -> dict:
    """Sanity check of an INT8 graph against its fp32 graph on the same inputs: it loads, gives the
    same output shape, finite values, and a relative error ||q - f|| / ||f|| within ``max_rel_error``
    (quantisation costs a few percent; a wrong or damaged file costs far more)."""
    x = inputs.float().numpy()
    ref, got = run_onnx(fp32_path, x), run_onnx(int8_path, x)
    if got.shape != ref.shape or not np.isfinite(got).all():
        return {"ok": False, "rel_error": float("inf"), "max_rel_error": max_rel_error}
    rel = float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-12))
    return {"ok": rel <= max_rel_error, "rel_error": rel, "max_rel_error": max_rel_error}


def export_for_device(model: nn.Module, graph: str, out_dir: Path | str, name: str, parity_x: torch.Tensor,
                      calibration: np.ndarray | None = None) -> tuple[dict[str, Path], dict]:
    """What a node does in the export phase: ``model`` to ``<name>.onnx`` (``graph`` "features"
    for a device part, "logits" for the unsplit base model), checked against PyTorch on
    ``parity_x`` (the node's own normalised images), and, when ``calibration`` is given,
    ``<name>.int8.onnx`` calibrated on it (the node's own training images, never test data).
    Returns ({precision: path}, parity report)."""
    if graph not in ("features", "logits"):
        raise PapmError(f"unknown graph {graph!r}; expected features or logits")
    out_dir = Path(out_dir)
    fp32 = out_dir / f"{name}.onnx"
    report = (export_part if graph == "features" else export_base)(model, fp32, parity_x)
    files = {"fp32": fp32}
    if calibration is not None:
        from papm.export.quantize import quantize_int8

        files["int8"] = quantize_int8(fp32, out_dir / f"{name}.int8.onnx", calibration)
    return files, report


def parity_inputs(x_norm: torch.Tensor, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Real normalised images plus a few random ones (outside the data range too), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    real = x_norm[torch.randperm(len(x_norm), generator=gen)[: max(2, n - 8)]]
    noise = torch.randn((8, *x_norm.shape[1:]), generator=gen) * 2.0
    return torch.cat([real.float(), noise])


# ---- a whole run directory -> an edge bundle ------------------------------------------------

def _feature_params(model: nn.Module) -> int:
    """Parameters a part actually runs (the extractor without its classifier)."""
    fc = getattr(model, "fc", None)
    return sum(p.numel() for p in model.parameters()) - (sum(p.numel() for p in fc.parameters()) if fc is not None else 0)


def _nonzero_params(module: nn.Module, skip_fc: bool = False) -> int:
    """Parameters that are not exactly zero (what a sparse format could drop)."""
    return int(sum(int((p != 0).sum()) for name, p in module.named_parameters() if not (skip_fc and name.startswith("fc."))))


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
) -> dict:
    """Export a run directory (base.pt, devices/device-k/pruned.pt, fusion/head.pt) into an edge bundle.

    Parts: the ONNX files the devices made in the run's export phase
    (``devices/device-k/extractor[.int8].onnx``, ``base[.int8].onnx``) are used as they are
    (after a parity check against the run's PyTorch checkpoints); a missing fp32 file is
    exported here. A missing INT8 file is quantised here, calibrated on the training images of
    the device's classes that this machine can load (the run's dataset): run with
    ``int8 = true`` to have every device calibrate on its own data instead.

    ``from_run``: called by the ServerApp, which has only the held-out ``test_split`` (used
    for parity inputs and the reported accuracy, never fitted on); nothing is calibrated then.
    The bundle is assembled in a temporary folder beside ``out`` and renamed into place at the
    end, so a failed export (a parity failure included) never leaves a half-written bundle.
    Returns {"bundle", "parity", "accuracy"}.
    """
    import tempfile

    from papm.deploy.bundle import Bundle, file_entry, write_manifest, BUNDLE_FORMAT, BUNDLE_VERSION
    from papm.deploy.runtime import EdgeRuntime
    from papm.shared.checkpoint import load_checkpoint, load_head
    from papm.shared.datasets import load_dataset_like, normalise
    from papm.shared.files import atomic_write_json
    from papm.shared.fusion import SplitModel

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "bundle"
    if not run_dir.is_dir():
        raise PapmError(f"run directory not found: {run_dir}; create one with `papm simulate`")
    if out.exists() and not out.is_dir():
        raise PapmError(f"{out} is a file; give --out a folder for the bundle")
    if out.exists() and not force:
        raise PapmError(f"{out} already exists; pass --force to replace the bundle or choose another --out")
    if calib_samples < 1:
        raise PapmError(f"--calib-samples must be >= 1, got {calib_samples}")
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
        x_check = parity_inputs(normalise(test.x, info), parity_samples)
    else:
        splits = load_dataset_like(info)
        test = splits.test
        x_check = parity_inputs(normalise(splits.val.x if len(splits.val) else splits.train.x, info), parity_samples)

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
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700; the bundle gets the usual permissions
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
            from papm.export.quantize import quantize_int8

            made_by = run_dir / "devices" / "extractors.json"
            device_reports = {}
            if made_by.is_file():
                doc = json.loads(made_by.read_text())
                device_reports = {f"device-{p['device']}": p.get("node_report", {}) for p in doc.get("parts", [])}

            for i, part in enumerate(parts):
                rel = f"parts/device-{part['device']}.int8.onnx"
                if from_devices(f"devices/device-{part['device']}/extractor.int8.onnx", stage / rel):
                    made = device_reports.get(f"device-{part['device']}", {}).get("calibration", {})
                    part["int8_calibration"] = made or {"source": "the run's export phase"}
                    log(f"{rel}: the device's INT8 file (calibrated on {made.get('source', 'its own training images')})")
                else:  # never on test data: training images of the device's classes
                    quantize_int8(stage / part["files"]["fp32"], stage / rel, calibration(part["classes"], seed=i))
                    part["int8_calibration"] = {"samples": calib_samples, "source": "training images of its classes (papm export)"}
                    log(f"quantised {rel} (INT8 QDQ, per-channel; calibrated on training images of its classes)")
                part["files"]["int8"] = rel
            if not from_devices("base.int8.onnx", stage / "base.int8.onnx"):
                quantize_int8(stage / "base.onnx", stage / "base.int8.onnx", calibration([], seed=len(parts)))
            base_files["int8"] = "base.int8.onnx"

        atomic_write_json(stage / "parity.json", {"tolerance": PARITY_TOL, "files": reports,
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
            "exporter": f"torch {torch.__version__} (torch.onnx, {LAST_EXPORTER} exporter)",
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
        if out.exists():  # --force: swap the old bundle out only once the new one is complete
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return {"bundle": out, "parity": reports, "accuracy": accuracy}
