"""Layer: cowd workers — the trio adapter around :mod:`cowd.workers.wire`, used by both ends.

:class:`ChannelStream` reads the socketpair with ``recvmsg`` (so SCM_RIGHTS fds arrive with
their bytes), feeds the decoder and yields messages; outgoing messages are queued in order
and written by one writer task, many messages per ``send``.  Queueing never awaits, so a
caller can compute something and queue it in one synchronous step (the ordering rule of the
contract in :mod:`cowd.workers`).

:class:`Calls` matches replies to the requests that wait for them, by cookie.
"""

from __future__ import annotations

import array
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from . import wire as W

log = logging.getLogger("cowd.workers")

# One receive: big enough for a batch of small messages, or a good piece of a large one, and
# under the allocator's mmap threshold (cowd/process.py) so that its fresh buffer comes from
# the heap instead of an mmap, an mremap and a munmap per receive.
RECEIVE_BYTES = 256 << 10
# Ancillary space for the fds of one receive (several fd-carrying messages may arrive in one).
RECEIVE_FDS = 4 * W.MAX_FDS
# Bytes the writer sends per call at most (large replies go out in pieces of this size).
SEND_BYTES = 1 << 20


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, ctype, data in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[:len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class ChannelStream:
    """One end of a worker channel; see the module docstring."""

    def __init__(self, sock: trio.socket.SocketType, name: str):
        self.sock = sock
        self.name = name
        self._decoder = W.Decoder()
        # Outgoing, in order: (bytes, fds).  Runs of fd-less messages are joined on send.
        self._out: list[tuple[bytes | bytearray | memoryview, tuple[int, ...]]] = []
        self._out_bytes = 0
        self._wake = trio.Event()
        self.closed = False
        self.sent_messages = 0
        self.received_messages = 0

    def send(self, msg: W.Message) -> None:
        """Queue ``msg`` (fds it carries are sent, not closed: the caller still owns them
        until the writer is done; see :meth:`send_and_close`)."""
        raw, fds = W.encode(msg)
        self.send_raw(raw, fds)

    def send_raw(self, raw: bytes | bytearray | memoryview, fds: tuple[int, ...] = ()) -> None:
        if self.closed:
            return
        self._out.append((raw, fds))
        self._out_bytes += len(raw)
        self.sent_messages += 1
        self._wake.set()

    def queued_bytes(self) -> int:
        return self._out_bytes

    async def writer(self, close_after_send: set[int] | None = None) -> None:
        """Write the queue, in order, until the channel closes.  An fd in
        ``close_after_send`` is closed once the message carrying it is out."""
        while not self.closed:
            if not self._out:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch = self._out
            self._out = []
            self._out_bytes = 0
            i = 0
            while i < len(batch):
                raw, fds = batch[i]
                if fds:
                    try:
                        await self.sock.sendmsg(
                            [raw[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", fds).tobytes())])
                    except (trio.ClosedResourceError, ConnectionError, OSError):
                        self.closed = True
                        return
                    await self._send_all(memoryview(raw)[1:])
                    if close_after_send:
                        for fd in fds:
                            if fd in close_after_send:
                                close_after_send.discard(fd)
                                os.close(fd)
                    i += 1
                    continue
                j = i
                while j < len(batch) and not batch[j][1] and j - i < 256:
                    j += 1
                if j - i == 1:  # one message (a large one, often): no copy
                    await self._send_all(raw)
                else:
                    await self._send_all(b"".join(batch[k][0] for k in range(i, j)))
                i = j

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = await self.sock.send(view[:SEND_BYTES])
            except (trio.ClosedResourceError, ConnectionError, OSError):
                self.closed = True  # the reader sees the end too
                return
            view = view[n:]

    async def messages(self) -> AsyncIterator[W.Message]:
        """Messages as they arrive, until end of file (the other end is gone)."""
        space = socket.CMSG_SPACE(RECEIVE_FDS * array.array("i").itemsize)
        while True:
            msg = self._decoder.next_message()
            if not isinstance(msg, str):  # not NEED_DATA
                self.received_messages += 1
                yield msg
                continue
            try:
                data, ancdata, _flags, _addr = await self.sock.recvmsg(RECEIVE_BYTES, space)
            except trio.ClosedResourceError:
                return  # closed on this side
            except (ConnectionError, OSError) as e:
                log.debug("%s: channel closed: %s", self.name, e)
                return
            fds = _fds_of(ancdata)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            self._decoder.feed(data, fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        for fd in self._decoder.pending_fds():
            os.close(fd)
        self.sock.close()


class Calls:
    """Requests waiting for their REPLY (or STATS), by cookie."""

    def __init__(self) -> None:
        self._cookies = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}  # cookie -> [event, result]

    def new(self, on_complete: Callable[[Any], None] | None = None) -> int:
        """A cookie to wait on; ``on_complete(result)`` is called by :meth:`complete` itself,
        before any other message is read (for a caller whose result must be applied in
        channel order), never for a failure."""
        cookie = next(self._cookies)
        self._waiting[cookie] = [trio.Event(), None, on_complete]
        return cookie

    async def wait(self, cookie: int) -> Any:
        slot = self._waiting[cookie]
        try:
            await slot[0].wait()
        finally:
            self._waiting.pop(cookie, None)
        if isinstance(slot[1], BaseException):
            raise slot[1]
        return slot[1]

    def complete(self, cookie: int, result: Any) -> bool:
        slot = self._waiting.get(cookie)
        if slot is None:
            return False
        slot[1] = result
        if slot[2] is not None:
            slot[2](result)
        slot[0].set()
        return True

    def fail_all(self, error: BaseException) -> None:
        for slot in self._waiting.values():
            slot[1] = error
            slot[0].set()

    def __len__(self) -> int:
        return len(self._waiting)


__all__ = ["Calls", "ChannelStream"]
