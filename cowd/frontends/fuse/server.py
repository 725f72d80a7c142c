"""Layer: cowd frontends (fuse), the trio adapter: :class:`FuseFrontend` reads
``/dev/fuse``, hands namespace requests to the codec (:class:`~.protocol.FuseFs`) and runs
READ, WRITE, FSYNC, FALLOCATE, LSEEK and SYNCFS against the Disk; :func:`mount_fuse` builds
it on the caller's nursery and exit stack.

Invariants: nothing in the trio thread touches the mounted files (the thread that would have
to answer is the one that would block); teardown unmounts only the mount this object made.

Theory of operation
-------------------
Workers: each worker task owns a request buffer (max_write plus a page; the kernel refuses
smaller reads) and a reply buffer.  The buffers of all ``max_workers`` workers are made when
the frontend is built, their pages touched and, where the kernel allows, locked
(cowd/sysmem.py): a worker started under load, which may be while the kernel is reclaiming
memory by writing back through this very mount, allocates nothing.  The worker holding the
read lock reads a request (non-blocking; it waits for readability only when the device is
empty) and runs the first step of its handler by hand (``coro.send(None)``).  Most requests
finish in that step — ``Disk.read_into`` and in-place writes do no ``await`` on their fast
paths — and the worker goes on to the next request with no task switch, up to
MAX_INLINE_REQUESTS in a row before it lets other tasks run.  A request that must wait (a
flush in a worker thread, an allocating write behind a granule lock) makes its worker
release the read lock, so another worker reads on, and is then finished by the same worker
in the same task (:class:`_Resume` forwards the trap its first step yielded, exactly as
``await`` would have).  When every worker is busy another is started, up to ``max_workers``:
a lock hand-over to the next worker per request would cost a trio scheduling pass and an
epoll call each (about half the warm 4 KiB read rate, docs/fuse-options.md).  Data is not
copied more than the kernel makes us: a WRITE's payload is handed to ``Disk.write`` as a
view into the request buffer; a READ is read into the reply buffer right behind its header
and sent with one ``write(2)``.

Lifetime: :func:`mount_fuse` opens ``/dev/fuse``, mounts (``mount(2)`` as root, otherwise
``fusermount3``), starts the workers in the caller's nursery, waits for the kernel's INIT and
registers :meth:`FuseFrontend.close` on the caller's exit stack.  Teardown unmounts only the
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
the page cache and fail only at write-back).  A READ that misses the page cache advises the
kernel (POSIX_FADV_WILLNEED) and yields the device to the next worker before it reads, so
the misses of everything queued are on the disk at once (an allocating WRITE does the same
for its copy-up source).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Coroutine, Generator, Mapping
from contextlib import AsyncExitStack
from typing import Any

import trio

from ...disk import Disk, DiskError
from ...errors import CommandFailed
from ...sysmem import resident_buffer
from .mount import (
    MNT_DETACH,
    UMOUNT_NOFOLLOW,
    libc,
    mount_fusermount,
    mount_syscall,
    mounts_at,
)
from .protocol import (
    DATA_OPS,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FALLOCATE_IN,
    FSYNC_IN,
    FUSE_FALLOCATE,
    FUSE_FSYNC,
    FUSE_INIT,
    FUSE_MIN_READ_BUFFER,
    FUSE_NOTIFY_INVAL_ENTRY,
    FUSE_READ,
    FUSE_ROOT_ID,
    FUSE_SYNCFS,
    FUSE_WRITE,
    IN_HEADER,
    INIT_TIMEOUT_S,
    LSEEK_IN,
    LSEEK_OUT,
    MAX_INLINE_REQUESTS,
    NOTIFY_INVAL_ENTRY_OUT,
    OUT_HEADER,
    PAGE_BYTES,
    READ_IN,
    SEEK_DATA,
    SEEK_HOLE,
    WRITE_IN,
    WRITE_OUT,
    Fail,
    FuseFs,
    FuseOptions,
    FuseProtocolError,
    Node,
    parse_request,
    reply_error,
    reply_ok,
    unpack_body,
)

log = logging.getLogger("cowd.fuse")

# Teardown waits this long for open files (a loop device) to be closed before it aborts.
DRAIN_TIMEOUT_S = 10.0


# ---- the trio adapter ----------------------------------------------------------------------


class _Resume:
    """Finish a coroutine whose first step already ran (and yielded ``trap``) in this task:
    what ``await`` would have done had the first step not been taken by hand.  The coroutine
    runs in the same task throughout, so trio sees nothing unusual."""

    __slots__ = ("coro", "trap")

    def __init__(self, coro: Coroutine[Any, Any, None], trap: Any):
        self.coro = coro
        self.trap = trap

    def __await__(self) -> Generator[Any, Any, None]:
        coro, trap = self.coro, self.trap
        while True:
            try:
                value = yield trap
            except BaseException as e:
                try:
                    trap = coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    trap = coro.send(value)
                except StopIteration:
                    return


class _Worker:
    __slots__ = ("locked", "reply", "request")

    def __init__(self, request_bytes: int, reply_bytes: int):
        self.request, locked_request = resident_buffer(request_bytes)
        self.reply, locked_reply = resident_buffer(reply_bytes)
        self.locked = locked_request and locked_reply


class FuseFrontend:
    """The mounted directory; see the module docstring.  Build it with :func:`mount_fuse`."""

    def __init__(self, mountpoint: str, options: FuseOptions):
        options.check()
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options
        self.fs = FuseFs(options)
        # The mount's source names this process and a random token, so teardown can tell
        # our mount from anything mounted on the same directory later.
        self.source = f"cowd-{os.getpid()}-{secrets.token_hex(4)}"
        self.fd = -1
        self.mounted = False
        self._fusermount = False
        self._read_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._initialized = trio.Event()
        self._ended = trio.Event()
        self._drained = trio.Condition()
        self._workers = 0
        self._idle = 0
        self._closed = False
        # Every worker's buffers, made now (see "Workers" above); _spawn takes from here.
        self._spare = [_Worker(max(FUSE_MIN_READ_BUFFER, options.max_write_bytes + PAGE_BYTES),
                               OUT_HEADER.size + options.max_read_bytes)
                       for _ in range(options.max_workers)]
        self.buffers_locked = all(w.locked for w in self._spare)
        self.counters: dict[str, int] = {
            "requests": 0, "reads": 0, "writes": 0, "fsyncs": 0, "fallocates": 0,
            "bytes_read": 0, "bytes_written": 0, "errors": 0, "protocol_errors": 0,
            "workers_max": 0, "waited": 0,
        }

    # -- public ---------------------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def add_disk(self, name: str, disk: Disk) -> str:
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

    # -- the session loop ---------------------------------------------------------------------

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._nursery = nursery
                self._spawn()
                self._spawn()
                task_status.started()
        finally:
            self._ended.set()
            if self._closed:
                self._close_fd()

    def _spawn(self) -> None:
        assert self._nursery is not None
        w = self._spare.pop()  # there is one per worker the options allow
        self._workers += 1
        self._idle += 1
        self.counters["workers_max"] = max(self.counters["workers_max"], self._workers)
        self._nursery.start_soon(self._worker, w)

    async def _receive(self, buf: bytearray) -> int:
        """Read one request into ``buf``; 0 when the connection has ended."""
        while True:
            fd = self.fd
            if fd < 0:
                return 0
            try:
                return os.readv(fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # the request was interrupted before we read it
                if e.errno in (errno.ENODEV, errno.EBADF, errno.ECONNABORTED):
                    return 0
                raise

    async def _worker(self, w: _Worker) -> None:
        view = memoryview(w.request)
        lock = self._read_lock
        try:
            while True:
                await lock.acquire()
                held = True
                try:
                    for _ in range(MAX_INLINE_REQUESTS):
                        try:
                            n = await self._receive(w.request)
                        except trio.ClosedResourceError:
                            n = 0
                        if n == 0:
                            self._ended.set()
                            return
                        # Run the handler's first step here.  Most requests finish in it
                        # (no await on the Disk's fast paths): then read the next one with
                        # no task switch.  One that must wait hands the device to another
                        # worker and is finished by this one.
                        coro = self._handle(view[:n], w)
                        try:
                            trap = coro.send(None)
                        except StopIteration:
                            continue
                        lock.release()
                        held = False
                        self.counters["waited"] += 1
                        self._idle -= 1
                        if self._idle == 0 and self._workers < self.options.max_workers:
                            self._spawn()
                        try:
                            await _Resume(coro, trap)
                        finally:
                            self._idle += 1
                        break
                finally:
                    if held:
                        lock.release()
        finally:
            self._workers -= 1
            self._idle -= 1
            self._spare.append(w)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            os.write(self.fd, data)
        except OSError as e:
            # ENOENT: the kernel gave up on the request (interrupted or aborted); ENODEV:
            # the connection is gone.  Neither is ours to report.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("fuse: writing a reply failed: %s", e.strerror)

    async def _handle(self, data: memoryview, w: _Worker) -> None:
        self.counters["requests"] += 1
        try:
            req = parse_request(data)
        except FuseProtocolError as e:
            self.counters["protocol_errors"] += 1
            log.error("%s", e)
            if len(data) >= IN_HEADER.size:
                self._send(reply_error(IN_HEADER.unpack_from(data)[2], errno.EIO))
            return
        if req.opcode not in DATA_OPS or self.fs.negotiated is None:
            try:
                reply = self.fs.handle(req)
            except FuseProtocolError as e:
                self.counters["protocol_errors"] += 1
                log.error("%s", e)
                reply = reply_error(req.unique, errno.EIO)
            if reply is not None:
                self._send(reply)
            if req.opcode == FUSE_INIT and self.fs.negotiated is not None:
                self._initialized.set()
            return
        node: Node | None = None
        try:
            if req.opcode == FUSE_READ:
                fh, offset, size = unpack_body(READ_IN, req.body, "READ")[:3]
                node, _h = self.fs.node_of(fh)
                node.inflight += 1
                await self._read(req.unique, node.disk, offset, size, w)
                return
            if req.opcode == FUSE_WRITE:
                fh, offset, size = unpack_body(WRITE_IN, req.body, "WRITE")[:3]
                payload = req.body[WRITE_IN.size:]
                if len(payload) != size:
                    raise FuseProtocolError(f"fuse: WRITE payload length does not match "
                                            f"(size={size}, payload={len(payload)})")
                node, _h = self.fs.node_of(fh)
                node.inflight += 1
                disk = node.disk
                if offset < disk.size < offset + size:
                    # Crossing the end: write what fits and answer short, as a block device
                    # does (the kernel's buffered path splits such a write the same way).
                    size = disk.size - offset
                    payload = payload[:size]
                if disk.advise_write(offset, size):
                    # An allocation: its copy-up source is being fetched; let the requests
                    # queued behind this one start theirs before we wait for it (as _read).
                    await trio.lowlevel.checkpoint()
                await disk.write(offset, payload)  # at or past the end: ENOSPC
                self.counters["writes"] += 1
                self.counters["bytes_written"] += size
                self._send(reply_ok(req.unique, WRITE_OUT.pack(size, 0)))
                return
            if req.opcode == FUSE_SYNCFS:
                for n in list(self.fs.nodes.values()):
                    if not n.disk.readonly:
                        await n.disk.flush()
                self._send(reply_ok(req.unique))
                return
            fh = unpack_body(FSYNC_IN, req.body, "request")[0]
            node, _h = self.fs.node_of(fh)
            node.inflight += 1
            if req.opcode == FUSE_FSYNC:
                self.counters["fsyncs"] += 1
                await node.disk.flush()
                self._send(reply_ok(req.unique))
            elif req.opcode == FUSE_FALLOCATE:
                _fh, offset, length, mode, _pad = unpack_body(FALLOCATE_IN, req.body, "FALLOCATE")
                self.counters["fallocates"] += 1
                await self._fallocate(node.disk, offset, length, mode)
                self._send(reply_ok(req.unique))
            else:  # FUSE_LSEEK
                _fh, offset, whence, _pad = unpack_body(LSEEK_IN, req.body, "LSEEK")
                pos = await self._lseek(node.disk, offset, whence)
                self._send(reply_ok(req.unique, LSEEK_OUT.pack(pos)))
        except Fail as f:
            self.counters["errors"] += 1
            self._send(reply_error(req.unique, f.err))
        except DiskError as e:
            self.counters["errors"] += 1
            log.debug("fuse: %s", e)
            self._send(reply_error(req.unique, e.errno or errno.EIO))
        except FuseProtocolError as e:
            self.counters["protocol_errors"] += 1
            log.error("%s", e)
            self._send(reply_error(req.unique, errno.EIO))
        except Exception:
            self.counters["errors"] += 1
            log.exception("fuse: request %d failed", req.opcode)
            self._send(reply_error(req.unique, errno.EIO))
        finally:
            if node is not None:
                node.inflight -= 1
                if node.removed and node.inflight == 0:
                    async with self._drained:
                        self._drained.notify_all()

    async def _read(self, unique: int, disk: Disk, offset: int, size: int, w: _Worker) -> None:
        if size > self.options.max_read_bytes:
            raise Fail(errno.EINVAL)
        n = max(0, min(size, disk.size - offset))
        out = memoryview(w.reply)
        if n:
            dest = out[OUT_HEADER.size:OUT_HEADER.size + n]
            if not disk.try_read_into(dest=dest, offset=offset):
                # Not in the page cache (or behind a lock): have the disk start on it, and
                # give the device to the next worker first, so that the requests queued
                # behind this one are advised too and the disk works on all of them at
                # once; then read (by now usually from the page cache).
                disk.advise(offset, n)
                await trio.lowlevel.checkpoint()
                await disk.read_into(offset, dest)
        OUT_HEADER.pack_into(w.reply, 0, OUT_HEADER.size + n, 0, unique)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += n
        self._send(out[:OUT_HEADER.size + n])

    @staticmethod
    async def _fallocate(disk: Disk, offset: int, length: int, mode: int) -> None:
        size = disk.size
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            end = min(size, offset + length)
            if offset < end:
                await disk.trim(offset, end - offset)
            return
        if mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
            if not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
                raise Fail(errno.ENOSPC)  # it would grow the file
            end = min(size, offset + length)
            if offset < end:
                await disk.write_zeroes(offset, end - offset, may_unmap=False)
            return
        raise Fail(errno.EOPNOTSUPP)

    @staticmethod
    async def _lseek(disk: Disk, offset: int, whence: int) -> int:
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise Fail(errno.EINVAL)
        size = disk.size
        if offset >= size:
            raise Fail(errno.ENXIO)
        pos = offset
        while pos < size:
            runs = await disk.block_status(pos, size - pos)
            if not runs:
                break
            for n, hole, _zero in runs:
                if hole == (whence == SEEK_HOLE):
                    return pos
                pos += n
        if whence == SEEK_DATA:
            raise Fail(errno.ENXIO)
        return size


async def mount_fuse(stack: AsyncExitStack, nursery: trio.Nursery, mountpoint: str,
                     disks: Mapping[str, Disk], options: FuseOptions | None = None
                     ) -> FuseFrontend:
    """Mount ``mountpoint`` serving ``disks`` (file name -> Disk), run it in ``nursery`` and
    register its teardown (unmount, drain, close) on ``stack``.  Returns once the kernel has
    completed INIT, so the files can be opened right away (from another thread)."""
    fe = FuseFrontend(mountpoint, options or FuseOptions())
    for name, disk in disks.items():
        fe.add_disk(name, disk)
    await fe._mount()
    stack.push_async_callback(fe.close)
    await nursery.start(fe._serve)
    with trio.move_on_after(INIT_TIMEOUT_S):
        await fe._initialized.wait()
    if not fe._initialized.is_set():
        raise CommandFailed(f"{fe.mountpoint}: the kernel did not initialise the FUSE mount "
                         f"within {INIT_TIMEOUT_S:.0f} s")
    return fe


__all__ = [
    "FuseFrontend",
    "mount_fuse",
]
