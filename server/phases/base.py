"""Phase 0, base: the model every device specialises.

A given ``base-checkpoint`` is checked against the nodes' data (classes, image shape) and
kept with its own normalisation; otherwise the base model is trained with FedAvg over all
nodes for ``base-rounds`` rounds. BatchNorm (``bn``): with ``recalibrate`` the averaged
model's running statistics are re-estimated exactly from all nodes' sums after every round
(averaged statistics describe none of the averaged models); ``local`` (FedBN) also keeps each
node's BatchNorm weights on the node between rounds; ``average`` averages them like every
other weight. The global model is saved after every round (``progress/base.pt``), so a
killed run resumes at the round it was in. Output: ``base.pt``.
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING

import torch
from flwr.common.logger import log

from ...client.records import record_state
from ...shared.checkpoint import load_checkpoint, save_checkpoint
from ...shared.errors import PapmError
from ...shared.models import build_model, model_args
from ...shared.training import evaluate
from ..fedavg import weighted_average

if TYPE_CHECKING:
    from ..driver import RunDriver


def run(d: RunDriver) -> None:
    cfg, info = d.cfg, d.node_info
    if cfg.base_checkpoint:
        model, ckpt_info, ckpt = load_checkpoint(cfg.base_checkpoint)
        if ckpt_info.class_names != info.class_names or (ckpt_info.in_channels, ckpt_info.image_size) != (info.in_channels, info.image_size):
            raise PapmError(f"base checkpoint {cfg.base_checkpoint} has classes {ckpt_info.class_names} at "
                            f"{ckpt_info.in_channels} channel(s) x {ckpt_info.image_size} pixels, but the nodes have "
                            f"{info.class_names} at {info.in_channels} x {info.image_size}; use a matching checkpoint")
        info, args = ckpt_info, ckpt["model_args"]
    else:
        torch.manual_seed(cfg.seed)
        args = model_args(info.num_classes, info.in_channels, cfg.width)
        model = build_model(args)
        test = d.test_split()
        progress = d.rd.load_progress("base")
        start = int(progress["round"]) if progress else 0
        if progress:  # a killed run resumes at the round it was in (every round's seeds are fixed by its index)
            model.load_state_dict(progress["model"])
            log(INFO, "base: resuming after round %d of %d", start, cfg.base_rounds)
        d.rd.rewind_metrics({"base": start})
        for rnd in range(start, cfg.base_rounds):
            papm, arrays = d.model_payload(model, args)
            replies = d.send("base", "train.base", {
                n: d.content({**papm, "data-info": info.to_dict(), "round": rnd}, **arrays) for n in d.nodes})
            states = [record_state(c["model"]) for c in replies.values()]
            weights = [float(c["metrics"]["num-examples"]) for c in replies.values()]
            model.load_state_dict(weighted_average(states, weights))
            if cfg.bn != "average":
                d.recalibrate_bn("base", {"base": (model, args)}, {"base": d.by_partition(d.nodes)}, info)
            acc = evaluate(model, test, info, d.device)["accuracy"]
            loss = sum(float(c["metrics"]["train-loss"]) * w for c, w in zip(replies.values(), weights)) / sum(weights)
            d.rd.log_metrics("base", round=rnd + 1, nodes=len(replies), train_loss=loss, test_accuracy=acc)
            d.rd.save_progress("base", {"round": rnd + 1, "model": model.state_dict()})
            log(INFO, "base round %d/%d: %d nodes, loss %.4f, test accuracy %.4f", rnd + 1, cfg.base_rounds, len(replies), loss, acc)
    save_checkpoint(d.rd.base_file, model, args, info, kind="base",
                    meta={"source": cfg.base_checkpoint or "fedavg", "rounds": 0 if cfg.base_checkpoint else cfg.base_rounds})
