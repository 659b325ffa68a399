"""Structural pruning to a parameter budget, with Torch-Pruning's dependency graph.

Torch-Pruning finds the coupled groups (convs tied by residual additions are one
group) and does the surgery; it has no way to prune to an exact parameter count,
so the budget search here does that:

1. score every channel of every group with the criterion (one score per coupled channel);
2. rank all channels of all groups together, lowest score first;
3. removing the k lowest channels (keeping at least ``round_to`` per group, and a
   multiple of ``round_to`` when asked) gives a parameter count that never grows with
   k, so a bisection on k finds the cut that meets the target reduction; the count for
   a candidate cut is exact (the architecture is rebuilt on the meta device);
4. remove those channels with ``group.prune`` and check the result against the plan.

The plan is the kept channel count per conv (``channels``), which, with the
weights, rebuilds the pruned model on a fresh process (``build_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from .errors import PapmError
from .models import build_model, count_params, params_for_channels

DEFAULT_TOLERANCE = 0.01  # reduction must land within 1 percentage point of the target


@dataclass
class ScoredGroup:
    root: str  # name of the conv the group is rooted at
    convs: list[str]  # every conv whose output channels the group prunes
    scores: torch.Tensor  # one score per channel (higher = keep)


@dataclass
class PruneResult:
    channels: dict[str, int]  # kept output channels per conv
    kept: dict[str, list[int]]  # indices (in the unpruned conv) of the kept output channels, per conv
    params_before: int
    params_after: int
    target: float

    @property
    def reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before


def score_groups(model: nn.Module, example_input: torch.Tensor, importance) -> tuple[tp.DependencyGraph, list[ScoredGroup]]:
    """Coupled groups of ``model``'s convs (the classifier is never pruned) and their scores."""
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    names = {m: n for n, m in model.named_modules()}
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)]
    scored = []
    for group in dg.get_all_groups(ignored_layers=classifier, root_module_types=[nn.Conv2d]):
        convs = [
            names[dep.layer]
            for dep, _ in group
            if dep.pruning_fn == tp.prune_conv_out_channels and isinstance(dep.layer, nn.Conv2d)
        ]
        scores = importance(group)
        if scores is None:
            continue
        scored.append(ScoredGroup(names[group[0].dep.target.module], sorted(set(convs)), scores.detach().float().cpu()))
    return dg, scored


def _kept_counts(groups: list[ScoredGroup], removed_per_group: list[int], round_to: int) -> list[int]:
    kept = []
    for g, r in zip(groups, removed_per_group):
        n = len(g.scores)
        k = max(n - r, min(round_to, n))
        if round_to > 1:
            k = min(n, -(-k // round_to) * round_to)  # round the kept count up to a multiple
        kept.append(k)
    return kept


def _channels_for(base_channels: dict[str, int], groups: list[ScoredGroup], kept: list[int]) -> dict[str, int]:
    channels = dict(base_channels)
    for g, k in zip(groups, kept):
        for conv in g.convs:
            channels[conv] = k
    return channels


def largest_budget(reduction: float) -> float:
    """The largest budget of three decimals a cut removing at most ``reduction`` meets (rounded down, never up)."""
    return math.floor(reduction * 1000) / 1000


def largest_reduction(model_args: dict, image_size: int, round_to: int = 1) -> float:
    """The largest fraction of a model's parameters a channel cut can remove: every coupled group down to
    ``round_to`` channels, the classifier whole (as :func:`prune_to_budget` cuts). The architecture alone decides it:
    a run checks its budget against it before any work, not in its prune phase."""
    from .importance import PAPMImportance

    model = build_model(model_args)
    names = {m: n for n, m in model.named_modules()}
    with torch.enable_grad():  # Torch-Pruning traces with autograd
        _, groups = score_groups(model, torch.zeros(1, model_args["in_channels"], image_size, image_size),
                                 PAPMImportance(None, names, alpha=1.0))
    kept = _kept_counts(groups, [len(g.scores) for g in groups], round_to)
    smallest = params_for_channels({**model_args, "channels": _channels_for(model_args["channels"], groups, kept)})
    return 1.0 - smallest / params_for_channels(model_args)


def prune_to_budget(
    model: nn.Module,
    model_args: dict,
    example_input: torch.Tensor,
    importance,
    budget: float,
    *,
    round_to: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
) -> PruneResult:
    """Remove the lowest-scored channels until ``budget`` of the parameters are gone.

    ``budget`` is the fraction of parameters to remove (0.77 keeps 23%). Prunes
    ``model`` in place. Raises :class:`PapmError` when no cut lands within
    ``tolerance`` of the target (e.g. every layer is already down to one channel).
    """
    if not 0.0 < budget < 1.0:
        raise PapmError(f"--budget must be in (0, 1) (the fraction of parameters to remove), got {budget}")
    if round_to < 1:
        raise PapmError(f"--round-to must be >= 1, got {round_to}")
    params_before = count_params(model)
    if params_before != params_for_channels(model_args):
        raise PapmError("the model does not match its model_args; reload it from its checkpoint")
    dg, groups = score_groups(model, example_input, importance)
    # Global ranking: (score, group, channel), lowest first; ties broken by position (deterministic).
    flat_scores = torch.cat([g.scores for g in groups])
    owner = torch.cat([torch.full((len(g.scores),), i, dtype=torch.long) for i, g in enumerate(groups)])
    order = torch.sort(flat_scores, stable=True).indices
    target_params = (1.0 - budget) * params_before

    def plan(k: int) -> tuple[dict[str, int], list[int], int]:
        removed = torch.bincount(owner[order[:k]], minlength=len(groups)).tolist()
        kept = _kept_counts(groups, removed, round_to)
        channels = _channels_for(model_args["channels"], groups, kept)
        return channels, kept, params_for_channels({**model_args, "channels": channels})

    lo, hi = 0, len(order)
    if plan(hi)[2] > target_params:
        smallest = plan(hi)[2]
        raise PapmError(
            f"budget {budget:g} cannot be met: keeping {round_to} channel(s) per layer still leaves "
            f"{smallest}/{params_before} parameters (a reduction of {1 - smallest / params_before:.4f}); "
            f"choose a budget <= {largest_budget(1 - smallest / params_before):.3f}"
            + (" or a smaller round-to" if round_to > 1 else "")
        )
    while lo < hi:  # smallest k whose plan meets the target
        mid = (lo + hi) // 2
        if plan(mid)[2] <= target_params:
            hi = mid
        else:
            lo = mid + 1
    candidates = [lo] + ([lo - 1] if lo > 0 else [])
    best = None
    for k in candidates:  # prefer meeting the target; fall back to just under it if that is closer and within tolerance
        channels, kept, params = plan(k)
        gap = abs((1.0 - params / params_before) - budget)
        if gap <= tolerance:
            best = (k, channels, kept, params)
            break
    if best is None:
        channels, kept, params = plan(lo)
        raise PapmError(
            f"budget {budget:g} cannot be met within {tolerance:g}: the nearest cut removes "
            f"{1 - params / params_before:.4f} of the parameters (channels are removed in steps of {round_to}); "
            "use a smaller round-to or another budget"
        )
    k, channels, kept, params = best
    modules = dict(model.named_modules())
    kept_idx = {name: list(range(n)) for name, n in model_args["channels"].items()}
    for g, keep in zip(groups, kept):
        n = len(g.scores)
        if keep >= n:
            continue
        # Remove the n - keep lowest-scored channels of this group (the same ones the plan counted).
        drop = torch.sort(g.scores, stable=True).indices[: n - keep].sort().values.tolist()
        for conv in g.convs:
            kept_idx[conv] = sorted(set(range(n)) - set(drop))
        dg.get_pruning_group(modules[g.root], tp.prune_conv_out_channels, idxs=drop).prune()
    actual = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if actual != channels or count_params(model) != params:
        raise RuntimeError("internal error: the pruned model does not match its plan")  # never a user error
    return PruneResult(channels, kept_idx, params_before, params, budget)


def macs_and_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates for one input of the example's shape, and parameters."""
    was_training = model.training
    model.eval()
    home = next(model.parameters(), example_input).device
    macs, params = tp.utils.count_ops_and_params(model, example_input.to(home))
    model.train(was_training)
    return int(macs), int(params)
