"""Atomic output files: a crash or a bad input never leaves a half-written result
and never destroys an earlier one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import PapmError


def refuse_existing(*paths: Path | str, force: bool) -> None:
    """Raise unless every path is free (or ``force`` allows overwriting)."""
    for path in paths:
        if Path(path).is_dir():  # --force replaces files, never a whole folder of someone's work
            raise PapmError(f"{path} is a folder; give a file path to write (or another --out)")
    if force:
        return
    for path in paths:
        if Path(path).exists():
            raise PapmError(f"{path} already exists; pass --force to overwrite it or choose another --out")


def atomic_write(path: Path | str, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the new one.
    ``mode`` (e.g. 0o600 for a private key) is set before anything is written, so the
    content is never readable by others, not even for a moment; by default the file gets
    the usual permissions (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, mode if mode is not None else 0o666 & ~umask)  # mkstemp makes 0600
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), mode)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
