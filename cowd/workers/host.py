"""Layer: cowd workers — the control plane's side: :class:`WorkerPool` and one
:class:`WorkerLink` per worker process.

The pool starts ``count`` workers (``python -m cowd.workers.worker``), describes every served
disk to each (a :class:`~cowd.workers.wire.DiskSpec` with fresh descriptions of the chain's
files), hands them client connections in turn, answers their misses and requests with the
disk's :class:`~cowd.disk.Disk`, and restarts a worker that dies.  The contract it keeps is
written in :mod:`cowd.workers`; how, here:

- *Ordering.*  Every answer that carries remaps plans them (``Disk.segments``) and queues
  them in one synchronous step: ``segments`` returns right after its plan, with no
  checkpoint, and nothing awaits until the REMAPS are queued.
- *The change gate.*  A request that changes a disk's mapping (a forwarded write, trim,
  write-zeroes) first enters the disk's :class:`ChangeGate` with the granules it touches, then
  invalidates every worker holding remaps of the disk — waiting for each one's
  acknowledgement, except the requester's for a write — then asks the disk, then leaves.
  A plan never sends remaps of a granule inside the gate: a miss there waits until the
  change is done, and read-ahead, priming and a write's fresh remaps leave gated granules out.
  So no worker can learn a remap from before a change after it acknowledged the change's
  invalidation.
- *Holders.*  A worker holds a disk once remaps of it were queued for it; invalidations go to
  holders only.  A dead worker holds nothing.  A worker that does not acknowledge an
  invalidation within ACK_TIMEOUT_S is killed (a mapped write through a stale remap is worse
  than a dropped connection).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from formats.qcow2 import Units
from formats.remote import RemoteBase, RemoteFile

from ..disk import Disk, DiskError
from ..disk.lending import Adoption, FileRange
from ..disk.remote import Deadline
from ..frontends.fuse.mount import clone_fuse_fd
from ..frontends.fuse.protocol import IN_HEADER, FuseProtocolError, parse_request, reply_error
from ..frontends.fuse.server import FuseFrontend
from ..frontends.nbd.server import MAX_CONNECTIONS
from ..frontends.nbd.tls import TlsConfig
from . import wire as W
from .channel import Calls, ChannelStream
from .gated import GatedDisk, zero_range
from .served import Served

log = logging.getLogger("cowd.workers")

# Granules past a miss whose remaps go with the answer (a sequential reader's next misses).
READAHEAD_GRANULES = 64
# Priming sends a worker a disk's remaps in steps of this many granules (a few milliseconds
# of planning each), one step at a time for the whole pool, yielding between: a miss waits
# for one step at most, not for every disk's priming (16 disks primed at once, a step each of
# 4096 granules, held misses for a second or more: a 0.4-2 s p99 at the start).
PRIME_STEP_GRANULES = 256
# A worker that does not acknowledge an invalidation in this long is killed.
ACK_TIMEOUT_S = 30.0
# A worker that dies is started again after a pause that doubles from RESTART_MIN_S (a
# worker that dies at once, every time, costs little) up to RESTART_MAX_S.
RESTART_MIN_S = 0.1
RESTART_MAX_S = 5.0
# A worker that lived this long resets the pause.
RESTART_STABLE_S = 30.0
# A worker that has not answered its first query after this long is reported started
# anyway (a loaded machine imports slowly; its connections wait in the channel meanwhile).
START_TIMEOUT_S = 60.0
# How long STOP lets workers drain before they are killed.
STOP_TIMEOUT_S = 15.0
# The most clusters of one disk lent to one worker and not yet adopted: what a worker's death
# leaves to give back, and what a crash of the daemon can leak (cowd check --repair frees it).
MAX_LENT_BYTES = 64 << 20


def _covers(runs: list[W.RemapRun], start: int, end: int) -> bool:
    pos = start
    for r in runs:
        if r.guest_offset > pos:
            break
        pos = max(pos, r.guest_offset + r.length)
        if pos >= end:
            return True
    return pos >= end


def _fresh_fds(served: Served) -> tuple[int, ...]:
    """New open file descriptions of the chain's files for one worker (not the daemon's own,
    which carry its image locks)."""
    fds: list[int] = []
    try:
        for f in served.files:
            mode = os.O_RDWR if f.writable and not served.disk.readonly else os.O_RDONLY
            fds.append(os.open(f"/proc/self/fd/{f.fd}", mode | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)


def _remote_of(f: object) -> RemoteBase | None:
    """The remote base (formats/remote/) a chain file reads through, or None."""
    return f.remote if isinstance(f, RemoteFile) else None


# ---- one worker ----------------------------------------------------------------------------


class WorkerLink:
    """One worker process and its channel, restarted when it dies."""

    def __init__(self, pool: WorkerPool, index: int):
        self.pool = pool
        self.index = index
        self.chan: ChannelStream | None = None
        self.proc: trio.Process | None = None
        self.holds: set[int] = set()  # disk ids this worker has remaps of
        self.acks = Calls()  # invalidations waiting for INVALIDATED
        self.queries = Calls()  # stats queries
        self.starts = 0
        self.deaths = 0
        self.handed = 0  # connections handed to it, over its lives
        self.ready = False  # this life answered its first query: imports done, loop running
        self._to_close: set[int] = set()  # fds to close once sent
        # Per disk id, the file offsets of the clusters lent to this worker and not adopted
        # yet: given back once it can no longer write them (it died, or dropped the disk).
        self.lent: dict[int, set[int]] = {}
        self.counters = {k: 0 for k in ("misses", "requests", "remap_runs_sent",
                                        "invalidations_sent", "ack_timeouts",
                                        "clusters_lent", "clusters_adopted",
                                        "units_adopted", "units_refused", "adopted_sent",
                                        "writes_in_place")}

    @property
    def alive(self) -> bool:
        return self.chan is not None and not self.chan.closed

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the worker, serve it, start it again when it dies, until the pool stops."""
        pause = RESTART_MIN_S
        started = False
        while not self.pool.stopping:
            born = trio.current_time()
            try:
                await self._life(task_status if not started else None)
            finally:
                started = True
            if self.pool.stopping:
                return
            self.deaths += 1
            lived = trio.current_time() - born
            pause = RESTART_MIN_S if lived > RESTART_STABLE_S else min(RESTART_MAX_S, pause * 2)
            rc = self.proc.returncode if self.proc is not None else None
            how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
            log.warning("worker %d died (%s, lived %.1f s); starting it again in %.1f s",
                        self.index, how, lived, pause)
            await trio.sleep(pause)

    async def _life(self, task_status: trio.TaskStatus[None] | None) -> None:
        """One life of the worker: spawn it, describe the disks, serve its channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "cowd.workers.worker", "--channel",
                 str(theirs.fileno()), "--index", str(self.index), "--max-connections",
                 str(max(1, -(-MAX_CONNECTIONS // len(self.pool.links)))),
                 *self.pool.tls_args(),
                 "--log-level", logging.getLevelName(logging.getLogger().level)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                # This very interpreter (argv[0] still names the venv's, for its site
                # packages): a user may run a python reached through folders it could not
                # exec by path (a root-owned pyenv behind the venv's symlink).
                executable="/proc/self/exe")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.starts += 1
        chan = ChannelStream(trio.socket.from_stdlib_socket(ours), f"worker {self.index}")
        self.chan = chan
        try:
            for served in list(self.pool.disks.values()):
                self.describe(served)
            if self.pool.fuse is not None and self.pool.fuse.mounted:
                self.serve_fuse(self.pool.fuse)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chan.writer, self._to_close)
                ready = self.queries.new()  # answered once the worker's loop runs
                chan.send(W.StatsQuery(ready))
                nursery.start_soon(self._started, ready, task_status)
                try:
                    await self._read(chan, nursery)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            chan.close()
            self.holds.clear()
            dead = ConnectionError(f"worker {self.index} is gone")
            self.acks.fail_all(dead)
            self.queries.fail_all(dead)
            for fd in self._to_close:
                os.close(fd)
            self._to_close.clear()
            with trio.CancelScope(shield=True):
                await self._reap()
                await self.give_back()  # the process is gone: it writes nothing any more

    async def _started(self, cookie: int, task_status: trio.TaskStatus[None] | None) -> None:
        """Report the worker started once it answered its first query (it has imported and
        runs its loop), so the daemon listens only when its workers can serve."""
        with trio.move_on_after(START_TIMEOUT_S):
            try:
                await self.queries.wait(cookie)
            except ConnectionError:
                pass  # it died at once: run() starts it again
            else:
                self.ready = True
                self.pool.any_ready.set()
        if task_status is not None:
            task_status.started()

    async def _reap(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with trio.move_on_after(STOP_TIMEOUT_S if self.pool.stopping else 1.0):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self.chan is not None:
            self.chan.close()

    async def give_back(self, disk_ids: list[int] | None = None) -> None:
        """Free what this worker was lent and never adopted (of ``disk_ids``, or all) once
        it can no longer write it: dead, or it answered a message sent after DISK_GONE (its
        fds of the disk are closed).  A disk already closed keeps them (leaked clusters)."""
        for disk_id in list(self.lent) if disk_ids is None else disk_ids:
            offsets = self.lent.pop(disk_id, set())
            served = self.pool.disks.get(disk_id) or self.pool.leaving.get(disk_id)
            if not offsets or served is None:
                continue
            cs = served.disk.cluster_size
            try:
                await served.disk.lending.give_back(FileRange(off, cs) for off in offsets)
            except DiskError as e:
                log.info("%s: %d clusters lent to worker %d stay allocated (leaked): %s",
                         served.disk.path, len(offsets), self.index, e)

    def describe(self, served: Served) -> None:
        assert self.chan is not None
        fds = _fresh_fds(served)
        self._to_close.update(fds)
        disk = served.disk
        self.chan.send(W.DiskSpec(served.disk_id, served.name, disk.path, disk.size,
                                  disk.cluster_size, disk.granule, disk.readonly,
                                  tuple(f.writable for f in served.files), served.scope,
                                  served.fuse_ino, served.lend_file(),
                                  tuple(_remote_of(f) is not None for f in served.files),
                                  served.unit(), fds))

    def hand_off(self, fd: int, peer: str, scope: str) -> None:
        assert self.chan is not None
        self._to_close.add(fd)
        self.chan.send(W.Connection(peer, scope, (fd,)))
        self.handed += 1

    def serve_fuse(self, fe: FuseFrontend) -> None:
        """Give the worker a clone of the FUSE mount's descriptor to serve."""
        assert self.chan is not None
        clone = clone_fuse_fd(fe.fd)
        self._to_close.add(clone)
        self.chan.send(W.FuseSession(dataclasses.asdict(fe.options), (clone,)))

    async def _read(self, chan: ChannelStream, nursery: trio.Nursery) -> None:
        async for msg in chan.messages():
            if isinstance(msg, W.Miss):
                self.counters["misses"] += 1
                nursery.start_soon(self._miss, msg)
            elif isinstance(msg, W.Request):
                self.counters["requests"] += 1
                if msg.op == W.Op.WRITE:
                    self._advise_write(msg)
                nursery.start_soon(self._request, msg)
            elif isinstance(msg, W.Invalidated):
                self.acks.complete(msg.cookie, True)
            elif isinstance(msg, W.Reclaimed):
                self.acks.complete(msg.cookie, msg.runs)
            elif isinstance(msg, W.Stats):
                self.queries.complete(msg.cookie, msg.stats)
            elif isinstance(msg, W.Release):
                self.holds.discard(msg.disk_id)
            elif isinstance(msg, W.FuseForward):
                # Answered here, in order: the namespace is the daemon's (handles, lookups).
                chan.send(W.Reply(msg.cookie, 0, self.pool.fuse_reply(msg.request)))
            else:
                raise W.ChannelError(f"worker {self.index}: unexpected message {msg!r}")

    def _advise_write(self, r: W.Request) -> None:
        """Start the copy-up sources of a forwarded write on their way into the page cache
        as it arrives: every write of one receive is advised before the first runs (they
        run as tasks once the reader waits), so a cold base is read for all at once, as the
        NBD server does for its own batches."""
        served = self.pool.disks.get(r.disk_id)
        if served is not None:
            served.disk.advise_write(r.guest_offset, r.length)

    def _reply(self, cookie: int, err: int = 0, data: bytes | bytearray = b"") -> None:
        if self.chan is not None:
            self.chan.send(W.Reply(cookie, err, data))

    def _send_runs(self, served: Served, runs: list[W.RemapRun]) -> None:
        """Queue remaps (the caller planned them in this same synchronous step)."""
        if not runs or self.chan is None:
            return
        self.holds.add(served.disk_id)
        for raw in W.encode_remaps(served.disk_id, runs):
            self.chan.send_raw(raw)
        self.counters["remap_runs_sent"] += len(runs)

    # -- misses ------------------------------------------------------------------------

    async def _miss(self, m: W.Miss) -> None:
        served = self.pool.disks.get(m.disk_id)
        if served is None:
            self._reply(m.cookie, errno.ENODEV, b"disk is no longer served")
            return
        disk = served.disk
        g = disk.granule
        end = m.guest_offset + m.length
        if m.length <= 0 or m.guest_offset < 0 or end > disk.size:
            self._reply(m.cookie, errno.EINVAL, f"{disk.path}: miss outside the disk "
                        f"(offset={m.guest_offset}, length={m.length})".encode())
            return
        first, want = m.guest_offset // g, -(-end // g)
        fresh = m.disk_id not in self.holds
        deadline = Deadline()  # one for the plan's fetches and the read's (a remote base)
        try:
            while True:
                await served.gate.wait_clear(first, want)
                ahead = served.gate.clear_prefix(want, min(-(-disk.size // g),
                                                           want + READAHEAD_GRANULES))
                segs = await disk.segments(first * g, min(disk.size, ahead * g) - first * g,
                                           deadline=deadline, direct=True)
                # -- from here to the queueing, no await (the ordering rule) --
                if served.gate.overlaps(first, want):
                    continue  # a change began while the plan waited for a lock
                runs = served.runs(segs)
                self._send_runs(served, runs)
                break
            if _covers(runs, m.guest_offset, end):
                self._reply(m.cookie)
            else:  # a cluster that cannot be remapped (compressed): the data itself
                buf = bytearray(m.length)
                await disk.read_into(m.guest_offset, buf, deadline)
                self._reply(m.cookie, 0, buf)
        except DiskError as e:
            self.pool.check_readonly(served)
            self._reply(m.cookie, e.errno or errno.EIO, str(e).encode())
            return
        if fresh and m.disk_id in self.holds:
            self.pool.prime(self, served)

    async def prime_step(self, served: Served, pos: int, life: int) -> int | None:
        """Send this worker the remaps of the disk's next PRIME_STEP_GRANULES from guest
        offset ``pos``, as many as its table takes; the next step's offset, or None: done
        (or the worker's life ``life`` ended, or it dropped the disk)."""
        from .mapped import MAX_TABLE_ENTRIES

        disk = served.disk
        g = disk.granule
        limit = min(disk.size, MAX_TABLE_ENTRIES * g)
        if pos >= limit or self.starts != life or not self.alive or \
                served.disk_id not in self.holds or \
                self.pool.disks.get(served.disk_id) is not served:
            await trio.lowlevel.checkpoint()
            return None
        end = min(limit, pos + PRIME_STEP_GRANULES * g)
        try:
            segs = await disk.segments(pos, end - pos, direct=True)
        except DiskError as e:
            log.info("%s: priming worker %d stopped: %s", disk.path, self.index, e)
            return None
        if self.starts != life or served.disk_id not in self.holds:
            return None  # it died (or dropped the disk) while the plan waited
        self._send_runs(served, served.runs(segs))  # gated granules left out
        return end

    # -- requests ----------------------------------------------------------------------

    async def _request(self, r: W.Request) -> None:
        served = self.pool.disks.get(r.disk_id)
        if served is None:
            self._reply(r.cookie, errno.ENODEV, b"disk is no longer served")
            return
        disk = served.disk
        try:
            if r.op == W.Op.READ:
                buf = bytearray(max(0, r.length))
                await disk.read_into(r.guest_offset, buf)
                self._reply(r.cookie, 0, buf)
                return
            if r.op == W.Op.WRITE:
                await self._write(served, r)
            elif r.op in (W.Op.TRIM, W.Op.WRITE_ZEROES):
                await self._zero(served, r)
            elif r.op == W.Op.LEND:
                self._reply(r.cookie, 0, W.lent_runs(await self._lend(served, r.length)))
                return
            elif r.op == W.Op.ADOPT:
                await self._adopt(served, r)
            elif r.op == W.Op.ADOPT_UNITS:
                self._reply(r.cookie, 0, await self._adopt_units(served, r))
                return
            elif r.op == W.Op.FLUSH:
                await self.pool.reclaim(served)
                await disk.flush()
            elif r.op == W.Op.CACHE:
                await disk.prefetch(r.guest_offset, r.length)
            elif r.op == W.Op.BLOCK_STATUS:
                runs = await disk.block_status(r.guest_offset, r.length)
                self._reply(r.cookie, 0, W.status_runs([(n, hole) for n, hole, _z in runs]))
                return
            else:
                self._reply(r.cookie, errno.EINVAL, f"unknown op {r.op}".encode())
                return
        except DiskError as e:
            self.pool.check_readonly(served)  # before the reply: the worker learns it first
            self._reply(r.cookie, e.errno or errno.EIO, str(e).encode())
            return
        except Exception:
            log.exception("%s: a worker's %s failed", disk.path, r.op.name)
            self._reply(r.cookie, errno.EIO, b"internal error")
            return
        self._reply(r.cookie)

    async def _write(self, served: Served, r: W.Request) -> None:
        disk = served.disk
        if not r.flags & W.FLAG_FUA and disk.try_write(r.guest_offset, r.data, allocate=False):
            # Nothing changed the mapping (the worker's remap of these clusters was gone: it
            # gets them back, writable, so its next writes there stay local).  No gate, and
            # no holder to tell: most of a second worker's writes to clusters the first one
            # allocated came here, each waiting for the first one's acknowledgement.
            self.counters["writes_in_place"] += 1
            await self._send_fresh(served, r.guest_offset, r.guest_offset + r.length, None)
            return
        # The requester needs no acknowledgement: the invalidation reaches it before the
        # reply does, and a write frees no cluster a worker may write in place.
        async with self.pool.changing(served, r.guest_offset, r.length, requester=self,
                                      ack_requester=False) as token:
            await disk.write(r.guest_offset, r.data, fua=bool(r.flags & W.FLAG_FUA))
            if token is not None:
                await self._send_fresh(served, r.guest_offset, r.guest_offset + r.length, token)

    async def _send_fresh(self, served: Served, guest_offset: int, guest_end: int,
                          token: object | None) -> None:
        """The remaps of the clusters a change of this worker's (``token``; None: a write in
        place, no change) just wrote, so its next writes there stay local.  Without a change
        of its own, planned directly: after the plan's checkpoint, queued with no await
        between (the ordering rule); granules a change is under way in are left out."""
        disk = served.disk
        first, last = served.granules(guest_offset, guest_end)
        g = disk.granule
        segs = await disk.segments(first * g, min(disk.size, last * g) - first * g,
                                   direct=token is None)
        self._send_runs(served, served.runs(segs, but_gated=token))

    async def _lend(self, served: Served, clusters: int) -> list[W.LentRun]:
        """Lend this worker up to ``clusters`` free clusters of the disk's top file
        (formats/qcow2/lend.py), as many as MAX_LENT_BYTES leaves room for."""
        disk = served.disk
        lent = self.lent.setdefault(served.disk_id, set())
        cs = disk.cluster_size
        clusters = min(clusters, MAX_LENT_BYTES // cs - len(lent))
        if served.lend_file() < 0 or clusters <= 0:
            return []
        runs = await disk.lending.lend(clusters)
        out = []
        for run in runs:
            lent.update(range(run.file_offset, run.file_offset + run.length, cs))
            out.append(W.LentRun(run.file_offset, run.length))
        self.counters["clusters_lent"] += clusters
        return out

    async def _adopt(self, served: Served, r: W.Request) -> None:
        """The worker wrote lent clusters whole for its write of [guest_offset, +length):
        map them (disk.lending.adopt: an allocation, durable at the next flush) inside the
        change gate, as a forwarded write would be, then send the fresh remaps."""
        disk = served.disk
        adoptions = W.parse_adoptions(r.data)
        lent = self.lent.get(served.disk_id, set())
        cs = disk.cluster_size
        end = r.guest_offset + r.length
        for a in adoptions:
            offsets = range(a.file_offset, a.file_offset + a.length, cs)
            if a.guest_offset < r.guest_offset or a.guest_offset + a.length > end or \
                    not all(off in lent for off in offsets):
                raise DiskError(errno.EINVAL, f"{disk.path}: a worker adopted clusters it "
                                f"was not lent (guest_offset={a.guest_offset}, "
                                f"file_offset={a.file_offset})")
        async with self.pool.changing(served, r.guest_offset, r.length, requester=self,
                                      ack_requester=False) as token:
            await disk.lending.adopt([Adoption(a.guest_offset, a.length, a.file_offset)
                                      for a in adoptions])
            for a in adoptions:
                lent.difference_update(range(a.file_offset, a.file_offset + a.length, cs))
                self.counters["clusters_adopted"] += a.length // cs
            if token is not None:
                await self._send_fresh(served, r.guest_offset, end, token)
        if r.flags & W.FLAG_FUA:
            await disk.flush()

    async def _adopt_units(self, served: Served, r: W.Request) -> bytes:
        """The worker wrote whole subclusters at their place in clusters, the guest clusters'
        own or lent to it (disk.lending.adopt_units): allocate each run there, or refuse it.
        Returns a byte per run: 1 adopted, 0 refused.

        One change for the whole batch: the gate over every run's granules, the runs
        adopted, the other holders told what was adopted (ADOPTED, acknowledged before the
        reply: a read on another connection after the write's reply sees it).  Nobody is
        invalidated or sent remaps: each worker applies the adopted runs to the table
        entries it still has when it reads the message (MappedDisk._apply_adopted says why
        that is exact), so its table stays warm and a batch of 32 adoptions costs one
        message each way, plus one to each other holder and its acknowledgement."""
        disk = served.disk
        runs = W.parse_adoptions(r.data)
        if served.unit() == 0:
            raise DiskError(errno.EINVAL, f"{disk.path}: a worker adopted subclusters of a "
                                          f"disk that has none to adopt")
        lent = self.lent.get(served.disk_id, set())
        cs = disk.cluster_size
        out = bytearray(len(runs))
        inside = [i for i, a in enumerate(runs) if a.length > 0 and a.guest_offset >= 0
                  and a.guest_offset + a.length <= disk.size]  # the rest: refused
        ranges = [served.granules(runs[i].guest_offset, runs[i].guest_offset + runs[i].length)
                  for i in inside]
        hosts = [runs[i].file_offset - runs[i].guest_offset % cs for i in inside]
        async with served.gate.changing_many(ranges):
            got = await disk.lending.adopt_units(
                [Adoption(runs[i].guest_offset, runs[i].length, runs[i].file_offset)
                 for i in inside], [h in lent for h in hosts])
            await self.pool.tell_adopted(
                served, [runs[i] for i, o in zip(inside, got, strict=True)
                         if o is not Units.REFUSED], requester=self)
        for i, host, outcome in zip(inside, hosts, got, strict=True):
            if outcome is Units.LENT:
                lent.discard(host)
                self.counters["clusters_adopted"] += 1
            out[i] = outcome is not Units.REFUSED
            self.counters["units_adopted" if out[i] else "units_refused"] += 1
        if r.flags & W.FLAG_FUA:
            await disk.flush()
        return bytes(out)

    async def _zero(self, served: Served, r: W.Request) -> None:
        # Clusters may be freed: every holder, this worker too, must drop them first.
        async with self.pool.changing(served, r.guest_offset, r.length, requester=self,
                                      ack_requester=True):
            await zero_range(served.disk, r.op, r.guest_offset, r.length, r.flags)

    async def reclaim(self, served: Served) -> None:
        """Take back and free what this worker holds of ``served`` unwritten (see
        WorkerPool.reclaim)."""
        if not self.lent.get(served.disk_id) or not self.alive or self.chan is None:
            return
        cookie = self.acks.new()
        self.chan.send(W.Reclaim(cookie, served.disk_id))
        runs: tuple[W.LentRun, ...] = ()
        with trio.move_on_after(ACK_TIMEOUT_S):
            try:
                runs = await self.acks.wait(cookie)
            except ConnectionError:
                return  # dead: its life's end gives back what it held
        cs = served.disk.cluster_size
        lent = self.lent.get(served.disk_id, set())
        back = [off for run in runs
                for off in range(run.file_offset, run.file_offset + run.length, cs) if off in lent]
        lent.difference_update(back)
        try:
            await served.disk.lending.give_back(FileRange(off, cs) for off in back)
        except DiskError as e:  # the flush that follows says what is wrong with the disk
            log.info("%s: %d clusters taken back stay allocated: %s", served.disk.path,
                     len(back), e)

    async def ping(self, within_s: float) -> bool:
        """Whether the worker answers a query within ``within_s``: once it has, it has
        applied every message sent before it (the channel is a FIFO)."""
        if not self.alive or self.chan is None:
            return False
        cookie = self.queries.new()
        self.chan.send(W.StatsQuery(cookie))
        with trio.move_on_after(within_s):
            try:
                reply = await self.queries.wait(cookie)
            except ConnectionError:
                return False
            self._take_touches(reply)
            self._take_remote_hits(reply)
            return True
        return False

    async def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "alive": self.alive, "starts": self.starts,
                               "deaths": self.deaths, "connections_handed": self.handed,
                               "holds": sorted(self.holds), **self.counters}
        if self.alive and self.chan is not None:
            cookie = self.queries.new()
            self.chan.send(W.StatsQuery(cookie))
            with trio.move_on_after(2.0):
                try:
                    out["worker"] = await self.queries.wait(cookie)
                except ConnectionError:
                    pass
            self._take_touches(out.get("worker"))
            self._take_remote_hits(out.get("worker"))
        return out

    def _take_remote_hits(self, reply: Any) -> None:
        """Add what the worker read from remote bases' caches (drained by the query, per
        file index of each disk) to those bases' counters, so ``cowd stats``'s hit rate
        and bytes saved count the reads the workers served too.  The worker's JSON is
        checked: it is another process."""
        disks = reply.get("disks") if isinstance(reply, dict) else None
        if not isinstance(disks, dict):
            return
        for key, d in disks.items():
            hits = d.pop("remote_hit_bytes", None) if isinstance(d, dict) else None
            served = self.pool.disks.get(int(key)) if key.isdigit() else None
            if not hits or served is None or not isinstance(hits, list):
                continue
            for e in hits:
                if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], int)
                        and isinstance(e[1], int) and 0 <= e[0] < len(served.files)
                        and e[1] > 0):
                    continue
                remote = _remote_of(served.files[e[0]])
                if remote is not None:
                    remote.note_hits(e[1], by_worker=True)

    def _take_touches(self, reply: Any) -> None:
        """Hand the worker's boot-trace first touches (drained by the query) to the disks,
        keeping only reads of each disk's base file.  The worker's JSON is checked: it is
        another process."""
        disks = reply.get("disks") if isinstance(reply, dict) else None
        if not isinstance(disks, dict):
            return
        for key, d in disks.items():
            touches = d.pop("first_touches", None) if isinstance(d, dict) else None
            served = self.pool.disks.get(int(key)) if key.isdigit() else None
            if not touches or served is None or not isinstance(touches, list):
                continue
            disk = served.disk
            if not disk.trace.recording:
                continue
            base = [i for i, f in enumerate(served.files) if f is disk.trace_file]
            if base:
                disk.trace.note_worker(
                    e[:1] + e[2:] for e in touches
                    if isinstance(e, list) and len(e) == 4 and e[1] == base[0])


# ---- the pool ----------------------------------------------------------------------------------


class WorkerPool:
    """The control plane's workers; see the module docstring."""

    def __init__(self, count: int, nursery: trio.Nursery, *, tls: TlsConfig | None = None):
        if count < 1:
            raise ValueError(f"a worker pool needs at least one worker (count={count})")
        self.nursery = nursery
        # The NBD listeners' TLS, which each worker loads for itself (it negotiates, so it
        # does the handshake); handed over on its command line as a pickle of the paths.
        self.tls = tls
        self.links = [WorkerLink(self, i) for i in range(count)]
        self.disks: dict[int, Served] = {}
        # Disks removed whose lent clusters some worker may still hold (forget_disk).
        self.leaving: dict[int, Served] = {}
        self._ids = itertools.count(1)
        self._turn = itertools.cycle(range(count))
        self.stopping = False
        self.fuse: FuseFrontend | None = None  # the FUSE mount the workers also serve
        self.any_ready = trio.Event()  # set once a worker first answered
        self._started: trio.Event | None = None  # made by the first start(), set as it returns
        # Primings under way, (worker index, disk id, the worker's life) -> (worker, disk,
        # the next offset): one task works through them a step at a time, in turn (see
        # PRIME_STEP_GRANULES).
        self._priming: dict[tuple[int, int, int], tuple[WorkerLink, Served, int]] = {}
        self._primer_running = False

    def prime(self, link: WorkerLink, served: Served) -> None:
        """Send ``link`` the remaps of ``served`` from its start (it has just begun to hold
        the disk), behind the misses: one step of one priming at a time, for the pool."""
        key = (link.index, served.disk_id, link.starts)
        if key in self._priming:
            return
        self._priming[key] = (link, served, 0)
        if not self._primer_running:
            self._primer_running = True
            self.nursery.start_soon(self._primer)

    async def _primer(self) -> None:
        """Step through the primings under way, one step each in turn, until none is left."""
        try:
            while self._priming:
                for key in list(self._priming):
                    link, served, pos = self._priming[key]
                    nxt = await link.prime_step(served, pos, key[2])
                    if nxt is None:
                        del self._priming[key]
                    else:
                        self._priming[key] = (link, served, nxt)
                    await trio.lowlevel.checkpoint()
        finally:
            self._primer_running = False

    def tls_args(self) -> list[str]:
        if self.tls is None or not self.tls.enabled:
            return []
        return ["--tls-config", base64.b64encode(pickle.dumps(self.tls)).decode()]

    async def start(self) -> None:
        """Start every worker and return once each answers (its imports done: seconds, tens
        of them in a slow guest; one that does not answer in START_TIMEOUT_S is not waited
        for).  Only the first call starts them; a later one returns once they have."""
        if self.stopping:
            return
        if self._started is not None:
            await self._started.wait()
            return
        started = self._started = trio.Event()
        try:
            async with trio.open_nursery() as starting:  # all at once: their imports overlap
                for link in self.links:
                    starting.start_soon(self.nursery.start, link.run)
        finally:
            started.set()

    def add_disk(self, name: str, disk: Disk, scope: str = W.SCOPE_SERVE, *,
                 publish: bool = True) -> Served:
        """Serve ``disk`` from the workers as an export of ``scope`` named ``name``; with
        ``publish`` (else call :meth:`publish` once its FUSE inode is known) describe it to
        every worker now."""
        served = Served(next(self._ids), name, disk, disk.files(), scope)
        if publish:
            self.publish(served)
        return served

    def publish(self, served: Served) -> None:
        """Describe ``served`` to every worker (and to every worker started later)."""
        self.disks[served.disk_id] = served
        for link in self.links:
            if link.alive:
                link.describe(served)

    async def reclaim(self, served: Served) -> None:
        """Before a flush of ``served``: every worker gives up the clusters it was lent and
        has not written, and they are freed, so that the flush leaves none lent: a daemon
        killed after it leaves no leak (qemu-img check stays clean, as without workers).
        A write under way keeps the clusters it took (it adopts them)."""
        for link in self.links:
            await link.reclaim(served)

    async def forget_disk(self, disk: Disk) -> None:
        """Stop serving ``disk`` from the workers (before it closes): every worker drops it,
        and the clusters it was lent and never adopted are given back once it answers a
        query sent after the DISK_GONE (its descriptors of the disk are closed then), or
        once it is dead.  A worker that does not answer in ACK_TIMEOUT_S is killed."""
        for served in [s for s in self.disks.values() if s.disk is disk]:
            del self.disks[served.disk_id]
            self.leaving[served.disk_id] = served
            for link in self.links:
                if link.alive and link.chan is not None:
                    link.chan.send(W.DiskGone(served.disk_id))
                link.holds.discard(served.disk_id)
            try:
                for link in self.links:
                    if not link.lent.get(served.disk_id):
                        link.lent.pop(served.disk_id, None)
                        continue
                    if link.alive and not await link.ping(ACK_TIMEOUT_S):
                        log.error("worker %d did not answer in %g s; killing it",
                                  link.index, ACK_TIMEOUT_S)
                        link.kill()
                        continue  # its life's end gives back, if the disk is open then
                    await link.give_back([served.disk_id])
            finally:
                del self.leaving[served.disk_id]

    def check_readonly(self, served: Served) -> None:
        """A request failed: if it marked the disk corrupt (read-only from now on), tell every
        worker, so none writes in place any more (queued before the failed request's reply,
        so its worker knows when the client learns of it)."""
        disk = served.disk
        reason = disk.corrupt_reason
        if reason is None or served.readonly_told:
            return
        served.readonly_told = True
        for link in self.links:
            if link.alive and link.chan is not None:
                link.chan.send(W.DiskState(served.disk_id, True, reason))

    async def wait_ready(self, within_s: float) -> bool:
        """Whether a worker runs its loop, waiting up to ``within_s`` for the first one (a
        daemon started in the background does not wait for its workers' imports)."""
        with trio.move_on_after(within_s):
            await self.any_ready.wait()
        return any(link.ready for link in self.links)

    def hand_off(self, stream: trio.SocketStream, peer: str,
                 scope: str = W.SCOPE_SERVE) -> None:
        """Give a client connection to the next live worker (round robin; one whose loop
        runs first, else one still starting: the connection waits in its channel); it sees
        the disks of ``scope`` only."""
        for want_ready in (True, False):
            for _ in range(len(self.links)):
                link = self.links[next(self._turn)]
                if link.alive and (link.ready or not want_ready):
                    fd = stream.socket.detach()
                    link.hand_off(fd, peer, scope)
                    return
        raise DiskError(errno.EAGAIN, "no worker is running")

    async def serve_fuse(self, fe: FuseFrontend) -> None:
        """The FUSE mount is up: every worker, and every worker started from now on, serves
        a clone of its descriptor (namespace requests come back here: fuse_reply).  Returns
        once every running worker has made its session, so that an attach that returns has
        its request buffers resident (cowd/sysmem.py): made later, under the memory
        pressure the mount is there to relieve, they would be charged to whatever cgroup
        the worker is in by then (a worker that does not answer within START_TIMEOUT_S is
        not waited for: its session comes when it does)."""
        self.fuse = fe
        running = [link for link in self.links if link.alive]
        for link in running:
            link.serve_fuse(fe)
        async with trio.open_nursery() as nursery:
            for link in running:  # each answers once it has applied the message above
                nursery.start_soon(link.ping, START_TIMEOUT_S)

    def fuse_reply(self, raw: bytes | bytearray | memoryview) -> bytes:
        """The mount's answer to a namespace request a worker read (b"": none is due)."""
        fe = self.fuse
        view = memoryview(raw)
        try:
            req = parse_request(view)
        except FuseProtocolError as e:
            log.error("%s", e)
            return bytes(reply_error(IN_HEADER.unpack_from(view)[2], errno.EIO)) \
                if len(view) >= IN_HEADER.size else b""
        if fe is None:
            return bytes(reply_error(req.unique, errno.ENOSYS))
        try:
            reply = fe.fs.handle(req)
        except FuseProtocolError as e:
            log.error("%s", e)
            reply = reply_error(req.unique, errno.EIO)
        return bytes(reply) if reply is not None else b""

    def gated(self, served: Served) -> GatedDisk:
        """The daemon's own view of a disk its workers also serve (see GatedDisk)."""
        return GatedDisk(served, self.changing)

    @asynccontextmanager
    async def changing(self, served: Served, guest_offset: int, length: int, *,
                       requester: WorkerLink | None, ack_requester: bool
                       ) -> AsyncIterator[object | None]:
        """Around anything that may change or free the mapping of [guest_offset, +length):
        enter the disk's change gate and invalidate every holder (acknowledged, but for the
        requester's unless ``ack_requester``; no requester: the daemon itself, every
        holder).  Yields the gate's token, or None for a range outside the disk (the disk
        then refuses the request with its own error; nothing changes)."""
        disk = served.disk
        end = guest_offset + length
        if length <= 0 or guest_offset < 0 or end > disk.size:
            await trio.lowlevel.checkpoint()
            yield None
            return
        first, last = served.granules(guest_offset, end)
        async with served.gate.changing(first, last) as token:
            await self.invalidate(served, first, last, requester=requester,
                                  ack_requester=ack_requester)
            yield token

    async def tell_adopted(self, served: Served, runs: list[W.Adoption], *,
                           requester: WorkerLink) -> None:
        """Tell every holder of ``served`` but ``requester`` that ``runs`` were adopted, and
        wait for their acknowledgements (the requester updates its own table from the
        reply: see WorkerLink._adopt_units)."""
        if not runs:
            return
        waits: list[tuple[WorkerLink, int]] = []
        for link, chan in self._holders(served):
            if link is requester:
                continue
            # One message: no more runs than the ADOPT_UNITS they came in, and a smaller head.
            cookie = link.acks.new()
            chan.send(W.Adopted(cookie, served.disk_id, tuple(runs), True))
            waits.append((link, cookie))
            link.counters["adopted_sent"] += 1
        await self._wait_acks(waits)

    async def invalidate(self, served: Served, first: int, end: int, *,
                         requester: WorkerLink | None, ack_requester: bool) -> None:
        """Tell every holder of ``served`` to drop granules [first, end), and wait for the
        acknowledgements the contract needs (see the module docstring)."""
        g = served.disk.granule
        waits: list[tuple[WorkerLink, int]] = []
        for link, chan in self._holders(served):
            ack = link is not requester or ack_requester
            cookie = link.acks.new() if ack else 0
            chan.send(W.Invalidate(cookie, served.disk_id, first * g, (end - first) * g,
                                        ack))
            link.counters["invalidations_sent"] += 1
            if ack:
                waits.append((link, cookie))
        await self._wait_acks(waits)

    def _holders(self, served: Served) -> Iterator[tuple[WorkerLink, ChannelStream]]:
        """The live workers that hold remaps of ``served``, with their channels."""
        for link in self.links:
            if link.alive and served.disk_id in link.holds and link.chan is not None:
                yield link, link.chan

    async def _wait_acks(self, waits: list[tuple[WorkerLink, int]]) -> None:
        for link, cookie in waits:
            with trio.move_on_after(ACK_TIMEOUT_S) as scope:
                try:
                    await link.acks.wait(cookie)
                except ConnectionError:
                    pass  # it died: a dead worker holds nothing
            if scope.cancelled_caught:
                link.counters["ack_timeouts"] += 1
                log.error("worker %d did not acknowledge an invalidation in %g s; killing it",
                          link.index, ACK_TIMEOUT_S)
                link.holds.clear()
                link.kill()

    async def stop(self) -> None:
        """Ask every worker to drain and exit; kill what has not after STOP_TIMEOUT_S; then
        give back what they were lent (the disks close after this)."""
        self.stopping = True
        for link in self.links:
            if link.alive and link.chan is not None:
                link.chan.send(W.Stop())
        with trio.move_on_after(STOP_TIMEOUT_S):
            for link in self.links:
                if link.proc is not None:
                    await link.proc.wait()
        for link in self.links:
            link.kill()
        with trio.CancelScope(shield=True):
            for link in self.links:
                if link.proc is not None:
                    await link.proc.wait()
                await link.give_back()

    async def stats(self) -> list[dict[str, Any]]:
        return [await link.stats() for link in self.links]


__all__ = ["WorkerLink", "WorkerPool"]
