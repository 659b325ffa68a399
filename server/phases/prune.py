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

The compression options (``compression_options.py``) change the cut, not the rounds:
``schedule=iterative`` makes ``steps`` cuts, each group's APoZ re-measured on the nodes on its
current model, with one FedAvg round of ``step-epochs`` (or BatchNorm re-estimation only)
between cuts; ``data-free`` cuts by weights alone and restores the removed channels in the next
layers, with no fine-tuning; ``sparsity`` zeroes single weights instead (the nodes keep zeros
zero while fine-tuning); ``weight-bits`` rounds the fine-tuned weights per output channel, to nearest
on the server (``weight-quant=rtn``) or by GPTQ (``gptq``): layer by layer, each layer's input statistics
``X^T X`` summed over the nodes' images of the group's classes (one exchange per layer).
"""

from __future__ import annotations

import copy
import json
import math
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import torch
from flwr.common.logger import log

from ...client.records import record_state
from ...shared.checkpoint import save_checkpoint
from ...shared.errors import PapmError
from ...shared.files import atomic_write_csv, atomic_write_json
from ...shared.compression import quantize_weights, size_report, sparsity_masks
from ...shared.importance import ActivationCounts
from ...shared.lowbit import gptq_from_sums, gptq_layer_order
from ...shared.models import build_model
from ...shared.pruning import macs_and_params
from ...shared.restore import restore_after_pruning
from ...shared.sparsity import apply_masks
from ...shared.specialise import PruneSettings, prune_model, step_targets
from ...shared.training import evaluate
from ..fedavg import weighted_average

if TYPE_CHECKING:
    from ..driver import RunDriver


def target_budget(cfg) -> float | None:
    """The fraction of parameters (or, sparse, of conv weights) each model loses (``RunConfig.compression``)."""
    return cfg.compression()["budget"]


def cuts(cfg) -> int:
    """How many cuts the run makes: ``steps`` channel cuts with the iterative schedule, else one."""
    return cfg.steps if cfg.schedule == "iterative" else 1


def job_key(g: int) -> str:
    return f"group-{g}"


def workers(d: RunDriver, assignment: dict) -> dict[str, list[int]]:
    """Model key -> the live nodes that work on that group's model (``finetune-nodes``)."""
    members = d.group_nodes(assignment)  # a group that lost every node stops the run here
    if d.cfg.finetune_nodes == "all":
        return {job_key(g): sorted(d.nodes) for g in members}
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


def save_progress(d: RunDriver, rnd: int, done: int, models: dict, args: dict, apoz_nodes: dict) -> None:
    """The models after ``done`` cuts and fine-tuning round ``rnd`` (0: right after the last cut), and what
    rebuilds them."""
    d.rd.save_progress("prune", {"round": rnd, "cuts": done, "args": json.dumps({str(g): a for g, a in args.items()}),
                                 "apoz_nodes": json.dumps({str(g): n for g, n in apoz_nodes.items()}),
                                 "models": {str(g): m.state_dict() for g, m in models.items()}})


def resume_progress(d: RunDriver) -> tuple[int, int, dict, dict, dict] | None:
    """(round, cuts done, models, args, apoz_nodes) of a killed run, or None."""
    progress = d.rd.load_progress("prune")
    if not progress:
        return None
    args = {int(g): a for g, a in json.loads(progress["args"]).items()}
    models = {}
    for g, a in args.items():
        models[g] = build_model(a)
        models[g].load_state_dict(progress["models"][str(g)])
    apoz_nodes = {int(g): n for g, n in json.loads(progress["apoz_nodes"]).items()}
    done = int(progress.get("cuts", cuts(d.cfg)))  # a file from before iterative schedules held the one cut
    return int(progress["round"]), done, models, args, apoz_nodes


def finetune_round(d: RunDriver, models: dict, args: dict, teacher: tuple, info, assignment: dict, rnd: int,
                   rounds: int, epochs: float) -> int:
    """One FedAvg round of fine-tuning for every group's model at once (``rnd`` of ``rounds`` of one learning-rate
    schedule over ``epochs`` passes); returns how many nodes answered."""
    cfg, groups = d.cfg, assignment["groups"]
    holders = workers(d, assignment)
    steps = finetune_steps(cfg, sum(v["num_examples"] for v in d.nodes.values()), epochs, rounds)
    keep_zeros = cfg.compression()["sparsity"] != "none"  # sparse models: the nodes keep zero weights zero
    jobs = {job_key(g): {"classes": groups[g], "round": rnd, "rounds": rounds, "steps": steps, "keep-zeros": keep_zeros}
            for g in range(len(groups))}
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
    return len(replies)


def recalibrate(d: RunDriver, models: dict, args: dict, info, assignment: dict) -> None:
    groups = assignment["groups"]
    d.recalibrate_bn("prune", {job_key(g): (models[g], args[g]) for g in range(len(groups))}, workers(d, assignment), info)


def finetune(d: RunDriver, models: dict, args: dict, base, base_args, info, assignment: dict, apoz_nodes: dict,
             start: int = 0) -> None:
    """``finetune-rounds`` rounds of FedAvg for every group's model at once (one exchange per round),
    from round ``start``; the models are saved after every round."""
    cfg = d.cfg
    teacher = d.model_payload(base, base_args, "teacher") if cfg.kd else ({}, {})
    for rnd in range(start, cfg.finetune_rounds):
        answered = finetune_round(d, models, args, teacher, info, assignment, rnd, cfg.finetune_rounds, cfg.finetune_epochs)
        d.rd.log_metrics("finetune", round=rnd + 1, nodes=answered)
        save_progress(d, rnd + 1, cuts(cfg), models, args, apoz_nodes)
    if cfg.bn_recalibrate:
        recalibrate(d, models, args, info, assignment)


def run(d: RunDriver) -> None:
    cfg = d.cfg
    base, info, base_args = d.rd.load_base()
    assignment = d.rd.load_assignment()
    groups = assignment["groups"]
    resumed = resume_progress(d)
    if resumed:  # a killed run: the cuts and the finished fine-tuning rounds are kept
        start, done, models, args, apoz_nodes = resumed
        log(INFO, "prune: resuming after cut %d of %d, fine-tuning round %d of %d", done, cuts(cfg), start,
            cfg.finetune_rounds)
        d.rd.rewind_metrics({"prune": done, "prune-recovery": done, "finetune": start})
    else:
        d.rd.rewind_metrics({"prune": None, "prune-recovery": None, "finetune": None})
        start, done = 0, 0
        models = {g: copy.deepcopy(base).cpu() for g in range(len(groups))}
        args = {g: base_args for g in range(len(groups))}
        apoz_nodes = {g: 0 for g in range(len(groups))}
    while done < cuts(cfg):
        apoz_nodes = cut(d, models, args, base, base_args, info, assignment, done)
        done += 1
        if done < cuts(cfg):  # between two cuts of the iterative schedule: a short recovery
            teacher = d.model_payload(base, base_args, "teacher") if cfg.kd else ({}, {})
            if cfg.step_epochs > 0:
                finetune_round(d, models, args, teacher, info, assignment, 0, 1, cfg.step_epochs)
            recalibrate(d, models, args, info, assignment)
            for g, model in models.items():
                d.rd.log_metrics("prune-recovery", round=done, device=g, **test_accuracy(d, model, info, groups[g]))
        save_progress(d, 0, done, models, args, apoz_nodes)
    if not cfg.data_free:  # data-free models take no step on data
        finetune(d, models, args, base, base_args, info, assignment, apoz_nodes, start)
    weights = {}
    compression = cfg.compression()
    bits = compression["weight_bits"]
    if bits and compression["weight_quant"] == "gptq":  # after fine-tuning and BatchNorm: what the devices run
        weights = gptq(d, models, args, info, assignment, bits)
    elif bits:
        for g, model in models.items():
            weights[g] = quantize_weights(model, bits, "rtn", None, info)
    write_outputs(d, models, args, base, info, groups, apoz_nodes, weights)


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
    return {"test_all": evaluate(model, test, info, d.device)["accuracy"],
            "test_group": evaluate(model, test, info, d.device, classes=classes)["accuracy"]}


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


def write_steps(path, metrics: list[dict], g: int, final: dict) -> None:
    """One row per cut of device ``g``'s model: parameters, reduction and test accuracy after the cut, after the
    recovery before the next cut, and (last row) after fine-tuning and weight rounding."""
    recovered = {m["round"]: m for m in metrics if m["phase"] == "prune-recovery" and m.get("device") == g}
    rows = []
    for m in (m for m in metrics if m["phase"] == "prune" and m.get("device") == g):
        row = {"step": m["round"], "params": m.get("params_after"), "nonzero_params": m.get("nonzero_params", m.get("params_after")),
               "reduction": m.get("reduction"), "after_cut_group": m.get("test_group"), "after_cut_all": m.get("test_all")}
        r = recovered.get(m["round"], {})
        row.update(after_recovery_group=r.get("test_group"), after_recovery_all=r.get("test_all"))
        rows.append(row)
    if rows:
        rows[-1].update(final_group=final["test_group"], final_all=final["test_all"])
        atomic_write_csv(path, rows)


def write_outputs(d: RunDriver, models: dict, args: dict, base, info, groups: list, apoz_nodes: dict,
                  weights: dict) -> None:
    cfg = d.cfg
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    macs_before, params_before = macs_and_params(base.cpu(), example)
    metrics = d.rd.metrics()
    for g, model in models.items():
        out = d.rd.device_dir(g)
        final = test_accuracy(d, model, info, groups[g])
        write_steps(out / "prune_steps.csv", metrics, g, final)
        path = save_checkpoint(out / "pruned.pt", model, args[g], info, kind="pruned", meta={"classes": groups[g], "device": g})
        macs_after, params_after = macs_and_params(model, example)
        atomic_write_json(out / "prune.json", {
            "device": g, "classes": groups[g], "class_names": [info.class_names[c] for c in groups[g]],
            "params_before": params_before, "params_after": params_after,
            # the last cut's: 1 - parameters (sparse: non-zero weights, before any rounding) / the base's
            "reduction": next((m["reduction"] for m in reversed(metrics) if m["phase"] == "prune" and m.get("device") == g),
                              round(1 - params_after / params_before, 6)),
            "target": None if target_budget(cfg) is None else round(target_budget(cfg), 6),
            "schedule": cfg.schedule, "cuts": cuts(cfg), "data_free": cfg.data_free, **cfg.compression(),
            "weights": weights.get(g, {"weight_bits": 32}), "size": size_report(model),
            "criterion": cfg.criterion if cfg.compression()["sparsity"] == "none" and target_budget(cfg) is not None else None,
            "baseline": cfg.baseline, "grouping": cfg.grouping,
            "alpha": cfg.alpha, "kept_channels": args[g]["channels"], "macs_before": macs_before, "macs_after": macs_after,
            "bytes": path.stat().st_size,
            "test_accuracy": {"all": final["test_all"], "group": final["test_group"]},
            "apoz_nodes": apoz_nodes[g],
        })
