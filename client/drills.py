"""Failure drills: a Flower client mod that makes a node fail on purpose, to rehearse node loss.

Enabled only by the environment variable ``PAPM_INJECT_FAULT`` (read when the ClientApp is
built; unset in normal use, and then the ClientApp carries no mod at all). Drills are
separated by commas; each is ``MESSAGE_TYPE:PARTITION_ID:MODE``:

- ``train.finetune:1:hang=40``: the node with partition-id 1 stops answering for 40 s on
  that message type (the server times out, goes on without it and ignores the late reply);
- ``query.class_stats:2:raise``: its handler raises (reported by partition id);
- ``query.export/base:1:raise``: one export item fails while the other items of the same
  message still ship (the server hands the item to another node).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from flwr.app import Context, Message

from .records import json_config

ENV = "PAPM_INJECT_FAULT"


def parse_drills(text: str) -> list[tuple[str, int, str]]:
    """``"train.finetune:1:hang=40,query.apoz:0:raise"`` -> [(kind, partition id, mode), ...]."""
    drills = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        kind, pid, mode = spec.rsplit(":", 2)
        drills.append((kind, int(pid), mode))
    return drills


def _fail(kind: str, partition_id: int, mode: str) -> None:
    if mode.startswith("hang"):
        time.sleep(float(mode.partition("=")[2] or 3600))
    raise RuntimeError(f"injected fault on {kind} for partition-id {partition_id}")


def fault_drill_mod(drills: list[tuple[str, int, str]]) -> Callable[[Message, Context, Callable], Message]:
    """A ClientApp mod running ``drills`` around the real handlers, which carry no test code."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        message_type = msg.metadata.message_type
        for kind, target, mode in drills:
            if kind == message_type and target == pid:
                _fail(kind, pid, mode)
        reply = call_next(msg, context)
        items = [(kind.partition("/")[2], mode) for kind, target, mode in drills
                 if target == pid and kind.startswith(f"{message_type}/")]
        if not items or reply.has_error() or "reports" not in reply.content:
            return reply
        # one item of a multi-item reply fails: its report becomes the error, its files stay home
        reports = {k: json.loads(v) for k, v in reply.content["reports"].items()}
        files = reply.content["files"]
        for item, mode in items:
            if item in reports:
                try:
                    _fail(f"{message_type}/{item}", pid, mode)
                except RuntimeError as e:
                    reports[item] = {"partition_id": pid, "error": f"RuntimeError: {e}"}
                for key in [k for k in files if k.startswith(f"{item}.")]:
                    del files[key]
        reply.content["reports"] = json_config(**reports)
        return reply

    return mod


def drill_mods() -> list:
    """The mods a ClientApp gets: the drill mod when ``PAPM_INJECT_FAULT`` is set, else none."""
    drills = parse_drills(os.environ.get(ENV, ""))
    return [fault_drill_mod(drills)] if drills else []
