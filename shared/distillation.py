"""Distillation from a fixed teacher (the base model): its logits computed once per fit, and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import DatasetInfo
from .inference import logits_of


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor, info: DatasetInfo, device: torch.device | str = "cpu",
                    batch_size: int = 512) -> torch.Tensor:
    """The teacher's logits for every training image (uint8 ``x``), as seen upright and, where the dataset
    flips, mirrored: float32 (1 or 2, N, classes) on ``device``; ``fit`` picks each step's row by its flip.

    The teacher is fixed, so one pass over the data replaces a teacher forward in every step (about 1.3
    training steps' worth on a pruned student: distillation cost 2.3x a plain step, now a pass or two per
    fit). The random crop is not replayed: the teacher sees the uncropped image, which the crop shifts by at
    most ``crop_padding`` pixels. On CUDA the pass runs in bf16 autocast, as the training steps do."""
    views = [False, True] if info.hflip else [False]
    out = torch.empty(len(views), x.shape[0], info.num_classes, device=device)
    for v, mirrored in enumerate(views):  # each view written in place: no stacked second copy of N x C floats
        logits_of(teacher, x, info, device, batch_size=batch_size, mirrored=mirrored, autocast=True, out=out[v])
    return out


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(teacher || student) on temperature-softened outputs."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), log_target=True, reduction="batchmean"
    ) * (t * t)
