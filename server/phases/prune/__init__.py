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
its share of the group's weighted objective. Under label skew each node's steps pull towards its own
classes (client drift); ``finetune-logit-adjust`` shifts each node's logits by its class mix and
``finetune-scaffold`` adds SCAFFOLD's control variates (kept on the server, one per node and group model, saved
with the models) to its gradients. Afterwards each model's BatchNorm statistics are re-estimated
exactly from its nodes' data (``bn-recalibrate``). The pruned models are saved right after
pruning and after every round (``progress/prune.pt``): a killed run resumes at the round it
was in. After every round the server tests each model on its test split (``finetune-test`` in
metrics.jsonl, the log, prune.json's ``test_accuracy_per_round`` and summary.md's fine-tuning table).
Outputs: ``devices/device-k/pruned.pt`` and ``prune.json``.

The compression options (``compression_options.py``) change the cut, not the rounds:
``schedule=iterative`` makes ``steps`` cuts, each group's APoZ re-measured on the nodes on its
current model, with one FedAvg round of ``step-epochs`` (or BatchNorm re-estimation only)
between cuts (after the last cut, or the only one, BatchNorm is re-estimated with ``bn-recalibrate`` and the test
accuracy before and after it is reported); ``data-free`` cuts by weights alone and restores the removed channels in the next
layers, with no fine-tuning; ``sparsity`` zeroes single weights instead (the nodes keep zeros
zero while fine-tuning); ``weight-bits`` rounds the fine-tuned weights per output channel, to nearest
on the server (``weight-quant=rtn``) or by GPTQ (``gptq``): layer by layer, each layer's input statistics
``X^T X`` summed over the nodes' images of the group's classes (one exchange per layer).

This module is the phase's order of work and its resume; ``cut.py`` makes one cut, ``group_jobs.py``
holds the exchanges on the groups' models, ``outputs.py`` writes the device folders.
"""

from __future__ import annotations

import copy
import json
from logging import INFO
from typing import TYPE_CHECKING

from flwr.common.logger import log

from ....shared.compression import quantize_weights
from ....shared.models import build_model
from .cut import cut, cuts
from .group_jobs import finetune_round, gptq, recalibrate, test_accuracy
from .outputs import write_outputs

if TYPE_CHECKING:
    from ...driver import RunDriver


def save_progress(d: RunDriver, rnd: int, done: int, models: dict, args: dict, apoz_nodes: dict,
                  controls: dict | None = None) -> None:
    """The models after ``done`` cuts and fine-tuning round ``rnd`` (0: right after the last cut), what
    rebuilds them, and the SCAFFOLD control variates (``finetune-scaffold``)."""
    d.rd.save_progress("prune", {"round": rnd, "cuts": done, "args": json.dumps({str(g): a for g, a in args.items()}),
                                 "apoz_nodes": json.dumps({str(g): n for g, n in apoz_nodes.items()}),
                                 "models": {str(g): m.state_dict() for g, m in models.items()},
                                 "controls": controls or {}})


def resume_progress(d: RunDriver) -> tuple[int, int, dict, dict, dict, dict] | None:
    """(round, cuts done, models, args, apoz_nodes, control variates) of a killed run, or None."""
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
    controls = progress.get("controls", {})  # SCAFFOLD's control variates of the rounds done (finetune-scaffold)
    return int(progress["round"]), done, models, args, apoz_nodes, controls


def finetune(d: RunDriver, models: dict, args: dict, base, base_args, info, assignment: dict, apoz_nodes: dict,
             start: int = 0, controls: dict | None = None) -> None:
    """``finetune-rounds`` rounds of FedAvg for every group's model at once (one exchange per round),
    from round ``start``; the models are saved after every round."""
    cfg = d.cfg
    teacher = d.model_payload(base, base_args, "teacher") if cfg.kd else ({}, {})
    controls = controls or {}
    groups = assignment["groups"]
    for rnd in range(start, cfg.finetune_rounds):
        answered = finetune_round(d, models, args, teacher, info, assignment, rnd, cfg.finetune_rounds, cfg.finetune_epochs,
                                  controls if cfg.finetune_scaffold else None)
        d.rd.log_metrics("finetune", round=rnd + 1, nodes=answered)
        # the server's test split after every average (Flower's centralised evaluation): a long run shows how
        # far each specialist has come, and a finished one how it got there (prune.json, summary.md)
        tested = {g: test_accuracy(d, model, info, groups[g]) for g, model in models.items()}
        for g, acc in tested.items():
            d.rd.log_metrics("finetune-test", round=rnd + 1, device=g, **acc)
        log(INFO, "prune: fine-tuning round %d of %d: each device's test accuracy on its classes %s", rnd + 1,
            cfg.finetune_rounds, " ".join(f"{100 * acc['test_group']:.2f}%" for acc in tested.values()))
        save_progress(d, rnd + 1, cuts(cfg), models, args, apoz_nodes, controls)
    if cfg.bn_recalibrate:
        recalibrate(d, models, args, info, assignment)


def run(d: RunDriver) -> None:
    cfg = d.cfg
    base, info, base_args = d.rd.load_base()
    assignment = d.rd.load_assignment()
    groups = assignment["groups"]
    resumed = resume_progress(d)
    if resumed:  # a killed run: the cuts and the finished fine-tuning rounds are kept
        start, done, models, args, apoz_nodes, controls = resumed
        log(INFO, "prune: resuming after cut %d of %d, fine-tuning round %d of %d", done, cuts(cfg), start,
            cfg.finetune_rounds)
        d.rd.rewind_metrics({"prune": done, "prune-recovery": done, "prune-bn": done, "finetune": start,
                            "finetune-test": start})
    else:
        d.rd.rewind_metrics({"prune": None, "prune-recovery": None, "prune-bn": None, "finetune": None,
                            "finetune-test": None})
        start, done, controls = 0, 0, {}
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
        elif cfg.bn_recalibrate and not cfg.data_free:
            # right after the surgery: exact BatchNorm statistics of the cut model, no gradient step (what the
            # cut alone costs, told apart from what BatchNorm's stale statistics cost); the weights, so the
            # fine-tuning, are the same with or without it
            recalibrate(d, models, args, info, assignment)
            for g, model in models.items():
                d.rd.log_metrics("prune-bn", round=done, device=g, **test_accuracy(d, model, info, groups[g]))
        save_progress(d, 0, done, models, args, apoz_nodes)
    if not cfg.data_free:  # data-free models take no step on data
        finetune(d, models, args, base, base_args, info, assignment, apoz_nodes, start, controls)
    weights = {}
    compression = cfg.compression()
    bits = compression["weight_bits"]
    if bits and compression["weight_quant"] == "gptq":  # after fine-tuning and BatchNorm: what the devices run
        weights = gptq(d, models, args, info, assignment, bits)
    elif bits:
        for g, model in models.items():
            weights[g] = quantize_weights(model, bits, "rtn", None, info)
    write_outputs(d, models, args, base, info, groups, apoz_nodes, weights)
