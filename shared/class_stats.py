"""Per-class output statistics of a model, as sums that add up exactly across clients.

For every true class c (C classes, outputs of size C):

- ``counts[c]``: samples of class c;
- ``softmax_sum[c]`` and ``logit_sum[c]``: sums of the softmax / logit vectors;
- ``softmax_outer[c]`` and ``logit_outer[c]``: sums of the outer products p p^T, which
  give the within-class output covariance;
- ``confusion[c, k]``: samples of class c predicted as k.

Sums are accumulated in float64 (the confusion and counts as int64), so the
statistics of several data shards add up to the statistics of their union within
float rounding, and exactly for the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .datasets import DatasetInfo, ImageSet
from .errors import PapmError
from .inference import predict_logits

FIELDS = ("counts", "softmax_sum", "logit_sum", "softmax_outer", "logit_outer", "confusion")


@dataclass
class ClassStatistics:
    counts: torch.Tensor  # (C,) int64
    softmax_sum: torch.Tensor  # (C, C) float64
    logit_sum: torch.Tensor  # (C, C) float64
    softmax_outer: torch.Tensor  # (C, C, C) float64
    logit_outer: torch.Tensor  # (C, C, C) float64
    confusion: torch.Tensor  # (C, C) int64, rows = true class

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @classmethod
    def zeros(cls, num_classes: int) -> "ClassStatistics":
        c = num_classes
        f = dict(dtype=torch.float64)
        return cls(torch.zeros(c, dtype=torch.int64), torch.zeros(c, c, **f), torch.zeros(c, c, **f),
                   torch.zeros(c, c, c, **f), torch.zeros(c, c, c, **f), torch.zeros(c, c, dtype=torch.int64))

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor) -> "ClassStatistics":
        num_classes = logits.shape[1]
        stats = cls.zeros(num_classes)
        z = logits.double()
        p = torch.softmax(z, dim=1)
        y = labels.long()
        stats.counts += torch.bincount(y, minlength=num_classes)
        stats.softmax_sum.index_add_(0, y, p)
        stats.logit_sum.index_add_(0, y, z)
        for c in torch.unique(y).tolist():  # per class P_c^T P_c: C x C at a time, never an N x C x C array
            rows = y == c
            stats.softmax_outer[c] += p[rows].T @ p[rows]
            stats.logit_outer[c] += z[rows].T @ z[rows]
        pred = z.argmax(1)
        stats.confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
        return stats

    def __add__(self, other: "ClassStatistics") -> "ClassStatistics":
        if self.num_classes != other.num_classes:
            raise PapmError(f"class statistics over {self.num_classes} and {other.num_classes} classes cannot be added")
        return ClassStatistics(*(getattr(self, f) + getattr(other, f) for f in FIELDS))

    def mean_outputs(self, outputs: str = "softmax") -> torch.Tensor:
        """(C, C): row c is the mean output vector over samples of true class c."""
        total = self._sum(outputs)
        if (self.counts == 0).any():
            missing = torch.nonzero(self.counts == 0).flatten().tolist()
            raise PapmError(f"no samples of classes {missing}; class statistics need every class")
        return total / self.counts[:, None].double()

    def within_class_covariance(self, outputs: str = "softmax") -> torch.Tensor:
        """(C, C) pooled within-class covariance of the outputs: sum_c (S_c - n_c m_c m_c^T) / (N - C)."""
        mean = self.mean_outputs(outputs)
        outer = self.softmax_outer if outputs == "softmax" else self.logit_outer
        n = self.counts.double()
        scatter = outer.sum(0) - torch.einsum("c,ci,cj->ij", n, mean, mean)
        return scatter / max(1.0, float(n.sum()) - self.num_classes)

    def _sum(self, outputs: str) -> torch.Tensor:
        if outputs == "softmax":
            return self.softmax_sum
        if outputs == "logits":
            return self.logit_sum
        raise PapmError(f"unknown outputs {outputs!r}; choose softmax or logits")

    def to_arrays(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "ClassStatistics":
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise PapmError(f"class statistics are missing {missing}")
        stats = cls(*(torch.as_tensor(arrays[f]) for f in FIELDS))
        c = stats.num_classes
        shapes = {"counts": (c,), "softmax_sum": (c, c), "logit_sum": (c, c), "softmax_outer": (c, c, c),
                  "logit_outer": (c, c, c), "confusion": (c, c)}
        for f, shape in shapes.items():
            if tuple(getattr(stats, f).shape) != shape:
                raise PapmError(f"class statistics field {f} has shape {tuple(getattr(stats, f).shape)}, expected {shape}")
        return stats


def compute_class_stats(model: nn.Module, data: ImageSet, info: DatasetInfo, device="cpu", chunk: int = 4096) -> ClassStatistics:
    """Class statistics of ``model`` on ``data`` (use a training or validation split, never test),
    accumulated chunk by chunk: memory is bounded by the chunk and the C x C x C sums, whatever N is."""
    stats = ClassStatistics.zeros(info.num_classes)
    for i in range(0, len(data), chunk):
        part = ImageSet(data.x[i : i + chunk], data.y[i : i + chunk])
        logits = predict_logits(model, part, info, device)
        if logits.shape[1] != info.num_classes:
            raise PapmError(f"the model has {logits.shape[1]} outputs but the dataset has {info.num_classes} classes")
        stats = stats + ClassStatistics.from_logits(logits, part.y)
    return stats
