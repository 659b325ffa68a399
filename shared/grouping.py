"""Class grouping: a class-by-class similarity from the model's class statistics,
clustered into K device groups for every K from 2 to the number of classes.

Works on numpy arrays (no torch), so the coordinator and reports can use it anywhere.

Similarities (``--similarity``), each from the per-class statistics:

- ``correlation`` (default): Pearson correlation of the class-mean output vectors;
  classes the model confuses share output mass, so their means correlate.
- ``cosine``: cosine of the class-mean output vectors (not centred).
- ``covariance``: closeness of class means under the model's own pooled within-class
  output covariance: ``exp(-d^2 / median d^2)`` of the Mahalanobis distance d.
- ``confusion``: symmetrised confusion rate, ``(N_ij / n_i + N_ji / n_j) / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import PapmError

SIMILARITIES = ("correlation", "cosine", "covariance", "confusion")


def class_similarity(
    kind: str,
    mean_outputs: np.ndarray,
    confusion: np.ndarray | None = None,
    within_covariance: np.ndarray | None = None,
) -> np.ndarray:
    """(C, C) symmetric similarity with ones on the diagonal (larger = more alike)."""
    m = np.asarray(mean_outputs, dtype=np.float64)
    c = m.shape[0]
    if kind == "correlation":
        centred = m - m.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        unit = centred / np.where(norms > 0, norms, 1.0)
        sim = unit @ unit.T
    elif kind == "cosine":
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        unit = m / np.where(norms > 0, norms, 1.0)
        sim = unit @ unit.T
    elif kind == "covariance":
        if within_covariance is None:
            raise PapmError("the covariance similarity needs the within-class covariance (the outer-product sums)")
        cov = np.asarray(within_covariance, dtype=np.float64)
        # Ridge: softmax outputs sum to 1, so their covariance is singular.
        ridge = 1e-6 * max(float(np.trace(cov)) / c, 1e-12)
        prec = np.linalg.pinv(cov + ridge * np.eye(c))
        diff = m[:, None, :] - m[None, :, :]
        d2 = np.einsum("ijk,kl,ijl->ij", diff, prec, diff).clip(min=0.0)
        off = d2[~np.eye(c, dtype=bool)]
        scale = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
        sim = np.exp(-d2 / scale)
    elif kind == "confusion":
        if confusion is None:
            raise PapmError("the confusion similarity needs the confusion counts")
        conf = np.asarray(confusion, dtype=np.float64)
        rate = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1.0)
        sim = (rate + rate.T) / 2.0
    else:
        raise PapmError(f"unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")
    sim = (sim + sim.T) / 2.0
    np.fill_diagonal(sim, 1.0)
    return sim


def check_k(k: int, num_classes: int) -> int:
    if not 2 <= k <= num_classes:
        raise PapmError(
            f"K={k} device groups is impossible with {num_classes} classes; choose K between 2 and {num_classes}"
        )
    return k


def _canonical(labels: np.ndarray) -> list[list[int]]:
    """Groups as sorted class-id lists, ordered by their smallest class (stable output)."""
    groups = [sorted(int(c) for c in np.flatnonzero(labels == g)) for g in np.unique(labels)]
    return sorted(groups, key=lambda g: g[0])


def cluster_classes(similarity: np.ndarray, k: int) -> list[list[int]]:
    """scikit-learn agglomerative clustering, average linkage on ``1 - similarity``."""
    from sklearn.cluster import AgglomerativeClustering

    c = similarity.shape[0]
    check_k(k, c)
    if k == c:
        return [[i] for i in range(c)]
    distance = np.clip(1.0 - similarity, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
    return _canonical(labels)


def _within_total(similarity: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    return float(sum(similarity[np.ix_(g, g)].sum() - len(g) for g in groups))  # off-diagonal pairs, twice


def balanced_groups(similarity: np.ndarray, k: int) -> list[list[int]]:
    """K groups whose sizes differ by at most one, keeping similar classes together.

    How: start from the average-linkage clusters; while a group is over its size
    (sizes are ceil/floor of C/K, the largest clusters get the larger size), move its
    class least similar to the rest of it into the under-full group it is most similar
    to (on average); then swap pairs of classes between groups while a swap raises the
    total within-group similarity (sizes never change). Deterministic.
    """
    c = similarity.shape[0]
    check_k(k, c)
    groups = [list(g) for g in cluster_classes(similarity, k)]
    base, extra = divmod(c, k)
    # The `extra` largest clusters get size base+1 (ties: the earlier group).
    by_size = sorted(range(k), key=lambda i: (-len(groups[i]), i))
    cap = {g: base + (1 if rank < extra else 0) for rank, g in enumerate(by_size)}

    def mean_sim(cls: int, members: Sequence[int]) -> float:
        others = [m for m in members if m != cls]
        return float(similarity[cls, others].mean()) if others else 0.0

    while True:
        over = [g for g in range(k) if len(groups[g]) > cap[g]]
        if not over:
            break
        g = over[0]
        # the class that fits its group worst leaves it
        leaver = min(groups[g], key=lambda cls: (mean_sim(cls, groups[g]), cls))
        under = [h for h in range(k) if len(groups[h]) < cap[h]]
        target = max(under, key=lambda h: (np.mean(similarity[leaver, groups[h]]) if groups[h] else -np.inf, -h))
        groups[g].remove(leaver)
        groups[target].append(leaver)

    improved = True
    while improved:
        improved = False
        best = (1e-12, None)
        for a in range(k):
            for b in range(a + 1, k):
                for x in groups[a]:
                    for y in groups[b]:
                        # gain of swapping x (in a) and y (in b)
                        ga = [m for m in groups[a] if m != x]
                        gb = [m for m in groups[b] if m != y]
                        gain = (similarity[y, ga].sum() + similarity[x, gb].sum()
                                - similarity[x, ga].sum() - similarity[y, gb].sum())
                        if gain > best[0]:
                            best = (gain, (a, b, x, y))
        if best[1] is not None:
            a, b, x, y = best[1]
            groups[a].remove(x)
            groups[a].append(y)
            groups[b].remove(y)
            groups[b].append(x)
            improved = True
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def mean_within_similarity(similarity: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Mean similarity over all pairs of distinct classes that share a group (nan if none)."""
    pairs = sum(len(g) * (len(g) - 1) for g in groups)
    return _within_total(similarity, groups) / pairs if pairs else float("nan")


def confusion_within(confusion: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Share of a model's confusions (off-diagonal counts) that lie between classes of one group."""
    conf = np.asarray(confusion, dtype=np.float64).copy()
    np.fill_diagonal(conf, 0.0)
    total = conf.sum()
    if total == 0:
        return float("nan")
    return float(sum(conf[np.ix_(g, g)].sum() for g in groups) / total)


@dataclass
class GroupingAnalysis:
    """Everything the report shows: the similarity, and the groups for every K."""

    class_names: list[str]
    similarity: np.ndarray
    similarity_kind: str
    outputs: str
    balanced: bool
    partitions: dict[int, list[list[int]]]
    mean_within: dict[int, float]
    confusion_share: dict[int, float]
    confusion: np.ndarray
    counts: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def group_names(self, k: int) -> list[list[str]]:
        return [[self.class_names[c] for c in g] for g in self.partitions[k]]


def analyse_groups(
    class_names: Sequence[str],
    mean_outputs: np.ndarray,
    confusion: np.ndarray,
    counts: np.ndarray,
    within_covariance: np.ndarray | None = None,
    similarity: str = "correlation",
    outputs: str = "softmax",
    balanced: bool = False,
) -> GroupingAnalysis:
    """Similarity, then the groups for every K from 2 to the number of classes."""
    names = [str(n) for n in class_names]
    if len(names) < 2:
        raise PapmError("grouping needs at least 2 classes")
    if np.asarray(mean_outputs).shape != (len(names), len(names)):
        raise PapmError(f"class statistics cover {np.asarray(mean_outputs).shape[0]} classes but there are {len(names)} class names")
    sim = class_similarity(similarity, mean_outputs, confusion, within_covariance)
    partitions, within, share = {}, {}, {}
    for k in range(2, len(names) + 1):
        groups = balanced_groups(sim, k) if balanced else cluster_classes(sim, k)
        partitions[k] = groups
        within[k] = mean_within_similarity(sim, groups)
        share[k] = confusion_within(confusion, groups)
    return GroupingAnalysis(names, sim, similarity, outputs, balanced, partitions, within, share,
                            np.asarray(confusion), np.asarray(counts))


def analyse_stats(stats, class_names: Sequence[str], similarity: str = "correlation", outputs: str = "softmax",
                  balanced: bool = False) -> GroupingAnalysis:
    """:func:`analyse_groups` from a ``papm.shared.class_stats.ClassStatistics``."""
    if stats.num_classes != len(class_names):
        raise PapmError(f"class statistics cover {stats.num_classes} classes but the dataset has {len(class_names)}; "
                        "use the dataset the checkpoint was trained on")
    return analyse_groups(
        class_names,
        np.asarray(stats.mean_outputs(outputs)),
        np.asarray(stats.confusion),
        np.asarray(stats.counts),
        np.asarray(stats.within_class_covariance(outputs)) if similarity == "covariance" else None,
        similarity=similarity,
        outputs=outputs,
        balanced=balanced,
    )


def random_groups(num_classes: int, k: int, seed: int) -> list[list[int]]:
    """K groups of sizes floor/ceil(C/K) from a seeded permutation of the classes (the random-grouping baseline)."""
    order = np.random.default_rng(seed).permutation(num_classes)
    return sorted((sorted(int(c) for c in part) for part in np.array_split(order, k)), key=lambda g: g[0])
