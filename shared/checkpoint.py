"""Checkpoints that carry their own metadata and load with ``weights_only=True``.

Layout (plain containers and tensors only, like nanoGPT's ``model_args``)::

    {"format": "papm-checkpoint", "version": 1, "kind": "base" | "pruned",
     "model_args": {...},            # rebuilds the architecture (pruned channel table included)
     "data": DatasetInfo.to_dict(),  # classes, normalisation, image size, split seed
     "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .datasets import NATIVE_SHAPE, DatasetInfo
from .errors import PapmError
from .files import atomic_write_bytes
from .models import build_model

FORMAT = "papm-checkpoint"
VERSION = 1


def checkpoint_bytes(model: nn.Module, model_args: dict, info: DatasetInfo, kind: str, meta: dict | None = None) -> bytes:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model_args": model_args,
        "data": info.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def save_checkpoint(path: Path | str, model: nn.Module, model_args: dict, info: DatasetInfo, kind: str, meta: dict | None = None) -> Path:
    """Write atomically: an interrupted save never leaves a broken checkpoint behind."""
    return atomic_write_bytes(path, checkpoint_bytes(model, model_args, info, kind, meta))


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """The checkpoint dict, validated, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise PapmError(f"checkpoint not found: {path}; create one with `papm train --out {path}`")
    if not zipfile.is_zipfile(path):
        raise PapmError(f"{path} is not a readable checkpoint (not a PyTorch archive: truncated or corrupt); "
                        "re-create it with `papm train` or `papm prune`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines; keep the one naming the refused global
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it pickles {found.group(1)}" if found else "it holds pickled Python objects"
        raise PapmError(
            f"{path} is not a safe PAPM checkpoint ({what}; loading uses weights_only=True); "
            "re-create it with `papm train` or `papm prune`"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PapmError(f"{path} is not a readable checkpoint ({first}); re-create it with `papm train` or `papm prune`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PapmError(f"{path} is a PyTorch file but not a PAPM checkpoint; create one with `papm train`")
    if ckpt.get("version") != VERSION:
        raise PapmError(f"{path} has checkpoint version {ckpt.get('version')}, this papm reads version {VERSION}; re-create it")
    for key in ("model_args", "data", "state_dict"):
        if key not in ckpt:
            raise PapmError(f"{path} lacks {key!r}; the file is damaged, re-create it")
    return ckpt


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, DatasetInfo, dict[str, Any]]:
    """(model in eval mode, dataset info, the raw checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:  # metadata from a file: a damaged or hand-edited one must be one clear line, not a traceback
        info = DatasetInfo.from_dict(ckpt["data"])
        model = build_model(ckpt["model_args"])
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise PapmError(f"{path} has damaged metadata ({type(e).__name__}: {str(e)[:100]}); re-create it with "
                        "`papm train` or `papm prune`") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise PapmError(f"{path}: weights do not match its architecture ({first}); the file is damaged, re-create it") from None
    return model.to(device).eval(), info, ckpt


TRAINING_STATE_FORMAT = "papm-training-state"
TRAINING_STATE_VERSION = 1  # bump when fit's state or the model's layers change: an older file is refused, not misread
TRAINING_STATE_KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "generator", "best_accuracy", "best_model", "history")
# what each command's progress holds: `papm train` fit's state; `papm prune` the cut model and, once fine-tuning has
# begun, fit's state (prune_pipeline.specialise's ``on_state``)
PROGRESS_KEYS = {"train": TRAINING_STATE_KEYS,
                 "prune": ("model_args", "model", "steps", "apoz_used", "masks", "fit", "seconds")}


def training_state_path(out: Path | str) -> Path:
    """Where ``papm train --out out`` (or ``papm prune``) keeps its last finished epoch until ``out`` is written."""
    return Path(out).with_name(Path(out).name + ".partial")


def save_training_state(path: Path | str, command: dict, state: dict, tool: str = "train", device=None) -> Path:
    """``fit``'s ``on_state`` dict (or ``papm prune``'s, ``tool="prune"``) with the ``command`` (data, model and
    settings) that produced it and the ``device`` it ran on, written atomically."""
    buf = io.BytesIO()
    torch.save({"format": TRAINING_STATE_FORMAT, "version": TRAINING_STATE_VERSION, "tool": tool, "command": command,
                "state": state, "device": None if device is None else str(device)}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _read_training_state(path: Path, tool: str) -> dict:
    """The saved file, on the CPU (``fit`` moves it to the model's device); anything else at that path is refused: papm
    neither overwrites nor deletes a file it did not write."""
    try:  # a file of any content: torch's unpickler raises many kinds of errors on what is not its own
        saved = torch.load(path, map_location="cpu", weights_only=True) if zipfile.is_zipfile(path) else None
    except Exception:  # noqa: BLE001 - every one of them means "not a progress file"
        saved = None
    if not (isinstance(saved, dict) and saved.get("format") == TRAINING_STATE_FORMAT
            and isinstance(saved.get("command"), dict) and isinstance(saved.get("state"), dict)):
        raise PapmError(f"{path} is not papm {tool}'s progress file (or a damaged one), and papm {tool} keeps its progress "
                        "there; move it away or choose another --out")
    return saved


def _shown(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else f"{text[:38]}...{text[-38:]}"  # long paths differ at the end


def training_progress(out: Path | str, command: dict, force: bool, tool: str = "train") -> tuple[dict | None, str | None]:
    """The state to resume ``papm train --out out`` (or ``papm prune``: ``tool``) from and the device it was saved on
    (None when not known): (None, None) without a progress file, or with ``force`` (which removes papm's own); one
    saved by another command or papm version is refused with what differs. The device is no part of the command:
    a run may move (a GPU's run finished on a CPU), it is then not bit-identical to an uninterrupted one."""
    path = training_state_path(out)
    if not (path.exists() or path.is_symlink()):
        return None, None
    if path.is_dir():
        raise PapmError(f"{path} is a folder, and papm {tool} keeps its progress there; move it or choose another --out")
    saved = _read_training_state(path, tool)
    if force:
        path.unlink()
        return None, None
    start_over = f"pass --force to {tool} from the start"
    theirs = saved.get("tool", "train")  # the first progress files were papm train's and did not say so
    if theirs != tool:
        raise PapmError(f"{path} holds an interrupted papm {theirs}; finish it with that command, or {start_over} "
                        "(which removes it)")
    if saved.get("version") != TRAINING_STATE_VERSION or not set(PROGRESS_KEYS[tool]) <= set(saved["state"]):
        raise PapmError(f"{path} was written by another papm version (progress format {saved.get('version')}, this one "
                        f"{TRAINING_STATE_VERSION}); {start_over}")
    differs = sorted(k for k in {**command, **saved["command"]} if command.get(k) != saved["command"].get(k))
    if differs:
        what = ", ".join(f"{k}={_shown(saved['command'].get(k))} (this command: {_shown(command.get(k))})" for k in differs)
        raise PapmError(f"{path} holds an interrupted papm {tool} started with {what}; run that command again to finish "
                        f"it, or {start_over}")
    return saved["state"], saved.get("device")


def moved_device_warning(partial: Path, saved_on: str | None, device) -> str | None:
    """The line to show when a run resumes on another device than the one its progress was saved on."""
    if saved_on is None or saved_on == str(device):
        return None
    return (f"warning: {partial} was saved on {saved_on}, this run goes on on {device}: it goes on from the same "
            "state, but its result is not bit-identical to an uninterrupted run on either")


HEAD_FORMAT = "papm-fusion-head"


def save_head(path: Path | str, head: nn.Module, head_args: dict, info: DatasetInfo, meta: dict | None = None) -> Path:
    """Fusion head checkpoint: ``head_args`` rebuild it; ``meta`` names the device order."""
    payload = {"format": HEAD_FORMAT, "version": VERSION, "head_args": head_args, "data": info.to_dict(),
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, "meta": meta or {}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_head(path: Path | str):
    """(head in eval mode, dataset info, raw dict); errors as for model checkpoints."""
    from .fusion import build_head

    path = Path(path)
    if not path.is_file():
        raise PapmError(f"fusion head not found: {path}; it is written by the fusion phase of `papm simulate`")
    if not zipfile.is_zipfile(path):
        raise PapmError(f"{path} is not a readable fusion head (truncated or corrupt); re-run the fusion phase")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PapmError(f"{path} is not a safe fusion head ({first[:120]}); re-run the fusion phase") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != HEAD_FORMAT or ckpt.get("version") != VERSION:
        raise PapmError(f"{path} is not a PAPM fusion head (format {HEAD_FORMAT} v{VERSION}); re-run the fusion phase")
    try:
        head = build_head(ckpt["head_args"])
        head.load_state_dict(ckpt["state_dict"])
        info = DatasetInfo.from_dict(ckpt["data"])
    except (TypeError, KeyError, ValueError, AttributeError, RuntimeError) as e:
        raise PapmError(f"{path} is a damaged fusion head ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                        "re-run the fusion phase") from None
    return head.eval(), info, ckpt


def resolve_run_inputs(cfg: RunConfig) -> RunConfig:
    """The run's dataset, image size and channels, resolved once before the run starts.

    With a ``base-checkpoint`` they are the checkpoint's (as are its classes, normalisation and
    ``width``): an explicit different value is refused with one line; ``data-root`` defaults to the folder the
    checkpoint was trained on. Without one: digits unless another dataset is named, at the
    dataset's own shape unless ``image-size``/``channels`` say otherwise.
    """
    if cfg.base_checkpoint:
        try:
            ckpt = read_checkpoint(cfg.base_checkpoint)
            info = DatasetInfo.from_dict(ckpt["data"])
            width = float(ckpt["model_args"]["width"])
        except (TypeError, KeyError, ValueError) as e:
            raise PapmError(f"{cfg.base_checkpoint} has damaged metadata ({type(e).__name__}); re-create it with `papm train`") from None
        if ckpt.get("kind") != "base":  # a pruned model would be reported as the unsplit base and pruned again
            raise PapmError(f"base-checkpoint {cfg.base_checkpoint} is a {ckpt.get('kind')} checkpoint; give the base "
                            "checkpoint it came from (`papm train`'s)")
        theirs = {"dataset": info.name, "image-size": info.image_size, "channels": info.in_channels}
        mine = {"dataset": cfg.dataset, "image-size": cfg.image_size, "channels": cfg.channels}
        for key, value in mine.items():
            if value and value != theirs[key]:
                raise PapmError(f"{key}={value} conflicts with base-checkpoint {cfg.base_checkpoint} ({key} {theirs[key]}); "
                                f"leave {key} unset (the checkpoint's is used) or give a checkpoint trained with {key} {value}")
        default_width = RunConfig().width  # an unset width and the default look alike: only another value conflicts
        if cfg.width not in (default_width, width):
            raise PapmError(f"width={cfg.width:g} conflicts with base-checkpoint {cfg.base_checkpoint} (width {width:g}); "
                            "leave width unset (the checkpoint's is used) or give a checkpoint trained at that width")
        values = {**theirs, "width": width}
        if not cfg.data_root and info.name != "digits" and info.source:
            if not Path(info.source).is_dir():
                raise PapmError(f"base-checkpoint {cfg.base_checkpoint} was trained on {info.source}, which is not a folder "
                                "here (moved, or a relative path from another working folder); set data-root to where "
                                "the data is now")
            values["data-root"] = info.source
        return RunConfig.from_mapping(values, cfg)
    dataset = cfg.dataset or "digits"
    channels, size = NATIVE_SHAPE[dataset]
    return RunConfig.from_mapping({"dataset": dataset, "image-size": cfg.image_size or size,
                                   "channels": cfg.channels or channels}, cfg)
