"""Flower ClientApp: one handler per phase of a PAPM run.

Handlers only translate records: the work is done by ``papm.shared``. Every
message carries the resolved run config, so a node needs nothing but its node
config (``partition-id``, ``num-partitions``, optionally ``data-root`` for the
device's own ImageFolder tree). Each reply names the node's ``partition-id``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..shared.class_stats import compute_class_stats
from ..shared.datasets import DatasetInfo, normalise
from ..shared.fusion import build_head, feature_sums, fit_head
from ..shared.importance import count_zero_activations
from ..shared.models import build_model
from ..shared.node_data import NodeData, load_node_data
from ..shared.specialise import apoz_subset, group_weights
from ..shared.training import TrainSettings, fit, predict_logits, resolve_device, round_lr
from .drills import drill_mods
from .records import bytes_record, config_json, json_config, record_run_config, record_state, state_record, tensors_record

app = ClientApp(mods=drill_mods())  # failure drills only when PAPM_INJECT_FAULT is set

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

    def reply(self, arrays: dict | None = None, **metric_values) -> Message:
        content = RecordDict({"metrics": MetricRecord({"partition-id": self.partition_id, **metric_values})})
        if arrays:
            for name, record in arrays.items():
                content[name] = record
        return Message(content=content, reply_to=self.msg)


def _settings(node: Node, epochs: int, lr: float, round_: int) -> TrainSettings:
    # a different seed per node and round, reproducible for the run
    return TrainSettings(epochs=epochs, lr=lr, batch_size=node.cfg.batch_size, seed=node.cfg.seed + 1000 * round_ + node.partition_id,
                         select_on_val=False)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Who this node is and the sums the server needs for the run's normalisation."""
    node = Node(msg, context)
    x = node.data.train.x.double() / 255.0
    info = node.data.info
    reply = node.reply(
        {"stats": tensors_record({
            "class-counts": torch.bincount(node.data.train.y, minlength=info.num_classes),
            "val-class-counts": torch.bincount(node.data.val.y, minlength=info.num_classes),
            "pixel-sum": x.sum(dim=(0, 2, 3)),
            "pixel-sqsum": (x * x).sum(dim=(0, 2, 3)),
        })},
        **{"num-examples": len(node.data.train), "pixels-per-channel": int(x.shape[0] * x.shape[2] * x.shape[3])},
    )
    reply.content["node"] = json_config(class_names=info.class_names, in_channels=info.in_channels, image_size=info.image_size,
                                        hflip=info.hflip, crop_padding=info.crop_padding, dataset=info.name)
    return reply


@app.train("base")
def train_base(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    model = node.model()
    rnd = int(msg.content["papm"]["round"])
    lr = round_lr(node.cfg.base_lr, rnd, node.cfg.base_rounds)
    history = fit(model, node.data.train, node.info(), _settings(node, node.cfg.base_epochs, lr, rnd), node.device, progress=False)
    return node.reply({"model": state_record(model.state_dict())}, **{"num-examples": len(node.data.train),
                                                                        "train-loss": history[-1]["loss"] if history else 0.0})


@app.query("class_stats")
def class_stats(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    stats = compute_class_stats(node.model(), node.data.train, node.info(), node.device)
    return node.reply({"stats": tensors_record(stats.to_arrays())}, **{"num-examples": len(node.data.train)})


@app.query("apoz")
def apoz(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    classes = config_json(msg.content["papm"], "classes")
    data = apoz_subset(node.data.train, classes, node.cfg.apoz_samples, node.cfg.seed + node.partition_id)
    counts = count_zero_activations(node.model(), data, node.info(), node.device)
    return node.reply({"counts": tensors_record(counts.to_arrays())}, **{"num-examples": len(data)})


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    cfg = node.cfg
    model = node.model()
    classes = config_json(msg.content["papm"], "classes")
    rnd = int(msg.content["papm"]["round"])
    info = node.info()
    weights = group_weights(info.num_classes, classes, cfg.emphasis)
    fit(model, node.data.train, info, _settings(node, cfg.finetune_epochs, round_lr(cfg.finetune_lr, rnd, cfg.finetune_rounds), rnd),
        node.device,
        class_weights=weights if cfg.emphasis_mode == "loss" else None,
        sample_weights=weights[node.data.train.y] if cfg.emphasis_mode == "sampling" else None,
        teacher=node.model("teacher") if cfg.kd else None, progress=False)
    return node.reply({"model": state_record(model.state_dict())}, **{"num-examples": len(node.data.train)})


@app.query("export")
def export(msg: Message, context: Context) -> Message:
    """Phase 4 on the device: its group's pruned extractor (and, when asked, the unsplit base model)
    to ONNX, checked against PyTorch on this node's own images, and with int8=true quantised to
    INT8 calibrated on this node's own training images of the item's classes (the group's for an
    extractor, all for the base model; never test data). The files travel back as raw bytes.
    Each item succeeds or fails on its own: a failed item is reported, the others still ship."""
    from ..export.onnx_export import export_for_device, parity_inputs

    node = Node(msg, context)
    info = node.info()
    items = config_json(msg.content["papm"], "items")  # [{"key", "graph", "name", "classes"}]
    seed = node.cfg.seed + node.partition_id
    local = node.data.val if len(node.data.val) >= 8 else node.data.train
    parity_x = parity_inputs(normalise(local.x, info), n=64, seed=seed)

    def calibration(classes: list[int]) -> tuple[torch.Tensor | None, str]:
        if not node.cfg.int8:
            return None, ""
        pool = node.data.train.of_classes(classes) if classes else node.data.train
        what = "the group's classes" if classes and len(pool) else "all classes"
        if not len(pool):
            pool = node.data.train
        images = pool.sample(node.cfg.calib_samples, seed).x
        return normalise(images, info).numpy(), f"partition-id {node.partition_id} training images of {what}"

    files, reports = {}, {}
    with tempfile.TemporaryDirectory(prefix="papm-export-") as tmp:
        for item in items:
            try:
                calib, source = calibration(item.get("classes", []))
                paths, report = export_for_device(node.model(item["key"]), item["graph"], Path(tmp), item["name"], parity_x, calib)
                for precision, path in paths.items():
                    files[f"{item['name']}.{precision}"] = path.read_bytes()
                reports[item["name"]] = {**report, "partition_id": node.partition_id,
                                         "parity_inputs": "local validation images + random",
                                         "calibration": {"samples": 0 if calib is None else int(len(calib)), "source": source}}
            except Exception as e:  # noqa: BLE001 - reported per item; the server hands the item to another node
                first = (str(e).strip().splitlines() or [""])[0][:300]
                reports[item["name"]] = {"partition_id": node.partition_id, "error": f"{type(e).__name__}: {first}"}
    reply = node.reply({"files": bytes_record(files)}, **{"num-examples": len(parity_x)})
    reply.content["reports"] = json_config(**reports)
    return reply


def _extractors(node: Node) -> list:
    count = int(node.msg.content["papm"]["extractors"])
    return [node.model(f"extractor-{k}").eval() for k in range(count)]


def _features(node: Node, split: str) -> tuple[torch.Tensor, torch.Tensor]:
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
        x = normalise(data.x, info).to(node.device)
        with torch.no_grad():
            feats = torch.cat([torch.cat([e.to(node.device).features(x[i:i + 512]) for i in range(0, len(x), 512)])
                               for e in _extractors(node)], dim=1).float().cpu()
        _FEATURES[key] = (feats, data.y.clone())
        while len(_FEATURES) > 8:
            _FEATURES.popitem(last=False)
    return _FEATURES[key]


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    feats, _ = _features(node, "train")
    total, total_sq, count = feature_sums(feats)
    return node.reply({"sums": tensors_record({"sum": total, "sqsum": total_sq})}, **{"num-examples": count})


@app.train("fusion")
def fusion(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    feats, labels = _features(node, "train")
    head = build_head(config_json(msg.content["papm"], "head-args"))
    head.load_state_dict(record_state(msg.content["head"]))
    rnd = int(msg.content["papm"]["round"])
    result = fit_head(head, feats, labels, epochs=node.cfg.fusion_epochs, lr=node.cfg.fusion_lr,
                      batch_size=node.cfg.batch_size, seed=node.cfg.seed + 1000 * rnd + node.partition_id)
    return node.reply({"head": state_record(head.state_dict())}, **{"num-examples": len(labels), "train-loss": result["loss"]})


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Base model and fusion model on this node's local evaluation split (counts, so they add up)."""
    node = Node(msg, context)
    info = node.info()
    val = node.data.val
    base_pred = None
    if len(val):
        base_pred = predict_logits(node.model(), val, info, node.device).argmax(1)
        feats, labels = _features(node, "val")
        head = build_head(config_json(msg.content["papm"], "head-args"))
        head.load_state_dict(record_state(msg.content["head"]))
        with torch.no_grad():
            fusion_pred = head.eval()(feats).argmax(1)
    n = len(val)
    return node.reply(**{
        "num-examples": n,
        "base-correct": int((base_pred == val.y).sum()) if n else 0,
        "fusion-correct": int((fusion_pred == val.y).sum()) if n else 0,
    })
