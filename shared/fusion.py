"""The fusion head over frozen pruned extractors, and the split model it completes.

At inference every device runs its extractor (``ResNet18.features``) on the same
input; the features are concatenated in device order and the head turns them into
logits. The head's first step standardises the concatenated features with a fixed
mean/std held as buffers: training and the exported ONNX head do exactly the same
thing, so they cannot drift apart. Mean and std come from sums (sum, sum of
squares, count) that aggregate exactly across clients, with scikit-learn's
StandardScaler semantics (population variance; a constant feature gets scale 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .errors import PapmError

HEAD_KIND = "fusion-mlp"


def head_args(feature_dims: Sequence[int], num_classes: int, hidden: int = 128) -> dict[str, Any]:
    return {"kind": HEAD_KIND, "feature_dims": [int(d) for d in feature_dims], "num_classes": int(num_classes), "hidden": int(hidden)}


class FusionHead(nn.Module):
    """(B, sum(feature_dims)) concatenated features -> (B, num_classes) logits."""

    def __init__(self, feature_dims: Sequence[int], num_classes: int, hidden: int = 128):
        super().__init__()
        if not feature_dims or min(feature_dims) < 1:
            raise PapmError(f"fusion head needs at least one part with features, got dims {list(feature_dims)}")
        self.feature_dims = [int(d) for d in feature_dims]
        total = sum(self.feature_dims)
        self.register_buffer("mean", torch.zeros(total))
        self.register_buffer("std", torch.ones(total))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(total, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Sequential(nn.Linear(total, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)

    @torch.no_grad()
    def set_normalisation(self, total: torch.Tensor, total_sq: torch.Tensor, count: int) -> None:
        """Set mean/std from feature sums (which add up across clients)."""
        if count < 2:
            raise PapmError("feature normalisation needs at least 2 samples")
        mean = total.double() / count
        var = (total_sq.double() / count - mean * mean).clamp_min(0.0)
        # StandardScaler's rule: a feature whose variance is within float rounding of zero is constant
        # and gets scale 1 (a dead channel is passed through, not multiplied by a huge 1/std); the
        # rounding bound is that of a variance computed from sums (sum of squares / n - mean^2)
        eps = torch.finfo(torch.float64).eps
        constant = var <= count * eps * (mean * mean + var)
        std = torch.where(constant, torch.ones_like(var), var.sqrt())
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())


def build_head(args: dict[str, Any]) -> FusionHead:
    if args.get("kind") != HEAD_KIND:
        raise PapmError(f"unknown fusion head kind {args.get('kind')!r}; this version builds {HEAD_KIND!r}")
    return FusionHead(args["feature_dims"], args["num_classes"], args["hidden"])


def feature_sums(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum, sum of squares, count) of a (N, D) feature matrix, in float64."""
    f = features.double()
    return f.sum(0), (f * f).sum(0), int(f.shape[0])


def class_feature_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Per-class feature sums (C x D), class counts (C) and the Gram matrix X^T X (D x D), in float64.

    All three add up across nodes: the LDA head fitted from the nodes' totals (``fit_lda_head``) is the one
    fitted on all their images in one place, whatever the partition."""
    f = features.double()
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels.long(), f)
    return {"class-sum": sums, "class-count": torch.bincount(labels.long(), minlength=num_classes).double(), "gram": f.T @ f}


@torch.no_grad()
def fit_lda_head(head: FusionHead, class_sums: torch.Tensor, class_counts: torch.Tensor, gram: torch.Tensor,
                 shrinkage: float) -> None:
    """Make ``head`` (a linear one, ``hidden`` 0) linear discriminant analysis of the features, in closed form.

    Sets the standardisation from the same sums, then, on standardised features: class means, the pooled
    within-class covariance shrunk towards its mean variance (``(1 - s) * cov + s * tr(cov) / D * I``, which
    keeps it invertible where extractor channels are dead or redundant), ``W = cov^-1 means`` and the bias
    ``-means W / 2 + log(prior)``, the prior being every node's images together. The sums add up exactly across
    nodes, so under label skew the head is still that of all the data; a head trained by FedAvg drifts towards
    each node's classes instead. A class with no training image gets no weights and a bias far below the others.
    """
    if len(head.net) != 1:
        raise PapmError("an LDA head is linear; build it with hidden=0")
    if not 0.0 <= shrinkage <= 1.0:
        raise PapmError(f"LDA shrinkage must be in [0, 1], got {shrinkage}")
    counts = class_counts.double()
    n = float(counts.sum())
    total = class_sums.double().sum(0)
    head.set_normalisation(total, gram.double().diagonal(), int(round(n)))
    m, s = head.mean.double(), head.std.double()
    # the sums of standardised features z = (x - m) / s, from the raw ones
    z_gram = (gram.double() - torch.outer(m, total) - torch.outer(total, m) + n * torch.outer(m, m)) / torch.outer(s, s)
    z_sums = (class_sums.double() - counts[:, None] * m) / s
    present = counts > 0
    means = z_sums[present] / counts[present, None]
    within = (z_gram - z_sums[present].T @ means) / n
    within = (within + within.T) / 2
    dim = within.shape[0]
    scale = float(within.trace()) / dim
    cov = (1.0 - shrinkage) * within + shrinkage * (scale if scale > 0 else 1.0) * torch.eye(dim, dtype=torch.float64)
    coef = torch.linalg.lstsq(cov, means.T, driver="gelsd").solution  # lstsq: a singular cov (no shrinkage) still solves
    bias_present = -0.5 * (means * coef.T).sum(1) + (counts[present] / n).log()
    weight = torch.zeros(len(counts), dim, dtype=torch.float64)
    weight[present] = coef.T
    bias = torch.full((len(counts),), float(bias_present.min()) - 1e4, dtype=torch.float64)
    bias[present] = bias_present
    head.net[0].weight.copy_(weight.float())
    head.net[0].bias.copy_(bias.float())


class SplitModel(nn.Module):
    """Extractors (one per device, frozen) + fusion head: the whole split model in PyTorch."""

    def __init__(self, extractors: Sequence[nn.Module], head: FusionHead):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        self.head = head

    def part_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [e.features(x) for e in self.extractors]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self.part_features(x), dim=1))


def fit_head(
    head: FusionHead,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 1e-4,
    seed: int = 0,
    logit_shift: torch.Tensor | None = None,
) -> dict[str, float]:
    """Train the head in place on precomputed (frozen-extractor) features with Adam.

    Used for local training on one node (then FedAvg across nodes) and centrally.
    The standardisation buffers are not trained: set them first (``set_normalisation``).
    ``logit_shift`` (one value per class, ``label_shift``) is added to the logits in the loss only.
    """
    if len(labels) == 0:
        raise PapmError("no features to train the fusion head on")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    n, loss_sum, seen = len(labels), 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            logits = head(features[idx])
            if logit_shift is not None:
                logits = logits + logit_shift
            loss = nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
    head.eval()
    with torch.no_grad():
        acc = float((head(features).argmax(1) == labels).float().mean())
    return {"loss": loss_sum / max(1, seen), "train_accuracy": acc}


@torch.no_grad()
def extract_features(extractor: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Pooled features of normalised inputs ``x`` (float, N x C x H x W), in order."""
    extractor.eval()
    return torch.cat([extractor.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
