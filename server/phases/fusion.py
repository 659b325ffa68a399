"""Phase 5, fusion: the head over the frozen extractors, trained with FedAvg over all nodes.

The frozen extractors go to every node; the head's feature standardisation comes from
feature sums (exact across nodes); then ``fusion-rounds`` rounds of local head training
and FedAvg. Output: ``fusion/head.pt``.
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
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
    replies = d.send("fusion", "query.feature_stats", {n: d.content(papm, **arrays) for n in d.nodes})
    if not replies:
        raise PapmError("no node returned feature statistics; check the nodes and continue with --resume")
    hargs = head_args([e.feature_dim for e in extractors], info.num_classes, cfg.fusion_hidden)
    torch.manual_seed(cfg.seed)
    head = FusionHead(hargs["feature_dims"], hargs["num_classes"], hargs["hidden"])
    total = sum(torch.from_numpy(np.array(c["sums"]["sum"].numpy())) for c in replies.values())
    total_sq = sum(torch.from_numpy(np.array(c["sums"]["sqsum"].numpy())) for c in replies.values())
    count = sum(int(c["metrics"]["num-examples"]) for c in replies.values())
    head.set_normalisation(total, total_sq, count)
    split = SplitModel(extractors, head)
    test = d.test_split()
    for rnd in range(cfg.fusion_rounds):
        replies = d.send("fusion", "train.fusion", {
            n: d.content({**papm, "head-args": hargs, "round": rnd}, head=state_record(head.state_dict()), **arrays)
            for n in d.nodes})
        if not replies:
            raise PapmError("no node trained the fusion head; check the nodes and continue with --resume")
        head.load_state_dict(weighted_average([record_state(c["head"]) for c in replies.values()],
                                              [float(c["metrics"]["num-examples"]) for c in replies.values()]))
        acc = evaluate(split, test, info, d.device)["accuracy"]
        d.rd.log_metrics("fusion", round=rnd + 1, nodes=len(replies), test_accuracy=acc)
        log(INFO, "fusion round %d/%d: %d nodes, test accuracy %.4f", rnd + 1, cfg.fusion_rounds, len(replies), acc)
    save_head(d.rd.path / "fusion" / "head.pt", head, hargs, info, meta={"devices": list(range(len(extractors)))})
