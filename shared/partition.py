"""Seeded partitioners: split sample indices across N nodes.

Every partitioner returns one sorted index array per node; together they cover
every sample exactly once, and the same (labels, arguments, seed) always give
the same split. Every node gets at least ``min_size`` samples, or the split is
refused with one line that says what to change.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import PapmError

PARTITIONERS = ("iid", "dirichlet", "by-group")


def label_skew(class_counts: np.ndarray) -> float:
    """How far the nodes' class mixes are from all nodes' mix, from 0 (every node holds the same mix) to 1 (no
    two nodes share a class), whatever the nodes' sizes (``class_counts``: nodes x classes).

    The sample-weighted mean total-variation distance between each node's class distribution and the pooled
    one, divided by its largest value for these node sizes, 1 - sum(share^2), reached when the nodes' classes
    are disjoint. Empty nodes have no mix and do not count."""
    counts = np.asarray(class_counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    if counts.ndim != 2 or sizes.sum() <= 0:
        return 0.0
    held = sizes > 0
    counts, sizes = counts[held], sizes[held]
    share = sizes / sizes.sum()
    largest = 1.0 - float((share**2).sum())
    if largest <= 0:  # one node: nothing to differ from
        return 0.0
    distance = 0.5 * np.abs(counts / sizes[:, None] - counts.sum(axis=0) / sizes.sum()).sum(axis=1)
    return float(min(1.0, (share * distance).sum() / largest))


def skew_is_real(class_counts: np.ndarray, threshold: float = 0.1, p_value: float = 1e-3) -> bool:
    """True when the nodes' mixes differ by at least ``threshold`` (``label_skew``) and by more than their
    sizes explain: a chi-square test of homogeneity (``p < p_value``) keeps small IID nodes, whose mixes
    differ by sampling noise alone, from being called skewed."""
    from scipy.stats import chi2_contingency

    counts = np.asarray(class_counts, dtype=np.float64)
    counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]
    if counts.shape[0] < 2 or counts.shape[1] < 2 or label_skew(counts) < threshold:
        return False
    return bool(chi2_contingency(counts).pvalue < p_value)


def _check_nodes(labels: np.ndarray, num_nodes: int, min_size: int = 1) -> None:
    if num_nodes < 1:
        raise PapmError(f"number of nodes must be >= 1, got {num_nodes}")
    if num_nodes * min_size > len(labels):
        raise PapmError(f"cannot split {len(labels)} samples across {num_nodes} nodes with at least {min_size} each; "
                        "use fewer nodes or a smaller min-partition-size")


def _check_sizes(parts: list[np.ndarray], min_size: int, method: str, fix: str) -> list[np.ndarray]:
    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        small = [i for i, n in enumerate(sizes) if n < min_size]
        raise PapmError(f"the {method} partition gives node(s) {small} fewer than min-partition-size={min_size} samples "
                        f"(sizes {sizes}); {fix}")
    return parts


def partition_iid(labels: Sequence[int], num_nodes: int, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Shuffle and deal out: every node gets ~len/num_nodes samples of mixed classes."""
    labels = np.asarray(labels)
    _check_nodes(labels, num_nodes, min_size)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_nodes)]


def partition_dirichlet(
    labels: Sequence[int], num_nodes: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Per class, node shares drawn from Dirichlet(alpha): small alpha = skewed nodes.

    Redraws (with the same seeded generator) until every node has ``min_size`` samples.
    """
    labels = np.asarray(labels)
    _check_nodes(labels, num_nodes, min_size)
    if not alpha > 0:
        raise PapmError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise PapmError(
        f"Dirichlet(alpha={alpha}) left a node with fewer than min-partition-size={min_size} samples after 1000 draws; "
        "raise dirichlet-alpha, use fewer nodes or a smaller min-partition-size"
    )


def nodes_of_groups(num_groups: int, num_nodes: int) -> list[int]:
    """Group served by each node: round-robin, so every group gets a node when nodes >= groups."""
    if num_nodes < num_groups:
        raise PapmError(f"{num_groups} groups need at least {num_groups} nodes, got {num_nodes}")
    return [n % num_groups for n in range(num_nodes)]


def partition_by_group(
    labels: Sequence[int],
    groups: Sequence[Sequence[int]],
    num_nodes: int,
    share: float = 0.8,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Each node mostly sees its group's classes.

    Node n serves group ``n % K``. A sample of a class in group g goes, with
    probability ``share``, to one of g's nodes (uniformly), otherwise to any node.
    Classes in no group are spread uniformly.
    """
    labels = np.asarray(labels)
    _check_nodes(labels, num_nodes, min_size)
    if not 0.0 <= share <= 1.0:
        raise PapmError(f"by-group share must be in [0, 1], got {share}")
    node_group = np.asarray(nodes_of_groups(len(groups), num_nodes))
    class_group = {int(c): g for g, members in enumerate(groups) for c in members}
    rng = np.random.default_rng(seed)
    owner = rng.integers(0, num_nodes, size=len(labels))  # the "anywhere" draw
    stay = rng.random(len(labels)) < share
    for g in range(len(groups)):
        members = np.flatnonzero(node_group == g)
        in_group = np.isin(labels, [c for c, gg in class_group.items() if gg == g]) & stay
        owner[in_group] = members[rng.integers(0, len(members), size=int(in_group.sum()))]
    return _check_sizes([np.flatnonzero(owner == n) for n in range(num_nodes)], min_size, "by-group",
                        "lower by-group-share, use fewer nodes or a smaller min-partition-size")


def partition(
    labels: Sequence[int],
    num_nodes: int,
    method: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    groups: Sequence[Sequence[int]] | None = None,
    share: float = 0.8,
    min_size: int = 1,
) -> list[np.ndarray]:
    """``min_size`` 0 allows empty partitions (a node's small evaluation split may be empty)."""
    if len(labels) == 0 and min_size == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_nodes)]
    if method == "iid":
        return partition_iid(labels, num_nodes, seed, min_size)
    if method == "dirichlet":
        return partition_dirichlet(labels, num_nodes, alpha, seed, min_size)
    if method == "by-group":
        if not groups:
            raise PapmError("the by-group partitioner needs the class groups")
        return partition_by_group(labels, groups, num_nodes, share, seed, min_size)
    raise PapmError(f"unknown partitioner {method!r}; choose one of {', '.join(PARTITIONERS)}")
