"""Phase 2: which node serves which device group."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from papm.shared.errors import PapmError


def assign_nodes(class_counts: dict[int, np.ndarray], groups: list[list[int]]) -> dict[int, int]:
    """Node (partition id) -> group, every group served by floor(N/K) or ceil(N/K) nodes.

    A node's affinity for a group is the share of its training samples that belong to
    the group's classes; the assignment maximises the total affinity (Hungarian
    method over group slots), so a node whose data is mostly cats serves the cat group.
    """
    nodes = sorted(class_counts)
    k = len(groups)
    if len(nodes) < k:
        raise PapmError(f"{k} device groups need at least {k} nodes, but only {len(nodes)} are available; "
                        "start more SuperNodes or lower devices")
    affinity = np.zeros((len(nodes), k))
    for i, n in enumerate(nodes):
        counts = np.asarray(class_counts[n], dtype=np.float64)
        total = max(counts.sum(), 1.0)
        for g, classes in enumerate(groups):
            affinity[i, g] = counts[classes].sum() / total
    base, extra = divmod(len(nodes), k)
    slots, bonus = [], []
    for g in range(k):
        slots += [g] * (base + (1 if extra else 0))
        bonus += [10.0] * base + ([0.0] if extra else [])  # the first `base` slots of every group must be filled
    gain = affinity[:, slots] + np.asarray(bonus)[None, :]
    rows, cols = linear_sum_assignment(-gain)
    return {nodes[r]: slots[c] for r, c in zip(rows, cols)}
