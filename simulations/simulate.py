"""`papm simulate`: a whole PAPM run on one machine with Flower's simulation engine
(the Ray backend Flower ships), using the same ServerApp and ClientApp as a deployment."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..shared.config import PHASES, RunConfig
from ..shared.cpu import usable_cpus
from ..shared.errors import PapmError
from ..shared.files import check_writable


def thread_scaling(image_size: int) -> float:
    """How much faster one node runs on c torch threads than each of c one-thread nodes side by side, as
    c ** thread_scaling. Measured on 2 x86 cores (ResNet-18 x0.25 training steps, batch 128): 2 threads ran
    1.17x at 8x8 grey (2 ** 0.22: tiny layers, too little work to split), 1.85x at 16x16 and 1.73x at 32x32
    RGB (1.83x at width 0.125). Only used to pick a layout below."""
    return 0.2 if image_size < 16 else 0.85


def cpus_per_node(cpus: int, nodes: int, scaling: float = 0.85) -> int:
    """CPUs (= torch threads: Ray sets OMP_NUM_THREADS to them) for each simulated node's worker.

    Flower's Ray backend keeps ``cpus // c`` workers; every exchange runs the nodes in
    ``ceil(nodes / workers)`` turns of ``c`` threads each. One thread per node leaves cores idle
    whenever the last turn is short (3 nodes on 2 cores: the third node runs alone on one core) or
    there are fewer nodes than cores (3 nodes on 16 cores used 3); this picks the ``c`` with the
    shortest estimated exchange (``scaling``: ``thread_scaling``), preferring fewer threads on a tie."""
    cpus, nodes = max(1, cpus), max(1, nodes)
    return min(range(1, cpus + 1), key=lambda c: (math.ceil(nodes / (cpus // c)) / c ** scaling, c))


def backend_config(cfg: RunConfig) -> tuple[dict, int]:
    """Flower's Ray backend settings, and how many nodes it runs at the same time."""
    import torch

    cpus = usable_cpus()  # a container, taskset or cgroup quota may allow fewer than the machine has
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if gpu:  # the nodes share the GPU: up to four at a time, one CPU each to feed it
        share = min(cfg.nodes, 4)
        per_node, parallel = 1, max(1, min(cpus, share))
    else:
        share, per_node = 0, cpus_per_node(cpus, cfg.nodes, thread_scaling(cfg.image_size))
        parallel = cpus // per_node
    backend = {
        "client_resources": {"num_cpus": per_node, "num_gpus": (1.0 / share) if gpu else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if gpu else 0, "include_dashboard": False, "log_to_driver": False},
    }
    return backend, parallel


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


@contextlib.contextmanager
def stop_on_interrupt(run_dir: Path):
    """While the simulation runs, Ctrl-C (or SIGTERM) ends it at once: Flower's engine would wait for its
    threads and its Ray workers. Every finished output is already on the disk (written atomically, the
    rounds of the running phase included), so the processes below this one are killed and the process
    exits; the same command with `--resume` continues at the round it was in. The previous handlers
    come back afterwards."""
    def handler(signum, _frame):
        print(f"\ninterrupted; finished outputs are kept in {run_dir}; run the same command with --resume to continue",
              file=sys.stderr, flush=True)
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(130)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _RunSimulationNotice(logging.Filter):
    """Drops Flower's deprecation notice for ``run_simulation`` (the engine papm simulate drives)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg  # Flower also logs exception objects, not only strings
        return not (isinstance(msg, str) and msg.startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args))


def _expected(cfg: RunConfig) -> tuple[str, ...]:
    """The phases this invocation must complete (up to stop-after)."""
    return PHASES[: PHASES.index(cfg.stop_after) + 1] if cfg.stop_after else PHASES


def simulate(cfg: RunConfig, resume: bool = False, force: bool = False) -> Path:
    """Run (or resume) the whole pipeline; returns the run directory."""
    from ..server.run_directory import RunDirectory
    from ..shared.checkpoint import resolve_run_inputs
    from ..shared.grouping import check_k
    from ..shared.node_data import check_partitions, server_test_split

    cfg = resolve_run_inputs(cfg)
    # The server holds the test split anyway: check K against the classes before any work starts.
    check_k(cfg.devices, server_test_split(cfg).info.num_classes)
    run = RunDirectory(cfg.run_dir)
    if not (resume and not force and run.exists() and all(run.is_done(p) for p in _expected(cfg))):
        # one line for nodes that cannot split the data (not one per node once Ray started them); before --force clears
        # an old run; not for a finished run, which reads no training data
        check_partitions(cfg)
    if force and run.path.exists():
        run.clear()  # only a run's own files, only in a folder marked as a run; anything else is refused
    elif run.exists() and not resume:
        if not run.discard_failed_start():  # what a start that computed nothing wrote is cleared; anything more is kept
            raise PapmError(run.taken_message())
    elif run.exists():
        diff = run.read_config().differences(cfg)
        if diff:
            raise PapmError(run.other_config_message(diff))
        if all(run.is_done(p) for p in _expected(cfg)):
            return run.path  # finished: nothing to run, no Flower or Ray to start
    elif resume:
        raise PapmError(f"nothing to resume: {run.path} holds no run; drop --resume to start one")
    else:
        run.check_free()
    check_writable(run.path, "run-dir", folder=True)  # one line now, not a traceback once Flower and Ray have started
    from ..deploy.bundle import check_run_signing_key

    check_run_signing_key(cfg.sign_key)  # a bad key is one line before Ray starts, not after Flower's banner
    from flwr.common.logger import update_console_handler

    update_console_handler(colored=sys.stderr.isatty())  # colour codes on a terminal only, not in a redirected log
    # Offline: never try to install the app's dependencies; keep Ray quiet and local.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15, so every node of the run yields to any other program on the machine
    # (beside one busy process the digits demo took 16 minutes instead of 3). The nodes are the run's work:
    # they compete as the command itself does. A user's own RAY_worker_niceness is kept.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import warnings

    from flwr.simulation import run_simulation

    from ..client.client_app import app as client_app
    from ..server.server_app import build_server_app

    t0 = time.perf_counter()
    quiet = _RunSimulationNotice()
    flower_logger = logging.getLogger("flwr")
    flower_logger.addFilter(quiet)  # papm simulate is the user's command; Flower's note about its own API is not theirs
    with warnings.catch_warnings(), stop_on_interrupt(run.path):
        warnings.simplefilter("ignore")
        try:
            backend, parallel = backend_config(cfg)
            flower_logger.info("papm simulate: %d node(s) on %d worker(s) of %g CPU(s) each", cfg.nodes, parallel,
                               backend["client_resources"]["num_cpus"])
            run_simulation(server_app=build_server_app(cfg, resume=True, parallel_nodes=parallel), client_app=client_app,
                           num_supernodes=cfg.nodes, backend_config=backend)
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
        finally:
            flower_logger.removeFilter(quiet)
    done = run.completed()
    missing = [p for p in _expected(cfg) if p not in done]
    if missing:
        raise PapmError(f"the run stopped before phase {missing[0]} finished (see the log above); "
                        f"fix the cause and continue with `papm simulate --run-dir {run.path} --resume`")
    run.note("wall_seconds_last", round(time.perf_counter() - t0, 2))
    return run.path
