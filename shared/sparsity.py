"""Unstructured magnitude pruning and N:M (2:4) semi-structured sparsity of weights.

Channel pruning (``pruning.py``) removes whole channels, so the pruned model is a
smaller dense model: fewer bytes and faster on any runtime. The sparsity here zeroes
single weights instead and leaves every shape as it is. That buys two things and
not a third:

- a compressed file gets smaller (zeros compress well; :func:`sparsity_report` measures it);
- N:M sparsity (2 of every 4 weights zero) is the pattern NVIDIA's sparse tensor cores
  run at up to twice the dense speed, once a runtime that supports it (TensorRT) builds
  the engine;
- it does NOT make dense ONNX Runtime CPU inference faster: dense kernels multiply the
  zeros like any other value.

Masks are plain boolean tensors (True = keep) keyed by module name, one per
``Conv2d``/``Linear`` ``.weight``. :func:`apply_masks` multiplies them in once and for
all; no ``torch.nn.utils.prune`` re-parametrisation or hook is left behind, so the model
saves, loads and exports with plain state dicts. :class:`MaskKeeper` keeps the zeros
zero while fine-tuning.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn

from .errors import PapmError

SCOPES = ("global", "layer")


def weight_layers(model: nn.Module, include_classifier: bool = True) -> dict[str, nn.Module]:
    """The ``Conv2d`` and ``Linear`` layers of ``model`` by name, in module order.

    The classifier is the last ``Linear`` in module order (``fc`` in the ResNet-18);
    ``include_classifier=False`` leaves it out.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if not include_classifier:
        linears = [name for name, m in layers.items() if isinstance(m, nn.Linear)]
        if linears:
            del layers[linears[-1]]
    return layers


def _included_layers(model: nn.Module, include_classifier: bool) -> dict[str, nn.Module]:
    layers = weight_layers(model, include_classifier)
    if not layers:
        raise PapmError("the model has no Conv2d or Linear layer to sparsify; pass a model with convolutions "
                        "or set include_classifier=True")
    return layers


def _check_sparsity(sparsity: float) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PapmError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise PapmError(f"sparsity must be in [0, 1) (the fraction of weights set to zero), got {sparsity}; "
                        "use e.g. 0.5 or 0.9")
    return value


def _zero_lowest(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask (flat) that zeroes the ``count`` smallest entries; ties go to the earlier position."""
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    if count > 0:
        order = torch.sort(magnitudes.reshape(-1), stable=True).indices  # stable: equal values keep position order
        keep[order[:count]] = False
    return keep


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    include_classifier: bool = False,
) -> dict[str, torch.Tensor]:
    """Keep-masks that zero the smallest-magnitude weights of every Conv2d/Linear layer.

    ``scope="global"``: one threshold over all included weights together; exactly
    ``round(sparsity * total)`` weights are zeroed, so layers whose weights are small
    (typically the wide late layers) lose more than others. ``scope="layer"``: every
    layer loses exactly ``round(sparsity * its weights)``. Ties in ``|w|`` are broken by
    position (layers in module order, then the flat index: earlier goes first), so the
    masks are deterministic. Biases are never masked. The model is not changed.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise PapmError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    layers = _included_layers(model, include_classifier)
    magnitudes = {name: m.weight.detach().abs().float() for name, m in layers.items()}
    if scope == "layer":
        return {name: _zero_lowest(a, round(sparsity * a.numel())).reshape(a.shape) for name, a in magnitudes.items()}
    flat = torch.cat([a.reshape(-1).cpu() for a in magnitudes.values()])
    keep = _zero_lowest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, a in magnitudes.items():
        masks[name] = keep[start:start + a.numel()].reshape(a.shape).to(a.device)
        start += a.numel()
    return masks


def _reduction_rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (rows, reduction) with the reduction dim last, in the layout 2:4 hardware uses.

    Linear: (out, in). Conv: (out, kh, kw, in): sparse tensor cores run convolutions
    channels-last (KRSC), where the reduction's innermost run is the input channels, so a
    group of m is m consecutive input channels at one kernel position (as NVIDIA's ASP does).
    """
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    return weight.reshape(weight.shape[0], -1)


def _from_reduction_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        out, in_c, kh, kw = shape
        return rows.reshape(out, kh, kw, in_c).permute(0, 3, 1, 2).contiguous()
    return rows.reshape(shape)


@torch.no_grad()
def n_m_masks(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    include_classifier: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """N:M keep-masks: of every ``m`` consecutive weights along the reduction dim, keep the ``n`` largest ``|w|``.

    Linear groups run along the input features; Conv2d groups are ``m`` consecutive
    input channels at one kernel position and output channel (channels-last, as NVIDIA's
    2:4 sparse tensor cores and ASP lay them out). Ties keep the earlier weight.

    Returns ``(masks, skipped)``: a layer whose group dim (input channels or features) is
    not a multiple of ``m`` cannot carry the pattern; it gets no mask and its name is in
    ``skipped`` (e.g. a 1- or 3-channel stem). Raises :class:`PapmError` when every layer
    is skipped. The model is not changed.
    """
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise PapmError(f"N:M sparsity needs integers 1 <= n < m, got n={n!r}, m={m!r}; use n=2, m=4")
    masks, skipped = {}, []
    for name, layer in _included_layers(model, include_classifier).items():
        rows = _reduction_rows(layer.weight.detach().abs().float())
        if rows.shape[1] % m:
            skipped.append(name)
            continue
        groups = rows.reshape(-1, m)
        kept = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, kept, True)
        masks[name] = _from_reduction_rows(keep.reshape(rows.shape), layer.weight.shape)
    if not masks:
        raise PapmError(f"no layer can take {n}:{m} sparsity (every group dim must be a multiple of {m}; "
                        f"skipped {skipped}); prune to channel counts that are multiples of {m}")
    return masks, skipped


def _mask_targets(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[nn.Module, torch.Tensor]]:
    modules = dict(model.named_modules())
    targets = []
    for name, mask in masks.items():
        layer = modules.get(name)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise PapmError(f"mask for {name!r} names no layer with a weight in this model; "
                            "build the masks from the same architecture")
        if tuple(mask.shape) != tuple(weight.shape):
            raise PapmError(f"mask for {name!r} has shape {tuple(mask.shape)} but the weight is {tuple(weight.shape)}; "
                            "build the masks from the same architecture")
        targets.append((layer, mask.to(device=weight.device, dtype=torch.bool)))
    return targets


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights in place, permanently (the state dict keeps its keys and shapes)."""
    for layer, keep in _mask_targets(model, masks):
        layer.weight.masked_fill_(~keep, 0.0)  # not a multiply: NaN * 0 would stay NaN, -w * 0 would be -0.0


class MaskKeeper:
    """Keeps masked-out weights at exactly zero while a sparse model is fine-tuned.

    Call :meth:`reapply` after every ``optimizer.step()``, or :meth:`attach` the optimizer
    once and it is called for you. Re-zeroing after the step is exact whatever the
    optimizer does; masking gradients alone is not (momentum, weight decay and Adam's
    moments move a weight whose gradient is zero). Construction applies the masks.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self._targets = _mask_targets(model, masks)
        self.reapply()

    @torch.no_grad()
    def reapply(self) -> None:
        for i, (layer, keep) in enumerate(self._targets):
            if keep.device != layer.weight.device:  # the model moved (e.g. .to("cuda")) since
                keep = keep.to(layer.weight.device)
                self._targets[i] = (layer, keep)
            layer.weight.masked_fill_(~keep, 0.0)

    def steps_with(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` updates any of the masked weights."""
        mine = {id(layer.weight) for layer, _ in self._targets}
        return any(id(p) in mine for group in optimizer.param_groups for p in group["params"])

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply after every ``optimizer.step()``; returns a handle whose ``.remove()`` detaches."""
        return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.reapply())


def _state_bytes(model: nn.Module):
    for tensor in model.state_dict().values():
        t = tensor.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        yield t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """How sparse ``model`` is and what that buys on disk.

    Unstructured and 2:4 sparsity do not make dense ONNX Runtime CPU inference faster
    (dense kernels multiply the zeros); what they buy is a smaller compressed file.

    - ``total_params``, ``nonzero_params``, ``sparsity``: over all parameters (BatchNorm and biases too);
    - ``layers``: per Conv2d/Linear layer, the fraction of its weight that is exactly zero;
    - ``dense_bytes``: the raw bytes of the state dict with floating tensors as fp32;
    - ``compressed_bytes``: those bytes after zlib (level 9), a generic compressor, as a
      zipped or gzipped model file would shrink.
    """
    params = [p.detach() for p in model.parameters()]
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    layers = {
        name: 1.0 - int(torch.count_nonzero(m.weight)) / m.weight.numel()
        for name, m in weight_layers(model, include_classifier=True).items()
    }
    compressor = zlib.compressobj(9)
    dense_bytes = compressed_bytes = 0
    for chunk in _state_bytes(model):
        dense_bytes += len(chunk)
        compressed_bytes += len(compressor.compress(chunk))
    compressed_bytes += len(compressor.flush())
    return {
        "total_params": total,
        "nonzero_params": nonzero,
        "sparsity": 1.0 - nonzero / total if total else math.nan,
        "layers": layers,
        "dense_bytes": dense_bytes,
        "compressed_bytes": compressed_bytes,
    }
