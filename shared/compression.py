"""Weight-level compression of a specialised model: sparsity instead of channel pruning, low-bit
weights after fine-tuning, and the compression-level ladder that names common combinations.

Channel pruning (``pruning.py``) makes a smaller dense model: faster on every runtime. The
options here keep every shape and change the weights' values, so they shrink a compressed
file but not dense ONNX Runtime latency (dense kernels multiply zeros and low-bit values like
any other; only INT8 has ONNX Runtime kernels, through ``papm export --int8``). They are here
so a user can compare them with PAPM at an equal parameter or size budget in one tool.

The options, their combination rules and the level ladder: ``compression_options.py``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .datasets import DatasetInfo, ImageSet, normalise
from .errors import PapmError
from .compression_options import SPARSITY_MODES
from .lowbit import quantize_gptq, quantize_rtn
from .sparsity import MaskKeeper, magnitude_masks, n_m_masks, sparsity_report, weight_layers

def sparsity_masks(model: nn.Module, mode: str, amount: float) -> dict[str, torch.Tensor]:
    """Keep-masks for ``mode`` (the classifier keeps every weight: it is the group's output layer)."""
    if mode == "unstructured":
        return magnitude_masks(model, amount, scope="global")
    if mode == "2:4":
        return n_m_masks(model, 2, 4)[0]  # layers whose inputs are not a multiple of 4 (the stem) stay dense
    raise PapmError(f"unknown sparsity {mode!r}; choose one of {', '.join(SPARSITY_MODES)}")


def nonzero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the weights that are not zero now (a sparse model received from elsewhere)."""
    return {name: m.weight.detach() != 0 for name, m in weight_layers(model, include_classifier=True).items()}


@contextlib.contextmanager
def masks_kept(keeper: MaskKeeper | None):
    """While fine-tuning, re-zero the masked weights after every optimiser step (any optimiser ``fit`` builds)."""
    if keeper is None:
        yield
        return
    # the hook is process-wide (``fit`` builds its optimiser inside); it acts only on an optimiser that
    # steps this model's masked weights, so other training in the process (threads, the warm worker) is untouched
    handle = register_optimizer_step_post_hook(lambda opt, *_: keeper.reapply() if keeper.steps_with(opt) else None)
    try:
        yield
    finally:
        handle.remove()
        keeper.reapply()


def quantize_weights(model: nn.Module, bits: int, method: str, calibration: ImageSet | None, info: DatasetInfo,
                     samples: int = 256, seed: int = 0) -> dict:
    """Fake-quantise every conv/linear weight of ``model`` (on the CPU) to ``bits``; GPTQ calibrates on
    ``samples`` seeded images of ``calibration``."""
    model.cpu()
    if method == "rtn":
        quantize_rtn(model, bits)
        return {"weight_bits": bits, "weight_quant": "rtn"}
    if calibration is None or len(calibration) == 0:
        raise PapmError("GPTQ needs calibration images; use --weight-quant rtn where there is no data")
    data = calibration.sample(samples, seed)
    quantize_gptq(model, bits, normalise(data.x, info))  # images as the model sees them
    return {"weight_bits": bits, "weight_quant": "gptq", "calibration_samples": len(data)}


def dense_runtime_note(sparsity: str, weight_bits: int) -> str | None:
    """What a dense runtime (ONNX Runtime on a CPU) makes of the compression, in plain words; None for a plain
    channel cut (a smaller dense model: its latency is what was measured)."""
    notes = []
    if sparsity != "none":
        notes.append(f"{sparsity} sparsity keeps every weight tensor's shape: dense ONNX Runtime runs the zeros like any "
                     "other weight, so the model is no faster and no smaller in memory than the dense model; only the "
                     "compressed file shrinks")
    if weight_bits and weight_bits < 8:
        notes.append(f"{weight_bits}-bit weights are evaluated in PyTorch; ONNX Runtime has no CPU kernels below 8 bits "
                     "and runs them as fp32 (INT8: papm export --int8)")
    elif weight_bits == 8:
        notes.append("8-bit weights are rounded in PyTorch and still stored as fp32; INT8 kernels on ONNX Runtime "
                     "come from papm export --int8")
    return "; ".join(notes) or None


def size_report(model: nn.Module) -> dict:
    """Non-zero parameters, sparsity and the zlib-compressed size of the weights (see ``sparsity_report``)."""
    r = sparsity_report(model)
    return {k: r[k] for k in ("total_params", "nonzero_params", "sparsity", "dense_bytes", "compressed_bytes")}
