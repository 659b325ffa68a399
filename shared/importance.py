"""APoZ counts and the channel-importance criteria (PAPM, L1, APoZ, random).

A criterion is a Torch-Pruning importance: a callable ``(group) -> per-channel
scores``, higher = more important. Groups come from Torch-Pruning's dependency
graph, so channels coupled through residual additions get one score each.

APoZ (average percentage of zeros) is kept as sums, ``zeros[c]`` and
``elements``, per gated convolution, so counts from several clients (or data
shards) add up to exactly the counts on the union of their data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from .datasets import DatasetInfo, ImageSet, normalise
from .errors import PapmError

CRITERIA = ("papm", "l1", "apoz", "random")


@dataclass
class ActivationCounts:
    """Per gated conv: exact-zero counts per output channel and elements per channel."""

    zeros: dict[str, torch.Tensor] = field(default_factory=dict)  # int64 per channel
    elements: dict[str, int] = field(default_factory=dict)  # samples x H x W seen per channel

    def __add__(self, other: "ActivationCounts") -> "ActivationCounts":
        if not self.zeros:
            return other.copy()
        if not other.zeros:
            return self.copy()
        if set(self.zeros) != set(other.zeros) or any(self.zeros[k].shape != other.zeros[k].shape for k in self.zeros):
            raise PapmError("APoZ counts come from different architectures and cannot be added")
        return ActivationCounts(
            {k: self.zeros[k] + other.zeros[k] for k in self.zeros},
            {k: self.elements[k] + other.elements[k] for k in self.elements},
        )

    def copy(self) -> "ActivationCounts":
        return ActivationCounts({k: v.clone() for k, v in self.zeros.items()}, dict(self.elements))

    def apoz(self) -> dict[str, torch.Tensor]:
        """Fraction of exact zeros per channel, in [0, 1]."""
        return {k: self.zeros[k].double() / max(1, self.elements[k]) for k in self.zeros}

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor form for records: ``zeros/<conv>`` and ``elements/<conv>``."""
        out = {f"zeros/{k}": v for k, v in self.zeros.items()}
        out.update({f"elements/{k}": torch.tensor([v], dtype=torch.int64) for k, v in self.elements.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> "ActivationCounts":
        zeros = {k[len("zeros/"):]: torch.as_tensor(v, dtype=torch.int64) for k, v in arrays.items() if k.startswith("zeros/")}
        elements = {k[len("elements/"):]: int(torch.as_tensor(v).reshape(-1)[0]) for k, v in arrays.items() if k.startswith("elements/")}
        if set(zeros) != set(elements):
            raise PapmError("APoZ counts are incomplete: zero counts and element counts name different layers")
        return cls(zeros, elements)


@torch.no_grad()
def count_zero_activations(
    model: nn.Module,
    data: ImageSet,
    info: DatasetInfo,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> ActivationCounts:
    """Count exact zeros after every ReLU with forward hooks, over all of ``data``.

    The model must expose ``activation_sites()`` (ReLU module name -> gated conv name).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    sites = model.activation_sites()
    modules = dict(model.named_modules())
    counts = ActivationCounts()
    hooks = []

    def make_hook(conv_name: str):
        def hook(_module, _inputs, output):
            z = (output == 0).sum(dim=(0, 2, 3)).to("cpu", torch.int64)
            counts.zeros[conv_name] = counts.zeros.get(conv_name, 0) + z
            counts.elements[conv_name] = counts.elements.get(conv_name, 0) + output.shape[0] * output.shape[2] * output.shape[3]

        return hook

    for relu_name, conv_name in sites.items():
        hooks.append(modules[relu_name].register_forward_hook(make_hook(conv_name)))
    try:
        for i in range(0, len(data), batch_size):
            model(normalise(data.x[i : i + batch_size].to(device), info))
    finally:
        for h in hooks:
            h.remove()
    return counts


def _out_channel_members(group) -> list[tuple[nn.Conv2d, list[int], list[int]]]:
    """(conv, channel idxs, root idxs) for every conv whose output channels the group prunes."""
    members = []
    for i, (dep, idxs) in enumerate(group):
        if dep.pruning_fn == tp.prune_conv_out_channels and isinstance(dep.layer, nn.Conv2d):
            members.append((dep.layer, list(idxs), list(group[i].root_idxs)))
    return members


def _mean_over_members(values: list[tuple[torch.Tensor, list[int]]], n: int) -> torch.Tensor | None:
    if not values:
        return None
    acc = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    for v, root_idxs in values:
        r = torch.as_tensor(root_idxs, dtype=torch.long)
        acc.index_add_(0, r, v.double())
        hits.index_add_(0, r, torch.ones(len(root_idxs), dtype=torch.float64))
    return acc / hits.clamp_min(1)


class PAPMImportance(tp.importance.Importance):
    """PAPM_c = alpha * ||W_c||_2 / max_c' ||W_c'||_2 + (1 - alpha) * (1 - APoZ_c).

    The weight term is normalised per layer (divided by the layer's largest filter
    norm, so it lies in [0, 1] like 1 - APoZ) and averaged over the coupled convs of
    the group; the APoZ term is averaged over the group's gated activation sites.
    ``alpha=1`` is plain L2 magnitude, ``alpha=0`` is plain APoZ.
    """

    def __init__(self, apoz: dict[str, torch.Tensor] | None, module_names: dict[nn.Module, str], alpha: float = 0.5):
        if not 0.0 <= alpha <= 1.0:
            raise PapmError(f"alpha must be in [0, 1], got {alpha}")
        if alpha < 1.0 and not apoz:
            raise PapmError("PAPM with alpha < 1 needs APoZ counts; compute them on the device's data first")
        self.apoz = apoz or {}
        self.names = module_names
        self.alpha = alpha

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        members = _out_channel_members(group)
        if not members:
            return None
        n = len(group[0].idxs)
        weight_terms, apoz_terms = [], []
        for conv, idxs, root_idxs in members:
            norms = conv.weight.detach().flatten(1).norm(dim=1).double()
            weight_terms.append((norms[idxs] / norms.max().clamp_min(1e-12), root_idxs))
            name = self.names.get(conv)
            if name in self.apoz:
                apoz_terms.append((1.0 - self.apoz[name].double()[idxs], root_idxs))
        w = _mean_over_members(weight_terms, n)
        a = _mean_over_members(apoz_terms, n)
        if a is None or self.alpha == 1.0:
            return w.float()
        if self.alpha == 0.0:
            return a.float()
        return (self.alpha * w + (1.0 - self.alpha) * a).float()


def make_importance(
    criterion: str,
    model: nn.Module,
    counts: ActivationCounts | None = None,
    alpha: float = 0.5,
) -> tp.importance.Importance:
    """The Torch-Pruning importance for ``--criterion``."""
    names = {m: n for n, m in model.named_modules()}
    apoz = counts.apoz() if counts is not None else None
    if criterion == "papm":
        return PAPMImportance(apoz, names, alpha)
    if criterion == "apoz":
        return PAPMImportance(apoz, names, alpha=0.0)
    if criterion == "l1":
        # The classic filter-norm baseline, built to differ from PAPM only by the APoZ term: PAPM's own
        # weight term (filter norm normalised per layer, coupled channels averaged), i.e. alpha = 1, so a
        # difference between the two criteria is attributable to APoZ alone.
        return PAPMImportance(None, names, alpha=1.0)
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise PapmError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
