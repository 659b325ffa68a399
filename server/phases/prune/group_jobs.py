"""The prune phase's exchanges on every group's model at once: who works on which model, the APoZ
sums, one FedAvg round of fine-tuning, exact BatchNorm, GPTQ layer by layer, and the server's test accuracy.

A model's key in a message is ``group-g``; with ``finetune-nodes=all`` every live node works on every
group's model, else only the group's own nodes (``workers``).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import torch

from ....client.records import record_state, state_record
from ....shared.errors import PapmError
from ....shared.importance import ActivationCounts
from ....shared.lowbit import gptq_from_sums, gptq_layer_order
from ....shared.inference import predict_logits
from ...fedavg import scaffold_controls, scaffold_correction, weighted_average

if TYPE_CHECKING:
    from ...driver import RunDriver


def job_key(g: int) -> str:
    return f"group-{g}"


def workers(d: RunDriver, assignment: dict) -> dict[str, list[int]]:
    """Model key -> the live nodes that work on that group's model (``finetune-nodes``)."""
    members = d.group_nodes(assignment)  # a group that lost every node stops the run here
    if d.cfg.finetune_nodes == "all":
        return {job_key(g): d.by_partition(d.nodes) for g in members}
    return {job_key(g): ns for g, ns in members.items()}


def group_apoz_counts(d: RunDriver, base, base_args, info, assignment: dict, models: dict | None = None) -> tuple[dict, dict]:
    """Group -> summed APoZ counts (of the base, or of each group's current model ``models[g]`` = (model, args)),
    and group -> how many nodes had samples of its classes."""
    groups = assignment["groups"]
    holders = workers(d, assignment)
    jobs = {job_key(g): {"classes": groups[g], "own-model": models is not None} for g in range(len(groups))}
    papm, arrays = d.model_payload(base, base_args) if models is None else ({}, {})
    own = {job_key(g): models[g] for g in range(len(groups))} if models is not None else {}
    requests = d.job_requests(holders, own, {**papm, "data-info": info.to_dict()}, arrays, jobs)
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
                    record_state(replies[n][f"counts-{key}"]))
    d.group_nodes(assignment)  # a group whose every node failed just now stops the run here
    return counts, contributed


def finetune_steps(cfg, total_examples: int, epochs: float | None = None, rounds: int | None = None) -> int:
    """Local SGD steps per round: ``finetune-epochs`` passes over all nodes' training data together, split
    over the rounds. Every node that works on a group's model takes that many steps, so the model takes as
    many sequential steps as fine-tuning on all the data in one place would, whatever the nodes' shares."""
    epochs = cfg.finetune_epochs if epochs is None else epochs
    rounds = cfg.finetune_rounds if rounds is None else rounds
    return math.ceil(epochs * total_examples / (cfg.batch_size * rounds))


def finetune_round(d: RunDriver, models: dict, args: dict, teacher: tuple, info, assignment: dict, rnd: int,
                   rounds: int, epochs: float, controls: dict | None = None) -> int:
    """One FedAvg round of fine-tuning for every group's model at once (``rnd`` of ``rounds`` of one learning-rate
    schedule over ``epochs`` passes); returns how many nodes answered. ``controls`` (group -> SCAFFOLD control
    variates, ``finetune-scaffold``): each node's steps are corrected by them, and they are updated in place."""
    cfg, groups = d.cfg, assignment["groups"]
    holders = workers(d, assignment)
    steps = finetune_steps(cfg, sum(v["num_examples"] for v in d.nodes.values()), epochs, rounds)
    keep_zeros = cfg.compression()["sparsity"] != "none"  # sparse models: the nodes keep zero weights zero
    jobs = {job_key(g): {"classes": groups[g], "round": rnd, "rounds": rounds, "steps": steps, "keep-zeros": keep_zeros}
            for g in range(len(groups))}
    if cfg.finetune_logit_adjust:  # each node shifts its logits by its class mix against that of the model's workers
        for key, job in jobs.items():
            job["class-counts"] = d.class_counts(holders[key])
    models_by_key = {job_key(g): (models[g], args[g]) for g in range(len(groups))}
    requests = d.job_requests(holders, models_by_key, {**teacher[0], "data-info": info.to_dict()}, teacher[1], jobs)
    pid = {n: d.nodes[n]["partition_id"] for n in requests}  # a node's control variates follow its data, not its id
    if controls is not None:
        for g in range(len(groups)):
            for n in holders[job_key(g)]:
                correction = scaffold_correction(controls.get(g, {}), pid[n])
                if correction is not None:
                    requests[n][f"control-{job_key(g)}"] = state_record(correction)
    before = {g: {k: p.detach().clone() for k, p in models[g].named_parameters()} for g in models} if controls is not None else {}
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
        returned = {n: record_state(replies[n][key]) for n in got}
        models[g].load_state_dict(weighted_average(list(returned.values()), weights))
        if controls is not None:
            controls[g] = scaffold_controls(before[g], {pid[n]: returned[n] for n in got},
                                            {pid[n]: float(r.get("lr-sum", 0.0)) for n, r in zip(got, results)},
                                            {pid[n]: float(w) for n, w in zip(got, weights)}, controls.get(g, {}))
    return len(replies)


def recalibrate(d: RunDriver, models: dict, args: dict, info, assignment: dict) -> None:
    groups = assignment["groups"]
    d.recalibrate_bn("prune", {job_key(g): (models[g], args[g]) for g in range(len(groups))}, workers(d, assignment), info)


def gptq(d: RunDriver, models: dict, args: dict, info, assignment: dict, bits: int) -> dict:
    """GPTQ of every group's model, layer by layer in forward order, with one exchange per layer for all groups:
    the nodes return ``X^T X`` of the layer's inputs (through the layers quantised so far) on their images of the
    group's classes, and the summed statistics are exactly those of all their calibration images in one place."""
    groups = assignment["groups"]
    holders = workers(d, assignment)
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    orders = {g: gptq_layer_order(models[g], example) for g in models}
    images = {g: 0 for g in models}
    for i in range(max(len(o) for o in orders.values())):
        todo = [g for g in models if i < len(orders[g])]
        jobs = {job_key(g): {"classes": groups[g], "layer": orders[g][i]} for g in todo}
        requests = d.job_requests({job_key(g): holders[job_key(g)] for g in todo},
                                  {job_key(g): (models[g], args[g]) for g in todo}, {"data-info": info.to_dict()}, {}, jobs)
        replies = d.send("prune", "query.gptq_inputs", requests)
        for g in todo:
            got = [n for n in holders[job_key(g)] if n in replies]
            if not got:
                raise PapmError(f"device group {g} lost every node during GPTQ; bring one back and continue with --resume")
            sums = [record_state(replies[n][f"xtx-{job_key(g)}"]) for n in got]
            if i == 0:
                images[g] = sum(json.loads(replies[n]["results"][job_key(g)])["num-examples"] for n in got)
            total = (sum(s["xtx"].double() for s in sums).float(), sum(int(s["rows"]) for s in sums))
            gptq_from_sums(models[g], bits, [orders[g][i]], lambda _name, total=total: total)
    return {g: {"weight_bits": bits, "weight_quant": "gptq", "calibration_samples": images[g]} for g in models}


def test_accuracy(d: RunDriver, model, info, classes: list[int]) -> dict:
    """The server's held-out test accuracy of a group's model, on all classes and on the group's."""
    test = d.test_split()
    # one pass over the test split for both (it runs after every fine-tuning round)
    correct = predict_logits(model, test, info, d.device).argmax(1) == test.y
    group = torch.isin(test.y, torch.as_tensor(list(classes), dtype=torch.long))
    return {"test_all": float(correct.float().mean()),
            "test_group": float(correct[group].float().mean()) if group.any() else float("nan")}
