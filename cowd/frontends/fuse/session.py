"""Layer: cowd frontends (fuse), the request loop on one ``/dev/fuse`` descriptor:
:class:`FuseSession` reads requests, runs READ, WRITE, FSYNC, FALLOCATE, LSEEK and SYNCFS
against the disks, and hands every other request to :meth:`FuseSession.namespace`.

Two kinds of session: the daemon's :class:`~.server.FuseFrontend` (it mounted the directory,
owns the namespace, :class:`~.protocol.FuseFs`, and answers it in place), and a worker
process's session on a clone of the daemon's descriptor (``FUSE_DEV_IOC_CLONE``), which serves
data requests of the files it is told about and passes every namespace request to the daemon
(cowd/workers/fuse.py).  The kernel hands each request to whichever descriptor of the
connection reads first, and takes its reply on that descriptor.
Where the kernel serves the connection over io_uring
(.ring), the same handlers run on requests taken from ring entries: :meth:`FuseSession.dispatch`
answers through a :class:`Replier` (a worker's writes to the device, or a ring entry's
commit), and the device is still read for what the ring does not carry (FORGET, interrupts).

Theory of operation
-------------------
Workers: each worker task owns a request buffer (max_write plus a page; the kernel refuses
smaller reads) and a reply buffer.  The buffers of all ``max_workers`` workers are made when
the session is built, their pages touched and, where the kernel allows, locked
(cowd/sysmem.py): a worker started under load, which may be while the kernel is reclaiming
memory by writing back through this very mount, allocates nothing.  The worker holding the
read lock reads a request (non-blocking; it waits for readability only when the device is
empty) and runs the first step of its handler by hand (``coro.send(None)``).  Most requests
finish in that step — ``try_read_into`` and in-place writes do no ``await`` on their fast
paths — and the worker goes on to the next request with no task switch, up to
MAX_INLINE_REQUESTS in a row before it lets other tasks run.  A request that must wait (a
flush, an allocating write, the control plane's answer) makes its worker release the read
lock, so another worker reads on, and is then finished by the same worker in the same task
(:class:`_Resume` forwards the trap its first step yielded, exactly as ``await`` would have).
When every worker is busy another is started, up to ``max_workers``: a lock hand-over to the
next worker per request would cost a trio scheduling pass and an epoll call each (about half
the warm 4 KiB read rate, docs/fuse-options.md).  Data is not copied more than the kernel
makes us: a WRITE's payload is handed to the disk's ``write`` as a view into the request
buffer; a READ is read into the reply buffer right behind its header and sent with one
``write(2)``.  A READ that misses the page cache advises the kernel (POSIX_FADV_WILLNEED) and
yields the device to the next worker before it reads, so the misses of everything queued are
on the disk at once (an allocating WRITE does the same for its copy-up source).

Batches of small reads: a READ of at most DEFERRED_READ_BYTES is served by the worker holding
the read lock without a handler coroutine (:meth:`FuseSession._read_now`).  If its data is
not in the page cache it is advised and put aside with a reply buffer of its own (made up
front, DEFERRED_READS of them), and the worker reads on; when the device is empty (or before
the worker waits for anything, or lets go of the lock) it reads the put-aside requests, by
now on the disk together, and answers them (:meth:`FuseSession._finish_reads`).  The same
overlap as the yield above, without its task switches: a cold 4 KiB read cost three of them
and the lock's hand-overs, most of its CPU.  One that cannot be finished without waiting
(a worker's miss, which the control plane answers) is finished in a task of its own.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from ...disk import DiskError
from ...disk.api import BlockDisk
from ...sysmem import resident_buffer
from .protocol import (
    DATA_OPS,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FALLOCATE_IN,
    FSYNC_IN,
    FUSE_FALLOCATE,
    FUSE_FSYNC,
    FUSE_MIN_READ_BUFFER,
    FUSE_READ,
    FUSE_SYNCFS,
    FUSE_WRITE,
    IN_HEADER,
    LSEEK_IN,
    LSEEK_OUT,
    MAX_INLINE_REQUESTS,
    OUT_HEADER,
    PAGE_BYTES,
    READ_IN,
    SEEK_DATA,
    SEEK_HOLE,
    WRITE_IN,
    WRITE_OUT,
    Fail,
    FuseOptions,
    FuseProtocolError,
    Request,
    parse_request,
    reply_error,
    reply_ok,
    unpack_body,
)

log = logging.getLogger("cowd.fuse")

# READs of at most this many bytes are batched (see "Batches of small reads" above): the
# random reads whose page-cache misses cost most per byte.  Larger ones take the handler.
DEFERRED_READ_BYTES = 64 << 10
# Reads put aside at once per session, each with a reply buffer made up front (with the
# workers' buffers: 32 x 64 KiB, 2 MiB): the loop device's default queue depth is 128, a
# batch of 32 misses keeps the disk as busy as one process's blocking reads can use.
DEFERRED_READS = 32


@dataclass(slots=True)
class _PutAside:
    """A READ whose data was not in the page cache: advised, answered in the batch's end."""

    unique: int
    disk: BlockDisk
    token: object  # target_now's, for release_now
    offset: int
    length: int  # what is read: the request's size, clipped at the end of the disk
    reply: bytearray  # OUT_HEADER.size + DEFERRED_READ_BYTES, one of _read_spares


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


class Replier:
    """Where a request's handler builds and sends its reply: ``reply`` is a buffer of
    OUT_HEADER.size + max_read bytes (a READ reads its data in right behind the header) and
    :meth:`send` delivers a whole reply (header and payload, as written to /dev/fuse).  A
    /dev/fuse worker writes to the device; a ring entry commits on its io_uring (.ring)."""

    __slots__ = ("reply",)

    reply: bytearray

    def send(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError


class _Worker(Replier):
    __slots__ = ("_write", "aside", "locked", "request")

    def __init__(self, request_bytes: int, reply_bytes: int,
                 send: Callable[[bytes | bytearray | memoryview], None]):
        self.request, locked_request = resident_buffer(request_bytes)
        self.reply, locked_reply = resident_buffer(reply_bytes)
        self.locked = locked_request and locked_reply
        self._write = send
        self.aside: list[_PutAside] = []  # this worker's small reads waiting for the disk

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._write(data)


class FuseSession:
    """The request loop on :attr:`fd`; see the module docstring.  Subclasses say how a
    request names its disk (:meth:`target`, :meth:`release`, :meth:`all_disks`) and answer
    namespace requests (:meth:`namespace`)."""

    def __init__(self, options: FuseOptions):
        options.check()
        self.options = options
        self.fd = -1
        self._read_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._ended = trio.Event()
        self._workers = 0
        self._idle = 0
        # Every worker's buffers, made now (see "Workers" above); _spawn takes from here.
        self._spare = [_Worker(max(FUSE_MIN_READ_BUFFER, options.max_write_bytes + PAGE_BYTES),
                               OUT_HEADER.size + options.max_read_bytes, self._send)
                       for _ in range(options.max_workers)]
        # Reply buffers of put-aside reads (see "Batches of small reads" above).
        spares = [resident_buffer(OUT_HEADER.size + DEFERRED_READ_BYTES)
                  for _ in range(DEFERRED_READS)]
        self._read_spares = [buf for buf, _locked in spares]
        self.buffers_locked = all(w.locked for w in self._spare) and \
            all(locked for _buf, locked in spares)
        self.counters: dict[str, int] = {
            "requests": 0, "reads": 0, "writes": 0, "fsyncs": 0, "fallocates": 0,
            "bytes_read": 0, "bytes_written": 0, "errors": 0, "protocol_errors": 0,
            "workers_max": 0, "waited": 0, "reads_put_aside": 0,
        }

    # -- what subclasses say --------------------------------------------------------------

    def negotiated(self) -> bool:
        """INIT is done: data requests may be served."""
        return True

    async def namespace(self, req: Request, raw: memoryview) -> bytes | bytearray | None:
        """The reply to a request that touches no disk data (None: it has none); ``raw`` is
        the request as read (valid until this returns)."""
        raise NotImplementedError

    async def target(self, req: Request, fh: int) -> tuple[BlockDisk, object]:
        """The disk a data request is for, and a token for :meth:`release` (raise Fail).
        Returns without a checkpoint when it can (the inline first step goes on)."""
        raise NotImplementedError

    async def release(self, token: object) -> None:
        """The request that :meth:`target` gave ``token`` for is done."""
        await trio.lowlevel.checkpoint()

    def target_now(self, req: Request, fh: int) -> tuple[BlockDisk, object] | None:
        """:meth:`target` where it can answer without waiting (raise Fail as it does); None:
        only :meth:`target` can (the request takes the handler)."""
        return None

    def release_now(self, token: object) -> None:
        """:meth:`release` for a token :meth:`target_now` gave."""

    def all_disks(self) -> Iterable[BlockDisk]:
        """Every disk this session serves (SYNCFS flushes them)."""
        return ()

    def serving_ended(self) -> None:
        """The loop has stopped (the connection ended, or the session was cancelled)."""

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
            self.serving_ended()

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
            n = self._receive_now(buf)
            if n >= 0:
                return n
            await trio.lowlevel.wait_readable(self.fd)

    def _receive_now(self, buf: bytearray) -> int:
        """Read one request into ``buf`` if one is queued: its length, 0 when the connection
        has ended, -1 when none is queued."""
        while True:
            fd = self.fd
            if fd < 0:
                return 0
            try:
                return os.readv(fd, [buf])
            except BlockingIOError:
                return -1
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
                        n = self._receive_now(w.request)
                        if n < 0:  # the device is empty: answer what was put aside first
                            if w.aside:
                                self._finish_reads(w)
                                n = self._receive_now(w.request)
                            if n < 0:
                                try:
                                    n = await self._receive(w.request)
                                except trio.ClosedResourceError:
                                    n = 0
                        if n == 0:
                            self._ended.set()
                            return
                        if self._read_now(view[:n], w):
                            continue
                        # Run the handler's first step here.  Most requests finish in it
                        # (no await on the Disk's fast paths): then read the next one with
                        # no task switch.  One that must wait hands the device to another
                        # worker and is finished by this one.
                        coro = self._handle(view[:n], w)
                        try:
                            trap = coro.send(None)
                        except StopIteration:
                            continue
                        if w.aside:
                            self._finish_reads(w)
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
                    if w.aside:
                        self._finish_reads(w)
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
        await self.dispatch(req, data, w)

    async def dispatch(self, req: Request, raw: memoryview, w: Replier,
                       payload: memoryview | None = None) -> None:
        """Serve one parsed request and send its reply through ``w``.  ``raw`` is the request
        as the device delivers it (for :meth:`namespace`); ``payload`` is a WRITE's data when
        it is not in ``req.body`` behind fuse_write_in (a ring entry's payload buffer)."""
        data = raw
        if req.opcode not in DATA_OPS or not self.negotiated():
            try:
                reply = await self.namespace(req, data)
            except FuseProtocolError as e:
                self.counters["protocol_errors"] += 1
                log.error("%s", e)
                reply = reply_error(req.unique, errno.EIO)
            if reply is not None:
                w.send(reply)
            return
        token: object = None
        try:
            if req.opcode == FUSE_READ:
                fh, offset, size = unpack_body(READ_IN, req.body, "READ")[:3]
                disk, token = await self.target(req, fh)
                await self._read(req.unique, disk, offset, size, w)
                return
            if req.opcode == FUSE_WRITE:
                fh, offset, size = unpack_body(WRITE_IN, req.body, "WRITE")[:3]
                if payload is None:
                    payload = req.body[WRITE_IN.size:]
                if len(payload) != size:
                    raise FuseProtocolError(f"fuse: WRITE payload length does not match "
                                            f"(size={size}, payload={len(payload)})")
                disk, token = await self.target(req, fh)
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
                w.send(reply_ok(req.unique, WRITE_OUT.pack(size, 0)))
                return
            if req.opcode == FUSE_SYNCFS:
                for d in self.all_disks():
                    if not d.readonly:
                        await d.flush()
                w.send(reply_ok(req.unique))
                return
            fh = unpack_body(FSYNC_IN, req.body, "request")[0]
            disk, token = await self.target(req, fh)
            if req.opcode == FUSE_FSYNC:
                self.counters["fsyncs"] += 1
                await disk.flush()
                w.send(reply_ok(req.unique))
            elif req.opcode == FUSE_FALLOCATE:
                _fh, offset, length, mode, _pad = unpack_body(FALLOCATE_IN, req.body, "FALLOCATE")
                self.counters["fallocates"] += 1
                await self._fallocate(disk, offset, length, mode)
                w.send(reply_ok(req.unique))
            else:  # FUSE_LSEEK
                _fh, offset, whence, _pad = unpack_body(LSEEK_IN, req.body, "LSEEK")
                pos = await self._lseek(disk, offset, whence)
                w.send(reply_ok(req.unique, LSEEK_OUT.pack(pos)))
        except Fail as f:
            self.counters["errors"] += 1
            w.send(reply_error(req.unique, f.err))
        except DiskError as e:
            self.counters["errors"] += 1
            log.debug("fuse: %s", e)
            w.send(reply_error(req.unique, e.errno or errno.EIO))
        except FuseProtocolError as e:
            self.counters["protocol_errors"] += 1
            log.error("%s", e)
            w.send(reply_error(req.unique, errno.EIO))
        except Exception:
            self.counters["errors"] += 1
            log.exception("fuse: request %d failed", req.opcode)
            w.send(reply_error(req.unique, errno.EIO))
        finally:
            if token is not None:
                await self.release(token)

    def _read_now(self, raw: memoryview, w: _Worker) -> bool:
        """Serve ``raw`` here if it is a small READ whose disk :meth:`target_now` names: answer
        it, or (its data not in the page cache) advise it and put it aside in ``w``'s batch.
        False: not such a request, or no spare reply buffer (the handler serves it)."""
        spares = self._read_spares
        if not spares or len(raw) < IN_HEADER.size or \
                IN_HEADER.unpack_from(raw)[1] != FUSE_READ or not self.negotiated():
            return False
        try:
            req = parse_request(raw)
            fh, offset, size = unpack_body(READ_IN, req.body, "READ")[:3]
        except FuseProtocolError:
            return False  # the handler reports it
        if size > DEFERRED_READ_BYTES or size > self.options.max_read_bytes:
            return False
        try:
            got = self.target_now(req, fh)
        except Fail as f:
            self.counters["requests"] += 1
            self.counters["errors"] += 1
            self._send(reply_error(req.unique, f.err))
            return True
        if got is None:
            return False
        self.counters["requests"] += 1
        disk, token = got
        reply = spares.pop()
        r = _PutAside(req.unique, disk, token, offset, max(0, min(size, disk.size - offset)),
                      reply)
        try:
            dest = memoryview(reply)[OUT_HEADER.size:OUT_HEADER.size + r.length]
            if r.length and not disk.try_read_into(dest=dest, offset=offset):
                disk.advise(offset, r.length)
                self.counters["reads_put_aside"] += 1
                w.aside.append(r)
                return True
        except Exception as e:
            self._read_failed(r, e)
            return True
        self._read_done(r)
        return True

    def _finish_reads(self, w: _Worker) -> None:
        """Read and answer ``w``'s put-aside reads (advised: by now mostly read, or on the
        disk together); one that needs to wait for more than the disk is finished in a
        task."""
        aside, w.aside = w.aside, []
        for r in aside:
            try:
                dest = memoryview(r.reply)[OUT_HEADER.size:OUT_HEADER.size + r.length]
                if not r.disk.try_read_into(dest=dest, offset=r.offset, may_block=True):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._read_late, r)
                    continue
            except Exception as e:
                self._read_failed(r, e)
                continue
            self._read_done(r)

    async def _read_late(self, r: _PutAside) -> None:
        try:
            await r.disk.read_into(r.offset,
                                   memoryview(r.reply)[OUT_HEADER.size:OUT_HEADER.size + r.length])
        except Exception as e:
            self._read_failed(r, e)
        except BaseException:
            self.release_now(r.token)  # cancelled: the session is ending, no reply is due
            raise
        else:
            self._read_done(r)

    def _read_done(self, r: _PutAside) -> None:
        self._send(self._read_reply(r.unique, r.reply, r.length))
        self._read_spares.append(r.reply)
        self.release_now(r.token)

    def _read_failed(self, r: _PutAside, e: Exception) -> None:
        self.counters["errors"] += 1
        if isinstance(e, DiskError):
            log.debug("fuse: %s", e)
            err = e.errno or errno.EIO
        else:  # called in the except clause: the traceback is logged
            log.exception("fuse: request %d failed", FUSE_READ)
            err = errno.EIO
        self._send(reply_error(r.unique, err))
        self._read_spares.append(r.reply)
        self.release_now(r.token)

    async def _read(self, unique: int, disk: BlockDisk, offset: int, size: int, w: Replier
                    ) -> None:
        if size > self.options.max_read_bytes:
            raise Fail(errno.EINVAL)
        n = max(0, min(size, disk.size - offset))
        if n:
            dest = memoryview(w.reply)[OUT_HEADER.size:OUT_HEADER.size + n]
            if not disk.try_read_into(dest=dest, offset=offset):
                # Not in the page cache (or behind a lock): have the disk start on it, and
                # give the device to the next worker first, so that the requests queued
                # behind this one are advised too and the disk works on all of them at
                # once; then read (by now usually from the page cache).
                disk.advise(offset, n)
                await trio.lowlevel.checkpoint()
                await disk.read_into(offset, dest)
        w.send(self._read_reply(unique, w.reply, n))

    def _read_reply(self, unique: int, reply: bytearray, n: int) -> memoryview:
        """The reply to a READ whose ``n`` bytes are in ``reply`` behind its header: the
        header written, the read counted; what to send."""
        OUT_HEADER.pack_into(reply, 0, OUT_HEADER.size + n, 0, unique)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += n
        return memoryview(reply)[:OUT_HEADER.size + n]

    @staticmethod
    async def _fallocate(disk: BlockDisk, offset: int, length: int, mode: int) -> None:
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
    async def _lseek(disk: BlockDisk, offset: int, whence: int) -> int:
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


