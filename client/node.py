"""What a ClientApp handler works with: the run config, this node's identity and data, the models
and head a message carries, and the frozen extractors' features of a local split (cached per process)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from ..shared.datasets import DatasetInfo, normalise
from ..shared.fusion import build_head
from ..shared.models import build_model
from ..shared.node_data import NodeData, load_node_data
from ..shared.training import TrainSettings, label_shift, resolve_device
from .records import config_json, json_config, record_run_config, record_state

_FEATURES: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()  # per-process cache


class Node:
    """What a handler needs: the run config, this node's identity and data."""

    def __init__(self, msg: Message, context: Context):
        self.cfg = record_run_config(msg.content["run-config"])
        nc = context.node_config
        self.partition_id = int(nc.get("partition-id", 0))
        self.num_partitions = int(nc.get("num-partitions", 1))
        self.data: NodeData = load_node_data(self.cfg, self.partition_id, self.num_partitions, str(nc.get("data-root", "")))
        self.device = resolve_device(self.cfg.device)
        self.msg = msg

    def info(self) -> DatasetInfo:
        """The run's dataset info (global normalisation) sent by the server."""
        return DatasetInfo.from_dict(config_json(self.msg.content["papm"], "data-info"))

    def model(self, key: str = "model"):
        args = config_json(self.msg.content["papm"], f"{key}-args")
        model = build_model(args)
        model.load_state_dict(record_state(self.msg.content[key]))
        return model

    def calibration_images(self, classes: list[int]):
        """Up to ``calib-samples`` of this node's training images of ``classes`` (every class when empty):
        one seeded choice per node, so GPTQ's input sums and INT8 calibration draw the same images."""
        pool = self.data.train.of_classes(classes) if classes else self.data.train
        return pool.sample(self.cfg.calib_samples, self.cfg.seed + self.partition_id)

    def jobs(self) -> list[dict]:
        """The message's jobs: one per model it carries (``{"key", ...}``, the model under ``key``)."""
        return config_json(self.msg.content["papm"], "jobs")

    def reply_jobs(self, arrays: dict, results: dict) -> Message:
        reply = self.reply(arrays, **{"num-examples": len(self.data.train)})
        reply.content["results"] = json_config(**results)
        return reply

    def reply(self, arrays: dict | None = None, **metric_values) -> Message:
        content = RecordDict({"metrics": MetricRecord({"partition-id": self.partition_id, **metric_values})})
        if arrays:
            for name, record in arrays.items():
                content[name] = record
        return Message(content=content, reply_to=self.msg)


def train_settings(node: Node, lr: float, round_: int, steps: int, rounds: int) -> TrainSettings:
    """One FedAvg round of local training: ``steps`` SGD steps as a window of one warm-up-and-decay
    schedule over all ``rounds`` (so the rounds continue the schedule instead of restarting it).
    A different seed per node and round, reproducible for the run."""
    return TrainSettings(epochs=0, steps=steps, lr=lr, batch_size=node.cfg.batch_size, warmup=0.1,
                         seed=node.cfg.seed + 1000 * round_ + node.partition_id, select_on_val=False,
                         schedule_total=steps * rounds, schedule_start=steps * round_)


def received_extractors(node: Node) -> list:
    count = int(node.msg.content["papm"]["extractors"])
    return [node.model(f"extractor-{k}").eval() for k in range(count)]


def features(node: Node, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated features of all extractors on a local split (cached per process)."""
    digest = hashlib.sha256()
    for k in range(int(node.msg.content["papm"]["extractors"])):
        for name, arr in node.msg.content[f"extractor-{k}"].items():
            digest.update(name.encode())
            digest.update(arr.data)
    key = f"{node.partition_id}/{node.num_partitions}/{split}/{digest.hexdigest()}"
    if key not in _FEATURES:
        data = getattr(node.data, split)
        info = node.info()
        extractors = [e.to(node.device) for e in received_extractors(node)]
        parts = []
        with torch.no_grad():  # batch by batch: a float copy of a whole split would be 4x its uint8 size
            for i in range(0, len(data), 512):
                x = normalise(data.x[i:i + 512].to(node.device), info)
                parts.append(torch.cat([e.features(x) for e in extractors], dim=1).float().cpu())
        feats = torch.cat(parts) if parts else torch.empty(0, 0)
        _FEATURES[key] = (feats, data.y.clone())
        while len(_FEATURES) > 8:
            _FEATURES.popitem(last=False)
    return _FEATURES[key]


def received_head(node: Node):
    head = build_head(config_json(node.msg.content["papm"], "head-args"))
    head.load_state_dict(record_state(node.msg.content["head"]))
    return head.eval()


def val_counts(node: Node, head) -> dict:
    """How many of this node's local evaluation images ``head`` gets right (counts add up across nodes)."""
    if not len(node.data.val):
        return {"val-correct": 0, "val-count": 0}
    feats, labels = features(node, "val")
    with torch.no_grad():
        return {"val-correct": int((head.eval()(feats).argmax(1) == labels).sum()), "val-count": len(labels)}


def shift_against(labels: torch.Tensor, everyone: list[int]) -> torch.Tensor:
    """``label_shift`` of this node's class mix (``labels``) against ``everyone``'s per-class image counts."""
    return label_shift(torch.bincount(labels, minlength=len(everyone)), torch.tensor([int(c) for c in everyone]))
