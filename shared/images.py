"""Image decoding and preprocessing with numpy and Pillow only (no torch).

Training (``datasets.py``: files and in-memory datasets alike), the federated run and the
edge runtime (``deploy/``) all go through :func:`fit_image`, so an image is converted,
resized and cropped the same way everywhere (image files first turned upright by their EXIF
orientation); ``normalise_array`` matches the training normalisation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .cpu import usable_cpus
from .errors import PapmError, problem_and_fix

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = 64_000_000  # larger images are refused (a decompression bomb), not decoded


def class_folders(folder: Path) -> list[str]:
    """The class names of an ImageFolder split: its sub-folders, hidden ones (``.ipynb_checkpoints``) left out."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted), leaving out hidden ones and those in hidden folders:
    macOS writes a ``._name.jpg`` beside every photo it copies to a foreign disk (not an image), and Jupyter keeps
    ``.ipynb_checkpoints/`` copies in the folders it opens."""
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def to_8_bit(im):
    """Grey images of more than 8 bits -> mode "L", as a viewer shows them: Pillow's convert("L") clips every value
    above 255 to white (16-bit scans) and every float below 1 to black (0-1 float TIFFs).
    16-bit files ("I;16", and "I" from a PNG: older Pillow opens 16-bit PNGs so) keep their top 8 bits. 32-bit integer
    files carry no range of their own: read as 8-bit when no value exceeds 255, as 16-bit when none exceeds 65,535,
    else as 31-bit (signed). Float files: 0-1 when no value exceeds 1 (the convention of scientific imaging), else 0-255."""
    from PIL import Image

    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        a = np.round(np.clip(a * (255.0 if a.max(initial=0.0) <= 1.0 else 1.0), 0, 255))
    else:
        a = np.clip(a.astype(np.int64), 0, None)
        top = a.max(initial=0)
        # mode "I" is signed 32-bit: 31 bits of range, the top 8 of them from bit 23
        shift = 8 if im.mode != "I" or im.format == "PNG" or 255 < top <= 65535 else 0 if top <= 255 else 23
        a = np.clip(a >> shift, 0, 255)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def fit_image(im, in_channels: int, image_size: int) -> np.ndarray:
    """A Pillow image -> uint8 C x S x S: grey or RGB, short side resized to S (bilinear), centre-cropped;
    grey images of more than 8 bits first brought to 8 (:func:`to_8_bit`)."""
    from PIL import Image

    im = to_8_bit(im).convert("L" if in_channels == 1 else "RGB")
    w, h = im.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def fit_array(x: np.ndarray, in_channels: int, image_size: int) -> np.ndarray:
    """uint8 N x C x H x W (C = 1 or 3) -> uint8 N x in_channels x S x S, each image through :func:`fit_image`."""
    from PIL import Image

    if x.shape[1] == in_channels and x.shape[2] == x.shape[3] == image_size:
        return x
    out = np.empty((len(x), in_channels, image_size, image_size), dtype=np.uint8)
    for i, a in enumerate(x):
        out[i] = fit_image(Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)), in_channels, image_size)
    return out


def upright(im):
    """The image as a viewer shows it: cameras and phones store a photo taken in portrait sideways, with an EXIF
    Orientation tag (2-8) that viewers apply; a model should see the photo the way its owner does."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block leaves the image as stored (Pillow raises various types here)
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im  # exif_transpose copies even at 1


def load_image(path: Path | str, in_channels: int, image_size: int) -> np.ndarray:
    """One image file -> uint8 C x S x S, turned upright by its EXIF orientation (see :func:`fit_image`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise PapmError(f"image {path} has {im.size[0]}x{im.size[1]} pixels, more than {MAX_PIXELS:,}; "
                                "resize it or remove it")
            return fit_image(upright(im), in_channels, image_size)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise PapmError(f"cannot read image {path}: {e}; remove or replace the file") from None


def read_images(paths: Sequence[Path | str], in_channels: int, image_size: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Image files -> (uint8 N x C x S x S, (path, problem) of each file that could not be read: its slot stays black),
    so a caller can go on with the rest (``papm infer`` on a folder) or refuse them all at once (:func:`unreadable_error`)."""
    out = np.zeros((len(paths), in_channels, image_size, image_size), dtype=np.uint8)
    failed = []
    for i, p in enumerate(paths):
        try:
            out[i] = load_image(p, in_channels, image_size)
        except PapmError as e:
            failed.append((str(p), str(e)))
    return out, failed


def _read_chunk(args: tuple[list[str], int, int]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    return read_images(*args)  # one picklable argument for the process pool


def unreadable_error(failed: list[tuple[str, str]], total: int) -> PapmError:
    """Every unreadable file of a folder in one line (one run to clean a tree, not one run per bad file)."""
    if len(failed) == 1:
        return PapmError(failed[0][1])
    shown = ", ".join(p for p, _ in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    first = problem_and_fix(failed[0][1])[0]  # its own fix is the one below
    return PapmError(f"cannot read {len(failed)} of {total} images: {shown} (the first: {first}); remove or replace those files")


def load_images(paths: Sequence[Path | str], in_channels: int, image_size: int, workers: int | None = None,
                progress: Callable[[int], None] | None = None, min_parallel: int = 2000) -> np.ndarray:
    """Many image files -> uint8 N x C x S x S, decoded by ``workers`` processes (default: one per CPU)
    from ``min_parallel`` files on (one per CPU this process may use: a container's share, not the host's);
    ``progress(n)`` is called as chunks of n images finish."""
    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, in_channels, image_size, image_size), dtype=np.uint8)
    workers = workers or usable_cpus()
    chunk = 256 if len(paths) >= 4 * workers * 256 else max(1, -(-len(paths) // (4 * workers)))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    jobs = [(c, in_channels, image_size) for c in chunks]
    parts, failed = [], []
    with contextlib.ExitStack() as stack:
        if workers == 1 or len(paths) < min_parallel:  # starting processes costs more than it saves on a small set
            results = map(_read_chunk, jobs)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the caller may run threads (Flower, Ray) that a fork would copy half-way
            results = stack.enter_context(ProcessPoolExecutor(max_workers=min(workers, len(chunks)),
                                                              mp_context=multiprocessing.get_context("spawn"))).map(_read_chunk, jobs)
        for c, (part, bad) in zip(chunks, results):
            parts.append(part)
            failed += bad
            if progress:
                progress(len(c))
    if failed:
        raise unreadable_error(failed, len(paths))
    return np.concatenate(parts)


def normalise_array(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 normalised exactly as ``datasets.normalise`` does in training."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / np.float32(255.0)) - m) / s
