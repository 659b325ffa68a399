"""Low-bit weight quantisation (8 down to 2 bits) of Conv2d and Linear layers, RTN and GPTQ.

Every scheme here is symmetric and per output channel: channel ``c`` keeps the integers
``-qmax .. qmax`` (``qmax = 2**(bits-1) - 1``, so ``2**bits - 1`` levels: zero is exact
and the largest weight is not clipped) times one scale, ``max|W[c]| / qmax`` taken
from the full-precision weights. At 8 bits that is the usual per-channel INT8 weight
format; at 2 bits it is ternary.

The weights are fake-quantised: they are replaced by their dequantised values
(``scale * q``) and stay fp32, so the model runs, fine-tunes and is evaluated in
PyTorch as it is. Lower bit widths are evaluated in PyTorch only; only INT8 goes
through ONNX Runtime (its quantiser, elsewhere), because ONNX Runtime has no CPU
kernels for 2-7 bit convolutions. Biases stay fp32.

Two ways to pick the integers:

- :func:`quantize_rtn`: round to nearest, weight by weight. Fine at 8 bits, lossy below 4.
- :func:`quantize_gptq`: GPTQ (Frantar et al., 2023), the Optimal Brain Compression
  update done column by column. It minimises each layer's *output* error on calibration
  images, ``||X W^T - X Q^T||^2``, not the weight error: when column ``i`` is rounded,
  its rounding error is spread over the not-yet-rounded columns in the proportion the
  inverse input Hessian ``H = 2 X^T X`` says compensates it best. Layers are done in
  forward order and each sees inputs through the already-quantised layers before it,
  so later layers also correct the error of earlier ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PapmError
from .compression_options import ALLOWED_BITS
from .sparsity import weight_layers


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise PapmError(f"bits must be one of {', '.join(map(str, ALLOWED_BITS))}, got {bits!r}; "
                        "use 8 for INT8 or 4 for 4-bit weights")
    return int(bits)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale ``max|W[c]| / qmax`` (1 for an all-zero channel, which stays zero)."""
    max_abs = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1).float()
    return torch.where(max_abs > 0, max_abs / _qmax(bits), torch.ones_like(max_abs))


def _fake_quantize(values: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest level of ``scale * {-qmax .. qmax}``; ``scale`` broadcasts over ``values``' rows."""
    return torch.clamp(torch.round(values / scale), -qmax, qmax) * scale


def distinct_values_per_channel(weight: torch.Tensor) -> int:
    """Most distinct values any output channel (first dim) of ``weight`` holds."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return max(int(torch.unique(row).numel()) for row in rows)


@torch.no_grad()
def quantize_rtn(model: nn.Module, bits: int, include_classifier: bool = True) -> dict[str, dict[str, Any]]:
    """Round every Conv2d/Linear weight to its nearest level, in place.

    Returns per layer ``{"bits", "scale": (out,) tensor, "weight_mse"}``; every weight
    of output channel ``c`` is then ``scale[c]`` times an integer in ``-qmax .. qmax``.
    """
    bits = _check_bits(bits)
    stats = {}
    for name, layer in weight_layers(model, include_classifier).items():
        w = layer.weight
        scale = channel_scales(w, bits).to(w.device)
        q = _fake_quantize(w.float(), scale.view(-1, *[1] * (w.dim() - 1)), _qmax(bits))
        stats[name] = {"bits": bits, "scale": scale.cpu(), "weight_mse": float((q - w.float()).pow(2).mean())}
        w.copy_(q)
    return stats


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, *, damp: float = 0.01,
                block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on one weight matrix (out, d) with input Hessian (d, d); returns (dequantised weight, scales).

    Columns are quantised left to right; each one's error, divided by the Cholesky factor
    of the inverse Hessian, is fed back into the columns after it (within a block at once,
    to later blocks in one matrix product: the "lazy batch" of the paper). Exact zeros stay
    zero, so a pruned model stays pruned (the zeroed weights' loss is compensated like any
    rounding error). Inputs never seen in the calibration data (zero Hessian diagonal)
    couple to nothing and are simply rounded.
    """
    bits = _check_bits(bits)
    qmax = _qmax(bits)
    W = weight.detach().float().clone()
    keep = W != 0
    scale = channel_scales(W, bits).to(W.device)[:, None]  # fixed from full precision before the loop
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise PapmError(f"the calibration Hessian is not positive definite even with damp={damp}; "
                        "pass a larger damp (e.g. 0.1) or more calibration images")
    U = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)  # upper factor of H^-1
    Q = torch.zeros_like(W)
    for start in range(0, W.shape[1], block_size):
        end = min(start + block_size, W.shape[1])
        block, errors = W[:, start:end].clone(), torch.zeros_like(W[:, start:end])
        for i in range(end - start):
            column, u = block[:, i], U[start + i, start + i]
            q = _fake_quantize(column[:, None], scale, qmax)[:, 0] * keep[:, start + i]
            Q[:, start + i] = q
            errors[:, i] = (column - q) / u
            block[:, i:] -= errors[:, i:i + 1] * U[start + i, start + i:end][None, :]
        W[:, end:] -= errors @ U[start:end, end:]
    return Q, scale[:, 0]


class _InputsTaken(Exception):
    """Raised by the hook once a layer's input is collected: the rest of the forward is not needed."""


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the matrix its weight (out, d) multiplies: (rows, d)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # im2col: (N, d, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _layer_hessian(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``X^T X`` and the row count of X, the inputs ``layer`` gets from ``model`` as it is now on ``batches``."""
    d = layer.weight[0].numel()
    H, rows = torch.zeros(d, d, device=layer.weight.device), 0

    def collect(_module, inputs, _output):
        nonlocal H, rows
        x = _input_rows(layer, inputs[0].float())
        H += x.T @ x
        rows += x.shape[0]
        raise _InputsTaken

    handle = layer.register_forward_hook(collect)
    try:
        for batch in batches:
            try:
                model(batch)
            except _InputsTaken:
                pass
    finally:
        handle.remove()
    return H, rows


def _forward_order(model: nn.Module, layers: dict[str, nn.Module], batch: torch.Tensor) -> list[str]:
    """Layer names in the order a forward pass calls them (module order can differ, e.g. shortcuts)."""
    order: list[str] = []

    def record(name: str):
        def hook(_module, _inputs, _output):
            if name not in order:
                order.append(name)
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return order + [name for name in layers if name not in order]  # never called: zero Hessian, plain rounding


def _check_gptq_layers(layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or isinstance(layer.padding, str)
                                             or layer.padding_mode != "zeros"):
            raise PapmError(f"GPTQ handles plain convolutions only, not {name!r} (groups, string padding "
                            "or non-zero padding mode); use round to nearest (rtn)")


def _check_calibration(calibration) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 4 or calibration.shape[0] == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise PapmError(f"calibration must be a non-empty (N, C, H, W) batch of images, got {shape}; "
                        "pass e.g. 256 training images")
    if not torch.isfinite(calibration).all():
        raise PapmError("calibration images contain NaN or inf; pass finite, normalised images")


def gptq_layer_order(model: nn.Module, example: torch.Tensor, include_classifier: bool = True) -> list[str]:
    """The Conv2d/Linear layers GPTQ quantises, in the order a forward pass of ``example`` (one input batch,
    any values: the order depends on the architecture only) calls them."""
    layers = weight_layers(model, include_classifier)
    _check_gptq_layers(layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _forward_order(model, layers, example)
    finally:
        model.train(was_training)


@torch.no_grad()
def layer_input_sums(model: nn.Module, name: str, calibration: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, int]:
    """``X^T X`` and the row count of X for layer ``name``: the inputs it gets from ``model`` as it is now (eval
    mode) on the images ``calibration``, taken ``batch_size`` at a time. Sums add up: split calibration
    images on several machines, add their sums, and GPTQ sees the inputs of all the images."""
    layer = weight_layers(model, True)[name]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return _layer_hessian(model, layer, [b.to(device) for b in calibration.split(batch_size)])
    finally:
        model.train(was_training)


@torch.no_grad()
def gptq_from_sums(model: nn.Module, bits: int, order: list[str], sums, *, damp: float = 0.01,
                   block_size: int = 128) -> dict[str, dict[str, Any]]:
    """GPTQ the layers ``order`` of ``model`` in place, one after another; ``sums(name)`` returns ``(X^T X, rows)``
    of that layer's inputs through the model as it is then (the layers before it quantised already): computed
    here (:func:`quantize_gptq`) or added up from the nodes of a federated run. Returns per layer
    ``{"bits", "scale", "weight_mse", "samples"}`` (``samples``: rows of X seen)."""
    bits = _check_bits(bits)
    if not damp > 0:
        raise PapmError(f"damp must be > 0, got {damp}")
    layers = weight_layers(model, True)
    stats = {}
    for name in order:
        H, rows = sums(name)
        w = layers[name].weight
        q, scale = gptq_weight(w.reshape(w.shape[0], -1), 2 * H.to(w.device) / max(rows, 1), bits, damp=damp,
                               block_size=block_size)
        q = q.reshape(w.shape)
        stats[name] = {"bits": bits, "scale": scale.cpu(), "weight_mse": float((q - w.float()).pow(2).mean()),
                       "samples": int(rows)}
        w.copy_(q)
    return stats


@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    bits: int,
    calibration: torch.Tensor,
    *,
    batch_size: int = 64,
    damp: float = 0.01,
    include_classifier: bool = True,
    block_size: int = 128,
) -> dict[str, dict[str, Any]]:
    """GPTQ every Conv2d/Linear layer of ``model`` in place, in forward order, on ``calibration`` images.

    ``calibration`` is an (N, C, H, W) batch, already normalised as the model expects; a
    few hundred images of the deployment's classes suffice. The model runs in eval mode
    (BatchNorm uses its running statistics) and gets its mode back afterwards. ``damp``
    adds ``damp * mean(diag H)`` to the Hessian's diagonal. Returns per layer
    ``{"bits", "scale", "weight_mse", "samples"}`` (``samples``: rows of X seen).
    """
    bits = _check_bits(bits)
    _check_calibration(calibration)
    if not damp > 0 or batch_size < 1:
        raise PapmError(f"damp must be > 0 and batch_size >= 1, got damp={damp}, batch_size={batch_size}")
    device = next(model.parameters()).device
    order = gptq_layer_order(model, calibration[:1].to(device), include_classifier)
    return gptq_from_sums(model, bits, order, lambda name: layer_input_sums(model, name, calibration, batch_size),
                          damp=damp, block_size=block_size)
