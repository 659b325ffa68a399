"""FedAvg: the example-weighted mean of the nodes' weights."""

from __future__ import annotations

import torch

from ..shared.errors import PapmError


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Mean of state dicts weighted by ``weights`` (the nodes' example counts).

    Float tensors are averaged in float64; integer buffers (BatchNorm's batch
    counter) take the weighted mean rounded to the nearest integer.
    """
    if not states:
        raise PapmError("no node returned weights to average; check that nodes are online")
    total = float(sum(weights))
    if total <= 0:
        raise PapmError("nodes reported no training examples; check their data")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise PapmError("nodes returned weights of different architectures; server and client versions differ")
    out = {}
    for k in keys:
        acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights))
        if states[0][k].is_floating_point() and not torch.isfinite(acc).all():
            raise PapmError(f"the nodes' averaged {k} holds NaN or infinite values: training diverged; lower the learning "
                            "rate (base-lr, finetune-lr or fusion-lr) and start the run again")
        out[k] = acc.round().to(states[0][k].dtype) if not states[0][k].is_floating_point() else acc.to(states[0][k].dtype)
    return out
