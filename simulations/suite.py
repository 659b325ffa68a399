"""`papm suite FILE`: a grid of ordinary runs, over several seeds, with dry-run, resume and shared base models.

A suite file (YAML or TOML)::

    name: ablation              # the suite's folder: runs/suite-<name>/ (or runs-dir)
    base: {nodes: 3, devices: 3}   # config every run starts from (run config keys)
    grid:                       # key -> values: the cartesian product of these
      criterion: [papm, l1, apoz, random]
      budget: [0.7, 0.77]
    seeds: [0, 1, 2]
    variants:                   # optional: extra single runs beside the grid (each its own settings)
      - {baseline: one-model-device-budget}

Each run is an ordinary run directory named from its varying values (``criterion=l1,budget=0.7,seed=1``).
``--dry-run`` prints the runs and writes nothing. ``--resume`` skips runs that finished, re-runs the
failed or unfinished ones (resuming them where they stopped). A failed run is recorded with its
error line in ``suite.json`` and does not stop the suite. Runs that share a base model (the same
config for everything the base phase reads, and the same seed) train it once: later ones load the
first one's ``base.pt`` as their ``base-checkpoint``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..shared.config import RunConfig
from ..shared.errors import PapmError
from ..shared.files import atomic_write_json, check_writable, read_table_file

SUITE_KEYS = ("name", "base", "grid", "seeds", "variants", "runs-dir", "engine")
# what the base phase reads: runs equal in these (and the seed) can share one base model
BASE_KEYS = ("dataset", "data-root", "image-size", "channels", "val-fraction", "partitioner", "dirichlet-alpha",
             "by-group-share", "min-partition-size", "seed", "nodes", "devices", "base-checkpoint", "width",
             "base-rounds", "base-epochs", "base-lr", "batch-size", "bn", "bn-samples")


@dataclass
class PlannedRun:
    name: str
    cfg: RunConfig
    varying: dict[str, Any]  # the values that differ between runs (seed included)
    shares_base_with: str | None = None  # the earlier run whose base.pt this one loads


@dataclass
class Suite:
    name: str
    root: Path
    runs: list[PlannedRun] = field(default_factory=list)
    engine: str = "simulation"


def _load(path: Path) -> dict:
    return read_table_file(path, "suite file", "a table with name, base, grid and seeds")


def _value_text(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def run_name(varying: dict[str, Any]) -> str:
    """``key=value`` pairs joined by commas, safe as a folder name."""
    text = ",".join(f"{k}={_value_text(v)}" for k, v in varying.items()) or "default"
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in text)


def plan_suite(path: Path | str, runs_dir: str | None = None) -> Suite:
    """Read, check and expand a suite file: every run, named, with its config (nothing is written)."""
    path = Path(path)
    data = _load(path)
    unknown = [k for k in data if k not in SUITE_KEYS]
    if unknown:
        raise PapmError(f"unknown suite key {unknown[0]!r} in {path.name}; valid keys: {', '.join(SUITE_KEYS)}")
    name = str(data.get("name") or path.stem)
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    seeds = data.get("seeds", [0])
    variants = data.get("variants") or []
    if not isinstance(base, dict) or not isinstance(grid, dict) or not isinstance(variants, list):
        raise PapmError(f"{path.name}: base and grid must be tables (key: value) and variants a list of tables")
    if not grid and not variants:
        raise PapmError(f"{path.name}: the grid is empty; give at least one key with a list of values (or variants)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PapmError(f"{path.name}: grid key {key!r} must have a non-empty list of values, got {values!r}")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise PapmError(f"{path.name}: seeds must be a non-empty list of integers, got {seeds!r}")
    engine = str(data.get("engine", "simulation"))
    if engine not in ("simulation", "direct"):
        raise PapmError(f"{path.name}: engine must be simulation or direct, got {engine!r}")
    base_cfg = RunConfig.from_mapping(base, source=f"suite {path.name} base")
    root = Path(runs_dir or data.get("runs-dir") or f"runs/suite-{name}")
    suite = Suite(name, root, engine=engine)
    if not all(isinstance(v, dict) and v for v in variants):
        raise PapmError(f"{path.name}: every variant must be a non-empty table of run config keys")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    combos += [dict(v) for v in variants]
    seen: dict[str, str] = {}
    for combo in combos:
        for seed in seeds:
            varying = {**combo, "seed": seed}
            cfg = RunConfig.from_mapping({k.replace("_", "-"): v for k, v in varying.items()}, base_cfg,
                                         source=f"suite {path.name} run {run_name(varying)}")
            name_ = run_name(varying)
            if name_ in seen:
                raise PapmError(f"{path.name}: two runs would both be named {name_!r}; give every variant different values")
            seen[name_] = name_
            cfg = RunConfig.from_mapping({"run-dir": str(root / name_)}, cfg)
            suite.runs.append(PlannedRun(name_, cfg, varying))
    # runs equal in everything the base phase reads train one base model
    first_with: dict[str, str] = {}
    for run in suite.runs:
        flat = run.cfg.to_flower()
        key = json.dumps({k: flat[k] for k in BASE_KEYS}, sort_keys=True)
        if run.cfg.base_checkpoint:
            continue
        if key in first_with:
            run.shares_base_with = first_with[key]
        else:
            first_with[key] = run.name
    return suite


def dry_run_table(suite: Suite) -> str:
    keys = list(dict.fromkeys(k for r in suite.runs for k in r.varying))
    lines = [f"suite {suite.name}: {len(suite.runs)} runs in {suite.root}/ ({suite.engine} engine)",
             "  ".join([f"{'run':<4}"] + [f"{k:<14}" for k in keys] + ["base model"])]
    for i, r in enumerate(suite.runs, 1):
        lines.append("  ".join([f"{i:<4}"] + [f"{_value_text(r.varying.get(k, '-')):<14}" for k in keys]
                               + [f"from {r.shares_base_with}" if r.shares_base_with else
                                  "base-checkpoint" if r.cfg.base_checkpoint else "trained here"]))
    return "\n".join(lines)


def _finished(run_dir: Path) -> bool:
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return "bundle" in state.get("completed", []) and (run_dir / "evaluation.json").is_file()


def _stored_config(run_dir: Path) -> RunConfig | None:
    """The config a run directory was started with, or None when it holds no run."""
    if not (run_dir / "config.json").is_file() or not (run_dir / "state.json").is_file():
        return None
    try:
        data = json.loads((run_dir / "config.json").read_text())
        data.pop("fingerprint", None)
        return RunConfig.from_mapping(data, source=str(run_dir / "config.json"))
    except (ValueError, PapmError):
        return None


def _base_done(run_dir: Path) -> bool:
    try:
        return "base" in json.loads((run_dir / "state.json").read_text()).get("completed", [])
    except (OSError, ValueError):
        return False


def run_suite(suite: Suite, resume: bool = False, say: Callable[[str], None] = print) -> dict:
    """Every planned run, in order; returns the suite record (also written to ``root/suite.json``)."""
    from ..shared.checkpoint import resolve_run_inputs
    from .direct import run_direct
    from .simulate import simulate

    record_path = suite.root / "suite.json"
    record = {"name": suite.name, "runs": {}}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            pass
    check_writable(suite.root, "--runs-dir", folder=True)
    if suite.root.exists() and not resume and any(suite.root.iterdir()):
        raise PapmError(f"{suite.root} already holds a suite; pass --resume to continue it or choose another runs-dir")
    suite.root.mkdir(parents=True, exist_ok=True)
    total = len(suite.runs)
    for i, run in enumerate(suite.runs, 1):
        run_dir = Path(run.cfg.run_dir)
        stored = _stored_config(run_dir)
        if stored is not None:
            # compared as the run resolved it (dataset and image shape filled in, its base model's path)
            planned = resolve_run_inputs(RunConfig.from_mapping({"base-checkpoint": stored.base_checkpoint}, run.cfg))
            diff = stored.differences(planned)
            if diff:
                raise PapmError(f"{run_dir} was run with other settings than the suite file now gives ({', '.join(diff)} "
                                f"{'differs' if len(diff) == 1 else 'differ'}); the suite file changed: restore it, or run the changed suite in another --runs-dir")
        if resume and _finished(run_dir):
            say(f"[{i}/{total}] {run.name}: done earlier, skipped")
            record["runs"].setdefault(run.name, {})["status"] = "done"
            continue
        cfg = run.cfg
        if stored is not None:  # a partial run continues with the base model it started with
            cfg = RunConfig.from_mapping({"base-checkpoint": stored.base_checkpoint}, cfg)
        elif run.shares_base_with:
            shared_dir = suite.root / run.shares_base_with
            if (shared_dir / "base.pt").is_file() and _base_done(shared_dir):
                cfg = RunConfig.from_mapping({"base-checkpoint": str(shared_dir / "base.pt")}, cfg)
        t0 = time.perf_counter()
        say(f"[{i}/{total}] {run.name}: running" + (f" (base model of {run.shares_base_with})" if cfg.base_checkpoint
                                                    and run.shares_base_with else ""))
        attempts = record["runs"].get(run.name, {}).get("attempts", 0) + 1
        entry = {"varying": run.varying, "run_dir": str(run_dir), "shares_base_with": run.shares_base_with, "attempts": attempts}
        try:
            partial = run_dir.exists() and (run_dir / "state.json").exists()
            if suite.engine == "direct":
                run_direct(cfg, resume=partial)
            else:
                simulate(cfg, resume=partial)
            entry.update(status="done", seconds=round(time.perf_counter() - t0, 1))
            say(f"[{i}/{total}] {run.name}: done in {entry['seconds']:.0f} s")
        except Exception as e:  # noqa: BLE001 - a failed run is recorded and the suite goes on
            reason = str(e) if isinstance(e, PapmError) else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            entry.update(status="failed", error=reason, seconds=round(time.perf_counter() - t0, 1))
            say(f"[{i}/{total}] {run.name}: failed: {reason}")
        record["runs"][run.name] = entry
        atomic_write_json(record_path, record)
    atomic_write_json(record_path, record)
    return record
