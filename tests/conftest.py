"""Shared fixtures: digits (shipped with scikit-learn) and one tiny trained base model."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papm.shared.checkpoint import save_checkpoint
from papm.shared.datasets import load_dataset
from papm.shared.models import ResNet18, model_args
from papm.shared.training import TrainSettings, fit

TINY_WIDTH = 0.125


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
