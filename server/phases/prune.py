"""Phase 3, prune: one PAPM plan per device group, then fine-tuning with FedAvg.

APoZ counts of the base model on the group's classes come from the nodes as sums (a node
with no sample of the group's classes adds nothing and stays in the run); the group's plan
(kept channels per layer) follows from the summed counts and the base weights, made here;
the pruned model is then fine-tuned with FedAvg for ``finetune-rounds`` rounds.

Who works on a group's model (``finetune-nodes``): ``all`` nodes (every node's data, each
weighing the group's classes by ``emphasis``) or only the group's own nodes. The budget,
``finetune-epochs``, counts passes over all nodes' data together: each working node takes
that many steps' worth per round, so a group's share of the data, or the number of nodes,
never shrinks the fine-tuning (FedAvg with k nodes of 1/k of the data each would otherwise
take 1/k of the sequential steps of centralised fine-tuning). FedAvg weighs each node by
its share of the group's weighted objective. Afterwards each model's BatchNorm statistics are re-estimated
exactly from its nodes' data (``bn-recalibrate``). The pruned models are saved right after
pruning and after every round (``progress/prune.pt``): a killed run resumes at the round it
was in. Outputs: ``devices/device-k/pruned.pt`` and ``prune.json``.
"""

from __future__ import annotations

import copy
import json
import math
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.common.logger import log

from ...client.records import record_state
from ...shared.checkpoint import save_checkpoint
from ...shared.errors import PapmError
from ...shared.files import atomic_write_json
from ...shared.importance import ActivationCounts
from ...shared.models import build_model
from ...shared.pruning import macs_and_params
from ...shared.specialise import PruneSettings, prune_model
from ...shared.training import evaluate
from ..fedavg import weighted_average

if TYPE_CHECKING:
    from ..driver import RunDriver


def job_key(g: int) -> str:
    return f"group-{g}"


def workers(d: RunDriver, assignment: dict) -> dict[str, list[int]]:
    """Model key -> the live nodes that work on that group's model (``finetune-nodes``)."""
    members = d.group_nodes(assignment)  # a group that lost every node stops the run here
    if d.cfg.finetune_nodes == "all":
        return {job_key(g): sorted(d.nodes) for g in members}
    return {job_key(g): ns for g, ns in members.items()}


def group_apoz_counts(d: RunDriver, base, base_args, info, assignment: dict) -> tuple[dict, dict]:
    """Group -> summed APoZ counts, and group -> how many nodes had samples of its classes."""
    groups = assignment["groups"]
    holders = workers(d, assignment)
    jobs = {job_key(g): {"classes": groups[g]} for g in range(len(groups))}
    papm, arrays = d.model_payload(base, base_args)
    requests = d.job_requests(holders, {}, {**papm, "data-info": info.to_dict()}, arrays, jobs)
    replies = d.send("prune", "query.apoz", requests)
    counts = {g: ActivationCounts() for g in range(len(groups))}
    contributed = {g: 0 for g in range(len(groups))}
    for g in range(len(groups)):
        key = job_key(g)
        for n in holders[key]:
            if n in replies:
                if json.loads(replies[n]["results"][key])["num-examples"] == 0:
                    continue
                contributed[g] += 1
                counts[g] = counts[g] + ActivationCounts.from_arrays(
                    {k: torch.from_numpy(np.array(v.numpy())) for k, v in replies[n][f"counts-{key}"].items()})
    d.group_nodes(assignment)  # a group whose every node failed just now stops the run here
    return counts, contributed


def finetune_steps(cfg, total_examples: int) -> int:
    """Local SGD steps per round: ``finetune-epochs`` passes over all nodes' training data together, split
    over the rounds. Every node that works on a group's model takes that many steps, so the model takes as
    many sequential steps as fine-tuning on all the data in one place would, whatever the nodes' shares."""
    return max(1, math.ceil(cfg.finetune_epochs * total_examples / (cfg.batch_size * cfg.finetune_rounds)))


def save_progress(d: RunDriver, rnd: int, models: dict, args: dict, apoz_nodes: dict) -> None:
    """The pruned models after fine-tuning round ``rnd`` (0: right after pruning) and what rebuilds them."""
    d.rd.save_progress("prune", {"round": rnd, "args": json.dumps({str(g): a for g, a in args.items()}),
                                 "apoz_nodes": json.dumps({str(g): n for g, n in apoz_nodes.items()}),
                                 "models": {str(g): m.state_dict() for g, m in models.items()}})


def resume_progress(d: RunDriver) -> tuple[int, dict, dict, dict] | None:
    """(round, models, args, apoz_nodes) of a killed run, or None."""
    progress = d.rd.load_progress("prune")
    if not progress:
        return None
    args = {int(g): a for g, a in json.loads(progress["args"]).items()}
    models = {}
    for g, a in args.items():
        models[g] = build_model(a)
        models[g].load_state_dict(progress["models"][str(g)])
    apoz_nodes = {int(g): n for g, n in json.loads(progress["apoz_nodes"]).items()}
    return int(progress["round"]), models, args, apoz_nodes


def finetune(d: RunDriver, models: dict, args: dict, base, base_args, info, assignment: dict, apoz_nodes: dict,
             start: int = 0) -> None:
    """``finetune-rounds`` rounds of FedAvg for every group's model at once (one exchange per round),
    from round ``start``; the models are saved after every round."""
    cfg, groups = d.cfg, assignment["groups"]
    teacher = d.model_payload(base, base_args, "teacher") if cfg.kd else ({}, {})
    for rnd in range(start, cfg.finetune_rounds):
        holders = workers(d, assignment)
        steps = finetune_steps(cfg, sum(v["num_examples"] for v in d.nodes.values()))
        jobs = {job_key(g): {"classes": groups[g], "round": rnd, "steps": steps} for g in range(len(groups))}
        models_by_key = {job_key(g): (models[g], args[g]) for g in range(len(groups))}
        requests = d.job_requests(holders, models_by_key, {**teacher[0], "data-info": info.to_dict()}, teacher[1], jobs)
        replies = d.send("prune", "train.finetune", requests)
        for g in range(len(groups)):
            key = job_key(g)
            got = [n for n in holders[key] if n in replies]
            if not got:
                raise PapmError(f"device group {g} lost every node while fine-tuning; bring one back and continue with --resume")
            results = [json.loads(replies[n]["results"][key]) for n in got]
            weights = [r["weight"] for r in results]
            if sum(weights) <= 0:
                weights = [r["num-examples"] for r in results]
            models[g].load_state_dict(weighted_average([record_state(replies[n][key]) for n in got], weights))
        d.rd.log_metrics("finetune", round=rnd + 1, nodes=len(replies))
        save_progress(d, rnd + 1, models, args, apoz_nodes)
    if cfg.bn_recalibrate:
        d.recalibrate_bn("prune", {job_key(g): (models[g], args[g]) for g in range(len(groups))}, workers(d, assignment), info)


def run(d: RunDriver) -> None:
    cfg = d.cfg
    base, info, base_args = d.rd.load_base()
    assignment = d.rd.load_assignment()
    groups = assignment["groups"]
    resumed = resume_progress(d)
    if resumed:  # a killed run: pruning and the finished fine-tuning rounds are kept
        start, models, args, apoz_nodes = resumed
        log(INFO, "prune: resuming after fine-tuning round %d of %d", start, cfg.finetune_rounds)
        d.rd.rewind_metrics({"finetune": start})
    else:
        d.rd.rewind_metrics({"prune": None, "finetune": None})
        start, models, args, apoz_nodes = 0, *prune_groups(d, base, base_args, info, assignment)
        save_progress(d, 0, models, args, apoz_nodes)
    finetune(d, models, args, base, base_args, info, assignment, apoz_nodes, start)
    write_outputs(d, models, args, base, info, groups, apoz_nodes)


def prune_groups(d: RunDriver, base, base_args, info, assignment: dict) -> tuple[dict, dict, dict]:
    """One pruned copy of the base model per group: (models, model_args, apoz node counts)."""
    cfg, groups = d.cfg, assignment["groups"]
    settings = PruneSettings(budget=cfg.budget, criterion=cfg.criterion, alpha=cfg.alpha, round_to=cfg.round_to,
                             apoz_samples=cfg.apoz_samples).validate()
    if cfg.criterion in ("papm", "apoz"):
        counts, apoz_nodes = group_apoz_counts(d, base, base_args, info, assignment)
    else:
        counts, apoz_nodes = {g: ActivationCounts() for g in range(len(groups))}, {g: 0 for g in range(len(groups))}
    models, args = {}, {}
    for g in range(len(groups)):
        model = copy.deepcopy(base).cpu()
        group_settings = settings
        if cfg.criterion in ("papm", "apoz") and not counts[g].zeros:
            # no node holds an image of this group's classes: no APoZ exists, the weights alone decide
            log(WARNING, "no node holds samples of group %d's classes; pruning it by weight norms only", g)
            group_settings = PruneSettings(**{**settings.__dict__, "criterion": "papm", "alpha": 1.0})
        result, args[g] = prune_model(model, base_args, info, group_settings, counts[g] if counts[g].zeros else None, seed=cfg.seed)
        models[g] = model
        d.rd.log_metrics("prune", device=g, params_before=result.params_before, params_after=result.params_after,
                         reduction=round(result.reduction, 6))
    return models, args, apoz_nodes


def write_outputs(d: RunDriver, models: dict, args: dict, base, info, groups: list, apoz_nodes: dict) -> None:
    cfg = d.cfg
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
