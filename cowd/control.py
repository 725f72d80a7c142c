"""Layer: cowd frontends (the control channel).  The daemon's control socket: one JSON object
per line each way, a request ``{"cmd": NAME, ...}`` and a reply ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}`` (with ``"unavailable": true`` when the daemon is shutting
down and the client should start another).  Used by ``cowd stats``, ``attach``, ``detach``,
``list`` and the CLI's ``ping`` (a daemon binds the socket only when it is ready, so any
answer means ready).

A handler's deliberate errors (cowd's and the format library's, OSError) become the error
reply; anything else is logged with its traceback and answered as an internal error, so a bug
in one request cannot take down a daemon that serves disks.

Bounds: a request line longer than MAX_LINE_BYTES drops the connection; a client that sends
nothing for IDLE_TIMEOUT_S is dropped, so idle connections cannot pile up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .errors import CommandFailed, CowdError, RequestError, UsageError

if TYPE_CHECKING:  # the client side (request) needs neither trio nor the format library
    import trio

log = logging.getLogger("cowd.control")

MAX_LINE_BYTES = 64 << 10  # requests are tiny; this only stops a runaway client
IDLE_TIMEOUT_S = 30.0
DEFAULT_RUN_DIR = "/run/cowd"

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class DaemonUnavailable(CommandFailed):
    """No daemon answers (no socket, nobody listening, or it is shutting down)."""


def control_path(run_dir: str) -> str:
    return os.path.join(run_dir, "control.sock")


async def _read_line(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            return line
        if len(buf) > MAX_LINE_BYTES:
            return None
        chunk = await stream.receive_some(MAX_LINE_BYTES)
        if not chunk:
            return None
        buf += chunk


async def serve_control(listener: trio.SocketListener, handlers: dict[str, Handler],
                        *, task_status: trio.TaskStatus[None] | None = None) -> None:
    import trio

    async def one(stream: trio.SocketStream) -> None:
        buf = bytearray()
        async with stream:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT_S):
                    line = await _read_line(stream, buf)
                    break
            else:
                return
            if line is None:
                return
            reply = await _dispatch(line, handlers)
            with trio.CancelScope(shield=True):
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except trio.BrokenResourceError:
                    pass

    if task_status is not None:
        task_status.started()
    await trio.serve_listeners(one, [listener])


async def _dispatch(line: bytes, handlers: dict[str, Handler]) -> dict[str, Any]:
    from formats.errors import FormatError

    try:
        req = json.loads(line)
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise ValueError("request must be an object with a 'cmd' string")
    except ValueError as e:
        return {"ok": False, "error": f"bad request: {e}"}
    handler = handlers.get(req["cmd"])
    if handler is None:
        return {"ok": False, "error": f"unknown command {req['cmd']!r}"}
    try:
        return {"ok": True, **await handler(req)}
    except DaemonUnavailable as e:
        return {"ok": False, "error": str(e), "unavailable": True}
    except UsageError as e:  # the client exits 2 for it, as for its own usage errors
        return {"ok": False, "error": str(e), "usage": True}
    except (CowdError, FormatError, OSError) as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:
        log.exception("control: %r failed", req["cmd"])
        return {"ok": False, "error": f"internal error in the daemon (see its log): {e!r}"}


def clear_stale_socket(path: str) -> None:
    """Make room for a unix socket at ``path``: refuse if a live daemon owns it, remove a
    stale one left by a dead daemon.  The folder must exist (cowd creates no folder on a
    socket's path: a typo would otherwise become a new directory tree)."""
    if os.path.exists(path):
        if _is_alive(path):
            raise CommandFailed(f"{path}: a daemon is already listening here")
        os.unlink(path)


async def open_control_listener(path: str) -> trio.SocketListener:
    """Bind the control socket (call clear_stale_socket first)."""
    import trio

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.SocketListener(sock)


def _is_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(path: str, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """Blocking client (the CLI's side): one request, one reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise DaemonUnavailable(f"{path}: no cowd daemon is running (control socket "
                                    "absent)") from None
        except ConnectionRefusedError:
            raise DaemonUnavailable(f"{path}: no cowd daemon is running (nothing listens "
                                    "on the control socket)") from None
        buf = bytearray()
        try:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            while b"\n" not in buf:
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise DaemonUnavailable(f"{path}: daemon closed the control connection")
                buf += chunk
                if len(buf) > 64 * MAX_LINE_BYTES:
                    raise CommandFailed(f"{path}: reply too long")
        except (BrokenPipeError, ConnectionResetError):
            raise DaemonUnavailable(f"{path}: daemon closed the control connection") from None
        except TimeoutError:
            raise CommandFailed(f"{path}: the daemon did not answer {cmd!r} within "
                             f"{timeout:g} s") from None
    finally:
        s.close()
    reply: dict[str, Any] = json.loads(buf[: buf.index(b"\n")])
    if not reply.get("ok"):
        if reply.get("unavailable"):
            raise DaemonUnavailable(str(reply.get("error", "daemon unavailable")))
        if reply.get("usage"):
            raise UsageError(str(reply.get("error", "bad request")))
        raise RequestError(0, str(reply.get("error", "unknown error")))
    return reply
