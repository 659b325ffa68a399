"""The run directory: resolved config, phase outputs, metrics, and which phases are done.

``state.json`` lists completed phases; a phase is marked complete only after all
its outputs are written (atomically), so a run can always resume after the last
completed phase and never recomputes it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..shared.checkpoint import load_checkpoint
from ..shared.class_stats import ClassStatistics
from ..shared.config import PHASES, RUNTIME_ONLY, RunConfig
from ..shared.datasets import DatasetInfo
from ..shared.errors import PapmError, problem_and_fix
from ..shared.files import atomic_write_bytes, atomic_write_json, atomic_write_text


MARKER = ".papm-run"  # written when a run starts: only such a folder is ever cleared by --force
MARKER_FORMAT, MARKER_VERSION = "papm-run-directory", 1
# everything a run writes at the top of its folder (--force removes these and nothing else)
RUN_OUTPUTS = ("progress", "config.json", "state.json", "metrics.jsonl", "base.pt", "base.onnx", "base.int8.onnx",
               "class_stats.pt", "groups", "devices", "fusion", "bundle", "evaluation.json", "summary.md", "summary.csv",
               "curves.png")


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._clock: tuple[str, float] | None = None  # the running phase, and when its time (all invocations') began

    # ---- layout ---------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def base_file(self) -> Path:
        return self.path / "base.pt"

    @property
    def assignment_file(self) -> Path:
        return self.path / "groups" / "assignment.json"

    def device_dir(self, k: int) -> Path:
        return self.path / "devices" / f"device-{k}"

    # ---- phase outputs, read back by later phases ------------------------------------
    def load_base(self) -> tuple[nn.Module, DatasetInfo, dict]:
        """(base model, the run's dataset info, its model_args) from base.pt."""
        model, info, ckpt = load_checkpoint(self.base_file)
        return model, info, ckpt["model_args"]

    def load_class_stats(self) -> ClassStatistics:
        return ClassStatistics.from_arrays(torch.load(self.path / "class_stats.pt", weights_only=True))

    def load_assignment(self) -> dict[str, Any]:
        """{"k", "groups" (class ids per group), "partition_group" (partition id -> group)}."""
        doc = json.loads(self.assignment_file.read_text())
        return {"k": doc["k"], "groups": [doc["groups"][str(g)]["classes"] for g in range(doc["k"])],
                "partition_group": {int(p): int(v["group"]) for p, v in doc["nodes"].items()}}

    def load_extractor(self, k: int) -> tuple[nn.Module, dict]:
        """Device k's pruned model and its model_args."""
        try:
            model, _, ckpt = load_checkpoint(self.device_dir(k) / "pruned.pt")
        except PapmError as e:  # the checkpoint's own fix (`papm train`/`prune`) is not how a run's file comes back
            raise PapmError(f"{problem_and_fix(str(e))[0]}; this run's prune phase wrote it: put the file back from a copy, "
                            f"or run again from the start (`papm simulate --run-dir {self.path} --force`)") from None
        return model, ckpt["model_args"]

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def marker_file(self) -> Path:
        return self.path / MARKER

    def exists(self) -> bool:
        """Whether a run was started here (its config and state are written)."""
        return self.state_file.exists() and self.config_file.exists()

    def is_run(self) -> bool:
        """Whether the folder carries a run directory's marker."""
        try:
            return json.loads(self.marker_file.read_text()).get("format") == MARKER_FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def other_config_message(self, diff: list[str]) -> str:
        """Why a resume with other settings is refused (``diff``: the keys that differ)."""
        return (f"{self.path} was started with a different config ({', '.join(diff)} "
                f"{'differs' if len(diff) == 1 else 'differ'}); resume with the same config or choose another --run-dir")

    def taken_message(self) -> str:
        if self.is_run():
            return f"{self.path} already holds a run; pass --resume to continue it, --force to start over, or choose another --run-dir"
        return (f"{self.path} holds a config.json and state.json but no {MARKER} marker (not a run, or one from before "
                "markers); pass --resume to continue a run, or choose another --run-dir")

    def check_free(self) -> None:
        """A new run may start here: the folder is missing, empty, or marked as a run directory."""
        if self.path.exists() and not self.path.is_dir():
            raise PapmError(f"run-dir {self.path} is a file; choose a folder for the run")
        if self.path.is_dir() and not self.is_run() and any(self.path.iterdir()):
            raise PapmError(f"{self.path} holds files but no PAPM run; a run is only written into an empty or new folder, "
                            "choose another --run-dir")

    def clear(self) -> list[str]:
        """--force: delete what a PAPM run writes here (nothing else; the marker stays) and return the
        names removed. Refused unless the folder carries a run's marker: a folder that merely holds a
        config.json (or a state.json) is never touched."""
        if self.path.is_dir() and not any(self.path.iterdir()):
            return []
        if self.path.exists() and not self.path.is_dir():
            raise PapmError(f"run-dir {self.path} is a file; choose a folder for the run")
        if not self.is_run():
            raise PapmError(f"{self.path} is not a PAPM run directory (no {MARKER} marker: not a run, or one from before "
                            "markers); --force deletes only marked runs and nothing was deleted; choose another --run-dir "
                            "or delete the folder yourself")
        removed = []
        for name in RUN_OUTPUTS:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            else:
                continue
            removed.append(name)
        for stray in self.path.glob(".*.tmp"):  # half-written files of an interrupted write
            stray.unlink(missing_ok=True) if stray.is_file() else shutil.rmtree(stray, ignore_errors=True)
        return removed

    def start(self, cfg: RunConfig, resume: bool) -> list[str]:
        """Create or reopen the run; returns the completed phases. Refuses a different config. ``new_keys``: the
        config keys the run's saved config lacks (a run started by an older version), with the values they take."""
        self.new_keys: dict[str, Any] = {}
        if not resume:
            self.discard_failed_start()
        if self.exists():
            saved = self.saved_settings()
            old = RunConfig.from_mapping(saved, source=str(self.config_file))
            self.new_keys = {k: v for k, v in cfg.to_flower().items() if k not in saved and k not in RUNTIME_ONLY}
            if not resume:
                raise PapmError(self.taken_message())
            diff = old.differences(cfg)
            if diff:
                raise PapmError(self.other_config_message(diff))
        else:
            self.check_free()
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.is_run():
            atomic_write_json(self.marker_file, {"format": MARKER_FORMAT, "version": MARKER_VERSION})
        atomic_write_json(self.config_file, {"fingerprint": cfg.fingerprint(), **cfg.to_flower()})
        state = self.state()
        state.setdefault("completed", [])
        state["fingerprint"] = cfg.fingerprint()
        atomic_write_json(self.state_file, state)
        return list(state["completed"])

    def discard_failed_start(self) -> bool:
        """Clear a marked run where no phase completed and no round was saved: it holds only what a start that failed
        before its first result wrote (a refused checkpoint, lost nodes), so a corrected command may begin afresh."""
        if not (self.exists() and self.is_run()):
            return False
        try:
            completed = self.state().get("completed", [])
        except PapmError:
            return False
        progress = self.path / "progress"
        if completed or (progress.is_dir() and any(progress.iterdir())):
            return False
        self.clear()
        return True

    def read_config(self) -> RunConfig:
        return RunConfig.from_mapping(self.saved_settings(), source=str(self.config_file))

    def saved_settings(self) -> dict[str, Any]:
        """config.json as saved (kebab-case keys, without the fingerprint); damage is one error."""
        try:
            data = json.loads(self.config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PapmError(f"{self.config_file} is unreadable ({e}); the run directory is damaged, start a new one") from None
        if not isinstance(data, dict):
            raise PapmError(f"{self.config_file} holds a JSON {type(data).__name__}, not the run's settings; the run "
                            "directory is damaged, start a new one")
        data.pop("fingerprint", None)
        return data

    def state(self) -> dict[str, Any]:
        if not self.state_file.exists():
            return {}
        try:
            state = json.loads(self.state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PapmError(f"{self.state_file} is damaged; start a new run directory") from None
        # a hand-edited or foreign file: the shape every reader relies on, checked once here
        if not isinstance(state, dict) or not isinstance(state.get("completed", []), list) \
                or not all(isinstance(p, str) for p in state.get("completed", [])) \
                or not isinstance(state.get("phases", {}), dict) or not isinstance(state.get("failures", []), list):
            raise PapmError(f"{self.state_file} is damaged (not the run's state: a JSON object whose completed is a "
                            "list of phase names); start a new run directory")
        return state

    def completed(self) -> list[str]:
        return list(self.state().get("completed", []))

    def is_done(self, phase: str) -> bool:
        return phase in self.completed()

    def start_clock(self, phase: str) -> float:
        """The ``time.perf_counter()`` value from which ``phase``'s seconds count: now, less the time earlier
        invocations spent on it up to their last saved round (a phase resumed over several sessions reports its whole
        time, not the last session's)."""
        kept = self.state().get("unfinished_seconds")
        earlier = kept.get(phase) if isinstance(kept, dict) else None  # a hand-edited state counts from now
        earlier = float(earlier) if isinstance(earlier, (int, float)) and 0 <= earlier < float("inf") else 0.0
        self._clock = (phase, time.perf_counter() - earlier)
        return self._clock[1]

    def mark_done(self, phase: str, **info: Any) -> None:
        assert phase in PHASES, phase
        state = self.state()
        done = state.setdefault("completed", [])
        if phase not in done:
            done.append(phase)
        state.setdefault("phases", {})[phase] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        kept = state.get("unfinished_seconds")
        if isinstance(kept, dict):
            kept.pop(phase, None)
            if not kept:  # nothing of an unfinished phase is left to count
                del state["unfinished_seconds"]
        atomic_write_json(self.state_file, state)
        self.clear_progress(phase)  # its outputs are complete: the rounds are no longer needed

    def note(self, key: str, value: Any) -> None:
        state = self.state()
        state[key] = value
        atomic_write_json(self.state_file, state)

    def log_metrics(self, phase: str, **values: Any) -> None:
        """One line per round and phase in metrics.jsonl (appended and flushed to the disk)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "phase": phase, **values}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        """Every complete line (a line cut short by a kill is skipped)."""
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def rewind_metrics(self, labels: dict[str, int | None]) -> None:
        """Before a phase (re)starts: for each metrics label, keep its lines up to round ``labels[label]``
        (None: none of them), so metrics.jsonl holds each round once after any number of kills and
        resumes. Rewritten atomically; other labels, and a file that needs no change, stay as they are."""
        lines = self.metrics()

        def keep(m: dict) -> bool:
            label = m.get("phase")
            if label not in labels:
                return True
            upto = labels[label]
            return upto is not None and isinstance(m.get("round"), int) and m["round"] <= upto

        kept = [m for m in lines if keep(m)]
        torn = self.metrics_file.exists() and not self.metrics_file.read_text().endswith("\n") and self.metrics_file.stat().st_size
        if len(kept) != len(lines) or torn:
            atomic_write_text(self.metrics_file, "".join(json.dumps(m) + "\n" for m in kept))

    # ---- progress inside a phase (resume at the round a run was in) -----------------------
    def progress_file(self, phase: str) -> Path:
        return self.path / "progress" / f"{phase}.pt"

    def save_progress(self, phase: str, payload: dict[str, Any]) -> None:
        """The phase's state after a round (weights, round, what rebuilds them): written atomically, so a
        killed run resumes at the round it was in instead of the start of the phase."""
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(self.progress_file(phase), buf.getvalue())
        if self._clock is not None and self._clock[0] == phase:  # the time that saved round's work took, kept with it
            self.note("unfinished_seconds", {phase: round(time.perf_counter() - self._clock[1], 2)})

    def load_progress(self, phase: str) -> dict[str, Any] | None:
        path = self.progress_file(phase)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged progress file only costs the rounds it held
            return None

    def clear_progress(self, phase: str) -> None:
        self.progress_file(phase).unlink(missing_ok=True)
