"""Flower overhead: `papm simulate` (Flower's simulation engine, Ray actors) against the
same phases run in one process without Flower's runtime, and the peak memory of a
simulation.

    python benchmarks/bench_flower.py                        # digits demo
    python benchmarks/bench_flower.py --set nodes=10 --set devices=3
    python benchmarks/bench_flower.py --set dataset=cifar10 --set data-root=DIR ...

"Without Flower" means the very same ServerApp phases (``RunDriver``) and ClientApp
handlers, connected by :class:`DirectGrid`, which hands each message straight to the
ClientApp in this process, one node after another. The difference is what Flower's
runtime costs: Ray start-up, actor scheduling, message (de)serialisation.
Peak memory is the largest sum of the resident memory of the whole process tree
(driver + Ray's processes + actors), sampled every 0.2 s.
Writes benchmarks/bench_flower.json and appends a row to benchmarks/bench_flower.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from bench_record import record


class DirectGrid(Grid):
    """A Grid that runs the ClientApp in this process, synchronously, for each pushed message."""

    def __init__(self, client_app, num_nodes: int):
        from flwr.supercore.task_identity import TaskIdentity

        # Flower 1.41 stamps messages with the identity of the task running in this process.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.identity = TaskIdentity
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                              state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # no SuperLink, no run record
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self):
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = 1
            self.identity.node_id = msg.metadata.dst_node_id  # the node answers as itself
            try:
                reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001 - the same as a node's error reply
                from flwr.app import Error

                reply = Message(Error(code=0, reason=str(e)), reply_to=msg)
            finally:
                self.identity.node_id = 0
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc; no extra dependency)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 2**20


def run_direct(cfg) -> float:
    """The whole run, same phases and handlers, without Flower's runtime. Returns seconds.

    One torch thread, as each simulated node gets one CPU (and on this 2-core machine two
    intra-op threads on these small tensors were 7x slower under load, not faster).
    """
    import torch

    from papm.client.client_app import app as client_app

    torch.set_num_threads(1)
    from papm.server.driver import RunDriver
    from papm.server.phases import PHASE_RUNNERS

    t0 = time.perf_counter()
    RunDriver(DirectGrid(client_app, cfg.nodes), cfg, resume=False).run(PHASE_RUNNERS)
    return time.perf_counter() - t0


def run_simulated(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """`papm simulate` in a subprocess; (seconds, peak MiB of the whole process tree)."""
    cmd = [sys.executable, "-m", "papm.cli", "simulate", "--run-dir", str(run_dir), "--force"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join(timeout=1)
    if proc.returncode != 0:
        raise SystemExit(f"papm simulate failed:\n{err[-3000:]}")
    return seconds, peak[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    from papm.shared.config import RunConfig

    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    try:
        cfg = RunConfig.from_overrides(args.set + [f"run-dir={work / 'direct'}"])
        direct = run_direct(cfg)
        simulated, peak = run_simulated(args.set, work / "sim")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row = {"config": args.set or ["(defaults: digits demo)"], "nodes": cfg.nodes, "devices": cfg.devices, "dataset": cfg.dataset,
           "simulate_seconds": round(simulated, 2), "direct_seconds": round(direct, 2), "ratio": round(simulated / direct, 3),
           "peak_rss_mib": round(peak, 1), "cpus": os.cpu_count()}
    print(f"papm simulate (Flower, Ray):    {simulated:8.2f} s   peak memory {peak:8.1f} MiB (whole process tree)")
    print(f"same phases without Flower:     {direct:8.2f} s")
    print(f"ratio (simulate / direct):      {simulated / direct:.3f}")
    row["config_text"] = " ".join(row["config"])
    js, md = record(args.out, "bench_flower", row, {
        "config": "config_text", "nodes": "nodes", "simulate s": "simulate_seconds", "direct s": "direct_seconds",
        "ratio": "ratio", "peak MiB": "peak_rss_mib"})
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
