"""ONNX export of the split model's pieces, and PyTorch/ONNX parity checks.

Three kinds of graph leave PyTorch:

- a part: one pruned extractor, normalised image float32 (N, C, H, W) -> pooled features (N, D);
- the fusion head: concatenated features (N, sum D) -> logits (N, classes);
- the unsplit base model: image -> logits (kept in the bundle for comparison).

Exporter choice: the TorchScript exporter first (7x faster here, same parity), the
torch.export-based ("dynamo") exporter where the former is gone; both exist on torch 2.11
and 2.14, and every file is checked against PyTorch. ``external_data=False`` keeps every
weight inside the .onnx file (one file per part, which the bundle checksums and ships as a unit).

These are library functions: the bundle assembly (``deploy/assemble.py``) and the Flower client both call them.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..shared.errors import PapmError

OPSET = 18
PARITY_TOL = 1e-4  # max abs diff allowed between PyTorch and ONNX Runtime for fp32 graphs, per unit of output scale
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


def onnx_latency_ms(modules: dict[str, nn.Module], example: torch.Tensor, runs: int = 50, threads: int = 1) -> dict[str, float]:
    """Median milliseconds of one ONNX Runtime (CPU, fp32, ``threads``) call of each module on ``example`` (batch 1:
    one image, as a device sees it), each exported to a temporary file. The calls of the modules alternate, so a
    machine busy with other work slows them alike and their ratio holds; 5 untimed calls each first."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="papm-latency-") as tmp:
        sessions = {name: onnx_session(export_onnx(m, example, Path(tmp) / f"{i}.onnx", "image", "output"), threads)
                    for i, (name, m) in enumerate(modules.items())}
        x = example[:1].detach().cpu().float().numpy()
        feeds = {name: {sess.get_inputs()[0].name: x} for name, sess in sessions.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for i in range(5 + runs):
            for name, sess in sessions.items():
                t = time.perf_counter()
                sess.run(None, feeds[name])
                if i >= 5:
                    times[name].append(time.perf_counter() - t)
    return {name: 1000.0 * float(np.median(t)) for name, t in times.items()}


def run_onnx(path: Path | str, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def parity(module: nn.Module, path: Path | str, inputs: torch.Tensor, tol: float = PARITY_TOL) -> dict:
    """Max abs difference between PyTorch and ONNX Runtime outputs on the same inputs.

    The allowance is ``tol`` times the output's scale (its largest magnitude, at least 1): fp32 sums in a
    different order differ in their last bits, which for outputs in the hundreds is more than 1e-4."""
    module = module.cpu().eval()
    ref = module(inputs.float()).numpy()
    got = run_onnx(path, inputs.float().numpy())
    if got.shape != ref.shape:
        raise PapmError(f"{Path(path).name}: ONNX output shape {got.shape} differs from PyTorch's {ref.shape}; re-export it")
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    tol = tol * max(1.0, float(np.max(np.abs(ref)))) if ref.size else tol
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
                      calibration: np.ndarray | None = None, int8_activations: str = "u8") -> tuple[dict[str, Path], dict]:
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
        from .quantize import int8_settings, quantize_int8

        files["int8"] = quantize_int8(fp32, out_dir / f"{name}.int8.onnx", calibration, int8_activations)
        report = {**report, "int8": int8_settings(int8_activations)}
    return files, report


def parity_inputs(x: torch.Tensor, n: int = 64, seed: int = 0, normalise=None) -> torch.Tensor:
    """Real normalised images plus a few random ones (outside the data range too), fixed by ``seed``.

    ``x`` is normalised already, or raw images with ``normalise`` (a function) applied to the chosen
    ones only: a whole split in float is 4x its uint8 size."""
    gen = torch.Generator().manual_seed(seed)
    real = x[torch.randperm(len(x), generator=gen)[: max(2, n - 8)]]
    if normalise is not None:
        real = normalise(real)
    noise = torch.randn((8, *x.shape[1:]), generator=gen) * 2.0
    return torch.cat([real.float(), noise])
