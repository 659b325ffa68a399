"""Shared fixtures: digits (shipped with scikit-learn) and one tiny trained base model."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from papm.shared.checkpoint import save_checkpoint
from papm.shared.datasets import load_dataset
from papm.shared.models import ResNet18, model_args
from papm.shared.training import TrainSettings, fit

TINY_WIDTH = 0.125

# Decoded-image caches of the tests (and of the commands they start) stay in a folder of their own.
_CACHE = tempfile.mkdtemp(prefix="papm-test-cache-")
os.environ["PAPM_CACHE_DIR"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", split_seed=0, val_fraction=0.1)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory, digits):
    """A width-0.125 ResNet-18 trained 3 epochs on digits, saved as `papm train` saves it."""
    torch.manual_seed(0)
    info = digits.info
    model = ResNet18(info.num_classes, info.in_channels, TINY_WIDTH)
    fit(model, digits.train, info, TrainSettings(epochs=3, lr=0.05), "cpu", val=digits.val, progress=False)
    path = tmp_path_factory.mktemp("base") / "base.pt"
    save_checkpoint(path, model, model_args(info.num_classes, info.in_channels, TINY_WIDTH), info, kind="base")
    return path


def run_papm(*args, cwd=None, env=None):
    """Run the installed CLI in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "papm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def write_imagefolder_for_cli(root, digits, classes=(0, 1, 2), per_class=4):
    """A tiny ImageFolder tree (train/ and test/) made of digits images as PNG files."""
    from PIL import Image

    for split, data in (("train", digits.train), ("test", digits.test)):
        for c in classes:
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i, x in enumerate(data.x[data.y == c][:per_class]):
                Image.fromarray(x[0].numpy(), mode="L").save(d / f"{i}.png")
    return root


def write_pattern_folder(root, classes=("circle", "square", "stripes"), per_class=12, size=48, channels=3,
                         parts=("train", "test"), seed=0):
    """A generated ImageFolder tree: one learnable pattern per class (a bright disc, a square, stripes
    at a class-specific place and colour) over noise, saved as PNG; ``parts`` names the split folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for part in parts:
        for c, name in enumerate(classes):
            d = root / part / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.normal(60, 25, (size, size, 3))
                cx, cy = 0.3 + 0.4 * rng.random(), 0.3 + 0.4 * rng.random()
                if c % 3 == 0:
                    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 0.05
                elif c % 3 == 1:
                    mask = (abs(xx - cx) < 0.2) & (abs(yy - cy) < 0.2)
                else:
                    mask = (np.sin(xx * (12 + c)) > 0.3)
                img[mask] = 60 + 180 * np.eye(3)[c % 3] + 40 * (c // 3)
                a = np.clip(img, 0, 255).astype(np.uint8)
                im = Image.fromarray(a, mode="RGB")
                (im.convert("L") if channels == 1 else im).save(d / f"{i:03d}.png")
    return root


def pattern_base(tmp_path, size=48, channels=3, width=TINY_WIDTH):
    """A generated ImageFolder tree (train/ and test/) and a tiny base checkpoint trained on it at
    ``size`` x ``size`` with ``channels`` channels, as `papm train --image-size` writes it: (root, path)."""
    root = write_pattern_folder(tmp_path / "data", per_class=12, size=size + 8, channels=channels)
    splits = load_dataset("imagefolder", root, image_size=size, in_channels=channels)
    torch.manual_seed(0)
    model = ResNet18(3, channels, width)
    fit(model, splits.train, splits.info, TrainSettings(epochs=4, lr=0.05), "cpu", val=splits.val, progress=False)
    path = tmp_path / "base.pt"
    save_checkpoint(path, model, model_args(3, channels, width), splits.info, kind="base")
    return root, path
