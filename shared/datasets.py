"""Datasets as uint8 image tensors with their metadata, and seeded splits.

Every dataset becomes ``x`` (uint8, N x C x H x W) and ``y`` (int64, N), so the
training loop can keep it on the device and do augmentation as batch tensor ops.
Normalisation (mean/std per channel, from the training split) is stored in
:class:`DatasetInfo` and travels in every checkpoint.

Sources:
- ``digits``: scikit-learn's 8x8 handwritten digits, shipped with scikit-learn
  (no download). It has no official test split: a fixed stratified 20% is held out
  with a constant seed, so every run and every node sees the same test set.
- ``cifar10``: through torchvision; downloads only with ``download=True``.
- ``imagefolder``: any tree ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PapmError
from .images import IMAGE_SUFFIXES, load_image

DATASETS = ("digits", "cifar10", "imagefolder")
DIGITS_TEST_SEED = 20240501  # fixed: the digits test split must never move
DIGITS_TEST_FRACTION = 0.2


@dataclass
class DatasetInfo:
    """What a model trained on this data needs to know at inference time."""

    name: str
    class_names: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    hflip: bool  # horizontal flips keep the label (not for digits)
    crop_padding: int  # random-crop augmentation pads by this many pixels
    split_seed: int = 0
    val_fraction: float = 0.1
    source: str = ""  # data root, when there is one

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetInfo":
        return cls(**d)


@dataclass
class ImageSet:
    x: torch.Tensor  # uint8 N x C x H x W
    y: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ImageSet(self.x[idx], self.y[idx])

    def of_classes(self, classes) -> "ImageSet":
        mask = torch.isin(self.y, torch.as_tensor(list(classes), dtype=torch.long))
        return ImageSet(self.x[mask], self.y[mask])

    def sample(self, max_samples: int, seed: int) -> "ImageSet":
        """At most ``max_samples`` of these images: a seeded random choice, kept in their order."""
        if len(self) <= max_samples:
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:max_samples]
        return self.subset(idx.sort().values)


@dataclass
class DataSplits:
    info: DatasetInfo
    train: ImageSet
    val: ImageSet
    test: ImageSet = field(repr=False)


def normalise(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 images -> float tensors normalised as in training."""
    mean = torch.tensor(info.mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of every class held out, seeded."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    xf = x.float() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = d.target.astype(np.int64)
    trainval, test = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return x[trainval], y[trainval], x[test], y[test], [str(c) for c in range(10)]


def _load_cifar10(root: Path, download: bool):
    try:
        from torchvision.datasets import CIFAR10

        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as e:
        raise PapmError(
            f"CIFAR-10 not found under {root} ({e}); pass --download where the network allows, "
            "or point --dataset imagefolder --data-root at an ImageFolder tree"
        ) from None
    to_x = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    return (
        to_x(train.data),
        np.asarray(train.targets, dtype=np.int64),
        to_x(test.data),
        np.asarray(test.targets, dtype=np.int64),
        list(train.classes),
    )


def _load_imagefolder(root: Path, in_channels: int, image_size: int):
    from tqdm.auto import tqdm

    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise PapmError(f"{root} is not an ImageFolder tree: it needs train/<class>/ and test/<class>/ folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise PapmError(f"{root}/train has {len(classes)} class folder(s); at least 2 are needed")
    if test_classes != classes:
        raise PapmError(f"{root}/test has classes {test_classes} but train has {classes}; make them the same")

    def read(split: str):
        files = [
            (f, c)
            for c, name in enumerate(classes)
            for f in sorted((root / split / name).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise PapmError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        x = np.stack([load_image(f, in_channels, image_size) for f, _ in tqdm(files, desc=f"reading {split}", leave=False, disable=None)])
        return x, np.asarray([c for _, c in files], dtype=np.int64)

    xtr, ytr = read("train")
    xte, yte = read("test")
    return xtr, ytr, xte, yte, classes


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
    image_size: int = 32,
    in_channels: int = 3,
) -> DataSplits:
    """Load a dataset and carve a stratified validation split from its training part.

    Model selection uses ``val``; ``test`` is only for reporting.
    """
    if not 0.0 <= val_fraction < 0.5:
        raise PapmError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    if name == "digits":
        xtr, ytr, xte, yte, classes = _load_digits()
        hflip, pad, source = False, 1, "sklearn.datasets.load_digits"
    elif name == "cifar10":
        root = Path(root or "data/cifar10")
        xtr, ytr, xte, yte, classes = _load_cifar10(root, download)
        hflip, pad, source = True, 4, str(root)
    elif name == "imagefolder":
        if root is None:
            raise PapmError("--dataset imagefolder needs --data-root DIR (a folder with train/ and test/)")
        root = Path(root)
        if not 8 <= image_size <= 512:
            raise PapmError(f"image_size must be in [8, 512], got {image_size}")
        xtr, ytr, xte, yte, classes = _load_imagefolder(root, in_channels, image_size)
        hflip, pad, source = True, max(1, image_size // 8), str(root)
    else:
        raise PapmError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train_idx, val_idx = stratified_split(ytr, val_fraction, split_seed)
    train = ImageSet(torch.from_numpy(xtr[train_idx]), torch.from_numpy(ytr[train_idx]))
    val = ImageSet(torch.from_numpy(xtr[val_idx]), torch.from_numpy(ytr[val_idx]))
    test = ImageSet(torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte))
    mean, std = _channel_stats(train.x)
    info = DatasetInfo(
        name=name,
        class_names=[str(c) for c in classes],
        in_channels=int(train.x.shape[1]),
        image_size=int(train.x.shape[-1]),
        mean=mean,
        std=std,
        hflip=hflip,
        crop_padding=pad,
        split_seed=split_seed,
        val_fraction=val_fraction,
        source=source,
    )
    return DataSplits(info, train, val, test)


def load_dataset_like(info: DatasetInfo, name: str | None = None, root: str | Path | None = None, download: bool = False) -> DataSplits:
    """Reload the data a checkpoint was trained on, with the same split seed and size.

    Normalisation stays the checkpoint's (``info``), so the model sees what it was trained on.
    """
    name = name or info.name
    splits = load_dataset(
        name,
        root if root is not None else (info.source if name != "digits" else None),
        split_seed=info.split_seed,
        val_fraction=info.val_fraction,
        download=download,
        image_size=info.image_size,
        in_channels=info.in_channels,
    )
    if splits.info.num_classes != info.num_classes:
        raise PapmError(
            f"the checkpoint has {info.num_classes} classes but dataset {name!r} has {splits.info.num_classes}; "
            "use the dataset the checkpoint was trained on"
        )
    if (splits.info.in_channels, splits.info.image_size) != (info.in_channels, info.image_size):
        raise PapmError(
            f"dataset {name!r} gives {splits.info.in_channels}x{splits.info.image_size}x{splits.info.image_size} images "
            f"but the checkpoint expects {info.in_channels}x{info.image_size}x{info.image_size}"
        )
    splits.info = info
    return splits
