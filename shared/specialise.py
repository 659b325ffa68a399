"""Class specialisation of a base model: APoZ on the group's data, PAPM pruning to a
budget, fine-tuning from the base weights with the group's classes emphasised.

Pure PyTorch: the CLI (`papm prune`) and the Flower client both call these pieces.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .datasets import DatasetInfo, DataSplits, ImageSet
from .errors import PapmError
from .importance import CRITERIA, ActivationCounts, count_zero_activations, make_importance
from .models import model_args as make_model_args
from .pruning import macs_and_params, prune_to_budget
from .training import TrainSettings, evaluate, fit

EMPHASIS_MODES = ("loss", "sampling")


@dataclass
class PruneSettings:
    budget: float
    criterion: str = "papm"
    alpha: float = 0.5
    round_to: int = 1
    apoz_samples: int = 2048  # group-class training samples used for APoZ (at most)
    emphasis: float = 4.0  # weight of the group's classes relative to the others
    emphasis_mode: str = "loss"  # class-weighted loss, or weighted sampling
    kd: bool = False
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    finetune: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=5, lr=0.02, warmup=0.1))

    def validate(self) -> "PruneSettings":
        if not 0.0 < self.budget < 1.0:
            raise PapmError(f"--budget must be in (0, 1) (the fraction of parameters to remove), got {self.budget}")
        if self.criterion not in CRITERIA:
            raise PapmError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise PapmError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.emphasis_mode not in EMPHASIS_MODES:
            raise PapmError(f"unknown emphasis mode {self.emphasis_mode!r}; choose one of {', '.join(EMPHASIS_MODES)}")
        if not self.emphasis >= 1.0:
            raise PapmError(f"--emphasis must be >= 1 (1 = no emphasis), got {self.emphasis}")
        if self.apoz_samples < 1:
            raise PapmError(f"--apoz-samples must be >= 1, got {self.apoz_samples}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise PapmError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise PapmError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.round_to < 1:  # checked here, before any APoZ counting or training
            raise PapmError(f"--round-to must be >= 1, got {self.round_to}")
        self.finetune.validate()
        return self


def parse_classes(text: str | list, info: DatasetInfo) -> list[int]:
    """``"3,5,8"`` (ids) or class names -> sorted unique class ids, checked against the dataset.

    A class name wins over an id: an ImageFolder class folder named ``10`` is that class."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    ids = []
    for item in items:
        if item == "":
            continue
        if isinstance(item, str) and item in info.class_names:
            c = info.class_names.index(item)
        elif isinstance(item, int) or str(item).lstrip("-").isdigit():
            c = int(item)
            if not 0 <= c < info.num_classes:
                raise PapmError(f"class id {c} is out of range; {info.name} has classes 0..{info.num_classes - 1}")
        else:
            raise PapmError(f"unknown class {item!r}; use ids 0..{info.num_classes - 1} or names {info.class_names}")
        ids.append(c)
    if not ids:
        raise PapmError("--classes is empty; name the group's classes, e.g. --classes 3,5,8")
    if len(set(ids)) != len(ids):
        raise PapmError(f"--classes names a class twice: {items}")
    return sorted(ids)


def group_weights(num_classes: int, classes: list[int], emphasis: float) -> torch.Tensor:
    """Per-class weights: ``emphasis`` for the group's classes, 1 for the others."""
    w = torch.ones(num_classes)
    w[classes] = emphasis
    return w


def apoz_subset(train: ImageSet, classes: list[int], max_samples: int, seed: int) -> ImageSet:
    """The group's training samples (at most ``max_samples``, a seeded random choice)."""
    data = train.of_classes(classes)
    if len(data) == 0:
        raise PapmError(f"the training data holds no sample of classes {classes}; APoZ needs the group's data")
    return data.sample(max_samples, seed)


def local_apoz_counts(base: nn.Module, train: ImageSet, info: DatasetInfo, classes: list[int], max_samples: int,
                      seed: int, device="cpu") -> tuple[ActivationCounts, int]:
    """APoZ counts of ``base`` on this node's samples of ``classes`` (at most ``max_samples``).

    A node that holds none returns empty counts: it stays in the run and adds nothing (with
    Dirichlet or by-group partitions some nodes hold no image of a group's classes)."""
    data = train.of_classes(classes)
    if len(data) == 0:
        return ActivationCounts(), 0
    data = data.sample(max_samples, seed)
    return count_zero_activations(base, data, info, device), len(data)


def objective_weight(labels: torch.Tensor, num_classes: int, classes: list[int], emphasis: float) -> float:
    """A node's share of a group's weighted fine-tuning objective: the sum of its samples' class weights
    (``emphasis`` for the group's classes, 1 for the others). FedAvg weighs the node's model by it, so a
    node rich in the group's classes counts more than one that is merely large."""
    return float(group_weights(num_classes, classes, emphasis)[labels].sum())


def finetune_local(model: nn.Module, train: ImageSet, info: DatasetInfo, classes: list[int], settings: TrainSettings,
                   emphasis: float, emphasis_mode: str, device="cpu", teacher: nn.Module | None = None) -> list[dict]:
    """One node's fine-tuning of a group's model (one FedAvg round): the group's classes emphasised."""
    weights = group_weights(info.num_classes, classes, emphasis)
    return fit(model, train, info, settings, device,
               class_weights=weights if emphasis_mode == "loss" else None,
               sample_weights=weights[train.y] if emphasis_mode == "sampling" else None,
               teacher=teacher, progress=False)


def accuracy_summary(model: nn.Module, split: ImageSet, info: DatasetInfo, classes: list[int], device) -> dict:
    all_ = evaluate(model, split, info, device)
    grp = evaluate(model, split, info, device, classes=classes)
    return {"all": all_["accuracy"], "group": grp["accuracy"], "per_class": all_["per_class"]}


def prune_model(
    model: nn.Module,
    base_args: dict,
    info: DatasetInfo,
    settings: PruneSettings,
    counts: ActivationCounts | None,
    seed: int = 0,
):
    """Prune ``model`` in place to the budget; return (PruneResult, pruned model_args)."""
    torch.manual_seed(seed)  # the random criterion is reproducible
    model = model.cpu().eval()
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    importance = make_importance(settings.criterion, model, counts, settings.alpha)
    result = prune_to_budget(model, base_args, example, importance, settings.budget, round_to=settings.round_to)
    args = make_model_args(base_args["num_classes"], base_args["in_channels"], base_args["width"], result.channels)
    return result, args


def specialise(
    base: nn.Module,
    base_args: dict,
    splits: DataSplits,
    classes: list[int],
    settings: PruneSettings,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> tuple[nn.Module, dict, dict]:
    """APoZ -> prune -> fine-tune. Returns (pruned model, its model_args, report dict)."""
    settings.validate()
    info = splits.info
    t0 = time.perf_counter()
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    macs_before, params_before = macs_and_params(base.cpu(), example)
    counts, apoz_data = None, None
    if settings.criterion in ("papm", "apoz"):
        apoz_data = apoz_subset(splits.train, classes, settings.apoz_samples, settings.finetune.seed)
        counts = count_zero_activations(base, apoz_data, info, device)
    model = copy.deepcopy(base).cpu()
    result, args = prune_model(model, base_args, info, settings, counts, seed=settings.finetune.seed)
    macs_after, params_after = macs_and_params(model, example)
    before = accuracy_summary(model, splits.test, info, classes, device)
    weights = group_weights(info.num_classes, classes, settings.emphasis)
    history = fit(
        model,
        splits.train,
        info,
        settings.finetune,
        device,
        val=splits.val,
        class_weights=weights if settings.emphasis_mode == "loss" else None,
        sample_weights=weights[splits.train.y] if settings.emphasis_mode == "sampling" else None,
        teacher=copy.deepcopy(base) if settings.kd else None,
        kd_weight=settings.kd_weight,
        kd_temperature=settings.kd_temperature,
        progress=progress,
        desc="fine-tune",
    )
    model = model.cpu().eval()
    after = accuracy_summary(model, splits.test, info, classes, device)
    base_acc = accuracy_summary(base, splits.test, info, classes, device)
    report = {
        "classes": classes,
        "class_names": [info.class_names[c] for c in classes],
        "params_before": params_before,
        "params_after": params_after,
        "reduction": round(1.0 - params_after / params_before, 6),
        "target": settings.budget,
        "criterion": settings.criterion,
        "alpha": settings.alpha,
        "round_to": settings.round_to,
        "kept_channels": result.channels,
        "base_channels": base_args["channels"],
        "macs_before": macs_before,
        "macs_after": macs_after,
        "accuracy_split": "test",
        "accuracy": {
            "base": {"all": base_acc["all"], "group": base_acc["group"]},
            "before_finetune": {"all": before["all"], "group": before["group"]},
            "after_finetune": {"all": after["all"], "group": after["group"]},
        },
        "per_class_accuracy_after": {info.class_names[c]: a for c, a in after["per_class"].items()},
        "apoz_samples": None if apoz_data is None else len(apoz_data),
        "finetune": {**asdict(settings.finetune), "emphasis": settings.emphasis, "emphasis_mode": settings.emphasis_mode,
                     "kd": settings.kd, "kd_weight": settings.kd_weight, "kd_temperature": settings.kd_temperature},
        "history": history,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return model, args, report
