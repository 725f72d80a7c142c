"""Layer: cowd frontend for the kernel's own NBD client: a Disk becomes /dev/nbdN, served by
this process's NBD server (:mod:`cowd.frontends.nbd.server`) over a socketpair.

Theory of operation
-------------------
The kernel's nbd driver speaks only the transmission phase: whoever hands it a socket must
have negotiated already.  So :meth:`NbdDevice.connect` makes a socketpair, serves one end with
the daemon's :class:`~cowd.frontends.nbd.server.NbdServer` (the whole protocol, newstyle
handshake included), and plays the client on the other end with :class:`ClientHandshake`
(sans-I/O, like the server's codec): fixed newstyle, NO_ZEROES, one ``NBD_OPT_GO`` for the
export, whose ``NBD_INFO_EXPORT`` gives the size and the transmission flags.  No structured
replies are asked for: the kernel reads only simple replies.

Then the socket goes to the kernel through the ioctl interface of ``linux/nbd.h`` on a free
``/dev/nbdN``.  A free device has no ``/sys/block/nbdN/pid`` (no ``NBD_DO_IT`` running) and
size 0; the claim itself is ``NBD_SET_SOCK``, which the kernel refuses with EBUSY when another
task set the device up (or EINVAL for a device configured over netlink), so two claimers never
share a device: a refused claim moves on to the next one.  After the claim come
``NBD_SET_BLKSIZE`` (512), ``NBD_SET_SIZE``, ``NBD_SET_FLAGS``, the queue limits the
server's preallocated buffers are sized for (``max_sectors_kb`` and ``nr_requests`` in
sysfs, :data:`DEVICE_MAX_REQUEST_BYTES` and :data:`DEVICE_QUEUE_DEPTH`; the device's own
values come back at detach), and ``NBD_DO_IT`` in a thread of its own, with signals blocked
there (an interrupted DO_IT tears the device down): it
returns only when the device is disconnected.  The attach is done when sysfs shows the
device's pid file and size.

Detach: fsync the device (the kernel sends FLUSH, the Disk makes it durable),
``NBD_DISCONNECT`` (the kernel sends NBD_CMD_DISC; the server answers what is in flight and
ends the connection), wait for DO_IT to return, ``NBD_CLEAR_SOCK``, close the device.

Daemon death: the process's end of the socketpair closes with it, the kernel's receive fails,
DO_IT (in the dying process) returns and the last close of the device releases it.  If
something else still holds the device open (a mounted file system), the kernel keeps its
configuration, with the dead thread's pid in sysfs, until :func:`clear_stale` (run by the next
cleanup of the run dir) sends ``NBD_CLEAR_SOCK``; such a device is never picked again while
it is not free.

Flags: the kernel is given the server's transmission flags minus WRITE_ZEROES / FAST_ZERO: the
kernel may send write-zeroes longer than the export's maximum block size, which the server
refuses; without the flag it writes zero pages instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ...errors import CommandFailed
from . import wire as W

log = logging.getLogger("cowd.nbdattach")

# What serves the daemon's end of a device's socketpair: an NbdServer's ``handle``, or a
# hand-off of the connection to a worker process (cowd/workers/).
Serve = Callable[[trio.SocketStream], Awaitable[None]]

# linux/nbd.h: _IO(0xab, n)
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_SET_SIZE = 0xAB02
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A

# The device's logical block size.
BLOCK_BYTES = 512
# The device's queue limits, set at attach (the server's buffers are sized for them,
# .server's DEVICE_BUFFERS): the largest request (max_sectors_kb; the kernel's own default is
# 1280 KiB) and the requests in flight (nr_requests; the nbd driver's tag set has 128).
DEVICE_MAX_REQUEST_BYTES = 256 << 10
DEVICE_QUEUE_DEPTH = 32
# Transmission flags the kernel is given (see the module docstring for what is left out).
KERNEL_FLAGS = (W.NBD_FLAG_HAS_FLAGS | W.NBD_FLAG_READ_ONLY | W.NBD_FLAG_SEND_FLUSH
                | W.NBD_FLAG_SEND_FUA | W.NBD_FLAG_ROTATIONAL | W.NBD_FLAG_SEND_TRIM
                | W.NBD_FLAG_CAN_MULTI_CONN)
# The client's side of the handshake must be done this soon.
HANDSHAKE_TIMEOUT_S = 10.0
# Option replies the client accepts for its one NBD_OPT_GO (INFO replies, then ACK), and the
# largest reply payload it takes (NBD_INFO_DESCRIPTION carries at most NBD_MAX_STRING).
MAX_GO_REPLIES = 16
MAX_REPLY_PAYLOAD = W.NBD_MAX_STRING + 2
# After NBD_DO_IT starts, sysfs must show the connected device this soon.
CONNECT_TIMEOUT_S = 20.0
# After NBD_DISCONNECT, DO_IT must return this soon.
DISCONNECT_TIMEOUT_S = 30.0

_NBD_NAME = re.compile(r"nbd([0-9]+)")
_HANDSHAKE = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_INFO_EXPORT = struct.Struct(">HQH")


# ---- the client's half of the handshake (sans-I/O) ----------------------------------------------

class HandshakeError(Exception):
    """The server's handshake was not one we can hand to the kernel."""


@dataclass(frozen=True)
class Negotiated:
    size_bytes: int
    transmission_flags: int


class ClientHandshake:
    """Fixed-newstyle client negotiation of one export with NBD_OPT_GO.  Feed the server's
    bytes to :meth:`receive_data`; send what :meth:`data_to_send` returns; :attr:`result` is
    set when the server acknowledged GO (the connection is then in transmission)."""

    def __init__(self, export: str):
        self.export = export
        self._buf = bytearray()
        self._out = bytearray()
        self._state = "greeting"
        self._replies = 0
        self._info: Negotiated | None = None
        self.result: Negotiated | None = None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if not data:
            raise HandshakeError(f"nbd handshake: the server closed the connection "
                                 f"(state={self._state})")
        if self.result is not None:
            raise HandshakeError(f"nbd handshake: data after NBD_OPT_GO's ACK "
                                 f"(bytes={len(data)})")
        self._buf += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self._state == "greeting":
            if len(self._buf) < _HANDSHAKE.size:
                return False
            magic, opt_magic, flags = _HANDSHAKE.unpack_from(self._buf)
            del self._buf[:_HANDSHAKE.size]
            if magic != W.NBDMAGIC or opt_magic != W.IHAVEOPT:
                raise HandshakeError(f"nbd handshake: not a newstyle server "
                                     f"(magic={magic:#x}, option magic={opt_magic:#x})")
            if not flags & W.NBD_FLAG_FIXED_NEWSTYLE:
                raise HandshakeError(f"nbd handshake: the server is not fixed-newstyle "
                                     f"(flags={flags:#x})")
            client_flags = W.NBD_FLAG_C_FIXED_NEWSTYLE
            if flags & W.NBD_FLAG_NO_ZEROES:
                client_flags |= W.NBD_FLAG_C_NO_ZEROES
            name = self.export.encode("utf-8")
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            self._out += struct.pack(">I", client_flags)
            self._out += _OPTION.pack(W.IHAVEOPT, W.NBD_OPT_GO, len(data)) + data
            self._state = "go"
            return True
        if self._state != "go" or len(self._buf) < _OPTION_REPLY.size:
            return False
        magic, option, reply, length = _OPTION_REPLY.unpack_from(self._buf)
        if magic != W.NBD_REP_MAGIC or option != W.NBD_OPT_GO:
            raise HandshakeError(f"nbd handshake: bad option reply (magic={magic:#x}, "
                                 f"option={option})")
        if length > MAX_REPLY_PAYLOAD:
            raise HandshakeError(f"nbd handshake: option reply too long (length={length})")
        if len(self._buf) < _OPTION_REPLY.size + length:
            return False
        payload = bytes(self._buf[_OPTION_REPLY.size:_OPTION_REPLY.size + length])
        del self._buf[:_OPTION_REPLY.size + length]
        self._replies += 1
        if self._replies > MAX_GO_REPLIES:
            raise HandshakeError(f"nbd handshake: too many replies to NBD_OPT_GO "
                                 f"(replies={self._replies})")
        if reply & W.NBD_REP_FLAG_ERROR:
            why = payload.decode("utf-8", "replace")
            raise HandshakeError(f"nbd handshake: export {self.export!r} refused: "
                                 f"{why or 'no message'} (reply={reply:#x})")
        if reply == W.NBD_REP_INFO:
            if len(payload) >= 2 and struct.unpack_from(">H", payload)[0] == W.NBD_INFO_EXPORT:
                if len(payload) != _INFO_EXPORT.size:
                    raise HandshakeError(f"nbd handshake: NBD_INFO_EXPORT of the wrong "
                                         f"length (length={len(payload)})")
                _, size, tflags = _INFO_EXPORT.unpack(payload)
                self._info = Negotiated(size, tflags)
            return True
        if reply == W.NBD_REP_ACK:
            if self._info is None:
                raise HandshakeError("nbd handshake: NBD_OPT_GO acknowledged without "
                                     "NBD_INFO_EXPORT")
            if self._buf:
                raise HandshakeError(f"nbd handshake: data after NBD_OPT_GO's ACK "
                                     f"(bytes={len(self._buf)})")
            self.result = self._info
            self._state = "done"
            return False
        raise HandshakeError(f"nbd handshake: unexpected reply to NBD_OPT_GO (reply={reply})")


async def negotiate(stream: trio.SocketStream, export: str) -> Negotiated:
    """Run the client's handshake on ``stream``; a HandshakeError if it does not finish."""
    hs = ClientHandshake(export)
    with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
        while hs.result is None:
            hs.receive_data(await stream.receive_some(W.RECEIVE_CHUNK_BYTES))
            out = hs.data_to_send()
            if out:
                await stream.send_all(out)
        return hs.result
    raise HandshakeError(f"nbd handshake: not done within {HANDSHAKE_TIMEOUT_S:g} s")


# ---- devices ------------------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def device_index(device: str) -> int | None:
    """N for /dev/nbdN (symlinks resolved), else None."""
    m = _NBD_NAME.fullmatch(os.path.basename(os.path.realpath(device)))
    return int(m.group(1)) if m else None


def device_pid(index: int) -> int | None:
    """The pid (thread id) sysfs shows for a connected device, or None."""
    text = _read(f"/sys/block/nbd{index}/pid")
    return int(text) if text and text.isdigit() else None


def device_sectors(index: int) -> int:
    text = _read(f"/sys/block/nbd{index}/size")
    return int(text) if text and text.isdigit() else 0


def free_devices() -> list[int]:
    """Indexes of /dev/nbdN that look free (not connected, size 0), lowest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/sys/block"):
            m = _NBD_NAME.fullmatch(name)
            if m is None:
                continue
            n = int(m.group(1))
            if not os.path.exists(f"/sys/block/{name}/pid") and device_sectors(n) == 0 \
                    and os.path.exists(f"/dev/{name}"):
                found.append(n)
    return sorted(found)


def _queue_path(index: int, name: str) -> str:
    return f"/sys/block/nbd{index}/queue/{name}"


def set_queue_limits(index: int) -> dict[str, str]:
    """Bound what the kernel may have in flight on /dev/nbdN to what the serving connection
    preallocated (cowd/frontends/nbd/server.py): requests of at most
    DEVICE_MAX_REQUEST_BYTES, at most DEVICE_QUEUE_DEPTH of them.  Returns the values it
    replaced, for :func:`restore_queue_limits`.  A limit that cannot be set is logged; the
    server then allocates what does not fit, and counts it."""
    old: dict[str, str] = {}
    for name, value in (("max_sectors_kb", DEVICE_MAX_REQUEST_BYTES >> 10),
                        ("nr_requests", DEVICE_QUEUE_DEPTH)):
        path = _queue_path(index, name)
        before = _read(path)
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(f"{value}\n")
        except OSError as e:
            log.warning("%s: cannot set to %d (%s); requests beyond the preallocated buffers "
                        "will allocate memory", path, value, e.strerror)
            continue
        if before is not None and before != str(value):
            old[name] = before
    return old


def restore_queue_limits(index: int, old: dict[str, str]) -> None:
    for name, value in old.items():
        with contextlib.suppress(OSError), \
                open(_queue_path(index, name), "w", encoding="ascii") as f:
            f.write(value + "\n")


def _do_it(fd: int, outcome: list[int], tid: list[int]) -> None:
    # Blocks until the device is disconnected.  A signal would interrupt it (and tear the
    # device down), so none is delivered to this thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    tid.append(threading.get_native_id())
    try:
        fcntl.ioctl(fd, NBD_DO_IT)
        outcome.append(0)
    except OSError as e:
        outcome.append(e.errno or errno.EIO)


class NbdDevice:
    """One /dev/nbdN connected to one export of the daemon's NBD server."""

    def __init__(self, index: int, fd: int, size_bytes: int, flags: int):
        self.index = index
        self.device = f"/dev/nbd{index}"
        self.fd = fd
        self.size_bytes = size_bytes
        self.flags = flags
        self.outcome: list[int] = []  # DO_IT's errno (0: clean disconnect), once it returned
        self.tid: list[int] = []  # the DO_IT thread's id (what sysfs shows as the pid)
        self.done = trio.Event()
        self.thread: threading.Thread | None = None
        self.queue_limits_replaced: dict[str, str] = {}

    @classmethod
    async def connect(cls, nursery: trio.Nursery, serve: Serve, export: str) -> NbdDevice:
        """Serve ``export`` on a new socketpair (``serve``: an NbdServer's ``handle``, or a
        hand-off to a worker process), negotiate it, and give the client end to the first
        free /dev/nbdN.  A one-line UsageError if that fails."""
        ours, kernels = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            kernels.set_inheritable(False)
            server_stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            nursery.start_soon(serve, server_stream)
            client = trio.socket.from_stdlib_socket(kernels)
            try:
                got = await negotiate(trio.SocketStream(client), export)
            except (HandshakeError, trio.BrokenResourceError, OSError) as e:
                raise CommandFailed(f"--via nbd: {e}") from None
            kernels.setblocking(True)
            dev = await trio.to_thread.run_sync(cls._claim, kernels.fileno(), got)
        except BaseException:
            kernels.close()
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RDWR)  # the server task sees EOF and ends
            raise
        kernels.close()  # the kernel holds its own reference now
        try:
            await dev._start()
        except BaseException:
            with trio.CancelScope(shield=True):
                await dev.disconnect()
            raise
        return dev

    @classmethod
    def _claim(cls, sock_fd: int, got: Negotiated) -> NbdDevice:
        size = got.size_bytes - got.size_bytes % BLOCK_BYTES
        if size != got.size_bytes:
            log.warning("the disk's size is not a multiple of %d; the device shows %d of "
                        "its %d bytes", BLOCK_BYTES, size, got.size_bytes)
        flags = got.transmission_flags & KERNEL_FLAGS
        tried = []
        for index in free_devices():
            path = f"/dev/nbd{index}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                tried.append(f"nbd{index}: {e.strerror}")
                continue
            try:
                fcntl.ioctl(fd, NBD_SET_SOCK, sock_fd)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EBUSY, errno.EINVAL):  # someone else's
                    tried.append(f"nbd{index}: {e.strerror}")
                    continue
                raise CommandFailed(f"{path}: NBD_SET_SOCK failed: {e.strerror}") from None
            try:
                fcntl.ioctl(fd, NBD_SET_BLKSIZE, BLOCK_BYTES)
                fcntl.ioctl(fd, NBD_SET_SIZE, size)
                fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
            except OSError as e:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(fd, NBD_CLEAR_SOCK)
                os.close(fd)
                raise CommandFailed(f"{path}: setting up the device failed: {e.strerror} "
                                 f"(size={size}, flags={flags:#x})") from None
            dev = cls(index, fd, size, flags)
            dev.queue_limits_replaced = set_queue_limits(index)
            return dev
        raise CommandFailed("--via nbd: no free /dev/nbdN (" + ("; ".join(tried) or
                         "every device is connected; modprobe nbd nbds_max=N") + ")")

    async def _start(self) -> None:
        token = trio.lowlevel.current_trio_token()

        def run() -> None:
            try:
                _do_it(self.fd, self.outcome, self.tid)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(self.done.set)

        self.thread = threading.Thread(target=run, name=f"nbd{self.index}-do-it", daemon=True)
        self.thread.start()
        deadline = trio.current_time() + CONNECT_TIMEOUT_S
        while device_pid(self.index) is None or \
                device_sectors(self.index) * 512 != self.size_bytes:
            if self.done.is_set():
                err = self.outcome[0] if self.outcome else errno.EIO
                raise CommandFailed(f"{self.device}: NBD_DO_IT failed: {os.strerror(err)}")
            if trio.current_time() > deadline:
                raise CommandFailed(f"{self.device}: not connected {CONNECT_TIMEOUT_S:g} s after "
                                 f"NBD_DO_IT (size={self.size_bytes})")
            await trio.sleep(0.01)

    async def disconnect(self, timeout_s: float = DISCONNECT_TIMEOUT_S) -> None:
        """NBD_DISCONNECT, wait for DO_IT, NBD_CLEAR_SOCK, close.  Idempotent."""
        if self.fd < 0:
            return
        if self.thread is not None and not self.done.is_set():
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(fcntl.ioctl, self.fd, NBD_DISCONNECT)
            with trio.move_on_after(timeout_s):
                await self.done.wait()
            if not self.done.is_set():
                log.warning("%s: NBD_DO_IT still running %g s after NBD_DISCONNECT; "
                            "clearing the socket", self.device, timeout_s)
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(fcntl.ioctl, self.fd, NBD_CLEAR_SOCK)
        if self.thread is not None and not self.done.is_set():
            with trio.move_on_after(timeout_s):
                await self.done.wait()
        if self.done.is_set() or self.thread is None:
            os.close(self.fd)
            restore_queue_limits(self.index, self.queue_limits_replaced)
        else:
            log.error("%s: NBD_DO_IT never returned; leaving its descriptor open", self.device)
        self.fd = -1

    async def sync(self) -> None:
        """fsync the device: the kernel writes back its cache and sends FLUSH."""
        await trio.to_thread.run_sync(os.fsync, self.fd)

    def stats(self) -> dict[str, Any]:
        return {"index": self.index, "size_bytes": self.size_bytes, "flags": self.flags,
                "do_it_tid": self.tid[0] if self.tid else None,
                "max_sectors_kb": _read(_queue_path(self.index, "max_sectors_kb")),
                "nr_requests": _read(_queue_path(self.index, "nr_requests")),
                "connected": not self.done.is_set()}


def clear_stale(index: int, tid: int | None) -> str | None:
    """After a daemon died: NBD_CLEAR_SOCK on /dev/nbdN if it still shows the dead daemon's
    DO_IT thread (``tid``) as its pid, or no pid but a size (a half-torn-down device).
    Returns what was done, or None when the device is free or is someone else's."""
    pid = device_pid(index)
    if pid is not None and (pid != tid or os.path.exists(f"/proc/{pid}")):
        return None  # connected by a live process (a new owner, or not ours)
    if pid is None and device_sectors(index) == 0:
        return None  # released when the daemon died
    path = f"/dev/nbd{index}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"could not clear ({e.strerror}):"
    try:
        fcntl.ioctl(fd, NBD_CLEAR_SOCK)
    except OSError as e:
        return f"could not clear ({e.strerror}):"
    finally:
        os.close(fd)
    return "cleared"


def nbd_problem() -> str | None:
    """Why `--via nbd` cannot work here, or None (cowd loads no nbd module itself)."""
    if os.geteuid() != 0:
        return "the kernel's nbd client needs root"
    if not os.path.isdir("/sys/module/nbd"):
        modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/sbin:/usr/sbin")
        if modprobe is None:
            return "the kernel has no nbd driver (no /sys/module/nbd, no modprobe)"
        try:
            rc = subprocess.run([modprobe, "-n", "nbd"], capture_output=True, timeout=10,
                                stdin=subprocess.DEVNULL).returncode
        except (OSError, subprocess.TimeoutExpired):
            rc = 1
        if rc != 0:
            return "the kernel has no nbd driver (no /sys/module/nbd; modprobe -n nbd failed)"
        return "the nbd module is not loaded (modprobe nbd; cowd loads no modules)"
    if not os.path.exists("/dev/nbd0"):
        return "nbd is loaded but there is no /dev/nbd0 (nbds_max=0?)"
    return None


__all__ = [
    "ClientHandshake",
    "HandshakeError",
    "NbdDevice",
    "Negotiated",
    "clear_stale",
    "device_index",
    "free_devices",
    "nbd_problem",
    "negotiate",
]
