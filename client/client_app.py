"""Flower ClientApp: one handler per phase of a PAPM run.

Handlers only translate records: the work is done by ``papm.shared``. Every
message carries the resolved run config, so a node needs nothing but its node
config (``partition-id``, ``num-partitions``, optionally ``data-root`` for the
device's own ImageFolder tree). Each reply names the node's ``partition-id``.
``node.py`` holds what the handlers work with (the node, its data, the received models).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from ..shared.bn import bn_input_sums, bn_state
from ..shared.class_stats import compute_class_stats
from ..shared.cpu import fit_torch_threads
from ..shared.datasets import normalise, pixel_sums
from ..shared.fusion import class_feature_sums, feature_sums, fit_head
from ..shared.compression import masks_kept, nonzero_masks
from ..shared.lowbit import layer_input_sums
from ..shared.sparsity import MaskKeeper, weight_layers
from ..shared.specialise import finetune_local, local_apoz_counts, objective_weight
from ..shared.distillation import teacher_outputs
from ..shared.errors import PapmError
from ..shared.inference import predict_logits
from ..shared.training import TrainSettings, fit, momentum_lr_sum, round_lr
from .drills import drill_mods
from .node import Node, features, received_head, shift_against, train_settings, val_counts
from .records import bytes_record, config_json, json_config, record_state, state_record, tensors_record

def user_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """A node's bad data or config (PapmError: one line saying what to fix) goes back as an error reply with that
    line, as Flower's own error replies do (code 2), without the tracebacks Flower and Ray print for an exception
    (hundreds of lines before the coordinator's one error line). Other exceptions are bugs and keep them."""
    try:
        return call_next(msg, context)
    except PapmError as e:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(e)), reply_to=msg)


app = ClientApp(mods=[user_errors_mod, *drill_mods()])  # failure drills only when PAPM_INJECT_FAULT is set
fit_torch_threads()  # a device container's CPU quota, which torch's own default does not see

FEDBN_KEY = "papm-fedbn"  # context.state: this node's own BatchNorm layers under bn=local


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Who this node is, what its data looks like, and the integer pixel sums of the run's normalisation."""
    node = Node(msg, context)
    info = node.data.info
    total, total_sq, count = pixel_sums(node.data.train.x)
    reply = node.reply(
        {"stats": tensors_record({
            "class-counts": torch.bincount(node.data.train.y, minlength=info.num_classes),
            "val-class-counts": torch.bincount(node.data.val.y, minlength=info.num_classes),
            "pixel-sum": total, "pixel-sqsum": total_sq,
        })},
        **{"num-examples": len(node.data.train), "pixels-per-channel": count},
    )
    reply.content["node"] = json_config(class_names=info.class_names, in_channels=info.in_channels, image_size=info.image_size,
                                        hflip=info.hflip, crop_padding=info.crop_padding, dataset=info.name)
    return reply


@app.train("base")
def train_base(msg: Message, context: Context) -> Message:
    """One FedAvg round of base training; with bn=local (FedBN) the node's own BatchNorm layers
    replace the global ones before training and are kept in the node's state after it."""
    node = Node(msg, context)
    model = node.model()
    rnd = int(msg.content["papm"]["round"])
    own_bn = node.cfg.bn == "local"
    run_id = f"{node.cfg.fingerprint()}:{node.cfg.run_dir}"
    if own_bn and FEDBN_KEY in context.state:
        kept = context.state[FEDBN_KEY]
        # only this run's own BatchNorm layers from the round just before (never another run's, or a
        # round the server never averaged because the run was killed and resumed)
        if kept.get("run", "") == run_id and int(kept.get("round", -2)) == rnd - 1:
            model.load_state_dict(record_state(context.state[FEDBN_KEY + "-weights"]), strict=False)
    lr = round_lr(node.cfg.base_lr, rnd, node.cfg.base_rounds)
    settings = TrainSettings(epochs=node.cfg.base_epochs, lr=lr, batch_size=node.cfg.batch_size,
                             seed=node.cfg.seed + 1000 * rnd + node.partition_id, select_on_val=False)
    history = fit(model, node.data.train, node.info(), settings, node.device, progress=False)
    if own_bn:
        context.state[FEDBN_KEY + "-weights"] = state_record(bn_state(model))
        context.state[FEDBN_KEY] = ConfigRecord({"run": run_id, "round": rnd})
    return node.reply({"model": state_record(model.state_dict())}, **{"num-examples": len(node.data.train),
                                                                        "train-loss": history[-1]["loss"] if history else 0.0})


@app.query("bn_stats")
def bn_stats(msg: Message, context: Context) -> Message:
    """BatchNorm input sums of each model in the message on this node's training images (all classes:
    every part sees every image at inference)."""
    node = Node(msg, context)
    data = node.data.train.sample(node.cfg.bn_samples, node.cfg.seed + node.partition_id)
    arrays, results = {}, {}
    for job in node.jobs():
        sums = bn_input_sums(node.model(job["key"]), data, node.info(), node.device, node.cfg.batch_size,
                             seed=node.cfg.seed + node.partition_id)
        arrays[f"bn-{job['key']}"] = tensors_record(sums.to_arrays())
        results[job["key"]] = {"num-examples": len(data)}
    return node.reply_jobs(arrays, results)


@app.query("class_stats")
def class_stats(msg: Message, context: Context) -> Message:
    node = Node(msg, context)
    stats = compute_class_stats(node.model(), node.data.train, node.info(), node.device)
    return node.reply({"stats": tensors_record(stats.to_arrays())}, **{"num-examples": len(node.data.train)})


@app.query("apoz")
def apoz(msg: Message, context: Context) -> Message:
    """APoZ counts of the base model (or, between the cuts of an iterative schedule, of each job's own model)
    on this node's samples of each job's group classes (none: empty counts)."""
    node = Node(msg, context)
    jobs = node.jobs()
    base = None if all(job.get("own-model") for job in jobs) else node.model()
    arrays, results = {}, {}
    for job in jobs:
        model = node.model(job["key"]) if job.get("own-model") else base
        counts, n = local_apoz_counts(model, node.data.train, node.info(), job["classes"], node.cfg.apoz_samples,
                                      node.cfg.seed + node.partition_id, node.device)
        arrays[f"counts-{job['key']}"] = tensors_record(counts.to_arrays())
        results[job["key"]] = {"num-examples": n}
    return node.reply_jobs(arrays, results)


@app.query("gptq_inputs")
def gptq_inputs(msg: Message, context: Context) -> Message:
    """For GPTQ on the server (``weight-quant=gptq``): ``X^T X`` and the row count of one layer's inputs (the job's
    ``layer``; the layers before it arrive quantised) on up to ``calib-samples`` of this node's training images of
    the job's group classes; a node without such images adds zero sums."""
    node = Node(msg, context)
    info = node.info()
    arrays, results = {}, {}
    for job in node.jobs():
        model = node.model(job["key"]).to(node.device)
        images = node.calibration_images(job["classes"])
        if len(images):
            xtx, rows = layer_input_sums(model, job["layer"], normalise(images.x, info))
        else:
            width = weight_layers(model, True)[job["layer"]].weight[0].numel()
            xtx, rows = torch.zeros(width, width), 0
        arrays[f"xtx-{job['key']}"] = tensors_record({"xtx": xtx.cpu(), "rows": torch.tensor(rows)})
        results[job["key"]] = {"num-examples": len(images)}
    return node.reply_jobs(arrays, results)


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    """One FedAvg round of fine-tuning for each job (a group's pruned model): the job's ``steps`` on this
    node's data with the group's classes emphasised; FedAvg weighs the result by the node's share of
    the group's weighted objective."""
    node = Node(msg, context)
    cfg, info = node.cfg, node.info()
    # kd: the base's logits on this node's images, once for every job of the round (the teacher is fixed)
    teacher_logits = teacher_outputs(node.model("teacher"), node.data.train.x, info, node.device) if cfg.kd else None
    arrays, results = {}, {}
    for job in node.jobs():
        model = node.model(job["key"])
        settings = train_settings(node, cfg.finetune_lr, job["round"], job["steps"], job.get("rounds", cfg.finetune_rounds))
        # a sparse model: the weights that arrive zero stay zero (the server's masks, without sending them)
        keeper = MaskKeeper(model, nonzero_masks(model)) if job.get("keep-zeros") else None
        # finetune-logit-adjust: shifted by this node's class mix against that of every node working on this model
        shift = shift_against(node.data.train.y, job["class-counts"]) if "class-counts" in job else None
        control = f"control-{job['key']}"  # finetune-scaffold: the server's c - c_i for this node and model
        correction = record_state(msg.content[control]) if control in msg.content else None
        with masks_kept(keeper):
            finetune_local(model, node.data.train, info, job["classes"], settings, cfg.emphasis, cfg.emphasis_mode,
                           node.device, teacher_logits=teacher_logits, logit_shift=shift, grad_correction=correction,
                           kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature)
        arrays[job["key"]] = state_record(model.state_dict())
        results[job["key"]] = {"num-examples": len(node.data.train), "steps": settings.steps,
                               "lr-sum": momentum_lr_sum(settings, settings.steps),
                               "weight": objective_weight(node.data.train.y, info.num_classes, job["classes"], cfg.emphasis)}
    return node.reply_jobs(arrays, results)


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
    parity_x = parity_inputs(local.x, n=64, seed=seed, normalise=lambda x: normalise(x, info))

    def calibration(classes: list[int]) -> tuple[object, str]:  # (numpy images or None, where they come from)
        if not node.cfg.int8:
            return None, ""
        images = node.calibration_images(classes)
        what = "the group's classes" if classes and len(images) else "all classes"
        if not len(images):  # no image of the group's classes here: calibrate on what the node holds
            images = node.calibration_images([])
        return normalise(images.x, info).numpy(), f"partition-id {node.partition_id} training images of {what}"

    files, reports = {}, {}
    with tempfile.TemporaryDirectory(prefix="papm-export-") as tmp:
        for item in items:
            try:
                calib, source = calibration(item.get("classes", []))
                paths, report = export_for_device(node.model(item["key"]), item["graph"], Path(tmp), item["name"], parity_x, calib,
                                                  node.cfg.int8_activations)
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


@app.query("feature_stats")
def feature_stats(msg: Message, context: Context) -> Message:
    """Feature sums for the head's standardisation; for an LDA head (``fusion-head`` lda or auto) per-class
    sums, class counts and the Gram matrix instead (the standardisation follows from them)."""
    node = Node(msg, context)
    feats, labels = features(node, "train")
    if node.cfg.fusion_head != "fedavg":
        sums = class_feature_sums(feats, labels, node.info().num_classes)
    else:
        total, total_sq, _ = feature_sums(feats)
        sums = {"sum": total, "sqsum": total_sq}
    return node.reply({"sums": tensors_record(sums)}, **{"num-examples": len(labels)})


@app.train("fusion")
def fusion(msg: Message, context: Context) -> Message:
    """One FedAvg round of the head: the received head's local validation counts (for the server's
    choice of round), then local training on the frozen extractors' features."""
    node = Node(msg, context)
    feats, labels = features(node, "train")
    head = received_head(node)
    val = val_counts(node, head)
    rnd = int(msg.content["papm"]["round"])
    shift = None
    if node.cfg.fusion_logit_adjust:
        shift = shift_against(labels, config_json(msg.content["papm"], "class-counts"))  # against all nodes' mix
    result = fit_head(head, feats, labels, epochs=node.cfg.fusion_epochs, lr=node.cfg.fusion_lr,
                      batch_size=node.cfg.batch_size, seed=node.cfg.seed + 1000 * rnd + node.partition_id,
                      logit_shift=shift)
    return node.reply({"head": state_record(head.state_dict())}, **{"num-examples": len(labels), "train-loss": result["loss"], **val})


@app.query("fusion_val")
def fusion_val(msg: Message, context: Context) -> Message:
    """The head's local validation counts (the last round's head, which no further round reports)."""
    node = Node(msg, context)
    return node.reply(**{"num-examples": len(node.data.val), **val_counts(node, received_head(node))})


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Base model and fusion model on this node's local evaluation split (counts, so they add up)."""
    node = Node(msg, context)
    info = node.info()
    val = node.data.val
    base_pred = None
    if len(val):
        base_pred = predict_logits(node.model(), val, info, node.device).argmax(1)
        feats, labels = features(node, "val")
        with torch.no_grad():
            fusion_pred = received_head(node)(feats).argmax(1)
    n = len(val)
    return node.reply(**{
        "num-examples": n,
        "base-correct": int((base_pred == val.y).sum()) if n else 0,
        "fusion-correct": int((fusion_pred == val.y).sum()) if n else 0,
    })
