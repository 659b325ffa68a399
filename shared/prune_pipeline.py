"""`papm prune`'s pipeline on one machine: APoZ on the group's data -> the cut (one, or ``steps`` with a short
recovery between them; or single weights; or a data-free cut) -> BatchNorm re-estimation -> fine-tuning with the
group's classes emphasised -> low-bit weights, with the accuracy after every stage in the report. With ``on_state`` the
cut model and each fine-tuning epoch are handed out to be kept; ``resume`` goes on from there (``papm prune``'s resume).

The pieces (settings, APoZ, one cut, fine-tuning) are in ``specialise.py``, which the Flower client uses too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import nn

from .bn import recalibrate_bn
from .compression import dense_runtime_note, masks_kept, quantize_weights, size_report, sparsity_masks
from .datasets import DataSplits
from .importance import count_zero_activations
from .models import build_model
from .pruning import macs_and_params
from .restore import restore_after_pruning
from .sparsity import MaskKeeper
from .specialise import PruneSettings, accuracy_summary, apoz_subset, group_weights, prune_model, step_targets
from .training import fit


def _recover(model: nn.Module, splits: DataSplits, classes: list[int], settings: PruneSettings, epochs: int,
             device, progress, desc: str, teacher: nn.Module | None, on_state=None, resume: dict | None = None) -> list[dict]:
    """Fine-tune the pruned model for ``epochs`` with the group's classes emphasised."""
    info = splits.info
    weights = group_weights(info.num_classes, classes, settings.emphasis)
    return fit(
        model, splits.train, info, replace(settings.finetune, epochs=epochs), device, val=splits.val,
        class_weights=weights if settings.emphasis_mode == "loss" else None,
        sample_weights=weights[splits.train.y] if settings.emphasis_mode == "sampling" else None,
        teacher=teacher, kd_weight=settings.kd_weight, kd_temperature=settings.kd_temperature,
        progress=progress, desc=desc, on_state=on_state, resume=resume,
    )


def _cut_channels(model: nn.Module, args: dict, params_before: int, splits: DataSplits, classes: list[int],
                  settings: PruneSettings, device, progress, teacher) -> tuple[dict, list[dict], int | None]:
    """The channel cuts of the schedule (one, or ``steps``); returns (model_args, one row per cut, APoZ samples)."""
    info = splits.info
    rows, apoz_used = [], None
    targets = step_targets(params_before, settings.budget, settings.steps if settings.schedule == "iterative" else 1)
    for i, target in enumerate(targets):
        counts = None
        if settings.criterion in ("papm", "apoz"):  # APoZ of the model as it is now, not of the base
            apoz_data = apoz_subset(splits.train, classes, settings.apoz_samples, settings.finetune.seed)
            counts, apoz_used = count_zero_activations(model, apoz_data, info, device), len(apoz_data)
        original = copy.deepcopy(model) if settings.data_free else None
        step_budget = settings.budget if len(targets) == 1 else 1.0 - target / sum(p.numel() for p in model.parameters())
        result, args = prune_model(model, args, info, replace(settings, budget=step_budget), counts,
                                   seed=settings.finetune.seed + i, final=i + 1 == len(targets))
        if original is not None:  # fold the removed channels into the next layers: weights only, no data
            example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
            restore_after_pruning(original, model, result.kept, example)
        row = {"step": i + 1, "params": result.params_after, "reduction": round(1.0 - result.params_after / params_before, 6)}
        rows.append(_after_cut(model, row, splits, classes, settings, device, seed=settings.finetune.seed + i))
        if i + 1 < len(targets) and settings.step_epochs > 0:
            _recover(model, splits, classes, settings, settings.step_epochs, device, progress, f"step {i + 1} fine-tune", teacher)
            model.cpu()
            step = accuracy_summary(model, splits.test, info, classes, device)
            row.update(after_step_finetune_group=step["group"], after_step_finetune_all=step["all"])
    return args, rows, apoz_used


def _after_cut(model: nn.Module, row: dict, splits: DataSplits, classes: list[int], settings: PruneSettings, device,
               seed: int) -> dict:
    """Accuracy right after a cut, and after BatchNorm re-estimation when that is on."""
    cut = accuracy_summary(model, splits.test, splits.info, classes, device)
    row.update(after_cut_group=cut["group"], after_cut_all=cut["all"])
    if settings.bn_recalibrate:
        recalibrate_bn(model, splits.train, splits.info, device, settings.finetune.batch_size, seed)
        bn = accuracy_summary(model, splits.test, splits.info, classes, device)
        row.update(after_bn_group=bn["group"], after_bn_all=bn["all"])
    return row


def specialise(
    base: nn.Module,
    base_args: dict,
    splits: DataSplits,
    classes: list[int],
    settings: PruneSettings,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    *,
    on_state: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> tuple[nn.Module, dict, dict]:
    """APoZ -> prune (channels in one cut or ``steps``; or single weights) -> fine-tune -> low-bit weights.

    Returns (compressed model, its model_args, report dict). The test split only measures. ``on_state`` receives the
    cut model (its ``model_args`` and weights, the cut's report rows, the sparsity masks) once the cut is made and again
    with ``fit``'s state after every fine-tuning epoch; given back as ``resume`` it skips the cut and goes on with the
    fine-tuning where it stopped, ending with the same weights."""
    settings.validate()
    info = splits.info
    t0 = time.perf_counter() - (resume["seconds"] if resume else 0.0)  # the report's time counts the interrupted run's too
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    macs_before, params_before = macs_and_params(base.cpu(), example)
    teacher = copy.deepcopy(base) if settings.kd else None
    model, args, keeper, apoz_used, masks = copy.deepcopy(base).cpu(), base_args, None, None, None
    if resume is not None:  # the cut was made before the interruption: its model, rows and masks come back as they were
        model, args, steps, apoz_used, masks = (build_model(resume["model_args"]), resume["model_args"], resume["steps"],
                                                resume["apoz_used"], resume["masks"])
        model.load_state_dict(resume["model"] if resume["fit"] is None else resume["fit"]["model"])
        keeper = MaskKeeper(model, masks) if masks is not None else None
    elif settings.sparsity != "none":  # single weights instead of channels: shapes stay
        masks = sparsity_masks(model, settings.sparsity, settings.budget)
        keeper = MaskKeeper(model, masks)
        nonzero = size_report(model)["nonzero_params"]
        steps = [_after_cut(model, {"step": 1, "params": nonzero, "reduction": round(1.0 - nonzero / params_before, 6)},
                            splits, classes, settings, device, settings.finetune.seed)]
    elif settings.budget is not None:
        args, steps, apoz_used = _cut_channels(model, base_args, params_before, splits, classes, settings, device,
                                               progress, teacher)
    else:  # a compression level that only quantises
        steps = [_after_cut(model, {"step": 1, "params": params_before, "reduction": 0.0}, splits, classes,
                            settings, device, settings.finetune.seed)]
    macs_after, params_after = macs_and_params(model, example)
    history, keep = [], None
    if on_state is not None and not settings.data_free and settings.finetune.epochs > 0:
        cut = {"model_args": args, "steps": steps, "apoz_used": apoz_used, "masks": masks}

        def keep(fit_state: dict | None) -> None:  # the cut's weights once; then fit's state holds the model
            on_state({**cut, "model": model.state_dict() if fit_state is None else None, "fit": fit_state,
                      "seconds": time.perf_counter() - t0})

        if resume is None:
            keep(None)
    if not settings.data_free:
        with masks_kept(keeper):
            history = _recover(model, splits, classes, settings, settings.finetune.epochs, device, progress, "fine-tune",
                               teacher, on_state=keep, resume=resume["fit"] if resume else None)
    model = model.cpu().eval()
    after = accuracy_summary(model, splits.test, info, classes, device)
    if history:  # a fine-tuning step was taken
        steps[-1].update(after_finetune_group=after["group"], after_finetune_all=after["all"])
    base_acc = accuracy_summary(base, splits.test, info, classes, device)
    last = steps[-1]
    accuracy = {
        "base": {"all": base_acc["all"], "group": base_acc["group"]},
        "before_finetune": {"all": last["after_cut_all"], "group": last["after_cut_group"]},
    }
    if settings.bn_recalibrate:
        accuracy["after_bn_recalibrate"] = {"all": last["after_bn_all"], "group": last["after_bn_group"]}
    accuracy["after_finetune"] = {"all": after["all"], "group": after["group"]}
    cut_size = size_report(model)  # before rounding: zeros that rounding makes are not part of the cut
    quant = None
    if settings.weight_bits:
        quant = quantize_weights(model, settings.weight_bits, settings.weight_quant,
                                 None if settings.data_free else splits.train.of_classes(classes), info,
                                 seed=settings.finetune.seed)
        q = accuracy_summary(model.eval(), splits.test, info, classes, device)
        accuracy["after_weight_quant"] = {"all": q["all"], "group": q["group"]}
        after = q
    size = size_report(model)
    report = {
        "classes": classes,
        "class_names": [info.class_names[c] for c in classes],
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params": size["nonzero_params"],
        "reduction": round(1.0 - (params_after if settings.sparsity == "none" else cut_size["nonzero_params"]) / params_before, 6),
        "target": settings.budget,
        "criterion": settings.criterion if settings.sparsity == "none" and settings.budget is not None else None,
        "alpha": settings.alpha,
        "round_to": settings.round_to,
        "schedule": settings.schedule,
        "steps": steps,
        "step_epochs": settings.step_epochs if settings.schedule == "iterative" else None,
        "bn_recalibrate": settings.bn_recalibrate,
        "data_free": settings.data_free,
        "sparsity": settings.sparsity,
        "level": settings.level or None,
        "weights": quant or {"weight_bits": 32},
        "size": size,
        "dense_runtime_note": dense_runtime_note(settings.sparsity, settings.weight_bits),
        "kept_channels": args["channels"],
        "base_channels": base_args["channels"],
        "macs_before": macs_before,
        "macs_after": macs_after,
        "accuracy_split": "test",
        "accuracy": accuracy,
        "per_class_accuracy_after": {info.class_names[c]: a for c, a in after["per_class"].items()},
        "apoz_samples": apoz_used,
        "finetune": {**asdict(settings.finetune), "emphasis": settings.emphasis, "emphasis_mode": settings.emphasis_mode,
                     "kd": settings.kd, "kd_weight": settings.kd_weight, "kd_temperature": settings.kd_temperature},
        "history": history,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return model, args, report
