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
import os
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


def _sample(n_total: int, n: int, seed: int) -> torch.Tensor:
    idx = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]
    return idx.sort().values


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
) -> dict:
    """Export a run directory (base.pt, devices/device-k/pruned.pt, fusion/head.pt) into an edge bundle.

    The bundle is assembled in a temporary folder beside ``out`` and renamed into place at the
    end, so a failed export (a parity failure included) never leaves a half-written bundle.
    Returns {"bundle", "parity", "accuracy"}.
    """
    import shutil
    import tempfile

    from papm.deploy.bundle import Bundle, file_entry, write_manifest, BUNDLE_FORMAT, BUNDLE_VERSION
    from papm.deploy.runtime import EdgeRuntime
    from papm.shared.checkpoint import load_checkpoint, load_head
    from papm.shared.datasets import load_dataset_like, normalise
    from papm.shared.files import atomic_write_json, refuse_existing
    from papm.shared.fusion import SplitModel

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "bundle"
    if not run_dir.is_dir():
        raise PapmError(f"run directory not found: {run_dir}; create one with `papm simulate`")
    refuse_existing(out, force=force)
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

    splits = load_dataset_like(info)
    x_check = parity_inputs(normalise(splits.val.x if len(splits.val) else splits.train.x, info), parity_samples)
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
            reports.append({**export_part(model, stage / rel, x_check), "file": rel, "precision": "fp32"})
            log(f"exported {rel}")
            parts.append({"device": int(k), "classes": groups[i], "class_names": [info.class_names[c] for c in groups[i]],
                          "input_name": "image", "output_name": "features",
                          "input_shape": [None, info.in_channels, info.image_size, info.image_size],
                          "mean": list(info.mean), "std": list(info.std), "feature_size": dims[i],
                          "params": _feature_params(model), "files": {"fp32": rel}})
        with torch.no_grad():
            feats = torch.cat([m.features(x_check) for m in extractors], dim=1)
        reports.append({**export_head(head, stage / "head.onnx", feats), "file": "head.onnx", "precision": "fp32"})
        reports.append({**export_base(base, stage / "base.onnx", x_check), "file": "base.onnx", "precision": "fp32"})
        log("exported head.onnx and base.onnx")
        base_files = {"fp32": "base.onnx"}

        if int8:
            from papm.export.quantize import quantize_int8

            for i, part in enumerate(parts):
                # the device's own local data: training images of its classes (never test data)
                local = splits.train.of_classes(part["classes"]) if part["classes"] else splits.train
                calib = local.x[_sample(len(local), calib_samples, seed=i)]
                rel = f"parts/device-{part['device']}.int8.onnx"
                quantize_int8(stage / part["files"]["fp32"], stage / rel, normalise(calib, info).numpy())
                part["files"]["int8"] = rel
                log(f"quantised {rel} (INT8 QDQ, per-channel; calibrated on {len(calib)} local training images)")
            calib = splits.train.x[_sample(len(splits.train), calib_samples, seed=len(parts))]
            quantize_int8(stage / "base.onnx", stage / "base.int8.onnx", normalise(calib, info).numpy())
            base_files["int8"] = "base.int8.onnx"

        atomic_write_json(stage / "parity.json", {"tolerance": PARITY_TOL, "inputs": "validation images + random", "files": reports})
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
                     "params": sum(p.numel() for p in head.parameters()), "files": {"fp32": file_entry(stage, "head.onnx")}},
            "base": {"input_name": "image", "output_name": "logits", "params": sum(p.numel() for p in base.parameters()),
                     "files": {p: file_entry(stage, rel) for p, rel in base_files.items()}},
            "opset": OPSET,
            "exporter": f"torch {torch.__version__} (torch.onnx, {LAST_EXPORTER} exporter)",
            "reports": {"parity": file_entry(stage, "parity.json")},
        }
        # accuracy on the test split, through ONNX Runtime exactly as the edge runs it
        bundle = Bundle(stage, {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, **manifest}, signed=False)
        x_test = normalise(splits.test.x, info)
        y_test = splits.test.y.numpy()
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
