"""Layer: cowd workers — a worker's share of the FUSE mount: :class:`WorkerFuseSession`.

The daemon mounts the directory, completes INIT and owns the namespace (which files exist,
their handles).  It then gives each worker a clone of the mount's descriptor
(``FUSE_DEV_IOC_CLONE``): the kernel hands a request to whichever descriptor reads first and
takes its reply there.  A worker serves what it reads with the daemon's own request loop
(:class:`~cowd.frontends.fuse.session.FuseSession`): data requests (READ, WRITE, FSYNC,
FALLOCATE, LSEEK, SYNCFS) against the :class:`~cowd.workers.mapped.MappedDisk` of the file's
inode — the FUSE request names it, so no handle table is needed here — and every other
request it passes to the daemon whole, as read (FUSE_FORWARD), writing back the reply the
daemon computes.  Open handles, lookups and INIT thus stay the daemon's alone.
Where the mount is served over io_uring (cowd/frontends/fuse/ring.py) the kernel sends a
clone only what the ring does not carry (FORGET, interrupts); the worker then also registers
ring queues of its own (:meth:`WorkerFuseSession.serve_ring`: the options it is given with
the clone say how many workers share the queues) on an io_uring of its own, against its
clone, and serves the requests taken from them with the same handlers: data requests
itself, namespace requests forwarded to the daemon.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from ..disk.api import BlockDisk
from ..frontends.fuse.protocol import Fail, FuseOptions, Request
from ..frontends.fuse.ring import (
    WORKER_DEPTH_FACTOR,
    FuseRing,
    ring_queue_count,
    worker_queues,
)
from ..frontends.fuse.session import FuseSession
from ..frontends.fuse.uring import UringError
from .mapped import MappedDisk

log = logging.getLogger("cowd.worker")

# How long a data request for an inode this worker has not been told of waits for it.
NEW_FILE_WAIT_S = 10.0

# Asks the daemon to answer a namespace request (its raw bytes); the reply's bytes, or None.
Forward = Callable[[bytes], Awaitable[bytes | None]]


class WorkerFuseSession(FuseSession):
    """One clone of the FUSE mount's descriptor in a worker; see the module docstring."""

    def __init__(self, fd: int, options: FuseOptions, by_ino: dict[int, MappedDisk],
                 forward: Forward):
        super().__init__(options)
        self.fd = fd
        self.by_ino = by_ino  # the worker's FUSE files by inode (it keeps them current)
        self._forward = forward
        self.files_changed = trio.Event()  # set (and renewed) when by_ino gains a file
        self.ring: FuseRing | None = None  # the ring queues this worker serves, if any

    async def serve_ring(self, index: int) -> None:
        """Register ring entries for worker ``index``'s queues (worker_queues) on this clone
        and serve them until the connection ends (or the worker stops).  The daemon has
        accepted the kernel's FUSE_OVER_IO_URING offer and counts on these queues: a failure
        is logged (a failed registration makes the kernel go back to /dev/fuse for the whole
        connection)."""
        qids: list[int] = []
        try:
            qids = worker_queues(ring_queue_count(), self.options.uring_workers, index)
            if not qids:
                return
            ring = FuseRing.create(self, self.options, qids, WORKER_DEPTH_FACTOR)
        except (OSError, ValueError) as e:
            log.error("fuse: cannot set up an io_uring for ring queues %s: %s (the mount "
                      "waits for them)", qids, e)
            return
        self.ring = ring
        try:
            ring.register(self.fd)
            log.debug("fuse: serving ring queues %s (%d entries each)", qids, ring.depth)
            async with trio.open_nursery() as nursery:
                ring.start(nursery)
        except UringError as e:
            log.error("fuse: registering ring queues %s failed: %s (the kernel serves the "
                      "mount through /dev/fuse reads from now on)", qids, e.strerror)
        finally:
            if ring.ring.fd >= 0:
                trio.lowlevel.notify_closing(ring.ring.fd)
            ring.close()

    async def namespace(self, req: Request, raw: memoryview) -> bytes | bytearray | None:
        return await self._forward(bytes(raw))

    async def target(self, req: Request, fh: int) -> tuple[BlockDisk, object]:
        disk = self.by_ino.get(req.nodeid)
        if disk is None:
            # The daemon describes a FUSE file to every worker before the file can be
            # opened, but this worker's channel may not have delivered it yet when a request
            # for it arrives on the device: wait for it, a bounded while.
            with trio.move_on_after(NEW_FILE_WAIT_S):
                while (disk := self.by_ino.get(req.nodeid)) is None:
                    await self.files_changed.wait()
        if disk is None:
            raise Fail(errno.EBADF)
        got = _open(disk)
        await trio.lowlevel.checkpoint_if_cancelled()
        return got

    def target_now(self, req: Request, fh: int) -> tuple[BlockDisk, object] | None:
        disk = self.by_ino.get(req.nodeid)
        return None if disk is None else _open(disk)  # None: not described yet, target waits

    def file_added(self) -> None:
        self.files_changed.set()
        self.files_changed = trio.Event()

    def all_disks(self) -> Iterable[BlockDisk]:
        return list(self.by_ino.values())


def _open(disk: MappedDisk) -> tuple[BlockDisk, object]:
    """A data request's target, if the disk is still served (no release token is needed)."""
    if disk.closed:
        raise Fail(errno.EIO)
    return disk, None


__all__ = ["WorkerFuseSession"]
