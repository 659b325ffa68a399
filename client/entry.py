"""The ClientApp Flower starts for every message (``clientapp`` in pyproject.toml); it imports no torch.

With ``worker-socket`` in the node config (a SuperNode beside a ``papm node`` worker) each message goes
to the warm worker (``worker.py``); otherwise, or when the worker does not answer, the handlers of
``client_app.py`` run here, in this process, as they always did. Either way the same handlers answer.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from .worker import WorkerUnavailable, forward

# every message type client_app.py handles (a test keeps the two lists equal)
MESSAGE_TYPES = ("query.hello", "train.base", "query.bn_stats", "query.class_stats", "query.apoz", "query.gptq_inputs",
                 "train.finetune", "query.export", "query.feature_stats", "train.fusion", "query.fusion_val", "evaluate.default")

app = ClientApp()


def handle(message: Message, context: Context) -> Message:
    socket_path = str(context.node_config.get("worker-socket", ""))
    if socket_path:
        try:
            return forward(socket_path, message, context)
        except WorkerUnavailable as e:
            log(WARNING, "%s; running %s in this process", e, message.metadata.message_type)
    from .client_app import app as handlers  # torch and the handlers, imported only here

    return handlers(message, context)


for _kind in MESSAGE_TYPES:
    _category, _action = _kind.split(".")
    getattr(app, _category)(_action)(handle)
