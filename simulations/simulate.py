"""`papm simulate`: a whole PAPM run on one machine with Flower's simulation engine
(the Ray backend Flower ships), using the same ServerApp and ClientApp as a deployment."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..shared.config import PHASES, RunConfig
from ..shared.errors import PapmError


def backend_config(cfg: RunConfig) -> dict:
    import torch

    cpus = os.cpu_count() or 1
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    # One CPU per simulated node, so a 2-core machine runs two nodes at a time instead of stalling.
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": (1.0 / min(cfg.nodes, 4)) if gpu else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if gpu else 0, "include_dashboard": False, "log_to_driver": False},
    }


def simulate(cfg: RunConfig, resume: bool = False, force: bool = False) -> Path:
    """Run (or resume) the whole pipeline; returns the run directory."""
    from ..server.run_directory import RunDirectory
    from ..shared.grouping import check_k
    from ..shared.node_data import server_test_split

    # The server holds the test split anyway: check K against the classes before any work starts.
    check_k(cfg.devices, server_test_split(cfg).info.num_classes)
    run = RunDirectory(cfg.run_dir)
    if run.exists():
        if force:
            shutil.rmtree(run.path)
        elif not resume:
            raise PapmError(f"{run.path} already holds a run; pass --resume to continue it, --force to start over, "
                            "or choose another --run-dir")
        else:
            diff = run.read_config().differences(cfg)
            if diff:
                raise PapmError(f"{run.path} was started with a different config ({', '.join(diff)} differ); "
                                "resume with the same config or choose another --run-dir")
    elif resume:
        raise PapmError(f"nothing to resume: {run.path} holds no run; drop --resume to start one")
    # Offline: never try to install the app's dependencies; keep Ray quiet and local.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import warnings

    from flwr.simulation import run_simulation

    from ..client.client_app import app as client_app
    from ..server.server_app import build_server_app

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_simulation(server_app=build_server_app(cfg, resume=True), client_app=client_app,
                           num_supernodes=cfg.nodes, backend_config=backend_config(cfg))
        except PapmError:
            raise
        except Exception as e:  # the ServerApp's own error, re-raised by Flower
            cause = e
            while cause.__cause__ is not None or cause.__context__ is not None:
                nxt = cause.__cause__ or cause.__context__
                if isinstance(nxt, PapmError):
                    raise nxt from None
                cause = nxt
            raise
    done = run.completed()
    expected = PHASES[: PHASES.index(cfg.stop_after) + 1] if cfg.stop_after else PHASES
    missing = [p for p in expected if p not in done]
    if missing:
        raise PapmError(f"the run stopped before phase {missing[0]} finished (see the log above); "
                        f"fix the cause and continue with `papm simulate --run-dir {run.path} --resume`")
    run.note("wall_seconds_last", round(time.perf_counter() - t0, 2))
    return run.path
