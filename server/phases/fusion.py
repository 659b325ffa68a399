"""Phase 5, fusion: the head over the frozen extractors, trained with FedAvg over all nodes.

The frozen extractors go to every node; the head's feature standardisation comes from
feature sums (exact across nodes); then ``fusion-rounds`` rounds of local head training
and FedAvg. Each round's nodes also report how many of their local validation images the
head they received gets right; the head of the round with the best federated validation
accuracy is kept (more rounds overfit the small head). The heads are saved after every
round (``progress/fusion.pt``): a killed run resumes at the round it was in.
Output: ``fusion/head.pt``.
"""

from __future__ import annotations

import json
from logging import INFO
from typing import TYPE_CHECKING

import torch
from flwr.common.logger import log

from ...client.records import record_state, state_record
from ...shared.checkpoint import save_head
from ...shared.errors import PapmError
from ...shared.fusion import FusionHead, SplitModel, head_args
from ...shared.training import evaluate
from ..fedavg import weighted_average

if TYPE_CHECKING:
    from ..driver import RunDriver


def run(d: RunDriver) -> None:
    cfg = d.cfg
    _, info, _ = d.rd.load_base()
    loaded = [d.rd.load_extractor(g) for g in range(d.rd.load_assignment()["k"])]
    extractors = [m for m, _ in loaded]
    papm, arrays = d.extractors_payload(loaded)
    papm["data-info"] = info.to_dict()
    # every node's class counts (from hello): each node shifts its logits by its own class mix against this
    papm["class-counts"] = d.class_counts(d.nodes)
    hargs = head_args([e.feature_dim for e in extractors], info.num_classes, cfg.fusion_hidden)
    head = FusionHead(hargs["feature_dims"], hargs["num_classes"], hargs["hidden"])
    heads: list[dict] = []  # the global head after each round
    val: list[float] = []  # federated validation accuracy of heads[r], reported by the nodes one round later
    progress = d.rd.load_progress("fusion")
    if progress:  # a killed run resumes at the round it was in
        heads = [progress["heads"][str(r)] for r in range(int(progress["round"]))]
        val = json.loads(progress["val"])
        head.load_state_dict(heads[-1])
        log(INFO, "fusion: resuming after round %d of %d", len(heads), cfg.fusion_rounds)
    else:
        replies = d.send("fusion", "query.feature_stats", {n: d.content(papm, **arrays) for n in d.nodes})
        if not replies:
            raise PapmError("no node returned feature statistics; check the nodes and continue with --resume")
        torch.manual_seed(cfg.seed)
        head = FusionHead(hargs["feature_dims"], hargs["num_classes"], hargs["hidden"])
        sums = [record_state(c["sums"]) for c in replies.values()]
        total = sum(s["sum"] for s in sums)
        total_sq = sum(s["sqsum"] for s in sums)
        count = sum(int(c["metrics"]["num-examples"]) for c in replies.values())
        head.set_normalisation(total, total_sq, count)
    d.rd.rewind_metrics({"fusion": len(heads), "fusion-selection": None})
    split = SplitModel(extractors, head)
    test = d.test_split()
    for rnd in range(len(heads), cfg.fusion_rounds):
        replies = d.send("fusion", "train.fusion", {
            n: d.content({**papm, "head-args": hargs, "round": rnd}, head=state_record(head.state_dict()), **arrays)
            for n in d.nodes})
        if not replies:
            raise PapmError("no node trained the fusion head; check the nodes and continue with --resume")
        if rnd > 0:
            val.append(_val_accuracy(replies))
        head.load_state_dict(weighted_average([record_state(c["head"]) for c in replies.values()],
                                              [float(c["metrics"]["num-examples"]) for c in replies.values()]))
        heads.append({k: v.clone() for k, v in head.state_dict().items()})
        acc = evaluate(split, test, info, d.device)["accuracy"]
        d.rd.log_metrics("fusion", round=rnd + 1, nodes=len(replies), test_accuracy=acc)
        d.rd.save_progress("fusion", {"round": rnd + 1, "heads": {str(r): h for r, h in enumerate(heads)}, "val": json.dumps(val)})
        log(INFO, "fusion round %d/%d: %d nodes, test accuracy %.4f", rnd + 1, cfg.fusion_rounds, len(replies), acc)
    last = d.send("fusion", "query.fusion_val", {n: d.content({"head-args": hargs, **papm}, head=state_record(head.state_dict()),
                                                             **arrays) for n in d.nodes})
    val.append(_val_accuracy(last))
    # the round whose head the nodes' local validation splits liked best (the head overfits with more rounds);
    # the test split is never used for this choice
    best = max(range(len(heads)), key=lambda r: (val[r], r)) if not any(v != v for v in val) else len(heads) - 1
    head.load_state_dict(heads[best])
    d.rd.log_metrics("fusion-selection", chosen_round=best + 1, val_accuracy=[round(v, 6) for v in val])
    log(INFO, "fusion: head of round %d kept (federated validation accuracy %.4f)", best + 1, val[best])
    save_head(d.rd.path / "fusion" / "head.pt", head, hargs, info,
              meta={"devices": list(range(len(extractors))), "round": best + 1, "val_accuracy": val})


def _val_accuracy(replies: dict) -> float:
    """Federated validation accuracy from the nodes' counts (nan when no node has a validation split)."""
    count = sum(int(c["metrics"]["val-count"]) for c in replies.values())
    return sum(int(c["metrics"]["val-correct"]) for c in replies.values()) / count if count else float("nan")
