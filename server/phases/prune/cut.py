"""One cut of every group's model: channels to (a share of) the budget by PAPM or another criterion,
or single weights (``sparsity``); a data-free cut folds the removed channels into the next layers."""

from __future__ import annotations

import copy
from logging import WARNING
from typing import TYPE_CHECKING

import torch
from flwr.common.logger import log

from ....shared.compression import size_report, sparsity_masks
from ....shared.importance import ActivationCounts
from ....shared.restore import restore_after_pruning
from ....shared.sparsity import apply_masks
from ....shared.specialise import PruneSettings, prune_model, step_targets
from .group_jobs import group_apoz_counts, test_accuracy

if TYPE_CHECKING:
    from ...driver import RunDriver


def target_budget(cfg) -> float | None:
    """The fraction of parameters (or, sparse, of conv weights) each model loses (``RunConfig.compression``)."""
    return cfg.compression()["budget"]


def cuts(cfg) -> int:
    """How many cuts the run makes: ``steps`` channel cuts with the iterative schedule, else one."""
    return cfg.steps if cfg.schedule == "iterative" else 1


def cut(d: RunDriver, models: dict, args: dict, base, base_args, info, assignment: dict, done: int) -> dict:
    """Cut ``done + 1`` of every group's model, in place: channels (to this cut's share of the budget) or single
    weights (``sparsity``); returns group -> how many nodes sent APoZ counts."""
    cfg, groups = d.cfg, assignment["groups"]
    budget, sparsity = target_budget(cfg), cfg.compression()["sparsity"]
    apoz_nodes = {g: 0 for g in range(len(groups))}
    if sparsity != "none" or budget is None:  # single weights, from the magnitudes alone (or a level that only quantises)
        for g, model in models.items():
            if sparsity != "none":
                apply_masks(model, sparsity_masks(model, sparsity, budget))
            size = size_report(model)
            d.rd.log_metrics("prune", round=done + 1, device=g, params_before=size["total_params"],
                             params_after=size["total_params"], nonzero_params=size["nonzero_params"],
                             reduction=round(size["sparsity"], 6), **test_accuracy(d, model, info, groups[g]))
        return apoz_nodes
    settings = PruneSettings(budget=budget, criterion=cfg.criterion, alpha=cfg.alpha, round_to=cfg.round_to,
                             apoz_samples=cfg.apoz_samples, bn_recalibrate=False).validate()
    counts = {g: ActivationCounts() for g in range(len(groups))}
    if cfg.criterion in ("papm", "apoz"):  # APoZ of each group's model as it is now (the base at the first cut)
        counts, apoz_nodes = group_apoz_counts(d, base, base_args, info, assignment,
                                               None if done == 0 else {g: (models[g], args[g]) for g in models})
    params_before = sum(p.numel() for p in base.parameters())
    target = step_targets(params_before, budget, cuts(cfg))[done]
    for g in range(len(groups)):
        model = models[g]
        group_settings = settings
        if cfg.criterion in ("papm", "apoz") and not counts[g].zeros:
            # no node holds an image of this group's classes: no APoZ exists, the weights alone decide
            log(WARNING, "no node holds samples of group %d's classes; pruning it by weight norms only", g)
            group_settings = PruneSettings(**{**settings.__dict__, "criterion": "papm", "alpha": 1.0})
        # one cut: the budget itself (no float round trip); a later cut: its share of what is left
        step_budget = budget if cuts(cfg) == 1 else 1.0 - target / sum(p.numel() for p in model.parameters())
        original = copy.deepcopy(model) if cfg.data_free else None
        result, args[g] = prune_model(model, args[g], info, PruneSettings(**{**group_settings.__dict__, "budget": step_budget}),
                                      counts[g] if counts[g].zeros else None, seed=cfg.seed + done,
                                      final=done + 1 == cuts(cfg))
        if original is not None:  # fold the removed channels into the next layers: weights only
            restore_after_pruning(original, model, result.kept, torch.zeros(1, info.in_channels, info.image_size, info.image_size))
        d.rd.log_metrics("prune", round=done + 1, device=g, params_before=params_before, params_after=result.params_after,
                         reduction=round(1.0 - result.params_after / params_before, 6),
                         **test_accuracy(d, model, info, groups[g]))
    return apoz_nodes
