"""Class specialisation of a base model: APoZ on the group's data, PAPM pruning to a
budget, fine-tuning from the base weights with the group's classes emphasised.

The budget is reached in one cut (``schedule="oneshot"``) or in ``steps`` cuts
(``"iterative"``): the kept fraction of the parameters shrinks geometrically, each
step re-measures APoZ on the model as it now is (a removed channel changes what the
next layer sees) and takes a short fine-tune, or only re-estimates BatchNorm
(``step_epochs=0``), before the next cut. Surgery leaves BatchNorm running
statistics that describe the unpruned network's activations; ``bn_recalibrate``
re-estimates them on the group's data with no gradient step (the same
``recalibrate_bn`` the federated run uses, fed from one place here).

Pure PyTorch: the Flower client and `papm prune` (its pipeline: ``prune_pipeline.py``) call these pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .compression_options import LEVELS, check_compression
from .datasets import DatasetInfo, ImageSet
from .errors import PapmError
from .importance import CRITERIA, ActivationCounts, count_zero_activations, make_importance
from .models import model_args as make_model_args
from .pruning import prune_to_budget
from .training import TrainSettings, evaluate, fit

EMPHASIS_MODES = ("loss", "sampling")


@dataclass
class PruneSettings:
    budget: float | None  # fraction of parameters to remove (sparsity "unstructured": of conv/linear weights to zero)
    criterion: str = "papm"
    alpha: float = 0.5
    round_to: int = 1
    apoz_samples: int = 2048  # group-class training samples used for APoZ (at most)
    emphasis: float = 4.0  # weight of the group's classes relative to the others
    emphasis_mode: str = "loss"  # class-weighted loss, or weighted sampling
    kd: bool = False
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    schedule: str = "oneshot"  # one cut, or `steps` cuts with APoZ re-measured in between
    steps: int = 3  # cuts of the iterative schedule (one-shot: one cut)
    step_epochs: int = 1  # fine-tuning epochs between two cuts (0: BatchNorm re-estimation only)
    bn_recalibrate: bool = True  # re-estimate BatchNorm statistics after every cut (no gradient step)
    data_free: bool = False  # no data at all: weights-only cut, removed channels folded into the next layer
    sparsity: str = "none"  # none (channel pruning) | unstructured | 2:4: zero single weights instead
    weight_bits: int = 0  # after fine-tuning, fake-quantise weights to this many bits (0: keep fp32)
    weight_quant: str = "rtn"  # rtn | gptq
    level: int = 0  # 1..5: a rung of the compression ladder (sets sparsity and weight bits), 0: none
    finetune: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=5, lr=0.02, warmup=0.1))

    def validate(self) -> "PruneSettings":
        self._resolve_level()
        if self.sparsity == "2:4" and self.budget is not None and not self.level:
            raise PapmError("2:4 sparsity zeroes half the weights by construction; drop --budget")
        if self.budget is None and self.sparsity == "none" and not self.level:  # level 1 quantises and cuts nothing
            raise PapmError("--budget is required: the fraction of parameters to remove, e.g. --budget 0.77")
        check_compression(budget=self.budget, criterion=self.criterion, schedule=self.schedule, steps=self.steps,
                          step_epochs=self.step_epochs, data_free=self.data_free, sparsity=self.sparsity,
                          weight_bits=self.weight_bits, weight_quant=self.weight_quant, level=self.level,
                          finetunes=self.finetune.epochs > 0, bn_recalibrate=self.bn_recalibrate, kd=self.kd)
        if self.criterion not in CRITERIA:
            raise PapmError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise PapmError(f"--alpha must be in [0, 1], got {self.alpha}; 0.5 weighs the weight norm and (1 - APoZ) "
                            "alike, 1 the weight norm only")
        if self.emphasis_mode not in EMPHASIS_MODES:
            raise PapmError(f"unknown emphasis mode {self.emphasis_mode!r}; choose one of {', '.join(EMPHASIS_MODES)}")
        if not self.emphasis >= 1.0:
            raise PapmError(f"--emphasis must be >= 1, got {self.emphasis}; 1 weighs every class alike, 4 (the "
                            "default) the group's classes four times")
        if self.apoz_samples < 1:
            raise PapmError(f"--apoz-samples must be >= 1, got {self.apoz_samples}; e.g. 512 images of the group's classes")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise PapmError(f"--kd-weight must be in [0, 1], got {self.kd_weight}; 0.5 mixes the teacher's and the labels' loss alike")
        if not self.kd_temperature > 0:
            raise PapmError(f"--kd-temperature must be > 0, got {self.kd_temperature}; e.g. 4 (1: the teacher's plain softmax)")
        if self.round_to < 1:  # checked here, before any APoZ counting or training
            raise PapmError(f"--round-to must be >= 1, got {self.round_to}; 1 keeps any channel count, 8 multiples of 8")
        self.finetune.validate()
        return self

    def _resolve_level(self) -> None:
        if self.level == 0:
            return
        if self.level not in LEVELS:
            raise PapmError(f"level must be 1..{max(LEVELS)}, got {self.level}; pick a rung of the ladder (0: no level)")
        rung = LEVELS[self.level]
        budget = rung.budget
        if (self.sparsity, self.weight_bits, self.weight_quant, self.budget) == (rung.sparsity, rung.weight_bits,
                                                                                  rung.weight_quant, budget):
            return  # resolved before
        if self.sparsity != "none" or self.weight_bits or self.budget is not None or self.weight_quant != "rtn":
            raise PapmError(f"--level {self.level} sets the sparsity and the weight bits itself; "
                            "drop --budget, --sparsity, --weight-bits and --weight-quant")
        self.sparsity, self.weight_bits, self.weight_quant, self.budget = (rung.sparsity, rung.weight_bits,
                                                                           rung.weight_quant, budget)


def describe(settings: PruneSettings) -> str:
    """What a settings object does, in one line (printed by `papm prune`)."""
    if settings.sparsity == "2:4":
        what = "2:4 sparsity (2 of every 4 weights zero)"
    elif settings.sparsity == "unstructured":
        what = f"zero the {settings.budget:.0%} smallest conv weights"
    elif settings.budget is None:
        what = "keep every channel"
    else:
        criterion = {"papm": f"papm, alpha={settings.alpha:g}", "l1": "l1: filter norms", "apoz": "apoz",
                     "random": "random"}.get(settings.criterion, settings.criterion)
        what = (f"remove {settings.budget * 100:.3g}% of the parameters ({criterion}"  # 0.995: 99.5%, not 100%
                + (f", {settings.steps} steps" if settings.schedule == "iterative" else "")
                + (", data-free restoration" if settings.data_free else "") + ")")
    if settings.weight_bits:
        what += f", then {settings.weight_bits}-bit weights ({settings.weight_quant})"
    return what + (f" [level {settings.level}]" if settings.level else "")


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
        raise PapmError(f"--classes names a class twice: {items}; name each class once")
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
                   emphasis: float, emphasis_mode: str, device="cpu", teacher_logits: torch.Tensor | None = None,
                   logit_shift: torch.Tensor | None = None, grad_correction: dict | None = None, kd_weight: float = 0.5,
                   kd_temperature: float = 4.0) -> list[dict]:
    """One node's fine-tuning of a group's model (one FedAvg round): the group's classes emphasised.
    ``logit_shift`` (``label_shift`` of the node's class mix against all working nodes'): the emphasis
    weights scale the local and the global class mix alike, so they cancel out of the shift. ``teacher_logits``
    (``teacher_outputs`` of the base on ``train``) add distillation from the base."""
    weights = group_weights(info.num_classes, classes, emphasis)
    return fit(model, train, info, settings, device,
               class_weights=weights if emphasis_mode == "loss" else None,
               sample_weights=weights[train.y] if emphasis_mode == "sampling" else None,
               teacher_logits=teacher_logits, kd_weight=kd_weight, kd_temperature=kd_temperature, logit_shift=logit_shift,
               grad_correction=grad_correction, progress=False)


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
    final: bool = True,
):
    """Prune ``model`` in place to the budget; return (PruneResult, pruned model_args). A cut that is not the
    ``final`` one of a schedule takes the nearest feasible cut (the next cut aims at an absolute parameter
    count again), so only the last one must land within the tolerance."""
    torch.manual_seed(seed)  # the random criterion is reproducible
    model = model.cpu().eval()
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    importance = make_importance(settings.criterion, model, counts, settings.alpha)
    result = prune_to_budget(model, base_args, example, importance, settings.budget, round_to=settings.round_to,
                             **({} if final else {"tolerance": 1.0}))
    args = make_model_args(base_args["num_classes"], base_args["in_channels"], base_args["width"], result.channels)
    return result, args


def step_targets(params_before: int, budget: float, steps: int) -> list[float]:
    """Parameter counts to reach after each cut: the kept fraction shrinks geometrically, so every step
    removes the same share of what is left, ending at ``(1 - budget) * params_before``."""
    return [params_before * (1.0 - budget) ** ((i + 1) / steps) for i in range(steps)]
