"""Decoded ImageFolder trees (``read_image_tree``: train/ and test/, checked), cached so a second run does not
decode again.

An ImageFolder split (``ROOT/train`` or ``ROOT/test``, one folder per class) is decoded in
parallel with a progress bar, then kept as one uint8 array file in the cache folder
(``$PAPM_CACHE_DIR``, default ``~/.cache/papm/images``; ``PAPM_CACHE_DIR=off`` disables
it). The cache key covers the folder, the class names, every file's relative path, size,
modification and change times and inode, the image size and channels, the preprocessing
version and Pillow's version: a changed, added or removed file (even one rewritten with
its size and mtime kept), another size or another Pillow decodes again. Cache files are written
atomically; a damaged one is decoded again and replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import PapmError, problem_and_fix
from .files import atomic_write_bytes
from .images import IMAGE_SUFFIXES, class_folders, image_files, load_images

PREPROCESS_VERSION = 4  # bump when images.load_image changes what it produces (2: 16-bit grey keeps its top 8 bits;
# 3: photos turned upright by their EXIF orientation; 4: 32-bit integer and float grey files by their values' range)


def cache_dir() -> Path | None:
    value = os.environ.get("PAPM_CACHE_DIR", "")
    if value.lower() in ("off", "0", "none"):
        return None
    where = Path(value).expanduser() if value else Path.home() / ".cache" / "papm" / "images"
    if where.exists() and not where.is_dir():  # a read-only folder only costs decoding; a file is a wrong setting
        raise PapmError(f"the image cache {where} is a file, not a folder; point PAPM_CACHE_DIR at a folder "
                        "(or set PAPM_CACHE_DIR=off)")
    return where


def list_images(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, class index) for every image under ``folder/<class>/``, in a fixed order."""
    files = []
    for c, name in enumerate(classes):
        d = folder / name
        if not d.is_dir():
            raise PapmError(f"{folder} has no folder {name!r} (a class of the training data); give every split the same classes")
        files += [(f, c) for f in image_files(d)]
    return files


def cache_key(folder: Path, classes: list[str], files: list[tuple[Path, int]], in_channels: int, image_size: int) -> str:
    h = hashlib.sha256()
    import PIL

    h.update(json.dumps({"folder": str(folder.resolve()), "classes": classes, "channels": in_channels, "size": image_size,
                         "version": PREPROCESS_VERSION, "pillow": PIL.__version__}).encode())
    for f, c in files:
        st = f.stat()  # the change time and inode move on any rewrite, even one that keeps the size and mtime
        h.update(f"{f.relative_to(folder)}\0{c}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:32]


def read_image_folder(folder: Path, classes: list[str], in_channels: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x C x S x S, int64 labels) of one split, from the cache or decoded in parallel."""
    from tqdm.auto import tqdm

    files = list_images(folder, classes)
    if not files:
        raise PapmError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put each class's images in "
                        f"{folder}/<class>/")
    labels = np.asarray([c for _, c in files], dtype=np.int64)
    where = cache_dir()
    path = where / f"{cache_key(folder, classes, files, in_channels, image_size)}.npy" if where else None
    if path is not None and path.is_file():
        try:
            x = np.load(path, allow_pickle=False)
            if x.shape == (len(files), in_channels, image_size, image_size) and x.dtype == np.uint8:
                return x, labels
        except (OSError, ValueError, EOFError):  # numpy raises EOFError for an empty file
            pass  # damaged: decode again below and replace it
    with tqdm(total=len(files), desc=f"decoding {folder.name}/", unit="img", leave=False, disable=None) as bar:
        x = load_images([f for f, _ in files], in_channels, image_size, progress=bar.update)
    if path is not None:
        try:
            buf = io.BytesIO()
            np.save(buf, x, allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass  # a read-only or full cache folder only costs the next run a decode
    return x, labels


def read_image_tree(root: Path, in_channels: int, image_size: int, parts: tuple[str, ...], every_class: bool = True):
    """The asked ``parts`` of an ImageFolder tree (``train`` and/or ``test``); a missing part is None. With
    ``every_class``, a class folder of train/ without images is refused."""
    wanted = [p for p in parts if (root / p).is_dir()]
    if "train" in parts and "train" not in wanted:
        raise PapmError(f"{root} is not an ImageFolder tree: it has no train/ folder; give a folder that holds "
                        "train/<class>/ images")
    if "test" in parts and "train" not in parts and "test" not in wanted:
        raise PapmError(f"{root} has no test/<class>/ folders; give the coordinator a data-root that holds its test split")
    classes = class_folders(root / wanted[0])
    if len(classes) < 2:
        raise PapmError(f"{root / wanted[0]} has {len(classes)} class folder(s); give at least 2 (one folder per class)")
    test_classes = class_folders(root / "test") if len(wanted) == 2 else classes
    if not test_classes:
        raise PapmError(f"{root}/test holds no class folders; put each class's test images in test/<class>/ "
                        "(the class folders of train/), or remove the empty test/")
    if test_classes != classes:
        raise PapmError(f"{root}/test has classes {test_classes} but train has {classes}; make them the same")
    loaded, problems = {}, []
    for part in wanted:  # both splits read before refusing: one run names the bad files of train/ and test/
        try:
            loaded[part] = read_image_folder(root / part, classes, in_channels, image_size)
        except PapmError as e:
            problems.append(str(e))
    if problems:
        raise PapmError(problems[0] if len(problems) == 1 else
                        " and ".join(problem_and_fix(m)[0] for m in problems) + "; " + problem_and_fix(problems[-1])[1])
    if "train" in loaded and every_class:
        empty = [classes[c] for c in np.flatnonzero(np.bincount(loaded["train"][1], minlength=len(classes)) == 0)]
        if empty:  # a model trained so scores a class it never saw; a run stops at its statistics
            raise PapmError(f"{root / 'train'} has no images in class folder(s) {', '.join(empty)}; add images of every "
                            "class or remove the empty folders (and the same classes from test/)")
    return loaded.get("train"), loaded.get("test"), classes
