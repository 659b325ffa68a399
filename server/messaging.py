"""Send one kind of message to many nodes and collect the replies, with a timeout.

Replies are matched to requests by ``reply_to_message_id`` (error replies come
from the SuperLink's node id, not the failed node's), so every failure is
attributed to the node, and reported by its ``partition-id``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from ..shared.errors import PapmError

PULL_INTERVAL = 0.1


def short_reason(reason: str, limit: int = 300) -> str:
    """One line from a node's error (simulation errors carry a whole remote traceback)."""
    text = str(reason)
    found = re.findall(r"Message: (.+?)(?:'>|$)", text, flags=re.S)
    line = found[-1] if found else next((ln for ln in reversed(text.splitlines()) if ln.strip()), text)
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class NodeFailure(PapmError):
    """A node did not answer, or answered with an error."""


@dataclass
class ExchangeResult:
    replies: dict[int, Message] = field(default_factory=dict)  # node id -> reply content
    failed: dict[int, str] = field(default_factory=dict)  # node id -> why


def exchange(grid: Grid, requests: dict[int, RecordDict], message_type: str, timeout: float, group_id: str = "") -> ExchangeResult:
    """Send ``requests[node_id]`` to each node; wait until all replied or ``timeout`` passed."""
    node_ids = list(requests)
    messages = [Message(content=requests[n], dst_node_id=n, message_type=message_type, group_id=group_id) for n in node_ids]
    # Both grids set each message's id on the object before pushing; the returned list
    # leaves out (or holds None for) messages the SuperLink did not accept.
    accepted = {mid for mid in grid.push_messages(messages) if mid}
    pending: dict[str, int] = {}
    result = ExchangeResult()
    for n, m in zip(node_ids, messages):
        mid = m.metadata.message_id
        if mid and mid in accepted:
            pending[mid] = n
        else:
            result.failed[n] = "message could not be delivered (too large, or the SuperLink refused it)"
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                result.failed[node] = f"error {reply.error.code}: {short_reason(reply.error.reason)}"
            else:
                result.replies[node] = reply
        if pending:
            time.sleep(PULL_INTERVAL)
    for node in pending.values():
        result.failed[node] = f"no reply within {timeout:g} s"
    return result
