"""Layer: cowd frontends.  The NBD server: a thin trio adapter around the sans-I/O codec in
:mod:`cowd.frontends.nbd.protocol`, serving disks: :class:`~cowd.disk.Disk` objects in the
daemon, :class:`~cowd.workers.mapped.MappedDisk` objects in a worker process (both
:class:`~cowd.disk.api.BlockDisk`).

Theory of operation: one task per connection reads the socket and feeds the codec.  Per
request the cost that matters is the fixed one (DESIGN.md: a Python server pays ~45 us of
wakeups and syscalls per request), so the reader first tries to answer each request right
where it is parsed: refused requests, reads and in-place writes that the Disk serves
synchronously (``try_read_into``/``try_write``: a remap-cache hit and a pread/pwrite).  Their
replies are collected and sent in one write once everything one receive brought is parsed —
a queue of 32 reads costs one wakeup, one recv and one send, not 32 of each.  Reads whose
data is not in the page cache are advised (POSIX_FADV_WILLNEED) as they are parsed and read
at the end of the batch, so the disk works on all of them at once, as under an AIO server,
without a thread.  Every other request (allocation, flush, trim, a read that must wait for a
lock) gets a task of its own in the connection's nursery, so a slow request never holds up
the ones behind it.  Replies are written under the connection's send lock inside a
shielded cancel scope, so a frame is never half
sent.  Back-pressure: before a request is dispatched the reader acquires its cost (its
payload or reply bytes, at least one unit) from the connection's budget of
MAX_INFLIGHT_BYTES; while the budget is spent the reader stops reading, so a client that
queues requests faster than they complete, or never reads its replies, is held to a bounded
amount of memory.  A reply the client does not take within REPLY_SEND_TIMEOUT_S drops the
connection (a frame may be half sent by then, so nothing else is possible).

Connection slots: handshakes must finish within HANDSHAKE_TIMEOUT_S, and at most
MAX_CONNECTIONS connections are served at once.  When all slots are taken, a new connection
evicts the oldest one that is still negotiating — so a flood of idle handshakes cannot lock
well-behaved clients out for HANDSHAKE_TIMEOUT_S — and is refused only when every slot is in
transmission.

Errors: a protocol error or a broken socket ends one connection (after its in-flight
requests are answered, or have failed to be).  Anything else escaping a connection is a bug:
it is logged with its traceback and ends that connection only, never the daemon.

TLS (cowd/frontends/nbd/tls.py): the server is given one immutable TlsConfig and loads its
credentials once.  The codec decides what may happen before TLS (the spec's FORCEDTLS and
SELECTIVETLS rules) and returns StartTls after acknowledging NBD_OPT_STARTTLS; the
connection then runs the TLS handshake on its socket, inside the same negotiation scope as
the rest of option haggling (so HANDSHAKE_TIMEOUT_S and the eviction of negotiating
connections bound it too), replaces its stream with the TLS stream and tells the codec the
identity the handshake verified.  A failed handshake ends that connection only.

Connections that back a kernel device (``cowd attach --via nbd``: an NbdServer made with
``device=True``, in the daemon or in the worker that serves the device's socketpair) must
keep serving the kernel's writeback when memory is short, which may be exactly when the
kernel is writing back through them (cowd/sysmem.py).  So they take no buffer on demand:
each such connection makes DEVICE_BUFFERS resident buffers of DEVICE_SLAB_BYTES when it is
created (touched, mlocked where allowed), and every write payload and read reply comes from
there.  The kernel bounds what that needs: the attach path sets the device's request size
(``max_sectors_kb``) to DEVICE_MAX_REQUEST_BYTES and its queue (``nr_requests``) to
DEVICE_QUEUE_DEPTH, every request holds at most one buffer (its payload, or its reply until
it is sent), and DEVICE_SPARE_BUFFERS cover replies that were sent but whose buffers are not
back yet.  Anything beyond (a device whose limits could not be set) is allocated as before and
counted (``device_buffer_fallbacks`` in ``cowd stats``).  Not covered: each receive still
returns a fresh chunk of up to RECEIVE_CHUNK_BYTES (trio's ``receive_some``), and headers and
small replies are Python objects made per request; those allocations rely on
PR_SET_IO_FLUSHER alone (they never wait on I/O reclaim).

Every connection to one export shares the one Disk object, whose flush covers every write
acknowledged on any connection: multi-conn is advertised.

Shutdown: :meth:`NbdServer.shutdown` stops accepting, tells each codec to refuse new work
(``ESHUTDOWN``) and waits up to a deadline for in-flight requests to be answered; a client
that does not read its replies gets SHUTDOWN_SEND_GRACE_S before it is dropped, so it cannot
hold the drain (and the exit) hostage.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
from collections.abc import Mapping

import trio

from ...disk import DiskError
from ...disk.api import BlockDisk, WriteEnd
from ...errors import CommandFailed, UsageError
from ...sysmem import resident_buffer
from . import protocol as P
from . import wire as W
from .attach import DEVICE_MAX_REQUEST_BYTES, DEVICE_QUEUE_DEPTH
from .tls import ServerCredentials, TlsConfig, TlsError, TlsStream

log = logging.getLogger("cowd.nbd")

# Bytes of request payloads and read replies in flight per connection.  64 requests of
# 1 MiB in flight fit; a client that queues more waits until replies drain.
MAX_INFLIGHT_BYTES = 64 << 20
# A connection that has not finished negotiating after this long is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
# Connections served at once; more are closed as soon as they are accepted.  A daemon with
# worker processes shares the bound out between them (cowd/workers/).
MAX_CONNECTIONS = 512
# Largest request we accept (the codec caps writes at NBD_MAX_WRITE_BYTES too).
MAX_BLOCK_BYTES = W.NBD_MAX_WRITE_BYTES
# Read reply buffers of at least POOL_MIN_BYTES are reused, up to POOL_BYTES per connection.
POOL_MIN_BYTES = 64 << 10
POOL_BYTES = 16 << 20
# A kernel device's connection (see "Connections that back a kernel device" above): the
# largest request the attach path lets the kernel send and the requests it lets it have in
# flight (DEVICE_MAX_REQUEST_BYTES and DEVICE_QUEUE_DEPTH, .attach), buffers for replies sent
# but not yet recycled, and the size of each buffer: a request's data and its reply header
# (16 bytes simple, 20..32 structured).  40 buffers of 256 KiB: 10 MiB resident per device.
DEVICE_SPARE_BUFFERS = 8
DEVICE_BUFFERS = DEVICE_QUEUE_DEPTH + DEVICE_SPARE_BUFFERS
DEVICE_SLAB_BYTES = DEVICE_MAX_REQUEST_BYTES + 32
# Replies answered inline are sent together once everything read in one wakeup is parsed,
# or as soon as they add up to this many bytes (bounding what a batch holds).
INLINE_BATCH_BYTES = 1 << 20
# A reply frame of at most this many bytes that finds another task sending is copied into a
# queue that the sender drains in one write before it lets go, instead of waiting for its own
# syscall: requests answered by tasks that wake together (writes whose adoptions came back in
# one batch) go out in one or two writes, not one each.
QUEUED_REPLY_BYTES = 8 << 10
# A reply that the client does not take within this long (it stopped reading) drops the
# connection, which frees its slot and its budget.  Long: a paused VM's client may be slow.
REPLY_SEND_TIMEOUT_S = 120.0
# At shutdown, clients get this long to take the replies still queued for them.
SHUTDOWN_SEND_GRACE_S = 2.0


class _BufferPool:
    """Reply buffers of large reads, kept for reuse: a fresh 1 MiB bytearray costs ~110 us
    of page faults (measured here), nearly as much as the pread that fills it.  Buffers are
    recycled by exact size (clients repeat their request sizes), at most POOL_BYTES per
    connection."""

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0

    def get(self, n: int) -> bytearray | memoryview:
        free = self._free.get(n)
        if free:
            self._bytes -= n
            return free.pop()
        return bytearray(n)

    def close(self) -> None:
        self._free.clear()

    def put(self, buf: bytes | bytearray | memoryview) -> None:
        if not isinstance(buf, bytearray):
            return
        n = len(buf)
        if n < POOL_MIN_BYTES or self._bytes + n > POOL_BYTES:
            return
        self._free.setdefault(n, []).append(buf)
        self._bytes += n


class _ResidentPool:
    """A kernel device connection's buffers: DEVICE_BUFFERS slabs of DEVICE_SLAB_BYTES cut
    from one resident arena made up front (one mapping of its own, so its pages and their
    mlock go back to the kernel with the connection).  :meth:`get` hands out a view of a
    free slab's first ``n`` bytes; :meth:`put` takes it back (anything else given to it is
    dropped).  A request larger than a slab, or one that finds every slab taken, gets a
    fresh bytearray, counted in the server's ``device_buffer_fallbacks``.  While the pool
    lives, the server's ``device_buffer_bytes`` and ``device_buffers_unlocked`` (slabs mlock
    refused: touched, but swappable) count it; :meth:`close` takes it out again."""

    def __init__(self, counters: dict[str, int]) -> None:
        self._counters = counters
        arena, locked = resident_buffer(DEVICE_BUFFERS * DEVICE_SLAB_BYTES)
        self._arena = memoryview(arena)
        self._free = list(range(DEVICE_BUFFERS))
        # id(view) -> (slab, view) of every slab lent out (the view kept, so its id is not
        # reused while it is out)
        self._lent: dict[int, tuple[int, memoryview]] = {}
        self._unlocked = 0 if locked else DEVICE_BUFFERS
        self._counted = True
        counters["device_buffer_bytes"] += DEVICE_BUFFERS * DEVICE_SLAB_BYTES
        counters["device_buffers_unlocked"] += self._unlocked

    def close(self) -> None:
        if self._counted:
            self._counters["device_buffer_bytes"] -= DEVICE_BUFFERS * DEVICE_SLAB_BYTES
            self._counters["device_buffers_unlocked"] -= self._unlocked
            self._counted = False

    def get(self, n: int) -> bytearray | memoryview:
        if n <= DEVICE_SLAB_BYTES and self._free:
            slab = self._free.pop()
            start = slab * DEVICE_SLAB_BYTES
            view = self._arena[start:start + n]
            self._lent[id(view)] = (slab, view)
            return view
        self._counters["device_buffer_fallbacks"] += 1
        return bytearray(n)

    def put(self, buf: bytes | bytearray | memoryview) -> None:
        lent = self._lent.get(id(buf))
        if lent is not None and lent[1] is buf:
            del self._lent[id(buf)]
            self._free.append(lent[0])


class _Deferred:
    """Marker: a read advised now and done at the end of the batch."""


_DEFERRED = _Deferred()


class _Started:
    """Marker: a write started inline, answered when the disk calls back."""


_STARTED = _Started()


class _ByteBudget:
    """A counting semaphore in bytes (requests larger than the budget take all of it).
    Released from synchronous code too (a write's completion callback), so it is counters
    and an event, not a lock that a task may hold across a checkpoint."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._changed = trio.Event()

    async def acquire(self, n: int) -> int:
        await trio.lowlevel.checkpoint()
        while (taken := self.take_nowait(n)) is None:
            await self._changed.wait()
        return taken

    def take_nowait(self, n: int) -> int | None:
        """``acquire`` without waiting: None if the budget is short now."""
        n = min(max(n, 1), self.total)
        if self.free < n:
            return None
        self.free -= n
        return n

    def release_nowait(self, n: int) -> None:
        self.free += n
        self._changed.set()
        self._changed = trio.Event()

    async def release(self, n: int) -> None:
        self.release_nowait(n)
        await trio.lowlevel.checkpoint()

    async def wait_idle(self) -> None:
        while self.free < self.total:
            await self._changed.wait()


def export_info(name: str, disk: BlockDisk) -> W.ExportInfo:
    preferred = max(512, min(disk.cluster_size, 2 << 20))
    return W.ExportInfo(
        name=name,
        size_bytes=disk.size,
        read_only=disk.readonly,
        can_flush=True,
        can_fua=True,
        can_trim=True,
        can_write_zeroes=True,
        can_fast_zero=True,  # zeroing is always overlay metadata, never a slow data write
        can_cache=True,
        can_multi_conn=True,
        description=disk.path,
        preferred_block_bytes=preferred,
        max_block_bytes=MAX_BLOCK_BYTES,
    )


class NbdServer:
    """Serves ``disks`` (export name -> disk; the mapping may change while serving) on the
    streams given to :meth:`handle`.  ``tls`` is the whole TLS configuration (default:
    off); its credentials are loaded here, in the serving process (a worker loads its own),
    and freed by :meth:`close`.  ``device``: its connections back kernel devices (/dev/nbdN)
    and get resident buffers up front (see the module docstring)."""

    def __init__(self, disks: Mapping[str, BlockDisk], tls: TlsConfig | None = None, *,
                 max_connections: int = MAX_CONNECTIONS, device: bool = False):
        self.disks = disks
        self.max_connections = max_connections
        self.device = device
        self.tls = tls if tls is not None else TlsConfig()
        self.tls_credentials: ServerCredentials | None = (
            self.tls.load() if self.tls.enabled else None)
        self._conns: set[_Connection] = set()
        # Connections still negotiating, oldest first (a dict keeps insertion order).
        self._negotiating: dict[_Connection, None] = {}
        self._accepting = True
        self._live = 0  # handlers running (an evicted one still holds its TLS session)
        self._closing = False
        self.counters = {"connections": 0, "refused": 0, "protocol_errors": 0,
                         "handshake_timeouts": 0, "handshakes_evicted": 0,
                         "send_timeouts": 0, "handler_errors": 0, "tls_handshakes": 0,
                         "tls_failures": 0, "device_buffer_bytes": 0,
                         "device_buffers_unlocked": 0, "device_buffer_fallbacks": 0}

    def check_authz_exports(self) -> None:
        """Every export an authorization list names must be served (a typo would otherwise
        leave the export it meant open to everyone)."""
        for export, identity in sorted(self.tls.policy.authz):
            if export not in self.disks:
                served = ", ".join(sorted(self.disks)) or "none"
                raise UsageError(f"--tls-authz {export} {identity}: no export named "
                                 f"{export!r} (exports: {served})")

    def close(self) -> None:
        """Free the TLS credentials once no connection uses them (now, or when the last
        handler ends: a session must never outlive its credentials)."""
        self._closing = True
        self._free_credentials_if_idle()

    def _free_credentials_if_idle(self) -> None:
        if self._closing and not self._live and self.tls_credentials is not None:
            self.tls_credentials.close()
            self.tls_credentials = None

    def _lookup(self, name: str) -> W.ExportInfo | None:
        if name == "" and len(self.disks) == 1:
            name = next(iter(self.disks))
        disk = self.disks.get(name)
        return export_info(name, disk) if disk is not None else None

    def _list(self) -> list[W.ExportInfo]:
        return [export_info(n, d) for n, d in self.disks.items()]

    def _make_room(self) -> bool:
        """True if a new connection may be served: below MAX_CONNECTIONS, or after evicting
        the oldest connection that has not finished negotiating (it has cost us nothing we
        owe it; a connection in transmission is never evicted)."""
        if len(self._conns) < self.max_connections:
            return True
        if not self._negotiating:
            return False
        victim = next(iter(self._negotiating))
        del self._negotiating[victim]
        self._conns.discard(victim)
        victim.negotiation_scope.cancel()
        self.counters["handshakes_evicted"] += 1
        return True

    async def handle(self, stream: trio.abc.Stream) -> None:
        if not self._accepting or not self._make_room():
            self.counters["refused"] += 1
            await trio.aclose_forcefully(stream)
            return
        conn = _Connection(self, stream)
        self._live += 1
        self._conns.add(conn)
        self._negotiating[conn] = None
        self.counters["connections"] += 1
        try:
            await conn.run()
        except Exception:
            # A bug, not a peer's doing: say so loudly, but one connection's failure must not
            # take down the disks every other client is using.
            self.counters["handler_errors"] += 1
            log.exception("%s: connection handler failed", conn.codec.peer)
        finally:
            self._conns.discard(conn)
            self._negotiating.pop(conn, None)
            try:
                await trio.aclose_forcefully(conn.stream)  # a TLS stream closes its socket
            finally:
                conn.buffers.close()
                self._live -= 1
                self._free_credentials_if_idle()

    async def shutdown(self, deadline_s: float) -> None:
        """Refuse new work and wait (bounded) until in-flight requests are answered.  A
        client that does not take its replies gets SHUTDOWN_SEND_GRACE_S to do so, then its
        connection is dropped (its requests were carried out; only the replies are lost)."""
        self._accepting = False
        grace_deadline = trio.current_time() + min(deadline_s, SHUTDOWN_SEND_GRACE_S)
        with trio.move_on_after(deadline_s):
            for conn in list(self._conns):
                conn.codec.start_shutdown()
                conn.limit_sends(grace_deadline)
            for conn in list(self._conns):
                await conn.budget.wait_idle()


class _Connection:
    def __init__(self, server: NbdServer, stream: trio.abc.Stream):
        self.server = server
        self.stream = stream  # becomes a TlsStream after STARTTLS
        # Read replies and write payloads, recycled; made up front for a kernel device.
        self.buffers = _ResidentPool(server.counters) if server.device else _BufferPool()
        self.codec = P.ServerConnection(server._lookup, list_exports=server._list,
                                        peer=peer_name(stream), tls=server.tls.policy,
                                        payload_buffer=self.buffers.get)
        self.send_lock = trio.Lock()
        self._queued: list[bytes] = []  # small frames the lock holder sends (see send)
        # Writes started inline and answered when the disk calls back (_start_write): the
        # transmission's nursery (for the task that sends their replies), how many are
        # under way, and whether that task is already asked for.
        self._nursery: trio.Nursery | None = None
        self._started = 0
        self._started_idle = trio.Event()
        self._replies_due = False
        self.budget = _ByteBudget(MAX_INFLIGHT_BYTES)
        self.disk: BlockDisk | None = None
        self.broken = False
        self.negotiation_scope = trio.CancelScope(deadline=trio.current_time()
                                                  + HANDSHAKE_TIMEOUT_S)
        self._send_scope: trio.CancelScope | None = None
        self._send_deadline_cap = math.inf

    def limit_sends(self, deadline: float) -> None:
        """From now on (and for the send in progress), a send must finish by ``deadline``."""
        self._send_deadline_cap = min(self._send_deadline_cap, deadline)
        if self._send_scope is not None:
            self._send_scope.deadline = min(self._send_scope.deadline, deadline)

    async def send(self, *chunks: bytes | bytearray | memoryview) -> None:
        """Send one frame whole (shielded from cancellation), or drop the connection: a
        frame that cannot be sent within REPLY_SEND_TIMEOUT_S (the peer does not read)
        breaks the connection, and a half-sent frame leaves nothing else to do.  A small
        frame that finds another task sending is queued for that task to send
        (QUEUED_REPLY_BYTES): then this returns before the frame is on the wire."""
        if self.send_lock.locked() and sum(len(c) for c in chunks) <= QUEUED_REPLY_BYTES:
            self._queued.append(b"".join(chunks))
            await trio.lowlevel.checkpoint()
            return
        async with self.send_lock:
            if self.broken:
                return
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = min(trio.current_time() + REPLY_SEND_TIMEOUT_S,
                                     self._send_deadline_cap)
                self._send_scope = scope
                try:
                    for chunk in chunks:
                        if len(chunk):
                            await self.stream.send_all(chunk)
                    while self._queued:
                        queued = b"".join(self._queued)
                        self._queued.clear()
                        await self.stream.send_all(queued)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.broken = True
                finally:
                    self._send_scope = None
            if scope.cancelled_caught:
                self.broken = True
                self.server.counters["send_timeouts"] += 1
                log.info("%s: not taking its replies; dropping the connection",
                         self.codec.peer)
            if self.broken:
                # Wake the reader (its receive fails), so the connection winds down.
                await trio.aclose_forcefully(self.stream)

    async def _flush_codec_output(self) -> None:
        out = self.codec.data_to_send()
        if out:
            await self.send(out)

    async def run(self) -> None:
        try:
            done = None
            with self.negotiation_scope:
                done = await self._negotiate()
            self.server._negotiating.pop(self, None)
            if self.negotiation_scope.cancel_called:
                # Evicted or timed out, even if the last option completed negotiation
                # before the cancellation reached a checkpoint: the slot is no longer ours.
                done = None
            if done is None:
                if (self.negotiation_scope.cancelled_caught
                        and trio.current_time() >= self.negotiation_scope.deadline):
                    self.server.counters["handshake_timeouts"] += 1
                return
            name = done.export.name
            self.disk = self.server.disks[name]
            await self._transmission()
        except W.NbdProtocolError as e:
            self.server.counters["protocol_errors"] += 1
            log.info("%s", e)
            await self._flush_codec_output()
        except TlsError as e:
            self.server.counters["tls_failures"] += 1
            log.info("%s: %s", self.codec.peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass

    async def _start_tls(self) -> None:
        """After the codec acknowledged NBD_OPT_STARTTLS (the ACK is sent): the handshake,
        then negotiation starts over on the TLS stream."""
        creds = self.server.tls_credentials
        transport = self.stream
        if creds is None or not isinstance(transport, trio.SocketStream):
            raise TlsError("TLS: this connection cannot do TLS (no credentials or no socket)")
        tls = await TlsStream.server_handshake(transport, creds)
        self.stream = tls
        self.server.counters["tls_handshakes"] += 1
        log.debug("%s: %s, identity %s", self.codec.peer, tls.description, tls.identity)
        self.codec.tls_established(tls.identity)

    async def _events(self) -> W.Event:
        """The next codec event, reading from the socket as needed."""
        while True:
            ev = self.codec.next_event()
            await self._flush_codec_output()
            if ev is not P.NEED_DATA:
                return ev
            data = await self.stream.receive_some(W.RECEIVE_CHUNK_BYTES)
            self.codec.receive_data(data)

    async def _negotiate(self) -> W.NegotiationDone | None:
        await self._flush_codec_output()  # the greeting
        while True:
            ev = await self._events()
            if isinstance(ev, W.NegotiationDone):
                return ev
            if isinstance(ev, W.Aborted | W.ConnectionClosed):
                return None
            if isinstance(ev, W.StartTls):
                await self._start_tls()
            # OptionHandled: the reply is already sent; negotiation goes on.

    async def _send_batch(self, batch: list[bytes | bytearray | memoryview]) -> None:
        """Send the replies answered inline, in one write, and recycle their buffers."""
        await self.send(batch[0] if len(batch) == 1 else b"".join(batch))
        for reply in batch:
            self.buffers.put(reply)
        batch.clear()

    async def _transmission(self) -> None:
        # Errors of the reading loop are caught inside the nursery: escaping it they would
        # arrive as an ExceptionGroup, which no ``except`` clause of run() matches.  Either
        # way the nursery then waits for the requests already in flight.
        error: W.NbdProtocolError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            batch: list[bytes | bytearray | memoryview] = []
            batch_bytes = 0
            deferred: list[W.Request] = []  # reads waiting for the disk, advised
            try:
                while True:
                    ev = self.codec.next_event()
                    if ev is P.NEED_DATA:
                        # Everything this wakeup brought is parsed.  Reads that missed the page
                        # cache were advised (the disk is fetching them all at once): do them
                        # now, then send the batch of replies in one write and read more.
                        for req in deferred:
                            reply = self._answer_inline(req, may_block=True)
                            if isinstance(reply, _Started):
                                continue
                            if reply is not None and not isinstance(reply, _Deferred):
                                batch.append(reply)
                            else:
                                taken = await self.budget.acquire(req.length)
                                nursery.start_soon(self._serve, req, taken)
                        deferred.clear()
                        if batch:
                            await self._send_batch(batch)
                            batch_bytes = 0
                        self.codec.receive_data(
                            await self.stream.receive_some(W.RECEIVE_CHUNK_BYTES))
                        continue
                    if isinstance(ev, W.Request):
                        reply = self._answer_inline(ev)
                        if isinstance(reply, _Deferred):
                            deferred.append(ev)
                            continue
                        if isinstance(reply, _Started):
                            continue
                        if reply is not None:
                            batch.append(reply)
                            batch_bytes += len(reply)
                            if batch_bytes >= INLINE_BATCH_BYTES:
                                await self._send_batch(batch)
                                batch_bytes = 0
                            continue
                        if batch:  # never sit on finished replies while we may block
                            await self._send_batch(batch)
                            batch_bytes = 0
                        payload = ev.command in (W.NBD_CMD_READ, W.NBD_CMD_WRITE)
                        cost = ev.length if payload and not ev.error else 1
                        taken = await self.budget.acquire(cost)
                        nursery.start_soon(self._serve, ev, taken)
                    elif isinstance(ev, W.Disconnect | W.ConnectionClosed):
                        if batch:
                            await self._send_batch(batch)
                        break
                    else:
                        raise AssertionError(f"unexpected event in transmission: {ev!r}")
            except W.NbdProtocolError as e:
                error = e
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass
            try:
                while self._started:  # writes started inline: their replies need the nursery
                    await self._started_idle.wait()
            finally:
                self._nursery = None
        if error is not None:
            raise error

    def _answer_inline(self, req: W.Request,
                       may_block: bool = False
                       ) -> bytes | bytearray | memoryview | _Deferred | _Started | None:
        """The reply to ``req`` if it can be answered right here with no await (refused
        requests, reads and in-place writes that the Disk serves synchronously); _DEFERRED
        for a read whose data is not in the page cache or a write that allocates (advised
        now, done at the end of the batch with ``may_block``); None when the request needs a
        task of its own."""
        codec = self.codec
        if req.error:
            return codec.error_reply(req, req.error)
        disk = self.disk
        assert disk is not None
        try:
            if req.command == W.NBD_CMD_READ:
                buf, dest = self._read_reply_buffer(req)
                try:
                    done = disk.try_read_into(req.offset, dest, may_block=may_block)
                except DiskError:
                    self.buffers.put(buf)  # a device's buffer must come back, even so
                    raise
                if done:
                    return buf
                self.buffers.put(buf)
                if not may_block and req.length <= INLINE_BATCH_BYTES:
                    disk.advise(req.offset, req.length)
                    return _DEFERRED
            elif req.command == W.NBD_CMD_WRITE and not req.fua:
                assert req.data is not None
                if not may_block and disk.advise_write(req.offset, req.length):
                    return _DEFERRED  # an allocation: its copy-up source is being fetched
                if disk.try_write(req.offset, req.data):
                    self._recycle_payload(req)
                    return codec.ok_reply(req)
                if self._start_write(req):
                    return _STARTED
        except DiskError as e:
            self._recycle_payload(req)
            return codec.error_reply(req, W.nbd_error(e.errno), str(e))
        return None

    def _start_write(self, req: W.Request) -> bool:
        """Start a write the disk writes now and answers later (BlockDisk.start_write: a
        worker's first write of whole subclusters), without a task of its own: its reply
        is queued when the disk calls back, and one task sends the replies queued by then
        (a batch of adoptions answers many writes at once)."""
        if self._nursery is None or self.disk is None or req.data is None:
            return False
        taken = self.budget.take_nowait(req.length)
        if taken is None:
            return False
        try:
            started = self.disk.start_write(req.offset, req.data,
                                            functools.partial(self._write_ended, req, taken))
        except BaseException:
            self.budget.release_nowait(taken)
            raise
        if not started:
            self.budget.release_nowait(taken)
            return False
        self._started += 1
        return True

    def _write_ended(self, req: W.Request, taken: int, end: WriteEnd) -> None:
        """The disk's callback for a write _start_write started (synchronous)."""
        self._started -= 1
        if not self._started:
            self._started_idle.set()
            self._started_idle = trio.Event()
        nursery = self._nursery
        if end.redo and nursery is not None:
            nursery.start_soon(self._serve, req, taken)  # the disk refused it: again, whole
            return
        self._recycle_payload(req)
        self.budget.release_nowait(taken)
        if end.redo:
            return  # the connection is gone: no one to answer
        if end.errno:
            self._queued.append(bytes(self.codec.error_reply(req, W.nbd_error(end.errno),
                                                             end.message)))
        else:
            self._queued.append(bytes(self.codec.ok_reply(req)))
        if not self._replies_due and nursery is not None:
            self._replies_due = True
            nursery.start_soon(self._send_queued)

    async def _send_queued(self) -> None:
        self._replies_due = False
        await self.send()  # sends what is queued (or leaves it to the task sending now)

    def _recycle_payload(self, req: W.Request) -> None:
        """A write is done with its payload (the disk copies what it keeps before it
        returns): the buffer goes back to the pool the codec takes payloads from, sparing the
        next write of that size a fresh allocation (above the allocator's mmap threshold,
        cowd/process.py, a fresh 1 MiB buffer is an mmap, 256 page faults and a munmap: with
        the fresh receive buffers, what made 1 MiB writes 4x slower)."""
        if req.data is not None:
            self.buffers.put(req.data)
        req.data = None

    async def _serve(self, req: W.Request, taken: int) -> None:
        try:
            await self._answer(req)
        finally:
            await self.budget.release(taken)

    def _read_reply_buffer(self, req: W.Request) -> tuple[bytearray | memoryview, memoryview]:
        """A (recycled) buffer holding READ's reply header, and the view its data goes in."""
        header = self.codec.read_reply_header(req)
        buf = self.buffers.get(len(header) + req.length)
        buf[: len(header)] = header
        return buf, memoryview(buf)[len(header):]

    async def _answer(self, req: W.Request) -> None:
        # Refused requests (req.error) never get here: _answer_inline answers them.
        codec = self.codec
        disk = self.disk
        assert disk is not None
        cmd = req.command
        try:
            if cmd == W.NBD_CMD_READ:
                buf, dest = self._read_reply_buffer(req)
                try:
                    await disk.read_into(req.offset, dest)
                    await self.send(buf)
                finally:
                    self.buffers.put(buf)
                return
            if cmd == W.NBD_CMD_WRITE:
                assert req.data is not None
                try:
                    await disk.write(req.offset, req.data, fua=req.fua)
                finally:
                    self._recycle_payload(req)
            elif cmd == W.NBD_CMD_FLUSH:
                await disk.flush()
            elif cmd == W.NBD_CMD_TRIM:
                await disk.trim(req.offset, req.length)
                if req.fua:
                    await disk.flush()
            elif cmd == W.NBD_CMD_WRITE_ZEROES:
                may_unmap = not req.flags & W.NBD_CMD_FLAG_NO_HOLE
                await disk.write_zeroes(req.offset, req.length, may_unmap=may_unmap,
                                        fua=req.fua)
            elif cmd == W.NBD_CMD_CACHE:
                await disk.prefetch(req.offset, req.length)
            elif cmd == W.NBD_CMD_BLOCK_STATUS:
                runs = await disk.block_status(req.offset, req.length)
                desc = [(n, (W.NBD_STATE_HOLE if hole else 0) | (W.NBD_STATE_ZERO if zero else 0))
                        for n, hole, zero in runs]
                await self.send(codec.block_status_reply(req, desc))
                return
            else:
                await self.send(codec.error_reply(req, W.NBD_EINVAL))
                return
        except DiskError as e:
            await self.send(codec.error_reply(req, W.nbd_error(e.errno), str(e)))
            return
        except Exception:
            log.exception("%s: %s failed", disk.path, req.command_name)
            await self.send(codec.error_reply(req, W.NBD_EIO, "internal error"))
            return
        await self.send(codec.ok_reply(req))


def peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        if sock is not None and sock.family == socket.AF_UNIX:
            return "nbd client (unix)"
        if sock is not None:
            host, port = sock.getpeername()[:2]
            return f"nbd client {host}:{port}"
    except OSError:
        pass
    return "nbd client"


async def open_nbd_listeners(addresses: list[tuple[str, str, int]]) -> list[trio.SocketListener]:
    """Bind every address: ('unix', path, 0) or ('tcp', host, port)."""
    listeners: list[trio.SocketListener] = []
    for kind, addr, port in addresses:
        try:
            if kind == "unix":
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await sock.bind(addr)
                os.chmod(addr, 0o600)
                sock.listen(128)
                listeners.append(trio.SocketListener(sock))
            else:
                listeners.extend(await trio.open_tcp_listeners(port, host=addr))
        except OSError as e:  # EADDRINUSE, EACCES: say which address
            where = addr if kind == "unix" else f"{addr}:{port}"
            raise CommandFailed(f"--nbd {kind}:{where}: cannot listen: "
                                f"{e.strerror or e}") from None
    return listeners

