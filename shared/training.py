"""The one training loop every phase uses (base training, fine-tuning, FedAvg rounds).

In the spirit of airbench: the whole split lives on the training device as a
uint8 tensor, batches are sliced from a permutation, augmentation (random crop
with padding, horizontal flip where the dataset allows it) is a batch tensor
op, and on CUDA the loop runs under bf16 autocast with channels_last.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .datasets import DatasetInfo, ImageSet, normalise
from .distillation import distillation_loss, teacher_outputs
from .errors import PapmError
from .inference import autocast_for, predict_logits


@dataclass
class TrainSettings:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate (SGD, Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup: float = 0.15  # fraction of steps with linearly rising lr; then linear decay to 0
    seed: int = 0
    select_on_val: bool = True  # keep the weights of the epoch with the best validation accuracy
    steps: int = 0  # optimiser steps to take (0: epochs x batches per epoch); the data is cycled through
    schedule_total: int = 0  # steps of the whole schedule this fit is a window of (0: this fit alone)
    schedule_start: int = 0  # where in that schedule this fit starts (a FedAvg round's offset)

    def validate(self) -> "TrainSettings":
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise PapmError(f"{name} must be {'>= 0' if name == 'epochs' else '>= 1'}, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PapmError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.weight_decay < 1.0:
            raise PapmError(f"weight decay must be in [0, 1), got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise PapmError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.steps < 0 or self.schedule_start < 0 or self.schedule_total < 0:
            raise PapmError("steps and the schedule window must be >= 0")
        return self

    def lr_factor(self, total: int) -> Callable[[int], float]:
        """Multiplier of ``lr`` at local step s: linear warm-up over ``warmup`` of the schedule, then linear
        decay to 0; a window of a longer schedule (FedAvg rounds) continues it instead of starting over."""
        length = self.schedule_total or total
        warm = max(1, int(self.warmup * length))

        def factor(s: int) -> float:
            g = self.schedule_start + s
            return (g + 1) / warm if g < warm else max(0.0, (length - g) / max(1, length - warm))

        return factor


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch over n samples; a last batch of a single sample joins the one before
    it, because BatchNorm in training mode cannot normalise one value per channel (a 1x1 feature map)."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def momentum_lr_sum(settings: TrainSettings, steps: int) -> float:
    """How far ``steps`` steps of ``fit`` move the weights per unit of a constant gradient: each step's learning
    rate times Nesterov momentum's build-up from a fresh buffer, 1 + m (1 - m^(t+1)) / (1 - m) at step t.
    A node's displacement divided by it is its mean local gradient (SCAFFOLD's control variate, option II)."""
    factor, m = settings.lr_factor(steps), settings.momentum
    return sum(settings.lr * factor(t) * (1 + m * (1 - m ** (t + 1)) / (1 - m)) for t in range(steps))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PapmError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PapmError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    # Measured on a 2-core CPU: +25-40% at width 1.0, nothing clear on small models.
    return device.type == "cuda" or sum(p.numel() for p in model.parameters()) > 2_000_000


def augment(x: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, for a whole batch at once."""
    return augment_with_flips(x, info, generator)[0]


def augment_with_flips(x: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``augment``, and which images it mirrored (bool per image; all False where the dataset does not flip)."""
    n, c, h, w = x.shape
    pad = info.crop_padding
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    flip = torch.zeros(n, dtype=torch.bool, device=x.device)
    if info.hflip:
        flip = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x, flip


def round_lr(lr: float, round_index: int, rounds: int) -> float:
    """Peak learning rate of FedAvg round ``round_index`` (0-based) of ``rounds``: decays linearly
    over the rounds (lr, ..., lr / rounds), so the last rounds average models that moved little
    and the global model settles instead of jumping between local optima."""
    return lr * (rounds - round_index) / rounds


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, info: DatasetInfo, device: torch.device | str = "cpu", classes=None) -> dict:
    """Accuracy on all of ``data`` (or on the samples whose label is in ``classes``), per class, and the
    confusion counts (``confusion[true][predicted]``, num_classes x num_classes)."""
    if classes is not None:
        data = data.of_classes(classes)
    c = info.num_classes
    if len(data) == 0:
        return {"accuracy": float("nan"), "n": 0, "per_class": {}, "confusion": [[0] * c for _ in range(c)]}
    pred = predict_logits(model, data, info, device).argmax(1)
    correct = pred == data.y
    per_class = {int(k): float(correct[data.y == k].float().mean()) for k in torch.unique(data.y)}
    confusion = torch.bincount(data.y.long() * c + pred, minlength=c * c).reshape(c, c)
    return {"accuracy": float(correct.float().mean()), "n": len(data), "per_class": per_class,
            "confusion": confusion.tolist()}


def label_shift(local_counts: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
    """log(local class prior) - log(global class prior): the logit adjustment of a node's loss under label skew.

    A node whose images are mostly of a few classes teaches a model trained on them that the other classes are
    rare; FedAvg then averages models that each believe in their own node's class mix. Training on
    ``logits + shift`` lets the node's prior explain its skew, so the model it returns keeps the prior of all
    nodes' data together (logit adjustment, as in FedLC, Zhang et al. 2022). With IID nodes the shift is about
    zero and nothing changes. A class the node has no image of gets a very negative shift: the node neither
    teaches nor unteaches it.
    """
    local = local_counts.double() / local_counts.sum().clamp_min(1)
    glob = global_counts.double() / global_counts.sum().clamp_min(1)
    return (local.clamp_min(1e-6).log() - glob.clamp_min(1e-6).log()).float()


def fit(
    model: nn.Module,
    train: ImageSet,
    info: DatasetInfo,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    *,
    val: ImageSet | None = None,
    class_weights: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    teacher_logits: torch.Tensor | None = None,
    logit_shift: torch.Tensor | None = None,
    grad_correction: dict[str, torch.Tensor] | None = None,
    kd_weight: float = 0.5,
    kd_temperature: float = 4.0,
    progress: bool | None = None,
    desc: str = "train",
    on_epoch: Callable[[int, dict], None] | None = None,
    on_state: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> list[dict]:
    """Train ``model`` in place; return one dict of metrics per epoch.

    ``class_weights`` weight the cross-entropy per class; ``sample_weights`` instead
    draw each epoch's samples with replacement in proportion to them; ``teacher``
    adds knowledge distillation (``kd_weight`` of the loss) on its ``teacher_outputs``, computed once here or
    given as ``teacher_logits`` (a caller that fits several models on the same data computes them once);
    ``logit_shift`` (one value per class, ``label_shift``) is added to the logits in the cross-entropy only; ``grad_correction`` (parameter
    name -> tensor, SCAFFOLD's ``c - c_i``) is added to every step's gradient. With ``val`` and
    ``settings.select_on_val`` the best-validation epoch's weights are kept. ``on_state`` receives, after every
    epoch, everything the loop needs to go on (weights, optimiser, schedule, sampler, best-so-far, history); that
    dict given back as ``resume`` continues the same schedule where it stopped, ending with the same weights.
    """
    settings.validate()
    device = torch.device(device)
    if len(train) < 2:
        raise PapmError(f"{len(train)} training sample(s); training needs at least 2 (BatchNorm); check the dataset and "
                        "the class selection")
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    channels_last = use_channels_last(model, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    if teacher_logits is None and teacher is not None:
        teacher_logits = teacher_outputs(teacher, train.x, info, device)
    if teacher_logits is not None:
        if teacher_logits.ndim != 3 or teacher_logits.shape[:2] != (2 if info.hflip else 1, len(train)):
            raise PapmError(f"teacher logits of shape {tuple(teacher_logits.shape)} for {len(train)} training images; "
                            "compute them with teacher_outputs on the same data")
        teacher_logits = teacher_logits.to(device=device, dtype=torch.float32)
    x_all, y_all = train.x.to(device), train.y.to(device)
    if class_weights is not None:
        class_weights = class_weights.to(device=device, dtype=torch.float32)
    if logit_shift is not None:
        logit_shift = logit_shift.to(device=device, dtype=torch.float32)
    corrected = []
    if grad_correction is not None:
        params = dict(model.named_parameters())
        unknown = sorted(set(grad_correction) - set(params))
        if unknown:
            raise PapmError(f"gradient correction for {unknown[0]!r}, which the model does not have; server and client versions differ?")
        corrected = [(params[k], c.to(device=device, dtype=params[k].dtype)) for k, c in grad_correction.items()]
    n = len(train)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    total = settings.steps or settings.epochs * steps_per_epoch
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, settings.lr_factor(total))
    history: list[dict] = []
    best = (-1.0, None)
    bar = tqdm(total=total, desc=desc, disable=(not progress) if progress is not None else None, leave=False)
    step, first_epoch = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
        first_epoch, step, history = resume["epoch"], resume["step"], list(resume["history"])
        best = (resume["best_accuracy"], resume["best_model"])
        bar.update(step)
    try:  # the bar is closed on Ctrl-C too, so the line after it starts clean
        for epoch in range(first_epoch, math.ceil(total / steps_per_epoch)):
            model.train()
            if sample_weights is not None:
                order = torch.multinomial(sample_weights.float(), n, replacement=True, generator=gen)
            else:
                order = torch.randperm(n, generator=gen)
            order = order.to(device)
            seen, loss_sum, correct = 0, 0.0, 0
            for start, stop in batch_bounds(n, settings.batch_size):
                if step == total:
                    break
                idx = order[start:stop]
                xb, flipped = augment_with_flips(x_all[idx], info, gen)
                xb = normalise(xb, info).contiguous(memory_format=memory_format)
                yb = y_all[idx]
                with autocast_for(device):
                    logits = model(xb)
                    shifted = logits.float() if logit_shift is None else logits.float() + logit_shift
                    loss = F.cross_entropy(shifted, yb, weight=class_weights, label_smoothing=settings.label_smoothing)
                    if teacher_logits is not None:  # the view (upright or mirrored) each image was trained on
                        t_logits = teacher_logits[flipped.long() if teacher_logits.shape[0] == 2 else 0, idx]
                        loss = (1 - kd_weight) * loss + kd_weight * distillation_loss(logits.float(), t_logits, kd_temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, c in corrected:
                    if p.grad is not None:
                        p.grad.add_(c)
                opt.step()
                sched.step()
                step += 1
                seen += len(idx)
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                bar.update(1)
            row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen}
            if val is not None and len(val) > 0:
                row["val_accuracy"] = evaluate(model, val, info, device)["accuracy"]
                if settings.select_on_val and row["val_accuracy"] > best[0]:
                    best = (row["val_accuracy"], copy.deepcopy(model.state_dict()))
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row.get('val_accuracy', float('nan')):.3f}")
            history.append(row)
            if on_epoch is not None:
                on_epoch(epoch, row)
            if on_state is not None:
                on_state({"epoch": epoch + 1, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "generator": gen.get_state(), "best_accuracy": best[0],
                          "best_model": best[1], "history": history})
    finally:
        bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.to(memory_format=torch.contiguous_format)
    return history
