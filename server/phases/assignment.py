"""Phase 2, assignment: which node serves which device group.

The groups for K = ``devices`` come from the class statistics (``class_stats.pt``), or, as
baselines, from a seeded random split (``grouping=random``) or one group of every class
(``baseline=one-model-*``); each node goes to the group whose classes make up most of its
training data, every group served by floor(N/K) or ceil(N/K) nodes. Output: ``groups/assignment.json`` (and the
report page with the run's section).
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.logger import log
from scipy.optimize import linear_sum_assignment

from ...shared.group_report import write_assignment, write_group_report
from ...shared.errors import PapmError
from ...shared.grouping import analyse_stats, random_groups
from ...shared.partition import label_skew, skew_is_real

if TYPE_CHECKING:
    from ..driver import RunDriver


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


def run(d: RunDriver) -> None:
    d.rd.rewind_metrics({"assignment": None})
    cfg = d.cfg
    _, info, _ = d.rd.load_base()
    analysis = analyse_stats(d.rd.load_class_stats(), info.class_names, cfg.similarity, cfg.outputs, cfg.balanced)
    stats_nodes = [m["nodes"] for m in d.rd.metrics() if m.get("phase") == "statistics"]
    analysis.extra.update({"split": "train", **({"nodes": stats_nodes[-1]} if stats_nodes else {})})
    by_pid = {v["partition_id"]: np.asarray(v["class_counts"]) for v in d.nodes.values()}
    if cfg.baseline != "none":  # one model for all classes, worked on by every node
        how, groups = cfg.baseline, [list(range(info.num_classes))]
    elif cfg.grouping == "random":
        how, groups = "random", random_groups(info.num_classes, cfg.devices, cfg.seed)
    else:
        how, groups = "similarity", analysis.partitions[cfg.devices]
    mapping = assign_nodes(by_pid, groups)
    nodes = [{"node": pid, "partition_id": pid, "group": g, "class_counts": [int(x) for x in by_pid[pid]]}
             for pid, g in sorted(mapping.items())]
    if how == "similarity":
        write_group_report(d.rd.path / "groups", analysis, {"chosen_k": cfg.devices, "nodes": nodes})
    else:  # the report shows the similarity groups for every K; the run's own groups are in assignment.json
        write_group_report(d.rd.path / "groups", analysis)
        write_assignment(d.rd.path / "groups", groups, info.class_names, nodes, how)
    k = len(groups)
    table = np.stack([by_pid[p] for p in sorted(by_pid)])
    skew, skewed = label_skew(table), skew_is_real(table)
    log(INFO, "label skew across nodes: %.3f (0: every node holds the same class mix, 1: no two share a class)%s", skew,
        "; the nodes' photos are label-skewed and finetune-scaffold is off: on skewed CIFAR-10 it was worth 1.2 points "
        "(README: real photos, label skew)" if skewed and not cfg.finetune_scaffold else "")
    d.rd.log_metrics("assignment", k=k, grouping=how, nodes=len(mapping), label_skew=round(skew, 4), label_skewed=skewed,
                     nodes_per_group=[sum(1 for gg in mapping.values() if gg == g) for g in range(k)])
    for g in range(k):
        members = [p for p, gg in mapping.items() if gg == g]
        log(INFO, "group %d (%s): partition-ids %s", g, ", ".join(info.class_names[c] for c in groups[g]), members)
