"""Layer: cowd frontends (fuse), FUSE over io_uring: :class:`FuseRing` takes the mount's
requests from ring entries registered on an io_uring (.uring) instead of ``read(2)`` on
``/dev/fuse``, and serves them with the session's own handlers (:meth:`FuseSession.dispatch`).

The kernel's side (Linux 6.14+, Documentation/filesystems/fuse-io-uring.rst): after INIT
accepted FUSE_OVER_IO_URING, the server registers ring entries (FUSE_IO_URING_CMD_REGISTER,
an IORING_OP_URING_CMD with the queue's index in the SQE's command area and two iovecs: the
entry's header buffer, struct fuse_uring_req_header, and its payload buffer).  There is one
queue per possible CPU, and the kernel routes a request to the queue of the CPU it was made
on; it switches the connection to the ring only once every queue has an entry, and until then
makes new requests wait.  A registered entry's command completes when a request is put in it:
fuse_in_header in the header's in/out area, the opcode's own header (fuse_read_in, ...) in the
op area, the rest (a WRITE's data, a LOOKUP's name) in the payload buffer, and its length and
the commit id in fuse_uring_ent_in_out.  The server answers with
FUSE_IO_URING_CMD_COMMIT_AND_FETCH: fuse_out_header in the in/out area, the reply's payload in
the payload buffer; that command completes again with the entry's next request.
Notifications, FORGETs and interrupts still go through ``/dev/fuse``, so the session's
``read(2)`` workers keep running beside the ring.

Queues and processes: nothing ties a queue to the descriptor or the io_uring that registered
it (the command names the connection through any of its descriptors, a clone too, and the
queue by index), so the daemon's worker processes (cowd/workers/) each register entries on
their clone of ``/dev/fuse``, on an io_uring of their own, and serve them with their
:class:`~cowd.workers.fuse.WorkerFuseSession`; every worker takes every queue (a queue
hands a request to the entry that became free last, whoever's it is), and the daemon
registers the queues no worker takes: all without workers, none with them
(:func:`worker_queues`, :func:`daemon_queues`).  The kernel makes requests wait until every
queue has an entry, so a worker that has not registered yet holds the mount up, and the
daemon gives its workers the mount's descriptor before anything is asked of the mount.  A
worker killed while its entries hold requests leaves those requests waiting until the
connection ends (the kernel ends only a dead descriptor's /dev/fuse reads); its other
entries are cancelled, and the other workers' entries take the queue's requests.

Theory of operation
-------------------
Buffers: each entry owns a header buffer and a reply buffer of OUT_HEADER.size plus the
largest payload; the payload iovec it registers is the reply buffer *behind* the header, so a
READ reads the disk straight into the payload the kernel copies out (:meth:`FuseSession._read`
builds its reply there), and a WRITE's data is handed to the disk as a view of it.  Entries
are made, touched and (where allowed) locked before INIT, like the session's worker buffers.

Workers: the same shape as the session's ``read(2)`` workers.  The task holding the ring lock
takes the next completed entry (reaping the completion queue, and waiting for the ring's
descriptor to become readable only when it is empty), runs the handler's first step by hand
and, when the handler finishes there, takes the next one; a handler that must wait makes its
task release the lock and finish it.  Commits are queued as SQEs and handed to the kernel in
one ``io_uring_enter`` before the lock holder looks for more work, or at once by a task that
finished a handler after waiting.  All of it runs in the trio thread, which is also the only
thread that submits (the kernel runs an entry's completion work in the submitter's context).

Lifetime: :meth:`FuseRing.create` (before the mount's INIT in the daemon; in a worker when it
is given the mount) makes the ring and the entries; :meth:`register` (after INIT) registers
every entry and :meth:`start` starts the workers.  When the connection
ends the kernel completes every registered entry with an error; the workers stop when no
entry is left, and :meth:`close` unmaps and closes the ring (which cancels anything pending).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections import deque
from typing import TYPE_CHECKING

import trio

from ...sysmem import resident_buffer
from .protocol import (
    DATA_OPS,
    FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
    FUSE_IO_URING_CMD_REGISTER,
    FUSE_MIN_READ_BUFFER,
    FUSE_URING_IN_OUT_HEADER_SZ,
    FUSE_URING_OP_IN_OUT_SZ,
    FUSE_WRITE,
    IN_HEADER,
    MAX_INLINE_REQUESTS,
    OUT_HEADER,
    URING_CMD_REQ,
    URING_ENT_IN_OUT,
    URING_ENT_IN_OUT_OFFSET,
    URING_REQ_HEADER_BYTES,
    FuseOptions,
    FuseProtocolError,
    Request,
    parse_request,
    reply_error,
)
from .session import Replier, _Resume
from .uring import Ring, UringError

if TYPE_CHECKING:
    from .session import FuseSession

log = logging.getLogger("cowd.fuse")

# Where the kernel says whether FUSE-over-io_uring may be used (Linux 6.14+).
ENABLE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
# The kernel wants a queue per possible CPU, each with at least one entry of a whole payload
# (a MiB): past this many possible CPUs the ring would pin too much memory; use /dev/fuse.
MAX_RING_QUEUES = 64
# Entries per queue: the session's max_workers spread over the queues, at most this many.
MAX_QUEUE_DEPTH = 16
# A worker process's ring has twice that (it shares every queue with the other workers, and
# a loop device puts nearly all its requests on one queue: that one must take a whole queue
# depth of requests from each worker, as a worker's /dev/fuse reads do).
WORKER_DEPTH_FACTOR = 2


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def possible_cpus(text: str) -> int:
    """The number of CPUs in a kernel CPU list such as ``0-3,8-11`` (cpu/possible)."""
    n = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


def ring_queue_count() -> int:
    """The connection's queue count: the possible CPUs (ValueError past MAX_RING_QUEUES)."""
    with open("/sys/devices/system/cpu/possible") as f:
        queues = possible_cpus(f.read())
    if not 1 <= queues <= MAX_RING_QUEUES:
        raise ValueError(f"{queues} possible CPUs need as many ring queues "
                         f"(at most {MAX_RING_QUEUES})")
    return queues


def worker_queues(queues: int, workers: int, index: int) -> list[int]:
    """The queues worker ``index`` of ``workers`` serves: all of them.  The kernel puts a
    request on the queue of the CPU it was made on, and a loop device makes nearly all of
    them on one CPU, so a queue owned by one worker left the others idle (measured: 1650 of
    1664 requests on one worker's queue); on every queue, the workers share each queue's
    requests as they share /dev/fuse reads (the kernel hands a request to the entry that
    became free last)."""
    return list(range(queues)) if 0 <= index < workers else []


def daemon_queues(queues: int, workers: int) -> list[int]:
    """The queues no worker takes, which the daemon serves (all of them without workers)."""
    taken = {q for i in range(workers) for q in worker_queues(queues, workers, i)}
    return [q for q in range(queues) if q not in taken]


def enable_uring_state() -> str | None:
    """The fuse module's ``enable_uring`` ("Y"/"N"), or None where the kernel has none."""
    try:
        with open(ENABLE_URING_PARAM) as f:
            return f.read().strip()
    except OSError:
        return None


class _Entry(Replier):
    """One ring entry: its buffers (registered with the kernel) and the request in it."""

    __slots__ = ("answered", "commit_id", "headers", "headers_view", "index", "iov", "locked",
                 "payload", "qid", "ring")

    def __init__(self, ring: FuseRing, index: int, qid: int, payload_bytes: int):
        self.ring = ring
        self.index = index
        self.qid = qid
        self.commit_id = 0
        self.answered = True
        self.headers, locked_headers = resident_buffer(URING_REQ_HEADER_BYTES)
        self.reply, locked_reply = resident_buffer(OUT_HEADER.size + payload_bytes)
        self.locked = locked_headers and locked_reply
        self.payload = memoryview(self.reply)[OUT_HEADER.size:]
        self.headers_view = memoryview(self.headers)
        iov = (_Iovec * 2)()
        iov[0].iov_base = ctypes.addressof((ctypes.c_char * len(self.headers))
                                           .from_buffer(self.headers))
        iov[0].iov_len = len(self.headers)
        iov[1].iov_base = ctypes.addressof((ctypes.c_char * len(self.reply))
                                           .from_buffer(self.reply)) + OUT_HEADER.size
        iov[1].iov_len = payload_bytes
        self.iov = iov

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.answered = True
        self.ring.commit(self, data)


class FuseRing:
    """The ring of one mount; see the module docstring.  Build with :meth:`create`."""

    def __init__(self, session: FuseSession, ring: Ring, queues: int, qids: list[int],
                 depth: int, payload_bytes: int):
        self.session = session
        self.ring = ring
        self.fd = -1  # the mount's /dev/fuse descriptor (or a clone), from register()
        self.queues = queues  # the connection's, one per possible CPU
        self.qids = qids  # the queues this ring serves
        self.depth = depth
        self.entries = [_Entry(self, i, qids[i // depth], payload_bytes)
                        for i in range(len(qids) * depth)]
        self.buffers_locked = all(e.locked for e in self.entries)
        self._ready: deque[_Entry] = deque()
        self._alive = 0
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._workers = 0
        self._idle = 0
        self.counters = {"ring_requests": 0, "ring_workers_max": 0, "ring_errors": 0}

    @classmethod
    def create(cls, session: FuseSession, options: FuseOptions,
               qids: list[int] | None = None, depth_factor: int = 1) -> FuseRing:
        """A ring and entries for ``options``, for the queues ``qids`` (all of them when
        None; none is a ring that registers nothing), ``depth_factor`` times the usual entries
        per queue.  UringError when io_uring cannot be
        set up, ValueError when this machine has too many possible CPUs for it."""
        queues = ring_queue_count()
        if qids is None:
            qids = list(range(queues))
        depth = max(1, min(MAX_QUEUE_DEPTH, options.max_workers * depth_factor // queues))
        payload_bytes = max(FUSE_MIN_READ_BUFFER, options.max_write_bytes,
                            options.max_read_bytes)
        ring = Ring(max(1, len(qids) * depth))
        try:
            return cls(session, ring, queues, qids, depth, payload_bytes)
        except BaseException:
            ring.close()
            raise

    # -- registration --------------------------------------------------------------------------

    def register(self, fd: int) -> None:
        """Register every entry on the mount's descriptor ``fd`` (after INIT).  The kernel
        answers a bad registration at once, with a completion: raise UringError for it."""
        self.fd = fd
        for e in self.entries:
            self.ring.uring_cmd(fd, FUSE_IO_URING_CMD_REGISTER, URING_CMD_REQ.pack(0, 0, e.qid),
                                e.index, addr=ctypes.addressof(e.iov), length=2)
        self.ring.submit()
        self._alive = len(self.entries)
        failed = [res for idx, res in self._reap() if res < 0]
        if failed:
            raise UringError(-failed[0], f"FUSE_IO_URING_CMD_REGISTER: "
                             f"{os.strerror(-failed[0])}")

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._spawn()
        self._spawn()

    # -- completions ---------------------------------------------------------------------------

    def _reap(self) -> list[tuple[int, int]]:
        """Reap the completion queue: entries with a request join the ready queue; failed
        ones are dropped (returned, for registration to report)."""
        done = self.ring.reap()
        failed = []
        for index, res in done:
            if res == 0:
                self._ready.append(self.entries[index])
                continue
            self._alive -= 1
            failed.append((index, res))
            if -res not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV):
                self.counters["ring_errors"] += 1
                log.error("fuse: io_uring entry %d failed: %s", index, os.strerror(-res))
        return failed

    async def _next(self) -> _Entry | None:
        """The next entry holding a request; None once no entry is left."""
        while not self._ready:
            if self._alive <= 0 or self.ring.fd < 0:
                return None
            self._submit()
            self._reap()
            if not self._ready:
                try:
                    await trio.lowlevel.wait_readable(self.ring.fd)
                except trio.ClosedResourceError:
                    return None
        return self._ready.popleft()

    def _submit(self) -> None:
        try:
            self.ring.submit()
        except UringError as e:
            log.error("fuse: %s", e)

    # -- replies ---------------------------------------------------------------------------------

    def commit(self, e: _Entry, data: bytes | bytearray | memoryview) -> None:
        """Queue the reply ``data`` (fuse_out_header and payload, as for /dev/fuse) for the
        request in ``e``, and ask for the entry's next request."""
        n = len(data) - OUT_HEADER.size
        if not (isinstance(data, memoryview) and data.obj is e.reply):
            e.payload[:n] = data[OUT_HEADER.size:]  # a READ's data is there already
        e.headers[:OUT_HEADER.size] = data[:OUT_HEADER.size]
        URING_ENT_IN_OUT.pack_into(e.headers, URING_ENT_IN_OUT_OFFSET, 0, e.commit_id, n, 0, 0)
        self.ring.uring_cmd(self.fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                            URING_CMD_REQ.pack(0, e.commit_id, e.qid), e.index)

    # -- serving ----------------------------------------------------------------------------------

    async def _serve(self, e: _Entry) -> None:
        e.answered = False
        await self._serve_request(e)
        if not e.answered:
            # Only requests the ring never carries (FORGET, INTERRUPT) go unanswered; an
            # entry left without a commit would never take a request again.
            e.send(reply_error(IN_HEADER.unpack_from(e.headers)[2], errno.ENOSYS))

    async def _serve_request(self, e: _Entry) -> None:
        s = self.session
        s.counters["requests"] += 1
        self.counters["ring_requests"] += 1
        h = e.headers
        length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(h)
        _flags, e.commit_id, payload_sz, _pad, _res = URING_ENT_IN_OUT.unpack_from(
            h, URING_ENT_IN_OUT_OFFSET)
        op_bytes = length - IN_HEADER.size - payload_sz
        if not 0 <= op_bytes <= FUSE_URING_OP_IN_OUT_SZ or payload_sz > len(e.payload):
            s.counters["protocol_errors"] += 1
            log.error("fuse: io_uring request lengths do not add up (len=%d, payload_sz=%d)",
                      length, payload_sz)
            e.send(reply_error(unique, errno.EIO))
            return
        op = FUSE_URING_IN_OUT_HEADER_SZ
        if opcode in DATA_OPS:
            # Parsed where the kernel put it (a WRITE's data stays in the payload buffer);
            # the raw request is only for namespace requests, which these are not.
            req = Request(opcode, unique, nodeid, uid, gid, pid, e.headers_view[op:op + op_bytes])
            await s.dispatch(req, e.headers_view[:IN_HEADER.size], e,
                             e.payload[:payload_sz] if opcode == FUSE_WRITE else None)
            return
        # Everything else is small: put it together as /dev/fuse would have delivered it.
        raw_bytes = bytearray(h[:IN_HEADER.size])
        raw_bytes += h[op:op + op_bytes]
        raw_bytes += e.payload[:payload_sz]
        raw = memoryview(raw_bytes)
        try:
            req = parse_request(raw)
        except FuseProtocolError as ex:
            s.counters["protocol_errors"] += 1
            log.error("%s", ex)
            e.send(reply_error(unique, errno.EIO))
            return
        await s.dispatch(req, raw, e)

    def _spawn(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._idle += 1
        self.counters["ring_workers_max"] = max(self.counters["ring_workers_max"],
                                                self._workers)
        self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        lock = self._lock
        try:
            while True:
                await lock.acquire()
                held = True
                try:
                    for _ in range(MAX_INLINE_REQUESTS):
                        e = await self._next()
                        if e is None:
                            return
                        coro = self._serve(e)
                        try:
                            trap = coro.send(None)
                        except StopIteration:
                            continue
                        lock.release()
                        held = False
                        self.session.counters["waited"] += 1
                        self._idle -= 1
                        if self._idle == 0 and self._workers < len(self.entries):
                            self._spawn()
                        try:
                            await _Resume(coro, trap)
                        finally:
                            self._idle += 1
                        self._submit()  # the lock holder may be asleep on the ring
                        break
                    else:
                        self._submit()
                finally:
                    if held:
                        lock.release()
        finally:
            self._workers -= 1
            self._idle -= 1

    def stats(self) -> dict[str, object]:
        return {"queues": self.queues, "served_queues": self.qids,
                "entries_per_queue": self.depth,
                "entries_alive": self._alive, "buffers_locked": self.buffers_locked,
                "workers": self._workers, **self.counters}

    def close(self) -> None:
        self.ring.close()


__all__ = ["ENABLE_URING_PARAM", "WORKER_DEPTH_FACTOR", "FuseRing", "daemon_queues",
           "enable_uring_state", "possible_cpus", "ring_queue_count", "worker_queues"]
