"""Image decoding and preprocessing with numpy and Pillow only (no torch).

Training (``datasets.py``) and the edge runtime (``deploy/``) both use these, so
an image is decoded, resized and normalised the same way in both places.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PapmError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_image(path: Path | str, in_channels: int, image_size: int) -> np.ndarray:
    """One image file -> uint8 C x S x S: convert to grey or RGB, resize the short side to S, centre-crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if in_channels == 1 else "RGB")
            w, h = im.size
            if (w, h) != (image_size, image_size):
                scale = image_size / min(w, h)
                nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PapmError(f"cannot read image {path}: {e}; remove or replace the file") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalise_array(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 normalised exactly as ``datasets.normalise`` does in training."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / np.float32(255.0)) - m) / s
