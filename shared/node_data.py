"""The local data of one node: its partition of the training and validation splits.

In simulation every node reads the same dataset and keeps its own partition
(seeded, so nodes agree without talking). On a real SuperNode the node config's
``data-root`` points at the device's own ImageFolder tree (``train/<class>/`` only) and
the node keeps all of it. Images are read at the run's ``image-size`` and ``channels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .config import RunConfig
from .datasets import DatasetInfo, DataSplits, ImageSet, load_dataset
from .errors import PapmError
from .partition import partition


@dataclass
class NodeData:
    info: DatasetInfo  # class names, image size; mean/std here are local, the run's come from the server
    train: ImageSet
    val: ImageSet  # the node's local evaluation split


def _read(name: str, root: str, split_seed: int, val_fraction: float, image_size: int, channels: int,
          parts: tuple[str, ...] = ("train", "test"), every_class: bool = True) -> DataSplits:
    return load_dataset(name, root or None, split_seed=split_seed, val_fraction=val_fraction, image_size=image_size,
                        in_channels=channels, parts=parts, every_class=every_class)


_dataset = lru_cache(maxsize=4)(_read)  # the nodes of one process (simulation workers, the direct engine) share a read


def load_node_data(cfg: RunConfig, partition_id: int, num_partitions: int, own_data_root: str = "") -> NodeData:
    """This node's data. ``own_data_root`` (node config ``data-root``): the device's own tree
    (``train/<class>/`` only), used whole; its evaluation split is carved from it (seeded)."""
    if own_data_root:
        # a device may hold no photos of some classes (label skew): its empty class folders are allowed
        splits = _dataset("imagefolder", own_data_root, cfg.seed, cfg.val_fraction, cfg.image_size, cfg.channels,
                          ("train",), every_class=False)
        if len(splits.train) < cfg.min_partition_size:
            raise PapmError(f"{own_data_root} holds {len(splits.train)} training images (after the evaluation split); "
                            f"a node needs at least min-partition-size={cfg.min_partition_size}")
        return NodeData(splits.info, splits.train, splits.val)
    if not 0 <= partition_id < num_partitions:
        raise PapmError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; fix the node config")
    splits = _dataset(cfg.dataset, cfg.data_root, cfg.seed, cfg.val_fraction, cfg.image_size, cfg.channels, ("train",))
    train_parts, val_parts = _partitions(cfg, splits, num_partitions)
    return NodeData(splits.info, splits.train.subset(train_parts[partition_id]), splits.val.subset(val_parts[partition_id]))


def _partitions(cfg: RunConfig, splits: DataSplits, num_partitions: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every node's (train, validation) indices: seeded, so each node computes the same split alone."""
    groups = None
    if cfg.partitioner == "by-group":
        # Before grouping exists, "by-group" data follows contiguous class blocks, one per device group.
        groups = [list(b) for b in np.array_split(np.arange(splits.info.num_classes), cfg.devices)]
    kw = dict(seed=cfg.seed, alpha=cfg.dirichlet_alpha, groups=groups, share=cfg.by_group_share)
    train_parts = partition(splits.train.y.numpy(), num_partitions, cfg.partitioner, min_size=cfg.min_partition_size, **kw)
    val_parts = partition(splits.val.y.numpy(), num_partitions, cfg.partitioner, min_size=0, **{**kw, "seed": cfg.seed + 1})
    return train_parts, val_parts


def check_partitions(cfg: RunConfig, keep: bool = False) -> None:
    """The partition every simulated node makes of the shared data, made once before any node starts: a config
    that cannot be split is one line, not one refusal per node. ``keep``: the nodes run in this process and reuse the
    split read here; else it is not kept (a coordinator holds no train split)."""
    splits = (_dataset if keep else _read)(cfg.dataset, cfg.data_root, cfg.seed, cfg.val_fraction, cfg.image_size,
                                           cfg.channels, ("train",))
    _partitions(cfg, splits, cfg.nodes)


def server_test_split(cfg: RunConfig) -> DataSplits:
    """The held-out test split the server evaluates on (never a node's data). An ImageFolder
    coordinator needs only ``data-root/test/<class>/``."""
    return _dataset(cfg.dataset, cfg.data_root, cfg.seed, cfg.val_fraction, cfg.image_size, cfg.channels, ("test",))
