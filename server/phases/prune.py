"""Phase 3, prune: one PAPM plan per device group, then fine-tuning inside the group.

The nodes of a group return APoZ counts on their samples of the group's classes (sums, so
they add up exactly); the group's plan (kept channels per layer) follows from the summed
counts and the base weights, made here on the server; the pruned model is fine-tuned with
FedAvg over the group's nodes. Outputs: ``devices/device-k/pruned.pt`` and ``prune.json``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...client.records import record_state
from ...shared.checkpoint import save_checkpoint
from ...shared.errors import PapmError
from ...shared.files import atomic_write_json
from ...shared.importance import ActivationCounts
from ...shared.pruning import macs_and_params
from ...shared.specialise import PruneSettings, prune_model
from ...shared.training import evaluate
from ..fedavg import weighted_average

if TYPE_CHECKING:
    from ..driver import RunDriver


def group_apoz_counts(d: RunDriver, base, base_args, info, assignment: dict) -> tuple[dict, dict]:
    """Group -> summed APoZ counts of its nodes, and group -> how many nodes contributed."""
    groups = assignment["groups"]
    counts = {g: ActivationCounts() for g in range(len(groups))}
    contributed = {g: 0 for g in range(len(groups))}
    members = d.group_nodes(assignment)
    papm, arrays = d.model_payload(base, base_args)
    requests = {n: d.content({**papm, "data-info": info.to_dict(), "classes": groups[g]}, **arrays)
                for g, ns in members.items() for n in ns}
    replies = d.send("prune", "query.apoz", requests)
    for g, ns in members.items():
        for n in ns:
            if n in replies:
                contributed[g] += 1
                counts[g] = counts[g] + ActivationCounts.from_arrays(
                    {k: torch.from_numpy(np.array(v.numpy())) for k, v in replies[n]["counts"].items()})
    d.group_nodes(assignment)  # a group whose every node failed just now stops the run here
    return counts, contributed


def finetune(d: RunDriver, models: dict, args: dict, base, base_args, info, assignment: dict) -> None:
    """``finetune-rounds`` rounds of FedAvg inside each group (all groups in one exchange per round)."""
    cfg, groups = d.cfg, assignment["groups"]
    teacher = d.model_payload(base, base_args, "teacher") if cfg.kd else ({}, {})
    for rnd in range(cfg.finetune_rounds):
        members = d.group_nodes(assignment)
        requests = {}
        for g, ns in members.items():
            papm, arrays = d.model_payload(models[g], args[g])
            for n in ns:
                requests[n] = d.content({**papm, **teacher[0], "data-info": info.to_dict(), "classes": groups[g],
                                         "round": rnd}, **arrays, **teacher[1])
        replies = d.send("prune", "train.finetune", requests)
        for g, ns in members.items():
            got = [n for n in ns if n in replies]
            if not got:
                raise PapmError(f"device group {g} lost every node while fine-tuning; bring one back and continue with --resume")
            models[g].load_state_dict(weighted_average([record_state(replies[n]["model"]) for n in got],
                                                       [float(replies[n]["metrics"]["num-examples"]) for n in got]))
        d.rd.log_metrics("finetune", round=rnd + 1, nodes=len(replies))


def run(d: RunDriver) -> None:
    cfg = d.cfg
    base, info, base_args = d.rd.load_base()
    assignment = d.rd.load_assignment()
    groups = assignment["groups"]
    settings = PruneSettings(budget=cfg.budget, criterion=cfg.criterion, alpha=cfg.alpha, round_to=cfg.round_to,
                             apoz_samples=cfg.apoz_samples).validate()
    if cfg.criterion in ("papm", "apoz"):
        counts, apoz_nodes = group_apoz_counts(d, base, base_args, info, assignment)
    else:
        counts, apoz_nodes = {g: ActivationCounts() for g in range(len(groups))}, {g: 0 for g in range(len(groups))}
    models, args = {}, {}
    for g in range(len(groups)):
        model = copy.deepcopy(base).cpu()
        result, args[g] = prune_model(model, base_args, info, settings, counts[g] if counts[g].zeros else None, seed=cfg.seed)
        models[g] = model
        d.rd.log_metrics("prune", device=g, params_before=result.params_before, params_after=result.params_after,
                         reduction=round(result.reduction, 6))
    finetune(d, models, args, base, base_args, info, assignment)
    test = d.test_split()
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    macs_before, params_before = macs_and_params(base.cpu(), example)
    for g, model in models.items():
        out = d.rd.device_dir(g)
        path = save_checkpoint(out / "pruned.pt", model, args[g], info, kind="pruned", meta={"classes": groups[g], "device": g})
        macs_after, params_after = macs_and_params(model, example)
        atomic_write_json(out / "prune.json", {
            "device": g, "classes": groups[g], "class_names": [info.class_names[c] for c in groups[g]],
            "params_before": params_before, "params_after": params_after,
            "reduction": round(1 - params_after / params_before, 6), "target": cfg.budget, "criterion": cfg.criterion,
            "alpha": cfg.alpha, "kept_channels": args[g]["channels"], "macs_before": macs_before, "macs_after": macs_after,
            "bytes": path.stat().st_size,
            "test_accuracy": {"all": evaluate(model, test, info, d.device)["accuracy"],
                              "group": evaluate(model, test, info, d.device, classes=groups[g])["accuracy"]},
            "apoz_nodes": apoz_nodes[g],
        })
