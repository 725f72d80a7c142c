"""Layer: cowd frontends (fuse), the trio adapter: :class:`FuseFrontend` mounts the directory
and serves its ``/dev/fuse`` descriptor (the request loop is :class:`~.session.FuseSession`),
answering namespace requests with the codec (:class:`~.protocol.FuseFs`) and data requests
with the Disks; :func:`mount_fuse` builds it on the caller's nursery and exit stack.

Invariants: nothing in the trio thread touches the mounted files (the thread that would have
to answer is the one that would block); teardown unmounts only the mount this object made.

Theory of operation
-------------------
The request loop and its workers are :mod:`.session`'s (its docstring says how they read
and answer).

Lifetime: :func:`mount_fuse` opens ``/dev/fuse``, mounts (``mount(2)`` as root, otherwise
``fusermount3``), starts the workers in the caller's nursery, waits for the kernel's INIT and
registers :meth:`FuseFrontend.close` on the caller's exit stack.  FUSE over io_uring
(.ring): before the mount it makes the ring and its entries (so INIT may accept the kernel's
FUSE_OVER_IO_URING offer, unless ``FuseOptions.io_uring`` is off); after INIT it registers
them and serves them beside the ``read(2)`` workers (only the queues no worker process takes:
``FuseOptions.uring_workers``, .ring), or records why not
(``uring_reason``: the kernel lacks it, ``enable_uring`` is N, io_uring refused) for the log
and ``cowd stats``.  Teardown unmounts only the
mount this object made (the mount's source names this process and a random token, and is
checked in /proc/self/mountinfo first), lazily (MNT_DETACH, as libfuse does), waits up to
``DRAIN_TIMEOUT_S`` for the kernel to end the connection (it does when the last open file —
a loop device's — is closed), then stops the workers and closes the device, which aborts
whatever is still connected.  Nothing in the trio thread may touch the mounted files: the
thread that would have to answer is the one that would block.

Mount options (the measurements are in docs/fuse-options.md, ``python -m tools.bench fuse``
makes them again): requests of 1 MiB (the kernel's max_pages limit: a sequential read gets
far more done per request and per wakeup than with 128 KiB); ``direct_io``, because the
image files are already in the host's page cache and a second cached copy in the FUSE
file's cache would only cost memory; parallel direct writes, so concurrent writers need not
queue on the inode lock; max_background 64, above a loop device's usual queue depth; no
writeback cache (no gain for a loop device, whose I/O is direct, and it breaks the fixed
size: the kernel owns i_size under it, so a write past the end would be acknowledged into
the page cache and fail only at write-back).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import trio

from ...disk import Disk
from ...disk.api import BlockDisk
from ...errors import CommandFailed
from .mount import (
    MNT_DETACH,
    UMOUNT_NOFOLLOW,
    libc,
    mount_fusermount,
    mount_syscall,
    mounts_at,
)
from .protocol import (
    FUSE_INIT,
    FUSE_NOTIFY_INVAL_ENTRY,
    FUSE_ROOT_ID,
    INIT_TIMEOUT_S,
    NOTIFY_INVAL_ENTRY_OUT,
    OUT_HEADER,
    FuseFs,
    FuseOptions,
    Node,
    Request,
)
from .ring import FuseRing, daemon_queues, enable_uring_state, ring_queue_count
from .session import FuseSession
from .uring import UringError

log = logging.getLogger("cowd.fuse")

# Teardown waits this long for open files (a loop device) to be closed before it aborts.
DRAIN_TIMEOUT_S = 10.0


# ---- the trio adapter ----------------------------------------------------------------------


class FuseFrontend(FuseSession):
    """The mounted directory; see the module docstring.  Build it with :func:`mount_fuse`."""

    def __init__(self, mountpoint: str, options: FuseOptions):
        super().__init__(options)
        self.mountpoint = os.path.abspath(mountpoint)
        self.fs = FuseFs(options)
        # The mount's source names this process and a random token, so teardown can tell
        # our mount from anything mounted on the same directory later.
        self.source = f"cowd-{os.getpid()}-{secrets.token_hex(4)}"
        self.mounted = False
        self._fusermount = False
        self._initialized = trio.Event()
        self._drained = trio.Condition()
        self._closed = False
        self.ring: FuseRing | None = None
        # Why requests are read from /dev/fuse rather than taken from an io_uring ("" while
        # the ring serves; set when the mount is made).
        self.uring_reason = "not mounted yet"

    # -- public ---------------------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def add_disk(self, name: str, disk: BlockDisk) -> str:
        """Serve ``disk`` as file ``name`` in the mount; returns its path."""
        self.fs.add(name, disk)
        return self.path_of(name)

    async def remove_disk(self, name: str, force: bool = False) -> None:
        """Stop serving ``name``: refused while the file is open unless ``force`` (then its
        handles fail with EIO).  Returns once no request on it is in flight; the caller still
        owns the Disk and closes it."""
        node = self.fs.remove(name, force)
        if self.mounted and self.fs.negotiated is not None:
            # The kernel may have the name cached; the notification can block while a lookup
            # in the root is pending, which only this thread can answer: send it from a worker.
            with trio.move_on_after(DRAIN_TIMEOUT_S):
                await trio.to_thread.run_sync(self._notify_inval_entry, node.name,
                                              abandon_on_cancel=True)
        async with self._drained:
            while node.inflight:
                await self._drained.wait()

    @property
    def names(self) -> list[str]:
        return list(self.fs.by_name)

    def stats(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "files": {n.name: {"inode": n.ino, "open_handles": n.handles}
                      for n in self.fs.nodes.values()},
            "workers": self._workers,
            "buffers_locked": self.buffers_locked,
            **self.counters,
            "io_uring": {"active": self.ring is not None, "reason": self.uring_reason,
                         **({"uring_workers": self.options.uring_workers, **self.ring.stats()}
                            if self.ring is not None else {})},
        }

    async def shutdown(self, deadline_s: float = DRAIN_TIMEOUT_S) -> None:
        """Unmount (lazily) and wait up to ``deadline_s`` for the kernel to end the
        connection, which it does when no file in the mount is open any more."""
        await self._unmount()
        with trio.move_on_after(deadline_s):
            await self._ended.wait()

    async def close(self) -> None:
        """Unmount, drain (bounded), stop the workers and close the device.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.CancelScope(shield=True):
                await self.shutdown(DRAIN_TIMEOUT_S)
                if not self._ended.is_set():
                    busy = [n.name for n in self.fs.nodes.values() if n.handles]
                    log.warning("fuse: %s: files still open after %g s, aborting the "
                                "connection (open: %s)", self.mountpoint, DRAIN_TIMEOUT_S,
                                ", ".join(busy) or "-")
        finally:
            if self._scope is not None:
                self._scope.cancel()
            if self.fd >= 0 and self._workers == 0:
                self._close_fd()

    # -- mount and unmount --------------------------------------------------------------------

    async def _mount(self) -> None:
        o = self.options
        opts = f"default_permissions,max_read={o.max_read_bytes}"
        if o.allow_other:
            opts += ",allow_other"
        use_fm = o.use_fusermount if o.use_fusermount is not None else os.geteuid() != 0
        if not await trio.Path(self.mountpoint).is_dir():
            raise CommandFailed(f"{self.mountpoint}: mount point is not a directory")
        if use_fm:
            self.fd = await mount_fusermount(self.mountpoint, self.source, opts)
            self._fusermount = True
        else:
            try:
                self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise CommandFailed(f"/dev/fuse: cannot open: {e.strerror}") from None
            try:
                await mount_syscall(self.fd, self.mountpoint, self.source, opts)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise
        os.set_blocking(self.fd, False)
        self.mounted = True

    def _ours_on_top(self) -> bool:
        mounts = mounts_at(self.mountpoint)
        return bool(mounts) and mounts[-1] == ("fuse.cowd", self.source)

    async def _unmount(self) -> None:
        if not self.mounted:
            await trio.lowlevel.checkpoint()
            return
        self.mounted = False
        if not self._ours_on_top():
            if any(m == ("fuse.cowd", self.source) for m in mounts_at(self.mountpoint)):
                log.warning("fuse: %s: another mount sits on ours; not unmounting it",
                            self.mountpoint)
            await trio.lowlevel.checkpoint()
            return
        if self._fusermount:
            exe = shutil.which("fusermount3") or "fusermount3"
            p = await trio.run_process([exe, "-u", "-z", "--", self.mountpoint], check=False,
                                       capture_stderr=True)
            if p.returncode != 0:
                log.warning("fuse: fusermount3 -u %s: %s", self.mountpoint,
                            p.stderr.decode(errors="replace").strip())
            return
        await trio.lowlevel.checkpoint()
        if libc().umount2(os.fsencode(self.mountpoint), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            log.warning("fuse: cannot unmount %s: %s", self.mountpoint, os.strerror(e))

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self._close_ring()

    def _close_ring(self) -> None:
        ring, self.ring = self.ring, None
        if ring is not None:
            if ring.ring.fd >= 0:
                trio.lowlevel.notify_closing(ring.ring.fd)
            ring.close()

    # -- io_uring ---------------------------------------------------------------------------------

    def _prepare_ring(self) -> None:
        """Before INIT: make the ring and its entries, so INIT can accept the kernel's
        FUSE_OVER_IO_URING offer knowing they exist."""
        if not self.options.io_uring:
            self.uring_reason = "off (--fuse-io-uring=auto to use it)"
            return
        try:
            qids = daemon_queues(ring_queue_count(), self.options.uring_workers)
            self.ring = FuseRing.create(self, self.options, qids)
        except (OSError, ValueError) as e:
            self.uring_reason = f"cannot set up an io_uring: {e}"
            return
        self.fs.uring_ready = True

    def _start_ring(self) -> None:
        """After INIT: register the ring's entries and serve them, or say why not (and then
        no worker process may register queues either: ``uring_workers`` is cleared in the
        options the workers are given with the mount's descriptor)."""
        neg = self.fs.negotiated
        ring = self.ring
        if ring is None:
            pass
        elif neg is None or not neg.io_uring:
            self._close_ring()
            param = enable_uring_state()
            if param is None:
                self.uring_reason = ("this kernel has no FUSE-over-io_uring (Linux 6.14 or "
                                     "later built with CONFIG_FUSE_IO_URING has it)")
            elif param != "Y":
                self.uring_reason = f"the fuse module's enable_uring is {param}"
            else:
                self.uring_reason = "the kernel did not offer FUSE_OVER_IO_URING at INIT"
        else:
            assert self._nursery is not None
            try:
                ring.register(self.fd)
            except UringError as e:
                # The kernel turns the ring off for this connection and goes on with
                # /dev/fuse; our entries that did register are cancelled by the close.
                self._close_ring()
                self.uring_reason = f"registering the ring failed: {e.strerror}"
            else:
                ring.start(self._nursery)
                self.uring_reason = ""
                log.info("fuse: %s: serving over io_uring (%d queues of %d entries; the "
                         "daemon's: %s, the rest its %d worker processes)",
                         self.mountpoint, ring.queues, ring.depth,
                         ",".join(map(str, ring.qids)) or "none", self.options.uring_workers)
                return
        self.options = dataclasses.replace(self.options, uring_workers=0)
        log.info("fuse: %s: serving through /dev/fuse reads: %s", self.mountpoint,
                 self.uring_reason)

    def _notify_inval_entry(self, name: str) -> None:
        raw = os.fsencode(name)
        body = NOTIFY_INVAL_ENTRY_OUT.pack(FUSE_ROOT_ID, len(raw), 0) + raw + b"\0"
        msg = OUT_HEADER.pack(OUT_HEADER.size + len(body), FUSE_NOTIFY_INVAL_ENTRY, 0) + body
        fd = self.fd
        if fd < 0:
            return
        try:
            os.write(fd, msg)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("fuse: invalidating %s: %s", name, e.strerror)

    # -- the session's questions (see FuseSession) ----------------------------------------------

    def negotiated(self) -> bool:
        return self.fs.negotiated is not None

    async def namespace(self, req: Request, raw: memoryview) -> bytes | bytearray | None:
        reply = self.fs.handle(req)
        if req.opcode == FUSE_INIT and self.fs.negotiated is not None:
            self._initialized.set()
        await trio.lowlevel.checkpoint_if_cancelled()
        return reply

    async def target(self, req: Request, fh: int) -> tuple[BlockDisk, object]:
        got = self.target_now(req, fh)
        await trio.lowlevel.checkpoint_if_cancelled()
        return got

    async def release(self, token: object) -> None:
        if self._last_of_removed(token):
            await self._notify_drained()

    def target_now(self, req: Request, fh: int) -> tuple[BlockDisk, object]:
        node, _h = self.fs.node_of(fh)
        node.inflight += 1
        return node.disk, node

    def release_now(self, token: object) -> None:
        if self._last_of_removed(token) and self._nursery is not None:
            self._nursery.start_soon(self._notify_drained)

    @staticmethod
    def _last_of_removed(token: object) -> bool:
        """Count a request on the node ``token`` done: True if it was the last one of a
        removed node (its removal waits for that)."""
        assert isinstance(token, Node)
        token.inflight -= 1
        return token.removed and token.inflight == 0

    async def _notify_drained(self) -> None:
        async with self._drained:
            self._drained.notify_all()

    def all_disks(self) -> Iterable[BlockDisk]:
        return [n.disk for n in list(self.fs.nodes.values())]

    def serving_ended(self) -> None:
        if self._closed:
            self._close_fd()


async def mount_fuse(stack: AsyncExitStack, nursery: trio.Nursery, mountpoint: str,
                     disks: Mapping[str, Disk], options: FuseOptions | None = None
                     ) -> FuseFrontend:
    """Mount ``mountpoint`` serving ``disks`` (file name -> Disk), run it in ``nursery`` and
    register its teardown (unmount, drain, close) on ``stack``.  Returns once the kernel has
    completed INIT, so the files can be opened right away (from another thread)."""
    fe = FuseFrontend(mountpoint, options or FuseOptions())
    for name, disk in disks.items():
        fe.add_disk(name, disk)
    fe._prepare_ring()
    try:
        await fe._mount()
    except BaseException:
        fe._close_ring()
        raise
    stack.push_async_callback(fe.close)
    await nursery.start(fe._serve)
    with trio.move_on_after(INIT_TIMEOUT_S):
        await fe._initialized.wait()
    if not fe._initialized.is_set():
        raise CommandFailed(f"{fe.mountpoint}: the kernel did not initialise the FUSE mount "
                         f"within {INIT_TIMEOUT_S:.0f} s")
    fe._start_ring()
    return fe


__all__ = [
    "FuseFrontend",
    "mount_fuse",
]
