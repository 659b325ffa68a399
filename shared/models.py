"""CIFAR-style ResNet-18 with a width multiplier and per-layer channel counts.

The architecture is fully described by ``model_args`` (a plain dict of ints,
floats and strings), so a checkpoint can rebuild a pruned model from its
``channels`` table and load its weights with ``torch.load(weights_only=True)``:
no module is ever pickled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import PapmError

ARCH = "resnet18-cifar"
STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


def default_channels(width: float) -> dict[str, int]:
    """Output channels of every convolution of an unpruned ResNet-18 at ``width``.

    Keys are module names (``conv1``, ``layer2.0.conv1``, ``layer2.0.shortcut.0`` ...).
    """
    if not width > 0:
        raise PapmError(f"width must be > 0, got {width}; use e.g. --width 0.25 or --width 1.0")
    stage = [max(1, int(round(w * width))) for w in STAGE_WIDTHS]
    channels = {"conv1": stage[0]}
    in_c = stage[0]
    for s, out_c in enumerate(stage, start=1):
        for b in range(BLOCKS_PER_STAGE):
            prefix = f"layer{s}.{b}"
            channels[f"{prefix}.conv1"] = out_c
            channels[f"{prefix}.conv2"] = out_c
            stride = 2 if (s > 1 and b == 0) else 1
            if stride != 1 or in_c != out_c:
                channels[f"{prefix}.shortcut.0"] = out_c
            in_c = out_c
    return channels


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual addition.

    Each ReLU is its own module so forward hooks can count its zeros (APoZ):
    ``relu1`` follows ``conv1``; ``relu2`` follows the residual sum, i.e. the
    channels shared by ``conv2``, the shortcut and the block's input.
    """

    def __init__(self, in_c: int, mid_c: int, out_c: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, mid_c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c)
        if shortcut:
            self.shortcut = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem with stride 1 and no max-pool, four stages, global pool, linear.

    ``channels`` (a table from :func:`default_channels`, possibly pruned) overrides the
    widths; ``width`` only picks the defaults. Inputs from 8x8 (digits) to 32x32 (CIFAR)
    and larger work: the pool is adaptive.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        channels: dict[str, int] | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise PapmError(f"a classifier needs at least 2 classes, got {num_classes}")
        if in_channels not in (1, 3):
            raise PapmError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
        expected = default_channels(width)
        channels = dict(expected if channels is None else channels)
        if set(channels) != set(expected):
            missing = sorted(set(expected) - set(channels))
            extra = sorted(set(channels) - set(expected))
            raise PapmError(f"channel table does not describe a ResNet-18 (missing {missing}, unexpected {extra})")
        self.channels = channels
        self.conv1 = nn.Conv2d(in_channels, channels["conv1"], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels["conv1"])
        self.relu1 = nn.ReLU()
        in_c = channels["conv1"]
        for s in range(1, len(STAGE_WIDTHS) + 1):
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                prefix = f"layer{s}.{b}"
                stride = 2 if (s > 1 and b == 0) else 1
                has_shortcut = f"{prefix}.shortcut.0" in channels
                out_c = channels[f"{prefix}.conv2"]
                if has_shortcut and channels[f"{prefix}.shortcut.0"] != out_c:
                    raise PapmError(f"channel table is inconsistent: {prefix}.conv2 and its shortcut differ")
                if not has_shortcut and out_c != in_c:
                    raise PapmError(f"channel table is inconsistent: {prefix}.conv2 must match its input ({in_c})")
                blocks.append(BasicBlock(in_c, channels[f"{prefix}.conv1"], out_c, stride, has_shortcut))
                in_c = out_c
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_c, num_classes)
        self.feature_dim = in_c

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-pooled penultimate activations (what the fusion head consumes)."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def activation_sites(self) -> dict[str, str]:
        """ReLU module name -> name of the convolution whose output channels it gates.

        A block's ``relu2`` follows the residual sum; it is attributed to the block's
        ``conv2`` (the shortcut and earlier blocks share those channels and are pruned
        with it as one coupled group).
        """
        sites = {"relu1": "conv1"}
        for s in range(1, len(STAGE_WIDTHS) + 1):
            for b in range(BLOCKS_PER_STAGE):
                prefix = f"layer{s}.{b}"
                sites[f"{prefix}.relu1"] = f"{prefix}.conv1"
                sites[f"{prefix}.relu2"] = f"{prefix}.conv2"
        return sites


def model_args(num_classes: int, in_channels: int, width: float, channels: dict[str, int] | None = None) -> dict[str, Any]:
    """Everything :func:`build_model` needs, as plain values (saved in every checkpoint)."""
    return {
        "arch": ARCH,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "width": float(width),
        "channels": dict(channels) if channels is not None else default_channels(width),
    }


def build_model(args: dict[str, Any]) -> ResNet18:
    if args.get("arch") != ARCH:
        raise PapmError(f"unknown architecture {args.get('arch')!r}; this version builds {ARCH!r}")
    return ResNet18(args["num_classes"], args["in_channels"], args["width"], args["channels"])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_for_channels(args: dict[str, Any]) -> int:
    """Parameter count of the architecture ``args`` describes, without allocating weights."""
    with torch.device("meta"):
        return count_params(build_model(args))
