"""A warm node worker: one long-lived process per device that runs the ClientApp's handlers, so
torch, the decoded images and the caches stay loaded between Flower messages.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message (there is no warm
ClientApp; flower issue #3670). On a small device importing torch and decoding the device's
images costs seconds per message. With ``papm node --socket PATH`` running beside the
SuperNode, and ``worker-socket="PATH"`` in the SuperNode's node config, the ClientApp that
Flower starts (``client/entry.py``, which imports no torch) hands each message to the worker
over that Unix socket and returns its reply; the handlers are the same code, so results are
the same. The socket is for this user only: its folder may not be open to other users (the
worker refuses to start otherwise), the socket file is 0600, and the worker drops a
connection from any other user id (``SO_PEERCRED``). If the worker is not running, the
ClientApp logs one line and runs the handlers in its own process (slower, same results).

Wire format, both ways: 8-byte big-endian length, then a Flower ``Message`` protobuf; then the
same for a ``Context`` protobuf (the node's state travels back: FedBN keeps layers there). A
handler's PapmError comes back as an error reply (``client_app.user_errors_mod``); any other error travels back as a
text that the ClientApp raises, as the handler would have.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

_OK, _ERROR = b"K", b"E"


class WorkerUnavailable(Exception):
    """No worker answers at the socket (not started, or it died): the caller runs the handler itself."""


def _send(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(struct.pack(">Q", len(payload)) + payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(conn, 8))
    return _recv_exact(conn, n)


def forward(socket_path: str, message: Message, context: Context) -> Message:
    """Run ``message`` on the worker at ``socket_path``; update ``context`` in place; return the reply."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            conn.connect(socket_path)
        except OSError as e:
            raise WorkerUnavailable(f"no papm node worker at {socket_path} ({e.strerror})") from None
        _send(conn, message_to_proto(message).SerializeToString())
        _send(conn, context_to_proto(context).SerializeToString())
        try:
            status = _recv_exact(conn, 1)
        except ConnectionError:
            raise WorkerUnavailable(f"the papm node worker at {socket_path} closed the connection (did it die?)") from None
        if status == _ERROR:
            raise RuntimeError(_recv(conn).decode("utf-8", "replace"))
        reply = ProtoMessage()
        reply.ParseFromString(_recv(conn))
        new_context = ProtoContext()
        new_context.ParseFromString(_recv(conn))
    finally:
        conn.close()
    updated = context_from_proto(new_context)
    context.state = updated.state  # what the handler kept for the next message (FedBN's own layers)
    return message_from_proto(reply)


def check_socket_folder(path: Path) -> None:
    """The socket's folder must be this user's and closed to others: a socket there is a door to the node."""
    from ..shared.errors import PapmError

    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid():
        raise PapmError(f"socket folder {folder} belongs to another user; choose a folder of your own")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PapmError(f"socket folder {folder} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                        f"chmod 700 {folder} or choose another folder")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def serve(socket_path: str | Path, app=None, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Answer messages on ``socket_path`` until ``stop`` is set (or forever), one at a time, with ``app``
    (papm's ClientApp unless given)."""
    from ..shared.errors import PapmError

    path = Path(socket_path)
    if len(os.fsencode(str(path))) > 100:  # sun_path holds 108 bytes
        raise PapmError(f"socket path {path} is too long for a Unix socket ({len(os.fsencode(str(path)))} bytes > 100); "
                        "choose a shorter --socket")
    check_socket_folder(path)
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.lstat().st_mode)):
        raise PapmError(f"{path} exists and is not a socket; papm node replaces only a stale socket of its own: "
                        "choose another --socket path")
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise PapmError(f"a papm node worker already answers at {path}; stop it first or choose another --socket")
        except OSError:
            path.unlink()  # a stale socket of a worker that died
        finally:
            probe.close()
    if app is None:
        from .client_app import app  # torch, the handlers: loaded once, here
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))  # in a folder closed to other users (checked above), so no one else can reach it
    os.chmod(path, 0o600)  # and the socket itself is the owner's only (the umask is process-wide: left alone)
    server.listen(8)
    server.settimeout(0.5)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                if _peer_uid(conn) != os.getuid():
                    continue  # another user: no answer
                try:
                    _handle(conn, app)
                except (ConnectionError, OSError):
                    continue  # the ClientApp went away mid-message; the next one starts afresh
    finally:
        server.close()
        path.unlink(missing_ok=True)


def _handle(conn: socket.socket, app) -> None:
    msg, ctx = ProtoMessage(), ProtoContext()
    msg.ParseFromString(_recv(conn))
    ctx.ParseFromString(_recv(conn))
    context = context_from_proto(ctx)
    message = message_from_proto(msg)
    t0 = time.perf_counter()
    try:
        reply = app(message, context)
    except Exception as e:  # noqa: BLE001 - the handler's error goes back to the ClientApp, which raises it
        print(f"papm node: {message.metadata.message_type} failed: {type(e).__name__}: {e}", flush=True)
        conn.sendall(_ERROR)
        _send(conn, f"{type(e).__name__}: {e}".encode())
        return
    if reply.has_error():  # the node's data or config (a PapmError): its one line goes back as the reply
        print(f"papm node: {message.metadata.message_type} failed: {reply.error.reason}", flush=True)
    else:
        print(f"papm node: {message.metadata.message_type} answered in {time.perf_counter() - t0:.2f} s", flush=True)
    conn.sendall(_OK)
    _send(conn, message_to_proto(reply).SerializeToString())
    _send(conn, context_to_proto(context).SerializeToString())
