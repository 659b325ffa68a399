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


def scaffold_controls(x: dict[str, torch.Tensor], returned: dict[int, dict[str, torch.Tensor]], lr_sums: dict[int, float],
                      weights: dict[int, float], controls: dict) -> dict:
    """SCAFFOLD's control variates after a round (Karimireddy et al. 2020, option II), kept on the server so nodes
    stay stateless: node i's ``c_i`` becomes ``c_i - c + (x - y_i) / lr_sum_i`` (its mean local gradient, with
    ``x`` the model it received, ``y_i`` the one it returned, ``lr_sum_i`` how far its steps move per unit of
    gradient) and the global ``c`` the FedAvg-weighted mean of the nodes' ``c_i``; only the parameters in ``x``.
    ``controls``: ``{"global": {name: c}, "nodes": {partition id: {name: c_i}}}`` (empty at the start: zeros).
    A node steps with ``c - c_i`` added to its gradients, which removes the pull of its own data's optimum."""
    old_global = controls.get("global", {})
    nodes = dict(controls.get("nodes", {}))
    for i, y in returned.items():
        if lr_sums[i] <= 0:
            continue
        c_i = nodes.get(i, {})
        nodes[i] = {k: (c_i[k] if k in c_i else 0) - (old_global[k] if k in old_global else 0)
                    + (x[k].double() - y[k].double()).float() / lr_sums[i] for k in x}
    have = [i for i in returned if i in nodes]
    total = sum(weights[i] for i in have)
    if not have or total <= 0:
        return {"global": old_global, "nodes": nodes}
    glob = {k: sum(nodes[i][k].double() * (weights[i] / total) for i in have).float() for k in x}
    return {"global": glob, "nodes": nodes}


def scaffold_correction(controls: dict, node: int) -> dict[str, torch.Tensor] | None:
    """``c - c_i`` for one node (None before the first round: both are zero)."""
    glob = controls.get("global")
    if not glob:
        return None
    own = controls.get("nodes", {}).get(node, {})
    return {k: c - own[k] if k in own else c.clone() for k, c in glob.items()}
