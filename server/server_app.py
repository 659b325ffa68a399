"""Flower ServerApp: one PAPM run with the Message API: the driver (``driver.py``) runs the
phases (``phases/``, one module each) in order."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..shared.config import RunConfig
from .driver import RunDriver
from .phases import PHASE_RUNNERS


def build_server_app(cfg: RunConfig | None = None, resume: bool = True) -> ServerApp:
    """A ServerApp for ``cfg``; without one it reads Flower's run config (``flwr run``)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else RunConfig.from_mapping(dict(context.run_config), source="run config")
        RunDriver(grid, run_cfg, resume).run(PHASE_RUNNERS)

    return server_app


# `flwr run .` loads this; it resumes a run directory that holds the same config.
app = build_server_app()
