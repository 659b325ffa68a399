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
- ``imagefolder``: any tree ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (decoded in
  parallel once, then read from a cache keyed by the files' paths, sizes and times).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import PapmError
from .image_cache import read_image_tree
from .images import class_folders, fit_array

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
        """From a checkpoint, a bundle or a message; fields of the wrong type raise ValueError (a damaged file)."""
        info = cls(**d)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        checks = {
            "name": isinstance(info.name, str),
            "class_names": isinstance(info.class_names, list) and bool(info.class_names)
            and all(isinstance(c, str) for c in info.class_names),
            "in_channels": info.in_channels in (1, 3) and not isinstance(info.in_channels, bool),
            "image_size": isinstance(info.image_size, int) and not isinstance(info.image_size, bool) and info.image_size > 0,
            "mean": isinstance(info.mean, list) and len(info.mean) == info.in_channels and all(map(number, info.mean)),
            "std": isinstance(info.std, list) and len(info.std) == info.in_channels and all(number(v) and v > 0 for v in info.std),
            "hflip": isinstance(info.hflip, bool),
            "crop_padding": isinstance(info.crop_padding, int) and not isinstance(info.crop_padding, bool) and info.crop_padding >= 0,
        }
        wrong = [k for k, ok in checks.items() if not ok]
        if wrong:
            raise ValueError(f"data field {wrong[0]} is {getattr(info, wrong[0])!r}")
        return info


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

    def classes_without_images(self, info: "DatasetInfo") -> list[str]:
        """The names of ``info``'s classes of which these images hold none."""
        counts = torch.bincount(self.y, minlength=info.num_classes)
        return [info.class_names[c] for c in range(info.num_classes) if counts[c] == 0]

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


def pixel_sums(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel: sum and sum of squares of the uint8 pixel values (int64, exact) and pixels per channel.

    Integers, chunk by chunk: exact, additive across nodes, and never a float copy of the whole split."""
    total = torch.zeros(x.shape[1], dtype=torch.int64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.int64)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk].to(torch.int64)
        total += xb.sum(dim=(0, 2, 3))
        total_sq += (xb * xb).sum(dim=(0, 2, 3))
    return total, total_sq, int(x.shape[0] * x.shape[2] * x.shape[3])


def mean_std_from_sums(total, total_sq, count: int) -> tuple[list[float], list[float]]:
    """Normalisation (on the [0, 1] scale) from :func:`pixel_sums` (summed over nodes or not)."""
    if count < 2:
        raise PapmError("normalisation needs at least 2 pixels per channel; the data is empty")
    t = torch.as_tensor(total, dtype=torch.float64) / 255.0
    t2 = torch.as_tensor(total_sq, dtype=torch.float64) / (255.0 * 255.0)
    mean = t / count
    std = ((t2 / count - mean * mean).clamp_min(0.0) * count / (count - 1)).sqrt().clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    return mean_std_from_sums(*pixel_sums(x))


NATIVE_SHAPE = {"digits": (1, 8), "cifar10": (3, 32), "imagefolder": (3, 32)}  # (channels, size) when none is asked


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise PapmError("the built-in digits data set comes with scikit-learn, which this install lacks; "
                        "pip install \"papm-fl[coordinator]\", or give the node its own data-root") from None

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = d.target.astype(np.int64)
    trainval, test = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return (x[trainval], y[trainval]), (x[test], y[test]), [str(c) for c in range(10)]


def _load_cifar10(root: Path, download: bool):
    try:
        from torchvision.datasets import CIFAR10

        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as e:
        if (root / "train").is_dir() and class_folders(root / "train"):  # a common mix-up: unpacked JPEG folders
            raise PapmError(f"{root} holds an ImageFolder tree (train/<class>/), not torchvision's CIFAR-10 files; "
                            "read it as dataset imagefolder (--dataset imagefolder, or --set dataset=imagefolder)") from None
        raise PapmError(
            f"CIFAR-10 not found under {root} ({e}); download it once where the network allows "
            "(papm train --dataset cifar10 --download), or read an ImageFolder tree as dataset imagefolder"
        ) from None
    to_x = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    return ((to_x(train.data), np.asarray(train.targets, dtype=np.int64)),
            (to_x(test.data), np.asarray(test.targets, dtype=np.int64)), list(train.classes))



def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    download: bool = False,
    image_size: int = 0,
    in_channels: int = 0,
    parts: tuple[str, ...] = ("train", "test"),
    every_class: bool = True,
) -> DataSplits:
    """Load a dataset and carve a stratified validation split from its training part.

    Model selection uses ``val``; ``test`` is only for reporting. ``image_size`` and
    ``in_channels`` (0: the dataset's own, see ``NATIVE_SHAPE``) resize and convert every
    image the same way (``images.fit_image``). ``parts``: an ImageFolder tree may hold only
    ``train/`` (a device's own data: its evaluation split is carved from it) or only
    ``test/`` (the coordinator's); other datasets always load both. ``every_class=False``: a train/ class
    folder may be empty (a device's own photos under label skew), else that is refused.
    """
    if not 0.0 <= val_fraction < 0.5:
        raise PapmError(f"val_fraction must be in [0, 0.5), got {val_fraction}; give a fraction below 0.5 (e.g. 0.1)")
    if name not in DATASETS:
        raise PapmError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    native_c, native_s = NATIVE_SHAPE[name]
    in_channels, image_size = in_channels or native_c, image_size or native_s
    if not 8 <= image_size <= 512:
        raise PapmError(f"image size must be in [8, 512], got {image_size}; give a size from 8 to 512 (--image-size, or "
                        "image-size in a run config)")
    if in_channels not in (1, 3):
        raise PapmError(f"channels must be 1 (grey) or 3 (RGB), got {in_channels}; give 1 or 3")
    if name == "digits":
        train, test, classes = _load_digits()
        hflip, source = False, "sklearn.datasets.load_digits"
    elif name == "cifar10":
        root = Path(root or "data/cifar10")
        train, test, classes = _load_cifar10(root, download)
        hflip, source = True, str(root.resolve())  # absolute: a checkpoint is read from other folders too
    else:
        if not root:
            raise PapmError("--dataset imagefolder needs --data-root DIR (a folder with train/ and test/)")
        root = Path(root)
        if not root.is_dir():
            raise PapmError(f"data root {root} is not a folder; give an ImageFolder tree (train/<class>/..., test/<class>/...)")
        train, test, classes = read_image_tree(root, in_channels, image_size, parts, every_class)
        hflip, source = True, str(root.resolve())  # absolute: a checkpoint is read from other folders too
    empty = (np.zeros((0, in_channels, image_size, image_size), np.uint8), np.zeros(0, np.int64))
    xtr, ytr = train if train is not None else empty
    xte, yte = test if test is not None else empty
    xtr, xte = fit_array(xtr, in_channels, image_size), fit_array(xte, in_channels, image_size)
    train_idx, val_idx = stratified_split(ytr, val_fraction, split_seed) if len(ytr) else (np.zeros(0, int), np.zeros(0, int))
    train_set = ImageSet(torch.from_numpy(xtr[train_idx]), torch.from_numpy(ytr[train_idx]))
    val = ImageSet(torch.from_numpy(xtr[val_idx]), torch.from_numpy(ytr[val_idx]))
    test_set = ImageSet(torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte))
    # normalisation from the training split (a test-only load has none: its user brings a checkpoint's)
    mean, std = _channel_stats(train_set.x) if len(train_set) else ([0.0] * in_channels, [1.0] * in_channels)
    info = DatasetInfo(
        name=name,
        class_names=[str(c) for c in classes],
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        hflip=hflip,
        crop_padding=1 if name == "digits" else max(1, image_size // 8),
        split_seed=split_seed,
        val_fraction=val_fraction,
        source=source,
    )
    return DataSplits(info, train_set, val, test_set)


def load_dataset_like(info: DatasetInfo, name: str | None = None, root: str | Path | None = None, download: bool = False) -> DataSplits:
    """Reload the data a checkpoint was trained on, with the same split seed and size.

    Normalisation stays the checkpoint's (``info``), so the model sees what it was trained on.
    """
    name = name or info.name
    if name == "digits" and root is not None:  # digits ships with scikit-learn: a folder given here would be ignored
        raise PapmError(f"--data-root {root} names image folders, but the data is digits (shipped with scikit-learn); "
                        "drop --data-root")
    if root is None and name == info.name and name != "digits" and info.source and not Path(info.source).is_dir():
        raise PapmError(f"the checkpoint's data folder {info.source} (where it was trained) is not a folder here: moved, "
                        "or a relative path from another working folder; give --data-root where the data is now")
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
