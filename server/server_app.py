"""Flower ServerApp: one PAPM run with the Message API: the driver (``driver.py``) runs the
phases (``phases/``, one module each) in order."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..shared.checkpoint import resolve_run_inputs
from ..shared.config import RunConfig
from .driver import RunDriver
from .phases import PHASE_RUNNERS


def build_server_app(cfg: RunConfig | None = None, resume: bool = True, parallel_nodes: int | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one it reads Flower's run config (``flwr run``). ``parallel_nodes``:
    how many nodes a simulation engine runs at once (``timeout`` is per node's turn), None on devices."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_mapping(dict(context.run_config), source="run config")
        run_cfg = resolve_run_inputs(run_cfg)  # dataset and image shape: the base checkpoint's, or the dataset's own
        RunDriver(grid, run_cfg, resume, parallel_nodes).run(PHASE_RUNNERS)

    return server_app


# `flwr run .` loads this; it resumes a run directory that holds the same config.
app = build_server_app()
