"""Layer: cowd workers — the worker process: ``python -m cowd.workers.worker --channel FD``.

It serves the NBD connections the control plane hands it, with the NBD server the daemon
itself uses, over :class:`~cowd.workers.mapped.MappedDisk` s (one per disk the control plane
describes).  One task reads the channel and applies what arrives — disks, connections, remaps,
invalidations, replies — in order; one task writes it.  See :mod:`cowd.workers` for the
contract.

Lifetime: the worker ends at end of file on its channel (the control plane is gone, killed or
not: the kernel closes its end, and nothing more can be answered) or on STOP (it stops taking
connections, drains them for the time STOP allows, then exits 0).  Not PR_SET_PDEATHSIG:
that signal follows the *thread* that forked, and trio starts processes from a worker thread
that exits when idle, which killed every worker ten seconds after it was started.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio

from ..frontends.fuse.protocol import FuseOptions
from ..frontends.nbd.server import MAX_CONNECTIONS, NbdServer
from ..frontends.nbd.tls import TlsConfig
from ..process import settle_allocator
from . import wire as W
from .channel import Calls, ChannelStream
from .fuse import WorkerFuseSession
from .mapped import MappedDisk

log = logging.getLogger("cowd.worker")

# How long a STOP lets the connections drain.
STOP_DRAIN_S = 10.0


class PlaneClient:
    """The worker's :class:`~cowd.workers.mapped.ControlPlane`: requests over the channel,
    replies matched by cookie."""

    def __init__(self, chan: ChannelStream):
        self.chan = chan
        self.calls = Calls()
        self.nursery: trio.Nursery | None = None  # the worker's, once it runs

    def background(self, task: Callable[[], Awaitable[None]]) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(task)

    async def miss(self, disk_id: int, guest_offset: int, length: int) -> W.Reply:
        cookie = self.calls.new()
        self.chan.send(W.Miss(cookie, disk_id, guest_offset, length))
        reply: W.Reply = await self.calls.wait(cookie)
        return reply

    async def request(self, disk_id: int, op: W.Op, flags: int, guest_offset: int,
                      length: int, data: bytes | bytearray | memoryview = b"",
                      on_reply: Callable[[W.Reply], None] | None = None) -> W.Reply:
        cookie = self.calls.new(on_reply)
        self.chan.send(W.Request(cookie, disk_id, op, flags, guest_offset, length, data))
        reply: W.Reply = await self.calls.wait(cookie)
        return reply

    async def fuse(self, raw: bytes) -> bytes | None:
        """The daemon's reply to a FUSE namespace request (None: the kernel wants none)."""
        cookie = self.calls.new()
        self.chan.send(W.FuseForward(cookie, raw))
        reply: W.Reply = await self.calls.wait(cookie)
        return bytes(reply.data) or None


class Worker:
    def __init__(self, chan: ChannelStream, index: int, max_connections: int,
                 tls: TlsConfig | None = None):
        self.chan = chan
        self.index = index
        self.plane = PlaneClient(chan)
        self.by_id: dict[int, MappedDisk] = {}
        # What a connection of each scope may open (W.SCOPE_SERVE: `cowd serve`'s exports,
        # over its TLS; W.SCOPE_DEVICE: a --via nbd device's socketpair), served by an NBD
        # server of its own, as the daemon's two are.
        self.exports: dict[str, dict[str, MappedDisk]] = {s: {} for s in W.SCOPES}
        self.nbd = {W.SCOPE_SERVE: NbdServer(self.exports[W.SCOPE_SERVE], tls,
                                             max_connections=max_connections),
                    W.SCOPE_DEVICE: NbdServer(self.exports[W.SCOPE_DEVICE],
                                              max_connections=max_connections, device=True)}
        self.by_ino: dict[int, MappedDisk] = {}  # the FUSE mount's files
        self.fuse: list[WorkerFuseSession] = []
        self.started = time.monotonic()
        self.connections = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.chan.writer)
            self.plane.nursery = nursery
            try:
                await self._read(nursery)
            finally:
                # Cancel first: a task waiting on the control plane (a FUSE namespace request,
                # a miss) then ends cancelled, not with an error that the nursery would raise
                # as this worker's traceback; its request dies with the worker's descriptors.
                nursery.cancel_scope.cancel()
                self.plane.calls.fail_all(ConnectionError("the control plane is gone"))

    async def _read(self, nursery: trio.Nursery) -> None:
        async for msg in self.chan.messages():
            if isinstance(msg, W.Remaps):
                disk = self.by_id.get(msg.disk_id)
                if disk is not None:
                    disk.install(msg.runs)
            elif isinstance(msg, W.Reply):
                self.plane.calls.complete(msg.cookie, msg)
            elif isinstance(msg, W.Adopted):
                disk = self.by_id.get(msg.disk_id)
                if disk is not None:
                    disk.apply_adopted(msg.runs)
                if msg.ack:
                    self.chan.send(W.Invalidated(msg.cookie))
            elif isinstance(msg, W.Invalidate):
                disk = self.by_id.get(msg.disk_id)
                if disk is not None:
                    disk.invalidate(msg.guest_offset, msg.length)
                if msg.ack:
                    self.chan.send(W.Invalidated(msg.cookie))
            elif isinstance(msg, W.Connection):
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(
                    socket.socket(fileno=msg.fds[0])))
                nursery.start_soon(self._serve, stream, msg.scope)
            elif isinstance(msg, W.FuseSession):
                options = FuseOptions(**msg.options)
                session = WorkerFuseSession(msg.fds[0], options, self.by_ino, self.plane.fuse)
                self.fuse.append(session)
                await nursery.start(session._serve)
                if options.uring_workers:  # over io_uring: entries of its own (ring.py)
                    nursery.start_soon(session.serve_ring, self.index)
            elif isinstance(msg, W.DiskSpec):
                self._add_disk(msg)
            elif isinstance(msg, W.DiskGone):
                self._remove_disk(msg.disk_id)
            elif isinstance(msg, W.DiskState):
                disk = self.by_id.get(msg.disk_id)
                if disk is not None and msg.readonly:
                    disk.make_readonly(msg.reason)
            elif isinstance(msg, W.Reclaim):
                disk = self.by_id.get(msg.disk_id)
                self.chan.send(W.Reclaimed(msg.cookie, tuple(disk.reclaim() if disk else ())))
            elif isinstance(msg, W.StatsQuery):
                self.chan.send(W.Stats(msg.cookie, self.stats()))
            elif isinstance(msg, W.Stop):
                nursery.start_soon(self._stop)
            else:
                raise W.ChannelError(f"worker {self.index}: unexpected message {msg!r}")

    def _add_disk(self, spec: W.DiskSpec) -> None:
        old = self.by_id.get(spec.disk_id)
        if old is not None:
            self._remove_disk(spec.disk_id)
        disk = MappedDisk(spec, self.plane)
        self.by_id[spec.disk_id] = disk
        self.exports[spec.scope][spec.name] = disk
        if spec.fuse_ino:
            self.by_ino[spec.fuse_ino] = disk
            for session in self.fuse:
                session.file_added()

    def _remove_disk(self, disk_id: int) -> None:
        disk = self.by_id.pop(disk_id, None)
        if disk is None:
            return
        for exports in self.exports.values():
            if exports.get(disk.name) is disk:
                del exports[disk.name]
        for ino in [i for i, d in self.by_ino.items() if d is disk]:
            del self.by_ino[ino]
        disk.closed = True
        disk.clear()
        for fd in disk._fds:
            os.close(fd)

    async def _serve(self, stream: trio.SocketStream, scope: str) -> None:
        self.connections += 1
        try:
            await self.nbd[scope].handle(stream)
        finally:
            self.connections -= 1

    async def _stop(self) -> None:
        for server in self.nbd.values():
            await server.shutdown(STOP_DRAIN_S)
        self.chan.close()

    def stats(self) -> dict[str, object]:
        return {"index": self.index, "pid": os.getpid(), "connections": self.connections,
                "uptime_s": round(time.monotonic() - self.started, 3),
                "channel": {"sent": self.chan.sent_messages,
                            "received": self.chan.received_messages},
                "nbd": _summed(s.counters for s in self.nbd.values()),
                "fuse": _summed([*(f.counters for f in self.fuse),
                                 *(f.ring.counters for f in self.fuse if f.ring is not None)]),
                "fuse_ring": [f.ring.stats() for f in self.fuse if f.ring is not None],
                # Its sessions on the FUSE mount, and whether all their buffers are locked.
                "fuse_sessions": len(self.fuse),
                "fuse_buffers_locked": all(f.buffers_locked for f in self.fuse),
                "disks": {str(i): d.stats() for i, d in self.by_id.items()}}


def _summed(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cowd-worker", description="a cowd data-path worker "
                                 "(started by the daemon; not for direct use)")
    ap.add_argument("--channel", type=int, required=True, help="fd of the channel socket")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                    help="connections served at once (its share of the daemon's bound)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--tls-config", default=None,
                    help="the daemon's TLS configuration (base64 of its pickle: paths only)")
    args = ap.parse_args(argv)
    settle_allocator()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"cowd worker {args.index}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the control plane decides when we stop

    async def run() -> None:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=args.channel))
        chan = ChannelStream(sock, f"worker {args.index}")
        try:
            tls = pickle.loads(base64.b64decode(args.tls_config)) if args.tls_config else None
            await Worker(chan, args.index, args.max_connections, tls).run()
        finally:
            chan.close()

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
