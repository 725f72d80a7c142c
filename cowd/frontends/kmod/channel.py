"""Layer: cowd frontend for the kernel shim (kmod/): /dev/cowdN, mapped I/O in the kernel.

The kernel keeps a remap table and serves every request whose clusters it can map; this module
answers the rest.  It speaks the channel of ``kmod/cowd_uapi.h`` (mirrored in
:mod:`cowd.frontends.kmod.abi`) under trio: misses in, REMAP / INVALIDATE / REPLY messages out.

Theory of operation
-------------------
*Remaps.*  The device's cluster (the remap granularity, ``G``) is the smallest cluster of any
layer of the chain, so one guest cluster of ``G`` bytes always lives in one contiguous run of
one file.  :meth:`KmodDevice._remaps` turns the disk's planned segments into REMAP runs: DATA in
one file with contiguous file offsets (writable when the top layer owns it), or ZERO (a zero
cluster, or nothing in any layer).  Clusters it cannot express (a compressed cluster, a
cluster cut by a shorter parent's end) get no remap; reads of them are answered with the data.

*Misses.*  A READ miss pushes remaps for its clusters and ``READAHEAD_CLUSTERS`` more, then
REPLY RETRY (the kernel looks up again), or REPLY DATA with the bytes when a cluster could not
be remapped.  A WRITE miss allocates the clusters in the top layer (copy-up from the parents,
:meth:`Disk.allocate`), pushes writable remaps and replies RETRY; the kernel then writes in
place.  DISCARD and WRITE_ZEROES are done by the daemon, which invalidates the touched clusters
before it replies DONE; FLUSH makes the disk durable (data, then the metadata that reaches it)
before DONE.  At attach, :meth:`prime` pushes the whole disk's remaps, up to the kernel's bound.

*The allocation pool* (ABI v2, the header's "Versions"). When the top layer can lend clusters
(a qcow2 overlay whose cluster is the remap granule: formats/qcow2/lend.py) the daemon lends
``pool_target`` clusters (their refcounts set, durable with the next sync) and GRANTs them; the
kernel then does first writes itself — copy-up, data, completion — and reports each run in an
ALLOC message. The reader hands ALLOCs, in order, to one adopter task, which records them in
the image (``disk.lending.adopt``: L2 entries, durable at the next flush) and ACKs the last seq
of each batch; the kernel holds every FLUSH, DISCARD and WRITE_ZEROES issued after an ALLOC
until that ACK, so a flush the daemon answers covers every allocation it must. When an ALLOC
says the kernel's pool fell under ``pool_target / 2`` the reader starts a refill (one lend and
one GRANT per refill, not one round trip per cluster). Before the device is removed (detach,
shutdown) :meth:`stop_pool` REVOKEs the pool: the kernel drops what it holds, lets its
allocations under way finish, and queues REVOKED behind their ALLOCs; what was granted and
never reported is then given back. A daemon killed with a pool leaks its clusters (and loses
its unflushed allocations, as any unflushed write): ``cowd check --repair`` frees them.

*Ordering.*  Each handler computes its messages from the disk's state and appends them to one
outgoing buffer in the same synchronous step (no await in between), and the buffer goes to the
kernel in order: a remap computed after an allocation always lands after the remap computed
before it, so a stale read-only remap never overwrites a writable one.  A plan that had to
wait (a lock) is made again if the disk's mapping changed meanwhile (an adoption), and the
kernel ignores remaps of clusters it allocated and the daemon has not acknowledged yet.  A
DATA reply is read only once every ALLOC read before its miss is adopted.

*Boot-trace recording* (ABI v2, ``COWD_FEAT_TOUCH``).  The kernel maps the guest's reads
itself, so the disk's boot trace (:mod:`cowd.disk.boottrace`) would see none of them: when the
trace records, CREATE (or a takeover's REOPEN) names the base's file and the trace's granule,
and the kernel reports the first mapped read of each granule of that file in TOUCH messages
(CLOCK_MONOTONIC time, file offset, length: what a worker process reports).  The reader hands
them to ``disk.trace.note_worker``, where they merge with the daemon's own reads (a DATA
reply's) by time.  :meth:`drain` reads what the kernel queued and the reader has not read yet,
before a detach saves the trace and before ``cowd stats`` reports it.  When the trace is full
the daemon sends TOUCH_STOP; the kernel stops by itself at its bound and when the channel
closes.  An older module, or a version-1 channel, records nothing (``touch_state`` says why).

*Daemon death.*  If the daemon dies, the kernel keeps the device and its waiting requests
(``daemon_timeout_ms``); a new daemon takes it over with :meth:`KmodDevice.take_over` (the
kernel first forgets every remap and its pool: the dead daemon's unflushed allocations are not
in the image the new one reads).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import logging
import math
import os
import time
from typing import Any

import trio

from ...disk import Adoption, ChainFile, Disk, DiskError, FileRange, Segment
from ...errors import CommandFailed
from . import abi
from .module import (
    TouchPlan,
    chain_files,
    channel_version,
    checked_ioctl,
    ctl_call,
    fresh_fds,
    granule_for,
    remove_device,
    touch_plan,
)

log = logging.getLogger("cowd.kmod")

# Misses read from the channel per read() (the kernel returns at most 256).
READ_BATCH = 256
# Clusters past a READ miss whose remaps go to the kernel with the answer.
READAHEAD_CLUSTERS = 64
# How much of the disk one priming step resolves.
PRIME_CHUNK_BYTES = 64 << 20
# The kernel's remap table: entries (64 B each in the kernel) and how long its misses wait for
# a new daemon after this one dies.
DEFAULT_MAX_ENTRIES = 1 << 20
DEFAULT_DAEMON_TIMEOUT_MS = 120_000  # a restarted daemon under load can take ~40 s to start
BLKRRPART = 0x125F  # linux/fs.h _IO(0x12, 95)
# The allocation pool: clusters lent to the kernel at a time (what a killed daemon can leak),
# at most a quarter of the kernel's table (it pins what it allocates until acknowledged, and
# at most half its table), refilled when the kernel holds less than half of it: random first
# writes under TCG took the last quarter before a refill landed (a write miss each).
POOL_BYTES = 32 << 20
POOL_TABLE_FRACTION = 4
POOL_LOW_FRACTION = 2
# A write miss while the pool is on means first writes outran a refill: the target doubles,
# up to this many times the size asked for (what a killed daemon can leak grows with it).
POOL_GROWTH = 4
# ALLOCs adopted in one step (then an ACK and a checkpoint): a big batch adopted at once kept
# the reader and a refill waiting while the kernel's pool ran dry.
ADOPT_CHUNK = 32
# How long stop_pool waits for the kernel's REVOKED (its drain is of I/O under way: quick).
REVOKE_TIMEOUT_S = 60.0
# Reads of the channel one drain() makes at most (each returns up to 256 TOUCH records, and
# the kernel queues at most 4096).
DRAIN_READS = 32


class KmodDevice:
    """One /dev/cowdN and its channel; see the module docstring."""

    def __init__(self, disk: Disk, index: int, chan_fd: int, granule: int,
                 files: list[ChainFile], version: int = abi.ABI_VERSION,
                 touch: TouchPlan | str = "not asked for"):
        self.disk = disk
        self.index = index
        self.device = f"/dev/{abi.DISK_NAME}{index}"
        self.granule = granule
        self.version = version
        self._chan = chan_fd
        self._files = files
        self._file_index = {id(f): i for i, f in enumerate(files)}
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self._closed = False
        self.prime_seconds: float | None = None
        self.primed_entries = 0
        self._table_bound = 0
        self.ops = {k: 0 for k in ("misses", "read_misses", "write_misses", "flushes",
                                   "discards", "write_zeroes", "data_replies", "error_replies",
                                   "remaps_sent", "rejected", "replans")}
        # The allocation pool (see the module docstring).  _outstanding: host offsets of
        # clusters granted to the kernel and not yet reported in an ALLOC.
        self.pool_target = 0
        self._pool_max = 0
        self._pool_asked: int | None = None
        self.pool_problem: str | None = "not started"
        self._pool_on = False
        self._outstanding: set[int] = set()
        self._refilling = False
        self._seq_read = 0  # the last ALLOC read from the channel
        self._seq_adopted = 0  # ... and the last one adopted
        self._adopted_event = trio.Event()
        self._seq_acked = 0
        self.adopt_failed: str | None = None  # sticky: every later FLUSH fails
        self._adopt_send, self._adopt_recv = trio.open_memory_channel[
            abi.Alloc | abi.Revoked](math.inf)
        self._revokes: dict[int, trio.Event] = {}
        self._bad_allocs: set[int] = set()  # seqs of ALLOCs naming clusters never granted
        self._nursery: trio.Nursery | None = None
        self._cookies = itertools.count(1)
        self.pool_ops = {k: 0 for k in ("refills", "granted", "alloc_msgs", "adopted",
                                        "acks", "given_back", "revokes", "refill_ms_max",
                                        "growths")}
        # Boot-trace recording (see the module docstring).
        self._touching = isinstance(touch, TouchPlan)
        self.touch_state = "recording" if isinstance(touch, TouchPlan) else f"off: {touch}"
        self.touch_ops = {k: 0 for k in ("messages", "records", "deferred")}
        self._bufsize = READ_BATCH * (abi.MISS.size + abi.ALLOC.size) + abi.TOUCH_READ_BYTES

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def create(cls, disk: Disk, *, max_entries: int = DEFAULT_MAX_ENTRIES,
               daemon_timeout_ms: int = DEFAULT_DAEMON_TIMEOUT_MS) -> KmodDevice:
        files = chain_files(disk)
        g = granule_for(disk)
        version = channel_version()
        c = abi.Create(size=ctypes.sizeof(abi.Create), version=version)
        c.flags = abi.CREATE_READONLY if disk.readonly else 0
        c.disk_size = -(-disk.size // 512) * 512
        if c.disk_size != disk.size:
            raise CommandFailed(f"{disk.path}: the kernel shim needs a size in whole 512-byte "
                             f"sectors (size={disk.size})")
        c.logical_block_size = 512
        c.cluster_bits = g.bit_length() - 1
        c.max_entries = min(max_entries, abi.MAX_ENTRIES)
        c.daemon_timeout_ms = daemon_timeout_ms
        c.nr_files = len(files)
        touch = touch_plan(disk, files, version)
        if isinstance(touch, TouchPlan):
            c.flags |= abi.CREATE_TOUCH
            c.touch_file, c.touch_bits = touch
        fds = fresh_fds(files, disk.readonly)
        try:
            for i, f in enumerate(files):
                c.fds[i] = fds[i]
                c.file_flags[i] = abi.FILE_WRITABLE if f.writable and not disk.readonly else 0
            ctl_call(abi.CTL_CREATE, c, f"create a device for {disk.path}")
        finally:
            for fd in fds:
                os.close(fd)
        log.info("%s: /dev/cowd%d (cluster %d B, %d files, ABI %d)", disk.path, c.index, g,
                 len(files), version)
        return cls(disk, c.index, c.channel_fd, g, files, version, touch)

    @classmethod
    def take_over(cls, disk: Disk, index: int) -> KmodDevice:
        """Serve /dev/cowd``index``, whose daemon died, for ``disk`` (the same image)."""
        files = chain_files(disk)
        g = granule_for(disk)
        version = channel_version()
        r = abi.Reopen(size=ctypes.sizeof(abi.Reopen), version=version, index=index)
        touch = touch_plan(disk, files, version)
        if isinstance(touch, TouchPlan):
            r.flags = abi.REOPEN_TOUCH
            r.touch_file, r.touch_bits = touch
        ctl_call(abi.CTL_REOPEN, r, f"take over cowd{index}")
        if r.disk_size != disk.size or 1 << r.cluster_bits != g or r.nr_files != len(files):
            os.close(r.channel_fd)
            raise CommandFailed(f"/dev/cowd{index}: does not serve {disk.path} (size="
                             f"{r.disk_size}, cluster_bits={r.cluster_bits}, files={r.nr_files})")
        log.info("%s: took over /dev/cowd%d (ABI %d)", disk.path, index, version)
        return cls(disk, index, r.channel_fd, g, files, version, touch)

    async def rescan_partitions(self) -> None:
        """Ask the kernel to read the partition table (BLKRRPART).  In a thread: the kernel's
        reads may be misses this daemon answers."""
        def rescan() -> None:
            fd = os.open(self.device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, BLKRRPART)
            except OSError as e:
                log.warning("%s: partition scan failed: %s", self.device, e.strerror)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(rescan)

    def close(self) -> None:
        """Close the channel (the device stays, orphaned, until removed or taken over)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._chan)
            os.close(self._chan)

    def remove(self, force: bool = False) -> None:
        remove_device(self.index, force)

    def kernel_stats(self) -> dict[str, int]:
        st = abi.Stats(size=ctypes.sizeof(abi.Stats), version=self.version)
        if self._closed:
            return {}
        checked_ioctl(self._chan, abi.CHAN_STATS, st, f"stats of cowd{self.index}")
        return {name: int(getattr(st, name)) for name in abi.STATS_FIELDS}

    def stats(self) -> dict[str, Any]:
        return {"device": self.device, "granule": self.granule, "abi": self.version,
                "ops": dict(self.ops),
                "prime_seconds": self.prime_seconds, "primed_entries": self.primed_entries,
                "pool": {"on": self._pool_on, "problem": self.pool_problem,
                         "target_clusters": self.pool_target,
                         "outstanding_clusters": len(self._outstanding),
                         "adopt_failed": self.adopt_failed, **self.pool_ops},
                "touch": {"state": self.touch_state, **self.touch_ops},
                "kernel": self.kernel_stats()}

    # -- remaps ----------------------------------------------------------------------------

    def _remaps(self, segs: list[Segment], start: int, end: int,
                writable_only: bool = False, need_end: int | None = None
                ) -> tuple[list[bytes], int]:
        """REMAP messages for the whole clusters of [start, end) that ``segs`` (covering at
        least that range) can express; also the bytes of [start, ``need_end``) they cover
        (default: all of [start, end))."""
        need_end = end if need_end is None else need_end
        g = self.granule
        size = self.disk.size
        out: list[bytes] = []
        covered = 0
        # runs: (guest_start, guest_end, file index or -1 for zero, file offset, flags)
        run: list[int] | None = None
        runs: list[list[int]] = []
        for seg in segs:
            gofs, n = seg.guest_offset, seg.length
            if seg.is_data:
                fi = self._file_index.get(id(seg.file), -2)
                if fi < 0:
                    run = None
                    continue
                fo = seg.file_offset
                flags = abi.REMAP_WRITABLE if seg.writable and not self.disk.readonly else 0
            elif seg.is_zero:
                fi, fo, flags = -1, 0, abi.REMAP_ZERO
            else:
                run = None
                continue
            if run is not None and run[1] == gofs and run[2] == fi and run[4] == flags and \
                    (fi < 0 or run[3] + (run[1] - run[0]) == fo):
                run[1] = gofs + n
                continue
            run = [gofs, gofs + n, fi, fo, flags]
            runs.append(run)
        for rs, re_, fi, fo, flags in runs:
            cs = -(-max(rs, start) // g) * g
            ce = min(re_, end) // g * g
            if min(re_, end) == size:
                ce = -(-size // g) * g  # the last, partial cluster
            if ce <= cs:
                continue
            if writable_only and not flags & abi.REMAP_WRITABLE:
                continue
            if fi < 0:
                out.append(abi.pack_remap(0, flags, cs, ce - cs, 0, self.version))
            else:
                out.append(abi.pack_remap(fi, flags, cs, ce - cs, fo + (cs - rs),
                                          self.version))
            covered += max(0, min(ce, need_end) - cs)
        self.ops["remaps_sent"] += len(out)
        return out, covered

    def _aligned(self, offset: int, length: int, ahead: int = 0) -> tuple[int, int]:
        g = self.granule
        start = offset // g * g
        end = min(self.disk.size, -(-(offset + length) // g) * g + ahead * g)
        return start, end

    def table_bound(self) -> int:
        """The kernel table's bound in clusters (fixed at creation)."""
        if not self._table_bound:
            self._table_bound = self.kernel_stats()["max_entries"]
        return self._table_bound

    async def prime(self, max_entries: int | None = None) -> int:
        """Push remaps for the disk from the start, up to ``max_entries`` clusters (default:
        the kernel table's bound, so priming evicts nothing it pushed)."""
        if max_entries is None:
            max_entries = self.table_bound()
        t0 = time.monotonic()
        pushed = 0
        pos = 0
        size = self.disk.size
        g = self.granule
        while pos < size and pushed < max_entries:
            end = min(size, pos + PRIME_CHUNK_BYTES, pos + (max_entries - pushed) * g)
            segs = await self._segments(pos, end - pos)
            msgs, covered = self._remaps(segs, pos, end)
            self._send(msgs)
            pushed += -(-covered // g)
            pos = end
            await self._flush_out()
        self.prime_seconds = time.monotonic() - t0
        self.primed_entries = pushed
        return pushed

    async def _segments(self, offset: int, length: int) -> list[Segment]:
        """The disk's plan of the range, made again if the mapping changed while it waited
        (an adoption: remaps from the older plan could undo it in the kernel's table)."""
        while True:
            gen = self.disk.mapping_generation
            segs = await self.disk.segments(offset, length)
            if gen == self.disk.mapping_generation:
                return segs
            self.ops["replans"] += 1

    # -- the allocation pool -------------------------------------------------------------

    def _pool_problem(self) -> str | None:
        if self.version < 2:
            return f"the channel speaks ABI {self.version}"
        why = self.disk.lending.problem()
        if why is not None:
            return why
        if self.disk.cluster_size != self.granule:
            return (f"the overlay's cluster ({self.disk.cluster_size} B) is not the remap "
                    f"granule ({self.granule} B)")
        top = self.disk.files()[0]
        if self._file_index.get(id(top)) is None or not top.writable:
            return "the overlay's file is not writable in the kernel"
        return None

    async def start_pool(self, clusters: int | None = None) -> None:
        """Lend the kernel a pool of ``clusters`` (default: POOL_BYTES of them, at most a
        quarter of its table) if the disk allows (see the module docstring); otherwise, or
        with 0, first writes stay misses, and ``pool_problem`` says why."""
        if clusters is None:  # the size asked for before (a detach refused), or the default
            clusters = self._pool_asked if self._pool_asked is not None else \
                POOL_BYTES // self.granule
        self._pool_asked = clusters
        self.pool_problem = self._pool_problem() if clusters else "no pool asked for"
        if self.pool_problem is not None:
            log.info("cowd%d: no allocation pool: %s", self.index, self.pool_problem)
            await trio.lowlevel.checkpoint()
            return
        bound = min(self.table_bound() // POOL_TABLE_FRACTION, abi.MAX_POOL_CLUSTERS // 2)
        self.pool_target = max(1, min(clusters, bound))
        self._pool_max = max(1, min(clusters * POOL_GROWTH, bound))
        self._pool_on = True
        await self._refill()

    async def _refill(self) -> None:
        """Lend and GRANT what the kernel's pool lacks of its target (one round trip)."""
        # What the kernel holds (and allocations under way or failed): granted, not reported.
        want = self.pool_target - len(self._outstanding)
        if not self._pool_on or self._refilling or want <= 0:
            return
        self._refilling = True
        t0 = time.monotonic()
        try:
            runs = await self.disk.lending.lend(want)
            if not self._pool_on:  # stopped meanwhile: give them straight back
                await self.disk.lending.give_back(
                    [FileRange(r.file_offset, r.length) for r in runs])
                return
            msgs = []
            g = self.granule
            for r in runs:
                fi, off, n = self._file_index[id(r.file)], r.file_offset, r.length
                for pos in range(off, off + n, abi.MAX_POOL_CLUSTERS // 2 * g):
                    part = min(n - (pos - off), abi.MAX_POOL_CLUSTERS // 2 * g)
                    msgs.append(abi.pack_grant(fi, pos, part))
                self._outstanding.update(range(off, off + n, g))
            self.pool_ops["refills"] += 1
            self.pool_ops["granted"] += want
            self._send(msgs)
            ms = round((time.monotonic() - t0) * 1000)
            self.pool_ops["refill_ms_max"] = max(self.pool_ops["refill_ms_max"], ms)
        except DiskError as e:
            log.warning("cowd%d: no more clusters for the kernel's pool: %s", self.index, e)
            self.pool_problem = str(e)
            self._pool_on = False
        finally:
            self._refilling = False

    async def _adopter(self) -> None:
        """Record the kernel's allocations in order, ACK each batch, refill when low."""
        async for first in self._adopt_recv:
            batch = [first]
            while True:
                try:
                    batch.append(self._adopt_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            allocs: list[abi.Alloc] = []
            for m in batch:
                if isinstance(m, abi.Alloc):
                    allocs.append(m)
                    continue
                await self._adopt(allocs)  # those before the REVOKED
                allocs = []
                self._ack()
                ev = self._revokes.pop(m.cookie, None)
                if ev is not None:
                    ev.set()
            await self._adopt(allocs)
            self._ack()

    def _maybe_refill(self) -> None:
        """Refill in a task of its own (lending may wait for the top layer's lock) when what
        the kernel holds is under the low-water mark (the reader calls it as ALLOCs arrive)."""
        if self._pool_on and not self._refilling and self._nursery is not None and \
                len(self._outstanding) < max(1, self.pool_target // POOL_LOW_FRACTION):
            self._nursery.start_soon(self._refill)

    def _reported(self, m: abi.Alloc) -> bool:
        """An ALLOC read: its clusters are no longer in the kernel's pool.  False if they
        were not granted (the kernel's bug: never adopted, and no flush may succeed)."""
        g = self.granule
        hosts = range(m.file_offset, m.file_offset + m.length, g)
        self.pool_ops["alloc_msgs"] += 1
        if m.file >= len(self._files) or self._files[m.file] is not self.disk.files()[0] or \
                m.length % g or not self._outstanding.issuperset(hosts):
            self._adopt_error(f"the kernel reported clusters it was not granted (file="
                              f"{m.file}, file_offset={m.file_offset:#x}, length={m.length})")
            return False
        self._outstanding.difference_update(hosts)
        return True

    def _ack(self) -> None:
        if self._seq_adopted > self._seq_acked:
            self._send([abi.pack_ack(self._seq_adopted)])
            self._seq_acked = self._seq_adopted
            self.pool_ops["acks"] += 1
            self._adopted_event.set()
            self._adopted_event = trio.Event()

    async def _adopt(self, allocs: list[abi.Alloc]) -> None:
        """Record ALLOCs in the image, ADOPT_CHUNK at a time (each in one step when nothing
        else holds the disk), advancing the adopted seq and ACKing after each chunk."""
        for i in range(0, len(allocs), ADOPT_CHUNK):
            chunk = allocs[i:i + ADOPT_CHUNK]
            good = [m for m in chunk if m.seq not in self._bad_allocs]
            self._bad_allocs.difference_update(m.seq for m in chunk)
            try:
                await self.disk.lending.adopt([Adoption(m.guest_offset, m.length, m.file_offset)
                                               for m in good])
            except DiskError as e:
                self._adopt_error(str(e))
            else:
                self.pool_ops["adopted"] += sum(m.length for m in good) // self.granule
            self._seq_adopted = chunk[-1].seq
            self._ack()

    def _adopt_error(self, why: str) -> None:
        """The kernel completed writes this daemon cannot record: no flush may claim them."""
        log.error("cowd%d: an allocation made in the kernel is not recorded: %s", self.index,
                  why)
        self.adopt_failed = self.adopt_failed or why

    async def _adopted_through(self, seq: int) -> None:
        """Wait until every ALLOC up to ``seq`` is adopted."""
        while self._seq_adopted < seq:
            await self._adopted_event.wait()

    async def stop_pool(self) -> None:
        """REVOKE the kernel's pool and give back what it never wrote (before the device
        is removed, or when this daemon stops)."""
        if not self._pool_on and not self._outstanding:
            await trio.lowlevel.checkpoint()
            return
        self._pool_on = False
        cookie = next(self._cookies)
        done = self._revokes[cookie] = trio.Event()
        self._send([abi.pack_revoke(cookie)])
        await self._flush_out()
        self.pool_ops["revokes"] += 1
        with trio.move_on_after(REVOKE_TIMEOUT_S):
            await done.wait()
        if not done.is_set():
            log.warning("cowd%d: no REVOKED from the kernel; %d lent clusters stay leaked",
                        self.index, len(self._outstanding))
            return
        g = self.granule
        unused = sorted(self._outstanding)
        self._outstanding.clear()
        if unused:
            self.pool_ops["given_back"] += await self.disk.lending.give_back(
                [FileRange(h, g) for h in unused])

    # -- the channel -----------------------------------------------------------------------

    def _send(self, msgs: list[bytes]) -> None:
        if msgs:
            self._out.extend(msgs)
            self._wake.set()

    async def _flush_out(self) -> None:
        """Write the outgoing messages in order.  A message the kernel rejects is logged and
        skipped (say, a reply to a request that its timeout already failed)."""
        while self._out and not self._closed:
            buf = b"".join(self._out)
            self._out.clear()
            view = memoryview(buf)
            while view:
                try:
                    n = os.write(self._chan, view)
                except OSError as e:
                    size, mtype, _version = abi.HDR.unpack_from(view)
                    self.ops["rejected"] += 1
                    level = logging.DEBUG if e.errno == errno.ENOENT else logging.WARNING
                    log.log(level, "cowd%d: kernel rejected a message (type=%d): %s",
                            self.index, mtype, e.strerror)
                    if e.errno == errno.ENODEV:
                        return
                    n = size
                view = view[n:]
            await trio.lowlevel.checkpoint()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer misses until the channel closes or the device goes away."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._adopter)
            task_status.started()
            try:
                await self._reader(nursery)
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._flush_out()

    async def _reader(self, nursery: trio.Nursery) -> None:
        os.set_blocking(self._chan, False)
        while not self._closed:
            try:
                await trio.lowlevel.wait_readable(self._chan)
            except (trio.ClosedResourceError, OSError):
                return
            try:
                data = os.read(self._chan, self._bufsize)
            except BlockingIOError:
                continue  # (drain() read it)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    log.info("cowd%d: removed", self.index)
                    return
                raise
            self._dispatch(data, nursery)

    def _dispatch(self, data: bytes, nursery: trio.Nursery) -> None:
        """The messages of one read, in order and in one step (no await: a read that
        :meth:`drain` makes is dispatched in the order it was read)."""
        # The kernel puts its events first: an ALLOC goes to the adopter before any miss
        # read with it is answered.
        allocs = False
        for m in abi.unpack_messages(data, self.version):
            if isinstance(m, abi.Miss):
                self.ops["misses"] += 1
                nursery.start_soon(self._answer, m.cookie, m.op, m.offset, m.length,
                                   self._seq_read)
                continue
            if isinstance(m, abi.Touch):
                self._touched(m)
                continue
            if isinstance(m, abi.Alloc):
                self._seq_read = m.seq
                allocs = True
                if not self._reported(m):
                    self._bad_allocs.add(m.seq)
            self._adopt_send.send_nowait(m)
        if allocs:
            self._maybe_refill()

    def _touched(self, m: abi.Touch) -> None:
        """The kernel's first mapped reads of the base: into the disk's boot trace."""
        trace = self.disk.trace
        self.touch_ops["messages"] += 1
        self.touch_ops["records"] += len(m.records)
        self.touch_ops["deferred"] += m.deferred
        if m.records:
            trace.note_worker(m.records)
        if m.end:
            self._touching = False
            self.touch_state = f"ended: the kernel's bound ({abi.MAX_TOUCHES} records)"
        elif self._touching and not trace.recording:
            self._touching = False
            self.touch_state = "stopped: the trace is full"
            self._send([abi.pack_touch_stop()])

    async def drain(self) -> None:
        """Read and dispatch what the channel holds now, as the reader would: the kernel's
        last first-touch records reach the boot trace before a detach saves it or ``cowd
        stats`` reports it (the reader may not have run since the kernel queued them)."""
        nursery = self._nursery
        if self._touching and nursery is not None and not self._closed:
            os.set_blocking(self._chan, False)  # (the reader's too, once it has started)
            for _ in range(DRAIN_READS):
                try:
                    data = os.read(self._chan, self._bufsize)
                except OSError:  # EAGAIN: nothing more (ENODEV: the reader says so)
                    break
                self._dispatch(data, nursery)
        await trio.lowlevel.checkpoint()

    async def _answer(self, cookie: int, op: int, offset: int, length: int,
                      seq_read: int = 0) -> None:
        try:
            if op == abi.OP_READ:
                await self._read_miss(cookie, offset, length, seq_read)
            elif op == abi.OP_WRITE:
                await self._write_miss(cookie, offset, length)
            elif op == abi.OP_FLUSH:
                self.ops["flushes"] += 1
                if self.adopt_failed is not None:
                    raise DiskError(errno.EIO, f"{self.disk.path}: writes the kernel made "
                                    f"are not in the image ({self.adopt_failed})")
                await self.disk.flush()
                self._send([abi.pack_reply(cookie, abi.REPLY_DONE, version=self.version)])
            elif op in (abi.OP_DISCARD, abi.OP_WRITE_ZEROES):
                await self._zero_miss(cookie, op, offset, length)
            else:
                self._reply_error(cookie, errno.EINVAL, f"unknown op {op}")
        except DiskError as e:
            self._reply_error(cookie, e.errno, str(e))

    def _reply_error(self, cookie: int, err: int, why: str) -> None:
        self.ops["error_replies"] += 1
        log.warning("cowd%d: failing a request (errno=%d): %s", self.index, err, why)
        self._send([abi.pack_reply(cookie, -(err or errno.EIO), version=self.version)])

    async def _read_miss(self, cookie: int, offset: int, length: int, seq_read: int = 0
                         ) -> None:
        self.ops["read_misses"] += 1
        g = self.granule
        start, want_end = self._aligned(offset, length)  # the request's own clusters
        # Read ahead no further than half the kernel's table holds (a small table would
        # otherwise evict what was just pushed).
        ahead = max(0, min(READAHEAD_CLUSTERS,
                           self.table_bound() // 2 - (want_end - start) // g))
        end = min(self.disk.size, want_end + ahead * g)
        segs = await self._segments(start, end - start)
        # The read-ahead's remaps first, the request's last: the kernel looks the request up
        # again when the RETRY right after them arrives, and a full table evicts the least
        # recently pushed.
        msgs = self._remaps(segs, want_end, end)[0] if end > want_end else []
        own, covered = self._remaps(segs, start, want_end)
        msgs += own
        if covered >= want_end - start:
            msgs.append(abi.pack_reply(cookie, abi.REPLY_RETRY, version=self.version))
            self._send(msgs)
            return
        # Some cluster cannot be remapped (compressed, or cut by a parent's end): the data,
        # read once the kernel's allocations reported before this miss are in the image.
        self._send(msgs)
        await self._adopted_through(seq_read)
        buf = bytearray(length)
        await self.disk.read_into(offset, buf)
        self.ops["data_replies"] += 1
        self._send([abi.pack_reply(cookie, abi.REPLY_DATA, length, self.version), bytes(buf)])

    async def _write_miss(self, cookie: int, offset: int, length: int) -> None:
        self.ops["write_misses"] += 1
        start, end = self._aligned(offset, length)
        segs = await self.disk.allocate(start, end - start)
        msgs, covered = self._remaps(segs, start, end, writable_only=True)
        if covered < end - start:
            self._send(msgs)
            self._reply_error(cookie, errno.EIO, f"clusters at {start}+{end - start} are "
                              "not writable in place after allocation")
            return
        msgs.append(abi.pack_reply(cookie, abi.REPLY_RETRY, version=self.version))
        self._send(msgs)
        if self._pool_on and not self._refilling and self.pool_target < self._pool_max:
            self.pool_target = min(self.pool_target * 2, self._pool_max)
            self.pool_ops["growths"] += 1
        self._maybe_refill()  # the kernel's pool may have run dry

    async def _zero_miss(self, cookie: int, op: int, offset: int, length: int) -> None:
        # The range's clusters may be freed (and reused by the next allocation): first the
        # kernel forgets their remaps, and its INVALIDATE returns only when no mapped I/O
        # uses them any more.
        self._send([abi.pack_invalidate(offset, length, self.version)])
        await self._flush_out()
        if op == abi.OP_DISCARD:
            self.ops["discards"] += 1
            await self.disk.trim(offset, length)
        else:
            self.ops["write_zeroes"] += 1
            await self.disk.write_zeroes(offset, length)
        # Again after: a miss answered meanwhile may have pushed a mapping from before.
        self._send([abi.pack_invalidate(offset, length, self.version),
                    abi.pack_reply(cookie, abi.REPLY_DONE, version=self.version)])
