"""The run directory: resolved config, phase outputs, metrics, and which phases are done.

``state.json`` lists completed phases; a phase is marked complete only after all
its outputs are written (atomically), so a run can always resume after the last
completed phase and never recomputes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..shared.checkpoint import load_checkpoint
from ..shared.class_stats import ClassStatistics
from ..shared.config import PHASES, RunConfig
from ..shared.datasets import DatasetInfo
from ..shared.errors import PapmError
from ..shared.files import atomic_write_json


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

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
        model, _, ckpt = load_checkpoint(self.device_dir(k) / "pruned.pt")
        return model, ckpt["model_args"]

    # ---- lifecycle -----------------------------------------------------------------
    def exists(self) -> bool:
        return self.state_file.exists() or self.config_file.exists()

    def start(self, cfg: RunConfig, resume: bool) -> list[str]:
        """Create or reopen the run; returns the completed phases. Refuses a different config."""
        if self.exists():
            old = self.read_config()
            if not resume:
                raise PapmError(f"{self.path} already holds a run; pass --resume to continue it, --force to start over, "
                                "or choose another --run-dir")
            diff = old.differences(cfg)
            if diff:
                raise PapmError(f"{self.path} was started with a different config ({', '.join(diff)} differ); "
                                "resume with the same config or choose another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_file, {"fingerprint": cfg.fingerprint(), **cfg.to_flower()})
        state = self.state()
        state.setdefault("completed", [])
        state["fingerprint"] = cfg.fingerprint()
        atomic_write_json(self.state_file, state)
        return list(state["completed"])

    def read_config(self) -> RunConfig:
        try:
            data = json.loads(self.config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PapmError(f"{self.config_file} is unreadable ({e}); the run directory is damaged, start a new one") from None
        data.pop("fingerprint", None)
        return RunConfig.from_mapping(data, source=str(self.config_file))

    def state(self) -> dict[str, Any]:
        if not self.state_file.exists():
            return {}
        try:
            return json.loads(self.state_file.read_text())
        except json.JSONDecodeError:
            raise PapmError(f"{self.state_file} is damaged; start a new run directory") from None

    def completed(self) -> list[str]:
        return list(self.state().get("completed", []))

    def is_done(self, phase: str) -> bool:
        return phase in self.completed()

    def mark_done(self, phase: str, **info: Any) -> None:
        assert phase in PHASES, phase
        state = self.state()
        done = state.setdefault("completed", [])
        if phase not in done:
            done.append(phase)
        state.setdefault("phases", {})[phase] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_json(self.state_file, state)

    def note(self, key: str, value: Any) -> None:
        state = self.state()
        state[key] = value
        atomic_write_json(self.state_file, state)

    def log_metrics(self, phase: str, **values: Any) -> None:
        """One line per round and phase in metrics.jsonl."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "phase": phase, **values}) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
