"""Phase 5, fusion: the head over the frozen extractors, from every node's data.

The frozen extractors go to every node. ``fusion-head=fedavg``: the head's feature standardisation
comes from feature sums (exact across nodes); then ``fusion-rounds`` rounds of local head training
and FedAvg. Each round's nodes also report how many of their local validation images the
head they received gets right; the head of the round with the best federated validation
accuracy is kept (more rounds overfit the small head). The heads are saved after every
round (``progress/fusion.pt``): a killed run resumes at the round it was in.
``fusion-head=lda``: one exchange of per-class feature sums and Gram matrices, which add up
exactly, and a linear head in closed form (``shared.fusion.fit_lda_head``): the head of all
the nodes' images in one place whatever the partition, where FedAvg drifts under label skew.
``fusion-head=auto`` (the default) makes both and keeps the LDA head only where the nodes' federated
validation accuracy of it beats that of FedAvg's best round (measured: it does under label skew, by 1-3
points on the CIFAR-10 subset; FedAvg's MLP wins on IID digits). Output: ``fusion/head.pt``.
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
from ...shared.fusion import FusionHead, SplitModel, fit_lda_head, head_args
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
    dims = [e.feature_dim for e in extractors]
    test = d.test_split()
    stats, lda = None, None
    if cfg.fusion_head != "fedavg":  # lda and auto: the closed-form head, from one exchange of summed statistics
        stats = _summed_stats(d, papm, arrays)
        lda = _lda_candidate(d, stats, extractors, papm, arrays, info, test)
        if cfg.fusion_head == "lda":
            return _save(d, lda["head"], lda["args"], info, len(extractors), {"fit": "lda", "val_accuracy": [lda["val"]]})
    hargs = head_args(dims, info.num_classes, cfg.fusion_hidden)
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
        stats = stats or _summed_stats(d, papm, arrays)
        torch.manual_seed(cfg.seed)
        head = FusionHead(hargs["feature_dims"], hargs["num_classes"], hargs["hidden"])
        head.set_normalisation(stats["sum"], stats["sqsum"], int(stats["count"]))
    d.rd.rewind_metrics({"fusion": len(heads), "fusion-selection": None})
    split = SplitModel(extractors, head)
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
    val.append(_validate(d, head, hargs, papm, arrays))
    # the round whose head the nodes' local validation splits liked best (the head overfits with more rounds);
    # the test split is never used for this choice
    best = max(range(len(heads)), key=lambda r: (val[r], r)) if not any(v != v for v in val) else len(heads) - 1
    head.load_state_dict(heads[best])
    chosen = "lda" if lda is not None and lda["val"] > val[best] else "fedavg"  # auto: the LDA head only if it is better
    d.rd.log_metrics("fusion-selection", chosen_round=best + 1, val_accuracy=[round(v, 6) for v in val], chosen=chosen,
                     **({"lda_val_accuracy": round(lda["val"], 6)} if lda is not None else {}))
    if val[best] != val[best]:  # nodes too small to keep validation images: nothing to choose by
        log(INFO, "fusion: no node holds validation images: the last round's head kept%s",
            " (not the LDA head, which is kept only when it validates better)" if lda is not None else "")
    else:
        log(INFO, "fusion: head of round %d (federated validation accuracy %.4f)%s", best + 1, val[best],
            f"; the LDA head's {lda['val']:.4f} -> {chosen} head kept" if lda is not None else " kept")
    if chosen == "lda":
        return _save(d, lda["head"], lda["args"], info, len(extractors),
                     {"fit": "lda", "val_accuracy": [lda["val"]], "fedavg_val_accuracy": val})
    _save(d, head, hargs, info, len(extractors), {"fit": "fedavg", "round": best + 1, "val_accuracy": val})


def _summed_stats(d: RunDriver, papm: dict, arrays: dict) -> dict:
    """Every node's feature statistics, summed: ``sum``, ``sqsum`` and ``count`` (the head's standardisation),
    and for an LDA head also ``class-sum``, ``class-count`` and ``gram``."""
    replies = d.send("fusion", "query.feature_stats", {n: d.content(papm, **arrays) for n in d.nodes})
    if not replies:
        raise PapmError("no node returned feature statistics; check the nodes and continue with --resume")
    sums = [record_state(c["sums"]) for c in replies.values()]
    total = {k: sum(s[k] for s in sums) for k in sums[0]}
    if "gram" in total:
        total["sum"], total["sqsum"] = total["class-sum"].sum(0), total["gram"].diagonal()
    total["count"] = sum(int(c["metrics"]["num-examples"]) for c in replies.values())
    total["nodes"] = len(replies)
    return total


def _lda_candidate(d: RunDriver, stats: dict, extractors: list, papm: dict, arrays: dict, info, test) -> dict:
    """The closed-form LDA head, its test accuracy and the nodes' federated validation accuracy of it."""
    hargs = head_args([e.feature_dim for e in extractors], info.num_classes, hidden=0)
    head = FusionHead(hargs["feature_dims"], hargs["num_classes"], hargs["hidden"])
    fit_lda_head(head, stats["class-sum"], stats["class-count"], stats["gram"], d.cfg.fusion_shrinkage)
    acc = evaluate(SplitModel(extractors, head), test, info, d.device)["accuracy"]
    val = _validate(d, head, hargs, papm, arrays)
    d.rd.rewind_metrics({"fusion-lda": None})
    d.rd.log_metrics("fusion-lda", nodes=stats["nodes"], test_accuracy=acc, val_accuracy=val)
    log(INFO, "fusion: LDA head from the nodes' summed statistics: test accuracy %.4f, federated validation accuracy %.4f",
        acc, val)
    return {"head": head, "args": hargs, "val": val}


def _validate(d: RunDriver, head: FusionHead, hargs: dict, papm: dict, arrays: dict) -> float:
    """The nodes' federated validation accuracy of ``head``."""
    replies = d.send("fusion", "query.fusion_val", {n: d.content({"head-args": hargs, **papm}, head=state_record(head.state_dict()),
                                                                **arrays) for n in d.nodes})
    return _val_accuracy(replies)


def _save(d: RunDriver, head: FusionHead, hargs: dict, info, k: int, meta: dict) -> None:
    save_head(d.rd.path / "fusion" / "head.pt", head, hargs, info, meta={"devices": list(range(k)), **meta})


def _val_accuracy(replies: dict) -> float:
    """Federated validation accuracy from the nodes' counts (nan when no node has a validation split)."""
    count = sum(int(c["metrics"]["val-count"]) for c in replies.values())
    return sum(int(c["metrics"]["val-correct"]) for c in replies.values()) / count if count else float("nan")
