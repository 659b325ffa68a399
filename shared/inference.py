"""The one batched, no-grad forward pass: a model's logits for a whole uint8 image tensor.

Evaluation, class statistics and distillation's teacher all read logits this way, so they batch,
normalise and restore the model identically.
"""

from __future__ import annotations

import torch
from torch import nn

from .datasets import DatasetInfo, ImageSet, normalise


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA (training steps and the distillation teacher's pass), off elsewhere: the CPU's
    bf16 kernels are slower than fp32 on most x86 parts."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, info: DatasetInfo, device: torch.device | str = "cpu", *,
              batch_size: int = 512, mirrored: bool = False, out_device: torch.device | str = "cpu",
              autocast: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits (N, classes) on ``out_device`` for uint8 images ``x``, in order; ``mirrored`` flips each
    image left-right first (batch by batch: no mirrored copy of the data). ``out``, if given, is written in
    place (a caller filling one slice of a larger tensor needs no second copy) and returned.

    Plain fp32 unless ``autocast``: class statistics and accuracies are sums that must not depend on how a node
    batches its data (bf16 logits would make federated sums differ from centralised ones). A distillation
    teacher only shapes a loss, so it may run under ``autocast_for(device)`` (bf16 on CUDA, nothing elsewhere).
    """
    device = torch.device(device)
    # The caller's model stays where it was, in the mode it was in: a server that evaluates its CPU copy on a GPU
    # must not find it on the GPU afterwards (it then meets CPU inputs: parameter counts, exports, checkpoints).
    home, was_training = next(model.parameters(), torch.empty(0)).device, model.training
    model.to(device).eval()
    if out is None:
        out = torch.empty(x.shape[0], info.num_classes, device=out_device)
    elif out.shape != (x.shape[0], info.num_classes):
        raise ValueError(f"out has shape {tuple(out.shape)}, logits of these images need {(x.shape[0], info.num_classes)}")
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device)
            with autocast_for(device) if autocast else torch.autocast(device.type, enabled=False):
                out[i : i + batch_size] = model(normalise(xb.flip(3) if mirrored else xb, info)).float()
    finally:
        model.to(home).train(was_training)
    return out


def predict_logits(model: nn.Module, data: ImageSet, info: DatasetInfo, device: torch.device | str = "cpu",
                   batch_size: int = 512) -> torch.Tensor:
    """Logits for every sample of ``data`` (float32, on the CPU), in order."""
    return logits_of(model, data.x, info, device, batch_size=batch_size)
