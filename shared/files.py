"""Atomic output files: a crash or a bad input never leaves a half-written result
and never destroys an earlier one."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import PapmError


def check_writable(path: Path | str, what: str = "--out", folder: bool = False) -> None:
    """One line now, before any work, for a path that cannot be written: empty, under a file, a file where a
    ``folder`` is wanted, or in a folder this user cannot write (probed with a temporary file that is removed at
    once; nothing else is created)."""
    if not str(path).strip():
        raise PapmError(f"{what} is empty; give a path")
    target = Path(path).expanduser().absolute()
    if folder and target.exists() and not target.is_dir():
        raise PapmError(f"{what} {path} is a file; give a folder")
    nearest = target.parent if target.exists() and not target.is_dir() else target
    while not nearest.exists():  # the nearest existing folder is where the writing will start
        nearest = nearest.parent
    if not nearest.is_dir():
        raise PapmError(f"{what} {path}: {nearest} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=nearest, prefix=".papm-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PapmError(f"{what} {path}: cannot write in {nearest} ({e.strerror or e}); choose a folder you can write") from None


def refuse_existing(*paths: Path | str, force: bool) -> None:
    """Raise unless every path is free (or ``force`` allows overwriting) and can be written."""
    for path in paths:
        check_writable(path)
    for path in paths:
        if Path(path).is_dir():  # --force replaces files, never a whole folder of someone's work
            raise PapmError(f"{path} is a folder; give a file path to write (or another --out)")
    if force:
        return
    for path in paths:
        if Path(path).exists():
            raise PapmError(f"{path} already exists; pass --force to overwrite it or choose another --out")


def _new_temp(parent: Path, name: str, make: Callable[[Path], None]) -> Path:
    """A fresh, unique path beside ``name`` in ``parent``, created by ``make`` (which must fail if it exists)."""
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue
    raise PapmError(f"cannot create a temporary file in {parent}; check the folder")


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX, so readers see either the old file or the new one; the file
    and then its folder are flushed to the disk (fsync) around the rename, so a power loss never
    leaves an empty or half-written file behind a result that was reported complete. The
    temporary file is created with the final permissions: ``mode`` (e.g. 0o600 for a private key,
    so the content is never readable by others, not even for a moment) or 0666 less the umask,
    which the kernel applies at creation (the process umask is never read or changed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def create(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 if mode is None else mode))

    tmp_path = _new_temp(path.parent, path.name, create)
    try:
        if mode is not None:
            os.chmod(tmp_path, mode)  # exactly ``mode``, whatever the umask removed
        write(tmp_path)
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent, directory=True)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` (a staged result) to the disk."""
    for root, _dirs, files in os.walk(folder):
        for f in files:
            fsync_path(Path(root) / f)
        fsync_path(Path(root), directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0
    return ok


def replace_dir(staged: Path, target: Path) -> None:
    """Put the complete folder ``staged`` where ``target`` is: swapped in one step where the system
    allows it (so there is never a moment with neither the old nor the new result), else renamed
    aside and replaced; the old folder is removed afterwards."""
    import shutil

    if not target.exists():
        os.rename(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)  # ``staged`` now holds the old folder
    else:
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(6)}")
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old, target)  # the old result comes back where it was
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent, directory=True)


def new_temp_dir(parent: Path, name: str) -> Path:
    """A fresh folder beside ``parent/name`` for staging a result, with the usual permissions (0777 less the umask)."""
    parent.mkdir(parents=True, exist_ok=True)
    return _new_temp(parent, name, lambda p: os.mkdir(p, 0o777))


def atomic_write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), mode)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: Path | str, rows: list[dict]) -> Path:
    """Rows of dicts as CSV; the columns are every key in first-seen order (a missing value is empty)."""
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _yaml_loader():
    """PyYAML's safe loader, refusing a key written twice in one table (PyYAML keeps the last silently; TOML refuses)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is written twice (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_table_file(path: Path, what: str, holds: str) -> dict:
    """The top-level table of a TOML or YAML file (by suffix); every failure is one error naming ``what``."""
    if not path.is_file():
        raise PapmError(f"{what} not found: {path}; check the path (relative paths start in the current folder)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PapmError(f"{what} {path} is not UTF-8 text; save it as UTF-8 TOML or YAML") from None
    except OSError as e:
        raise PapmError(f"cannot read {what} {path} ({e.strerror}); check the path and its permissions") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader()) or {}
        else:
            import tomllib

            data = tomllib.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if getattr(e, "problem", None):  # YAML: what is wrong, and where
            mark = getattr(e, "problem_mark", None)
            first = e.problem + (f" (line {mark.line + 1})" if mark else "")
        raise PapmError(f"cannot parse {what} {path}: {first}; mend that line (each key once)") from None
    if not isinstance(data, dict):
        raise PapmError(f"{what} {path} must hold {holds}, not a {type(data).__name__}; write one key per line "
                        "(TOML: key = value, YAML: key: value)")
    return data
