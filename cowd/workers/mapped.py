"""Layer: cowd workers — a worker's view of one disk: :class:`MappedDisk`.

It has the shape of :class:`~cowd.disk.api.BlockDisk`, so the NBD server serves it exactly as
it serves a :class:`~cowd.disk.Disk`.  What it does itself is what the contract in
:mod:`cowd.workers` allows — reads of ranges whose granules are all in its table, in-place
writes where they are all writable DATA, first writes of whole granules into the clusters
its pool holds (lent by the control plane, adopted after the write), and, with extended L2,
first writes of whole subclusters at their place (adopted in batches: ADOPT_UNITS) — and
everything else it asks of the control plane through a :class:`ControlPlane` (the worker's
channel).

The table maps a granule index (the disk's top-layer granule, the same unit as the control
plane's remap cache) to the :class:`Run` s that cover it, in guest order: a run is DATA at a
file offset (``fd`` >= 0) or zeroes (``fd`` == ZERO_FD).  It is filled only by REMAPS from
the control plane and emptied by INVALIDATE (and, past :data:`MAX_TABLE_ENTRIES`, oldest
first).  A granule that the control plane cannot express as runs (a compressed cluster) is
never in the table; reads of it go to the control plane, which answers with the data.

Trio-thread only.  No method awaits between looking runs up and doing their I/O, so an
INVALIDATE processed by the worker's channel task never races a read or write in progress.
"""

from __future__ import annotations

import bisect
import enum
import errno
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple, Protocol, TypeVar

import trio

from ..disk.api import MAX_REQUEST_BYTES, DiskError, WriteEnd
from ..disk.backing_io import WouldBlock, pread_into, pwrite_from, zero_fill
from ..disk.boottrace import MAX_TRACE_ENTRIES, TRACE_GRANULE_BYTES
from ..disk.streams import Streams
from . import wire as W

# Granules one disk's table holds (each about 200 B): 4 GiB of a disk of 64 KiB granules.
# Past it, the oldest entries go first; a miss brings them back.
MAX_TABLE_ENTRIES = 1 << 16

# The fd of a run that reads as zeroes.
ZERO_FD = -1

# Lent clusters (first writes the worker does itself, see MappedDisk._write_lent): a disk's
# pool is topped up once it holds less than half a batch.  The batch starts at
# LEND_FIRST_BYTES and doubles with every top-up up to LEND_MAX_BYTES (32 MiB is 0.01 s of
# sequential first writes on this project's host); a flush takes the pool back (RECLAIM)
# and starts it small again, so a writer that flushes often holds little.  The control
# plane bounds what one worker holds (host.py's MAX_LENT_BYTES).
LEND_FIRST_BYTES = 2 << 20
LEND_MAX_BYTES = 32 << 20

# The most runs one ADOPT_UNITS carries (24 bytes each: 1.5 MiB, under the channel's
# message bound; a write has at most one per subcluster, 8192 for the largest request): a
# longer queue goes in several.
MAX_UNIT_RUNS = 65536

log = logging.getLogger("cowd.worker")


class Run(NamedTuple):
    """Guest bytes [guest_offset, guest_end) are at ``file_offset`` of ``fd``, or zeroes
    (``fd`` == ZERO_FD); ``writable``: the worker may pwrite them in place."""

    guest_offset: int
    guest_end: int
    fd: int
    file_offset: int
    writable: bool


_run = functools.partial(tuple.__new__, Run)


class ControlPlane(Protocol):
    """How a MappedDisk asks the control plane (the worker's channel)."""

    async def miss(self, disk_id: int, guest_offset: int, length: int) -> W.Reply: ...

    async def request(self, disk_id: int, op: W.Op, flags: int, guest_offset: int,
                      length: int, data: bytes | bytearray | memoryview = b"",
                      on_reply: Callable[[W.Reply], None] | None = None) -> W.Reply:
        """``on_reply``: called with the reply as the channel reads it, before any message
        after it is handled (so what it does to the table keeps channel order)."""

    def background(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run ``task`` beside the requests (the worker's nursery)."""


class Local(enum.Enum):
    """What a local attempt at a request came to."""

    DONE = 0
    MISSING = 1  # a granule is not in the table
    WOULD_BLOCK = 2  # (reads without waiting) data not in the page cache
    SHORT = 3  # a read ended early: the file is shorter than the remap says
    NOT_WRITABLE = 4  # (writes) a run is not writable in place
    OUT_OF_RANGE = 5  # the request is not one the worker checks itself: let the plane say
    POOL_SHORT = 6  # (first writes) the pool holds fewer lent clusters than the write needs


def _add_piece(pieces: list[list[int]], fd: int, file_offset: int, at: int,
               length: int) -> None:
    """Append a pwrite ``[fd, file offset, at, length]`` (``at``: in the request), merged
    into the last one where it continues it in the file and in the request."""
    if pieces:
        last = pieces[-1]
        if last[0] == fd and last[1] + last[3] == file_offset and last[2] + last[3] == at:
            last[3] += length
            return
    pieces.append([fd, file_offset, at, length])


def _add_adoption(adopt: list[W.Adoption], guest: int, length: int, file_offset: int) -> None:
    """Append an adoption, merged into the last one where it continues it in the guest and
    in the file."""
    last = adopt[-1] if adopt else None
    if last is not None and last.guest_offset + last.length == guest and \
            last.file_offset + last.length == file_offset:
        adopt[-1] = W.Adoption(last.guest_offset, last.length + length, last.file_offset)
    else:
        adopt.append(W.Adoption(guest, length, file_offset))


_P = TypeVar("_P")  # a write's plan (MappedDisk._planned)


def _run_start(r: Run) -> int:
    return r[0]


def _span(runs: tuple[Run, ...], a: int, b: int) -> tuple[int, int]:
    """The indices [lo, hi) of the runs of a granule (in guest order, covering it) that
    [a, b) touches: found by bisection, since a granule written subcluster by subcluster
    holds up to 64 runs."""
    return (max(0, bisect.bisect_right(runs, a, key=_run_start) - 1),
            bisect.bisect_left(runs, b, key=_run_start))


def _overlapping(runs: tuple[Run, ...], a: int, b: int) -> tuple[Run, ...]:
    lo, hi = _span(runs, a, b)
    return runs[lo:hi]


class _UnitWrite:
    """A first write of whole subclusters (MappedDisk._write_units): its pwrites, the lent
    clusters it took, its adoptions; and, once its ADOPT_UNITS is answered, the outcome."""

    __slots__ = ("adopt", "callback", "done", "end", "length", "lent", "pieces")

    def __init__(self) -> None:
        self.pieces: list[list[int]] = []  # [fd, file offset, at, length]
        self.lent: set[int] = set()  # lent clusters (not yet adopted) it wrote into
        self.adopt: list[W.Adoption] = []
        self.length = 0  # the write's bytes
        self.end = WriteEnd()
        self.callback: Callable[[WriteEnd], None] | None = None  # else: done is set
        self.done = trio.Event()


class MappedDisk:
    """One disk as a worker serves it; see the module docstring."""

    def __init__(self, spec: W.DiskSpec, plane: ControlPlane):
        self.disk_id = spec.disk_id
        self.name = spec.name
        self._path = spec.path
        self._size = spec.size
        self._cluster_size = spec.cluster_size
        self._readonly = spec.readonly
        self.granule = spec.granule
        self._fds = list(spec.fds)
        self._fd_writable = [w and not spec.readonly for w in spec.files_writable]
        # Remote bases' cache files (fd -> file index) and the bytes read from each since
        # the last stats query (file index -> bytes): cache hits the daemon never sees.
        self._remote_fds = {fd: i for i, fd in enumerate(spec.fds)
                            if i < len(spec.files_remote) and spec.files_remote[i]}
        self._remote_hits: dict[int, int] = {}
        # Lent clusters of the lend file: [file offset, length] runs in file order.
        # The top file, where adopted subclusters live (_apply_adopted), if writable here.
        self._top_fd = spec.fds[spec.lend_file] if spec.lend_file >= 0 and \
            self._fd_writable[spec.lend_file] else None
        self._lend_fd = spec.fds[spec.lend_file] if spec.lend_file >= 0 and \
            not spec.readonly and spec.granule == spec.cluster_size else None
        self._pool: deque[list[int]] = deque()
        self._pool_bytes = 0
        self._lend_batch = LEND_FIRST_BYTES  # the next top-up's target
        self._lending = False  # a LEND is under way
        # First writes of whole subclusters (extended L2; see _write_units): the subcluster,
        # or 0 (whole granules only); the writes waiting for their ADOPT_UNITS, in order;
        # whether the batch sender runs; and per guest cluster (granule index) the lent
        # cluster that a write whose adoption is under way put its subclusters in (so the
        # cluster's other subclusters go there too, not into a second lent cluster).
        self._unit = spec.unit if self._lend_fd is not None else 0
        self._unit_queue: list[_UnitWrite] = []
        self._unit_sending = False
        self._unit_lent: dict[int, int] = {}
        self._unit_refs: dict[int, int] = {}  # lent cluster -> waiting writes that used it
        self._unit_kept: set[int] = set()  # ... of which one was adopted there
        self.plane = plane
        self._table: dict[int, tuple[Run, ...]] = {}
        self._streams = Streams(spec.granule)  # sequential readers: data read-ahead
        self.mapping_generation = 0  # bumped by every invalidation
        self.closed = False
        self.readonly_reason: str | None = None
        # Boot trace (cowd/disk/boottrace.py): first touches of parents' data runs, as
        # (CLOCK_MONOTONIC ns, file index, file offset, length), drained by the stats query.
        self._touched: set[tuple[int, int]] = set()
        self._touches: list[list[int]] = []
        self.tracing = True
        self.counters = {k: 0 for k in (
            "reads_local", "writes_local", "bytes_read", "bytes_written", "misses",
            "remaps_installed", "invalidations", "evictions", "forwarded_reads",
            "forwarded_writes", "forwarded_other", "would_block", "writes_lent",
            "clusters_lent", "clusters_written", "writes_units", "units_refused",
            "unit_batches")}

    # ---- the BlockDisk properties --------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def cluster_size(self) -> int:
        return self._cluster_size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def __len__(self) -> int:
        return len(self._table)

    # ---- the table -----------------------------------------------------------------------

    def install(self, runs: Iterable[W.RemapRun]) -> int:
        """Enter the granules that ``runs`` (in guest order) cover whole; returns how many."""
        g = self.granule
        size = self._size
        table = self._table
        fds = self._fds
        writable_fd = self._fd_writable
        parts: list[Run] = []
        cur = -1  # the granule being assembled, -1: none (or one that cannot be whole)
        expect = 0  # where its next run must start
        installed = 0
        for r in runs:
            if r.file_index == W.ZERO_FILE:
                fd, writable = ZERO_FD, False
            elif 0 <= r.file_index < len(fds):
                fd = fds[r.file_index]
                writable = bool(r.flags & W.REMAP_WRITABLE) and writable_fd[r.file_index]
            else:
                raise W.ChannelError(f"worker channel: remap names file {r.file_index} of "
                                     f"{len(fds)} (disk={self.disk_id})")
            pos = r.guest_offset
            end = min(size, r.guest_offset + r.length)
            while pos < end:
                idx = pos // g
                gstart = idx * g
                gend = min(size, gstart + g)
                if idx != cur:
                    cur, parts, expect = (idx, [], gstart) if pos == gstart else (-1, [], -1)
                if pos != expect:
                    cur = -1
                piece_end = min(end, gend)
                if cur >= 0:
                    fo = r.file_offset + (pos - r.guest_offset) if fd != ZERO_FD else 0
                    parts.append(_run((pos, piece_end, fd, fo, writable)))
                    expect = piece_end
                    if piece_end == gend:
                        if idx not in table and len(table) >= MAX_TABLE_ENTRIES:
                            del table[next(iter(table))]
                            self.counters["evictions"] += 1
                        table[idx] = tuple(parts)
                        installed += 1
                        cur = -1
                pos = piece_end
        self.counters["remaps_installed"] += installed
        return installed

    def invalidate(self, guest_offset: int, length: int) -> None:
        """Forget the granules touching [guest_offset, guest_offset + length)."""
        self.mapping_generation += 1
        self.counters["invalidations"] += 1
        if length <= 0:
            return
        g = self.granule
        first = guest_offset // g
        end = -(-(guest_offset + length) // g)
        table = self._table
        if end - first <= len(table):
            for i in range(first, end):
                table.pop(i, None)
        else:
            for i in [i for i in table if first <= i < end]:
                del table[i]

    def clear(self) -> None:
        self.mapping_generation += 1
        self._table.clear()

    def make_readonly(self, reason: str) -> None:
        """The control plane turned the disk read-only: no write is done in place from now
        on (they are forwarded, and refused there), and no writable remap is kept."""
        self._readonly = True
        self._top_fd = None
        self.readonly_reason = reason
        self._fd_writable = [False] * len(self._fds)
        self._drop_pool()
        self.clear()

    def _drop_pool(self) -> None:
        """Lend no more: what is lent stays so in the control plane, which gives it back
        once this worker drops the disk or dies."""
        self._lend_fd = None
        self._unit = 0
        self.reclaim()

    def reclaim(self) -> list[W.LentRun]:
        """Give up the pool (what no write took yet), and start small again."""
        runs = [W.LentRun(off, n) for off, n in self._pool]
        self._pool.clear()
        self._pool_bytes = 0
        self._lend_batch = LEND_FIRST_BYTES
        return runs

    # ---- boot trace ----------------------------------------------------------------------

    def _touch(self, fd: int, file_offset: int, length: int) -> None:
        """Note a read of a parent's data (before it is done: a failed read was still
        asked for).  Only granules first touched here are kept, at most MAX_TRACE_ENTRIES."""
        g = TRACE_GRANULE_BYTES
        touched = self._touched
        for i in range(file_offset // g, (file_offset + length - 1) // g + 1):
            if (fd, i) not in touched:
                if len(touched) >= MAX_TRACE_ENTRIES:
                    self.tracing = False
                    return
                touched.add((fd, i))
                try:
                    index = self._fds.index(fd)
                except ValueError:
                    return
                self._touches.append([time.monotonic_ns(), index, i * g, g])

    def drain_touches(self) -> list[list[int]]:
        out, self._touches = self._touches, []
        return out

    # ---- local I/O -----------------------------------------------------------------------

    def _in_range(self, offset: int, length: int) -> bool:
        return offset >= 0 and 0 < length <= MAX_REQUEST_BYTES and \
            offset + length <= self._size and not self.closed

    def _read_local(self, offset: int, view: memoryview, nowait: bool) -> Local:
        n = len(view)
        if not self._in_range(offset, n):
            return Local.OUT_OF_RANGE
        end = offset + n
        g = self.granule
        table = self._table
        first = offset // g
        last = (end - 1) // g
        if first == last:
            runs = table.get(first)
            if runs is None:
                return Local.MISSING
            if len(runs) == 1:  # the common case: one run covers the request
                fd, fo = runs[0].fd, runs[0].file_offset + (offset - runs[0].guest_offset)
                if fd == ZERO_FD:
                    zero_fill(view)
                    return Local.DONE
                if self.tracing and not runs[0].writable:
                    self._touch(fd, fo, n)
                try:
                    got = pread_into(fd, view, fo, nowait)
                except WouldBlock:
                    return Local.WOULD_BLOCK
                if got != n:
                    return Local.SHORT
                if fd in self._remote_fds:
                    self._count_remote({fd: n})
                return Local.DONE
            granules: list[tuple[Run, ...]] = [runs]
        else:
            granules = []
            for i in range(first, last + 1):
                runs = table.get(i)
                if runs is None:
                    return Local.MISSING
                granules.append(runs)
        run_fd = ZERO_FD
        run_fo = run_at = run_n = 0
        remote_fds = self._remote_fds
        remote: dict[int, int] = {}  # fd -> bytes, counted once the whole read is done
        try:
            for runs in granules:
                for rs, re_, fd, fo, _w in runs:
                    if re_ <= offset:
                        continue
                    if rs >= end:
                        break
                    a = rs if rs > offset else offset
                    b = re_ if re_ < end else end
                    if fd == ZERO_FD:
                        zero_fill(view[a - offset:b - offset])
                        continue
                    fo += a - rs
                    if not _w and self.tracing:
                        self._touch(fd, fo, b - a)
                    if fd in remote_fds:
                        remote[fd] = remote.get(fd, 0) + (b - a)
                    if fd == run_fd and fo == run_fo + run_n and a - offset == run_at + run_n:
                        run_n += b - a
                        continue
                    if run_n and pread_into(run_fd, view[run_at:run_at + run_n], run_fo,
                                            nowait) != run_n:
                        return Local.SHORT
                    run_fd, run_fo, run_at, run_n = fd, fo, a - offset, b - a
            if run_n and pread_into(run_fd, view[run_at:run_at + run_n], run_fo,
                                    nowait) != run_n:
                return Local.SHORT
        except WouldBlock:
            return Local.WOULD_BLOCK
        if remote:
            self._count_remote(remote)
        return Local.DONE

    def _count_remote(self, by_fd: dict[int, int]) -> None:
        for fd, n in by_fd.items():
            i = self._remote_fds[fd]
            self._remote_hits[i] = self._remote_hits.get(i, 0) + n

    def drain_remote_hits(self) -> list[list[int]]:
        """[file index, bytes] read from remote bases' caches since the last call."""
        out = [[i, n] for i, n in self._remote_hits.items()]
        self._remote_hits = {}
        return out

    def _write_local(self, offset: int, view: memoryview) -> Local:
        n = len(view)
        if self._readonly or not self._in_range(offset, n):
            return Local.OUT_OF_RANGE
        end = offset + n
        g = self.granule
        table = self._table
        # Every granule is looked up before the first byte is written (all or nothing), and
        # runs that continue each other in the file are one pwrite: a 1 MiB write to
        # clusters allocated in order is one syscall, not sixteen.
        pieces: list[list[int]] = []  # [fd, file offset, at, length]
        for i in range(offset // g, (end - 1) // g + 1):
            runs = table.get(i)
            if runs is None:
                return Local.MISSING
            if len(runs) > 2:  # a granule written subcluster by subcluster: up to 64 runs
                runs = _overlapping(runs, offset, end)
            for rs, re_, fd, fo, writable in runs:
                if re_ <= offset:
                    continue
                if rs >= end:
                    break
                if not writable:
                    return Local.NOT_WRITABLE
                a = rs if rs > offset else offset
                b = re_ if re_ < end else end
                _add_piece(pieces, fd, fo + (a - rs), a - offset, b - a)
        self._pwrite_pieces(view, pieces)
        return Local.DONE

    def _pwrite_pieces(self, view: memoryview, pieces: list[list[int]]) -> None:
        """Write ``view[at:at + length]`` at each piece's ``[fd, file offset, at, length]``."""
        try:
            for fd, fo, at, length in pieces:
                pwrite_from(fd, view[at:at + length], fo)
        except OSError as e:
            raise DiskError(e.errno or errno.EIO, f"{self._path}: write failed: "
                                                  f"{e.strerror}") from e

    # ---- first writes into lent clusters -------------------------------------------------

    def _plan_lent(self, offset: int, n: int
                   ) -> tuple[list[list[int]], list[W.Adoption]] | Local:
        """The pwrites (``[fd, file offset, at, length]``, runs that continue each other
        merged) and adoptions of a write of whole granules, every one in the table: granules
        the top layer owns in place, the others into clusters taken from the pool; or why
        not: MISSING (a granule is not in the table), OUT_OF_RANGE (not whole granules of
        the disk: the write is forwarded), POOL_SHORT (forwarded too, and the pool topped
        up)."""
        g = self.granule
        end = offset + n
        if offset % g or end % g or self._readonly or not self._in_range(offset, n):
            return Local.OUT_OF_RANGE
        table = self._table
        granules: list[tuple[Run, ...]] = []
        lent = 0
        for i in range(offset // g, end // g):
            runs = table.get(i)
            if runs is None:
                return Local.MISSING
            granules.append(runs)
            lent += not all(r.writable for r in runs)
        if lent * g > self._pool_bytes:
            return Local.POOL_SHORT
        pieces: list[list[int]] = []
        adopt: list[W.Adoption] = []
        lend_fd = self._lend_fd
        assert lend_fd is not None
        at = 0
        for runs in granules:
            if all(r.writable for r in runs):
                spans = [(r.fd, r.file_offset, r.guest_end - r.guest_offset) for r in runs]
            else:
                fo = self._take_lent()
                spans = [(lend_fd, fo, g)]
                _add_adoption(adopt, offset + at, g, fo)
            for fd, fo, length in spans:
                _add_piece(pieces, fd, fo, at, length)
                at += length
        return pieces, adopt

    async def _write_lent(self, offset: int, view: memoryview, fua: bool) -> bool:
        """A write that allocates, done here: the data goes into lent clusters whole (no
        copy-up: whole granules only), then the control plane adopts them (maps them, as
        its own allocation would, inside its change gate) and sends their remaps before it
        answers.  So the payload never crosses the channel, and the first writes of
        several workers run on their cores.  False: not done (forward it)."""
        if self._lend_fd is None:
            return False
        plan = await self._planned(self._plan_lent, offset, len(view))
        if plan is Local.POOL_SHORT or not isinstance(plan, Local):
            self._top_up()  # only for writes that lent clusters can take
        if isinstance(plan, Local):
            return False
        pieces, adopt = plan
        if not adopt:
            return False
        self._pwrite_pieces(view, pieces)
        reply = await self.plane.request(self.disk_id, W.Op.ADOPT, W.FLAG_FUA if fua else 0,
                                         offset, len(view), W.adoptions(adopt))
        self._raise_for(reply)
        c = self.counters
        c["writes_lent"] += 1
        c["clusters_written"] += sum(a.length for a in adopt) // self.granule
        c["bytes_written"] += len(view)
        return True

    # ---- first writes of whole subclusters (extended L2) ---------------------------------

    def _plan_units(self, offset: int, n: int) -> _UnitWrite | Local:
        """The pwrites and adoptions of a write of whole subclusters, every granule in the
        table: what is writable in place goes there; every other run (whole subclusters:
        a subcluster is allocated whole or not at all) goes to its place in the guest
        cluster's own host cluster (known from a writable run of the granule), or in the lent
        cluster a write under way chose for it, or in one taken from the pool.  Or why not
        (as _plan_lent)."""
        u = self._unit
        g = self.granule
        end = offset + n
        if not u or offset % u or end % u or self._readonly or not self._in_range(offset, n):
            return Local.OUT_OF_RANGE
        table = self._table
        lend_fd = self._lend_fd
        assert lend_fd is not None  # _unit is 0 without a pool
        # Per granule: its index, the runs [a, b) of the write touches, the host cluster
        # (-1: none yet) and whether that is a lent one.
        granules: list[tuple[int, tuple[Run, ...], int, bool]] = []
        need = 0  # lent clusters to take
        for i in range(offset // g, (end - 1) // g + 1):
            runs = table.get(i)
            if runs is None:
                return Local.MISSING
            cstart = i * g
            a, b = max(offset, cstart), min(end, cstart + g)
            touched = _overlapping(runs, a, b)
            for rs, re_, _fd, _fo, writable in touched:
                if not writable and ((rs if rs > a else a) % u or (re_ if re_ < b else b) % u):
                    return Local.OUT_OF_RANGE  # not whole subclusters (cannot be): forward
            host = self._unit_lent.get(i, -1)
            lent = host >= 0
            for rs, _re, fd, fo, writable in runs:
                if writable and fd == lend_fd:
                    host, lent = fo - (rs - cstart), False
                    break
            if host < 0:
                need += 1
            granules.append((i, touched, host, lent))
        if need * g > self._pool_bytes:
            return Local.POOL_SHORT
        plan = _UnitWrite()
        pieces = plan.pieces
        adopt = plan.adopt
        for i, touched, host, lent in granules:
            cstart = i * g
            a, b = max(offset, cstart), min(end, cstart + g)
            for rs, re_, fd, fo, writable in touched:
                x = rs if rs > a else a
                y = re_ if re_ < b else b
                if writable:
                    _add_piece(pieces, fd, fo + (x - rs), x - offset, y - x)
                    continue
                if host < 0:
                    host, lent = self._take_lent(), True
                    self._unit_lent[i] = host
                if lent and host not in plan.lent:
                    plan.lent.add(host)
                    self._unit_refs[host] = self._unit_refs.get(host, 0) + 1
                at = host + (x - cstart)
                _add_piece(pieces, lend_fd, at, x - offset, y - x)
                _add_adoption(adopt, x, y - x, at)
        return plan

    def _take_lent(self) -> int:
        g = self.granule
        head = self._pool[0]
        fo = head[0]
        head[0] += g
        head[1] -= g
        if not head[1]:
            self._pool.popleft()
        self._pool_bytes -= g
        return fo

    def _start_units(self, offset: int, view: memoryview,
                     plan: _UnitWrite | Local) -> _UnitWrite | None:
        """Write ``plan`` (from _plan_units) and queue its adoptions for the next
        ADOPT_UNITS; None: not started (forward it, or ask for remaps first)."""
        if plan is Local.POOL_SHORT or not isinstance(plan, Local):
            self._top_up()
        if isinstance(plan, Local):
            return None
        if not plan.adopt:
            self._release(plan, set())
            return None
        try:
            self._pwrite_pieces(view, plan.pieces)
        except DiskError:
            self._release(plan, set())
            raise
        plan.length = len(view)
        self._unit_queue.append(plan)
        if not self._unit_sending:
            self._unit_sending = True
            self.plane.background(self._send_units)
        return plan

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: Callable[[WriteEnd], None]) -> bool:
        """A first write of whole subclusters started without a task of its own (the NBD
        server's inline path): written now, ``done`` called once its adoption is answered
        (see _write_units).  False: not started (a miss, the pool short, not whole
        subclusters: ``write`` it)."""
        if not self._unit:  # every write not done in place comes here: leave at once
            return False
        view = memoryview(data).cast("B")
        plan = self._start_units(offset, view, self._plan_units(offset, len(view)))
        if plan is None:
            return False
        plan.callback = done
        return True

    async def _write_units(self, offset: int, view: memoryview, fua: bool) -> bool:
        """A first write of whole subclusters, done here: each at its place in a cluster (no
        copy-up: extended L2 has none for whole subclusters), then adopted by the control
        plane, with the adoptions of the other writes waiting then in one ADOPT_UNITS, before
        it is answered.  False: not done (forward it) — also when the control plane refused
        an adoption (the disk changed there meanwhile: the forwarded write does it whole)."""
        plan = await self._planned(self._plan_units, offset, len(view))
        started = self._start_units(offset, view, plan)
        if started is None:
            return False
        await started.done.wait()
        if started.end.errno:
            raise DiskError(started.end.errno, started.end.message)
        if started.end.redo:
            return False
        if fua:
            await self.flush()
        return True

    async def _send_units(self) -> None:
        """Send the waiting writes' adoptions, one ADOPT_UNITS for all the writes waiting
        when the last one was answered (a queue of 32 writes costs a round trip or two, not
        32), until none waits."""
        try:
            while self._unit_queue:
                take, runs = 0, 0
                for w in self._unit_queue:
                    if take and runs + len(w.adopt) > MAX_UNIT_RUNS:
                        break
                    take, runs = take + 1, runs + len(w.adopt)
                batch = self._unit_queue[:take]
                del self._unit_queue[:take]
                entries = [a for w in batch for a in w.adopt]
                self.counters["unit_batches"] += 1
                settled: list[bool] = []

                def settle(reply: W.Reply, batch: list[_UnitWrite] = batch,
                           settled: list[bool] = settled) -> None:
                    settled.append(True)
                    self._settle(batch, reply)
                try:
                    # Settled as the channel reads the reply (on_reply), not when this task
                    # runs again: _apply_adopted is exact only in channel order.
                    await self.plane.request(self.disk_id, W.Op.ADOPT_UNITS, 0, 0,
                                             len(entries), W.adoptions(entries),
                                             on_reply=settle)
                except ConnectionError:
                    pass
                if not settled:
                    self._settle(batch, W.Reply(0, errno.EIO, b"the control plane is gone"))
        finally:
            self._unit_sending = False

    def apply_adopted(self, runs: Iterable[W.Adoption]) -> None:
        """Another worker's subclusters were adopted (ADOPTED): as _apply_adopted.  Exact
        for the same reason: the control plane sends it after the adoption and before any
        later change's INVALIDATE; an entry planned after the adoption says so already."""
        for a in runs:
            self._apply_adopted(a)

    def _apply_adopted(self, a: W.Adoption) -> None:
        """The control plane adopted ``a`` and sent this worker no invalidation or remaps for
        it (host.py's _adopt_units): make the table entry of its granule say so, if the
        table still has it.  Exact, because an entry still here when the reply is read was
        planned either before the adoption — and then nothing else changed the granule in
        between, since every other change invalidates this worker before it changes
        anything, which would have dropped the entry before the reply came (the channel is
        a FIFO) — or after it, and then it says so already (this is idempotent).  A
        granule not in the table is left to its next miss."""
        g = self.granule
        i = a.guest_offset // g
        runs = self._table.get(i)
        top_fd = self._top_fd  # None when this worker may not write the disk
        if runs is None:
            return
        if top_fd is None:
            del self._table[i]  # no writing here: let a miss say what it is now
            return
        x, y = a.guest_offset, a.guest_offset + a.length
        fo = a.file_offset
        lo, hi = _span(runs, x, y)
        head: list[Run] = list(runs[:lo])  # the runs before x, and after y, cut there
        tail: list[Run] = []
        for r in runs[lo:hi]:
            rs, re_, rfd, rfo, rw = r
            if rs < x:
                head.append(r if re_ <= x else _run((rs, x, rfd, rfo, rw)))
            if re_ > y:
                if rs >= y:
                    tail.append(r)
                else:
                    tail.append(_run((y, re_, rfd, rfo + (y - rs) if rfd != ZERO_FD else 0,
                                      rw)))
        tail.extend(runs[hi:])
        # The new run merged with its neighbours where they continue it in the file (a
        # cluster written subcluster by subcluster stays a few runs, not 32).
        if head:
            rs, _re, rfd, rfo, rw = head[-1]
            if rw and rfd == top_fd and rfo + (x - rs) == fo:
                head.pop()
                x, fo = rs, rfo
        if tail:
            _rs, re_, rfd, rfo, rw = tail[0]
            if rw and rfd == top_fd and rfo == fo + (y - x):
                tail.pop(0)
                y = re_
        self._table[i] = (*head, _run((x, y, top_fd, fo, True)), *tail)

    def _settle(self, batch: list[_UnitWrite], reply: W.Reply) -> None:
        """Tell each write of ``batch`` what became of its adoptions (and the table, see
        _apply_adopted)."""
        k = 0
        g = self.granule
        c = self.counters
        for w in batch:
            got = b"" if reply.errno else bytes(reply.data[k:k + len(w.adopt)])
            k += len(w.adopt)
            kept: set[int] = set()
            if reply.errno or len(got) != len(w.adopt):
                w.end = WriteEnd(reply.errno or errno.EIO, reply.message if reply.errno else
                                 f"{self._path}: an ADOPT_UNITS reply without a result per run")
                kept = set(w.lent)
            else:
                for a, ok in zip(w.adopt, got, strict=True):
                    if ok:
                        kept.add(a.file_offset - a.file_offset % g)
                        self._apply_adopted(a)
                if all(got):
                    c["writes_units"] += 1
                    c["bytes_written"] += w.length
                else:
                    c["units_refused"] += 1
                    w.end = WriteEnd(redo=True)
            self._release(w, kept)
            if w.callback is not None:
                w.callback(w.end)
            else:
                w.done.set()

    def _release(self, w: _UnitWrite, kept: set[int]) -> None:
        """``w`` waits no more.  A lent cluster goes back to the pool once no write that put
        subclusters in it waits any more and none of theirs was adopted there (``kept``:
        those of ``w`` that were); after a failed reply, never (which runs the control
        plane adopted before it failed is not known: it keeps the cluster lent until this
        worker drops the disk, then frees it unless adopted)."""
        g = self.granule
        self._unit_kept.update(kept)
        for host in w.lent:
            self._unit_refs[host] -= 1
            if self._unit_refs[host]:
                continue
            del self._unit_refs[host]
            for i in [i for i, h in self._unit_lent.items() if h == host]:
                del self._unit_lent[i]
            if host in self._unit_kept:
                self._unit_kept.discard(host)
            elif self._lend_fd is not None:
                self._pool.appendleft([host, g])
                self._pool_bytes += g
        w.lent = set()

    async def _planned(self, plan: Callable[[int, int], _P | Local], offset: int,
                       n: int) -> _P | Local:
        """``plan(offset, n)``; on a miss, the remaps first (they come with read-ahead, and
        the first one primes the whole table, so that the next writes plan here without
        asking), then again."""
        got = plan(offset, n)
        if got is Local.MISSING:
            self.counters["misses"] += 1
            self._raise_for(await self.plane.miss(self.disk_id, offset, n))
            got = plan(offset, n)
        return got

    def _top_up(self) -> None:
        """Ask for more lent clusters in the background once the pool runs low."""
        if self._lending or self._lend_fd is None or \
                self._pool_bytes >= self._lend_batch // 2:
            return
        self._lending = True
        self.plane.background(self._lend)

    async def _lend(self) -> None:
        g = self.granule
        try:
            want = (self._lend_batch - self._pool_bytes) // g
            self._lend_batch = min(LEND_MAX_BYTES, self._lend_batch * 2)
            reply = await self.plane.request(self.disk_id, W.Op.LEND, 0, 0, want)
            if self.closed or self._lend_fd is None:
                return
            if reply.errno:
                log.info("%s: no more clusters lent to this worker: %s", self._path,
                         reply.message)
                self._drop_pool()
                return
            runs = W.parse_lent_runs(reply.data)
            for run in runs:
                if run.length % g or run.file_offset % g:
                    raise W.ChannelError(f"{self._path}: lent clusters not whole granules "
                                         f"(file_offset={run.file_offset})")
                self._pool.append([run.file_offset, run.length])
                self._pool_bytes += run.length
                self.counters["clusters_lent"] += run.length // g
        except ConnectionError:
            pass  # the control plane is gone: so is this worker, soon
        finally:
            self._lending = False

    # ---- the BlockDisk calls -------------------------------------------------------------

    def _counted_read(self, offset: int, view: memoryview, nowait: bool) -> Local:
        """:meth:`_read_local`, its OSError as a DiskError, done and would-block counted."""
        try:
            st = self._read_local(offset, view, nowait)
        except OSError as e:
            raise DiskError(e.errno or errno.EIO, f"{self._path}: read failed: "
                                                  f"{e.strerror}") from e
        if st is Local.DONE:
            c = self.counters
            c["reads_local"] += 1
            c["bytes_read"] += len(view)
        elif st is Local.WOULD_BLOCK:
            self.counters["would_block"] += 1
        return st

    def try_read_into(self, offset: int, dest: memoryview | bytearray, *,
                      may_block: bool = False) -> bool:
        view = memoryview(dest).cast("B")
        st = self._counted_read(offset, view, not may_block)
        if not may_block and st in (Local.DONE, Local.WOULD_BLOCK):
            # The first try of a read (the frontend tries without waiting first, then
            # again): the one that counts for the stream.
            self._stream_ahead(offset, len(view))
        return st is Local.DONE

    def _stream_ahead(self, offset: int, length: int) -> None:
        """A read that continues a sequential stream: have the kernel fetch the data after
        the last DATA run it read (as Disk does for its own streams)."""
        end = offset + length
        if not self._streams.note(offset, end):
            return
        for rs, re_, fd, fo, _w in reversed(self._table.get((end - 1) // self.granule, ())):
            if fd != ZERO_FD and rs < end:
                self._streams.advise_after(fd, fo + (min(re_, end) - rs), length)
                return

    def advise(self, offset: int, length: int) -> None:
        """Start the mapped data of the range on its way into the page cache (advice only:
        granules not in the table are left to the read's miss)."""
        if not self._in_range(offset, length):
            return
        g = self.granule
        end = offset + length
        for i in range(offset // g, (end - 1) // g + 1):
            for rs, re_, fd, fo, _w in self._table.get(i, ()):
                a, b = max(rs, offset), min(re_, end)
                if fd != ZERO_FD and a < b:
                    try:
                        os.posix_fadvise(fd, fo + (a - rs), b - a, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        pass

    def _after_miss(self, offset: int, view: memoryview) -> bool:
        """The read of a miss just answered, without waiting for the disk (and without
        counting it for the stream: its first try did); False: not done (and its data
        advised, if that was why)."""
        st = self._counted_read(offset, view, True)
        if st is Local.WOULD_BLOCK:
            self.advise(offset, len(view))
        return st is Local.DONE

    def advise_write(self, offset: int, length: int) -> bool:
        # The control plane advises the copy-up sources of the writes it is asked to do.
        return False

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        view = memoryview(data).cast("B")
        st = self._write_local(offset, view)  # a failed pwrite: DiskError
        if st is not Local.DONE:
            return False
        c = self.counters
        c["writes_local"] += 1
        c["bytes_written"] += len(view)
        return True

    async def read_into(self, offset: int, dest: memoryview | bytearray) -> None:
        view = memoryview(dest).cast("B")
        if self.try_read_into(offset, view, may_block=True):
            await trio.lowlevel.checkpoint()
            return
        if self._in_range(offset, len(view)):
            # A miss: the control plane sends the remaps (and answers with the data when a
            # granule cannot be remapped); then the read is local.
            self.counters["misses"] += 1
            reply = await self.plane.miss(self.disk_id, offset, len(view))
            self._raise_for(reply)
            if len(reply.data) == len(view):
                view[:] = reply.data
                return
            if self._after_miss(offset, view):
                return
            # Not in the page cache: started on its way, and the other tasks whose misses
            # were answered start theirs, before this one blocks the process in its read
            # (a worker's first reads of a disk are all misses: one blocking cold read
            # after another held every connection of the worker for a second).
            await trio.lowlevel.checkpoint()
            if self.try_read_into(offset, view, may_block=True):
                return
        # Out of range (the control plane says how), a short file, or a table that lost the
        # remaps again before the retry: the control plane reads it.
        self.counters["forwarded_reads"] += 1
        reply = await self.plane.request(self.disk_id, W.Op.READ, 0, offset, len(view))
        self._raise_for(reply)
        if len(reply.data) != len(view):
            raise DiskError(errno.EIO, f"{self._path}: the control plane answered a read "
                                       f"with the wrong length (length={len(reply.data)})")
        view[:] = reply.data

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        if self.try_write(offset, view):
            if fua:
                await self.flush()
            else:
                await trio.lowlevel.checkpoint()
            return
        if await self._write_lent(offset, view, fua):
            return
        if await self._write_units(offset, view, fua):
            return
        self.counters["forwarded_writes"] += 1
        reply = await self.plane.request(self.disk_id, W.Op.WRITE, W.FLAG_FUA if fua else 0,
                                         offset, len(view), view)
        self._raise_for(reply)

    async def _forward(self, op: W.Op, offset: int, length: int, flags: int = 0) -> W.Reply:
        self.counters["forwarded_other"] += 1
        reply = await self.plane.request(self.disk_id, op, flags, offset, length)
        self._raise_for(reply)
        return reply

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None:
        flags = (W.FLAG_MAY_UNMAP if may_unmap else 0) | (W.FLAG_FUA if fua else 0)
        await self._forward(W.Op.WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int) -> None:
        await self._forward(W.Op.TRIM, offset, length)

    async def flush(self) -> None:
        await self._forward(W.Op.FLUSH, 0, 0)

    async def prefetch(self, offset: int, length: int) -> None:
        await self._forward(W.Op.CACHE, offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]:
        reply = await self._forward(W.Op.BLOCK_STATUS, offset, length)
        return [(n, hole, hole) for n, hole in W.parse_status_runs(reply.data)]

    def _raise_for(self, reply: W.Reply) -> None:
        if reply.errno:
            raise DiskError(reply.errno, reply.message or f"{self._path}: "
                            f"{os.strerror(reply.errno)}")

    def stats(self) -> dict[str, object]:
        return {"name": self.name, "entries": len(self._table), **self.counters,
                "first_touches": self.drain_touches(),
                "remote_hit_bytes": self.drain_remote_hits()}


__all__ = ["MAX_TABLE_ENTRIES", "ZERO_FD", "ControlPlane", "Local", "MappedDisk", "Run"]
