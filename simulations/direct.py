"""The same ServerApp phases and ClientApp handlers connected in one process, without Flower's runtime.

:class:`DirectGrid` hands each pushed message straight to the ClientApp, node after node,
synchronously. It is what the Flower-overhead benchmark compares the simulation engine with,
and how tests run whole federations fast, including devices that each hold their own data
tree (``node_configs``: per node, the node config a SuperNode would have, e.g. ``data-root``).
Not a deployment path: no isolation, no timeouts, one process.
"""

from __future__ import annotations

import sys
import uuid
from typing import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import update_console_handler
from flwr.serverapp import Grid

from ..client.client_app import app as client_app
from ..server.driver import RunDriver
from ..server.phases import PHASE_RUNNERS
from ..shared.config import RunConfig


class DirectGrid(Grid):
    """A Grid that runs the ClientApp in this process, synchronously, for each pushed message."""

    def __init__(self, client_app, node_configs: list[dict]):
        from flwr.supercore.task_identity import TaskIdentity

        # Flower 1.41 stamps messages with the identity of the task running in this process.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.identity = TaskIdentity
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=dict(nc), state=RecordDict(), run_config={})
            for i, nc in enumerate(node_configs)
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


def run_direct(cfg: RunConfig, node_configs: list[dict] | None = None, resume: bool = False, app=None) -> None:
    """The whole run in this process; ``node_configs`` default to ``cfg.nodes`` simulated partitions;
    ``app``: another ClientApp (or a callable wrapping one) instead of papm's."""
    from ..shared.checkpoint import resolve_run_inputs

    cfg = resolve_run_inputs(cfg)
    update_console_handler(colored=sys.stderr.isatty())  # colour codes on a terminal only, not in a redirected log
    if node_configs is None:
        from ..shared.node_data import check_partitions

        check_partitions(cfg, keep=True)  # one line, not one refusal per node; the nodes below reuse the read
        node_configs = [{"partition-id": i, "num-partitions": cfg.nodes} for i in range(cfg.nodes)]
    RunDriver(DirectGrid(app or client_app, node_configs), cfg, resume=resume).run(PHASE_RUNNERS)
