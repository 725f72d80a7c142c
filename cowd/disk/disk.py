"""Layer: cowd disk, top: the request API frontends call — :class:`Disk`, one virtual disk.

Frontends (NBD, FUSE, the kernel channel) call a disk's methods with guest offsets.  The
disk checks the request, asks its :class:`~cowd.disk.chain.Chain` for a plan (the chain owns
the layers and is the only place that walks them) and does the I/O of the plan through
:mod:`cowd.disk.backing_io`.  Two jobs live in modules of their own, as parts the disk makes
and hands what they need of it (:class:`~cowd.disk.hooks.DiskHooks`: its checks, error
translation, counters and mapping steps).  :mod:`cowd.disk.mapping` (``disk.mapping``)
answers the questions that move no guest bytes — ``segments``, ``block_status``,
``prefetch``, ``prime``, which the disk's methods of those names pass on;
:mod:`cowd.disk.lending` (``disk.lending``) lends the top layer's clusters to the kernel
shim's allocation pool and adopts them once written, under the same range lock and with the
same cache invalidation as a write here (``_change_mapping``).

Theory of operation
-------------------
*Reads* plan, then read (``Chain.plan`` + ``Chain.read_segments``, one synchronous step).
A read that looks sequential (it starts where a recent read ended) resolves the next
``readahead_clusters`` granules on a miss, and has the kernel fetch the data ahead.  A
frontend that answers a batch in one wakeup uses ``try_read_into``: the plan of a read that
would wait for the disk is kept, ``advise`` starts its data on the way, and the read that
follows reuses it — a page-cache miss is planned once — unless the disk's mapping changed in
between (``mapping_generation``).

*Writes* look up the top layer's granules.  If every byte lands in DATA that the top layer
owns (``writable``) and no slow operation holds one of those granules, the write is a plain
``pwrite`` in place.  Otherwise the disk takes the granules' range lock
(:class:`~cowd.disk.locks.GranuleLocks`; a second writer to the same granule waits for the
first allocation), writes the in-place parts, and hands the rest to the codec's ``write``
(allocation with copy-up of head and tail, read through the chain's planner).  The touched
clusters' entries are invalidated before the call and refilled after it.  ``write_zeroes``
and ``trim`` go to the codec the same way.  ``flush`` calls the top image's ``flush`` (data
durable before the metadata that reaches it — the codec's promise).  Every write path writes
the one top file, so a flush on any connection covers every write acknowledged on any
connection (NBD multi-conn is safe).

Checkpoints: a read or write that the cache answers, and a miss whose layers are not busy,
completes without a trio checkpoint; frontends checkpoint on their sockets between requests,
and a caller that loops over the disk alone must checkpoint itself.

Why only flush runs in a thread: a thread hop costs more than a codec's allocation (the
measurements are in docs/disk-costs.md), so writes, write-zeroes and trims run inline, and a
thread would force every reader of a shared base to lock against it.  ``flush`` waits for
the disk for as long as there is dirty data, unbounded by anything the daemon controls, so
it — and only it — goes to a worker thread under the pool's ``CapacityLimiter``.
``offload_writes=True`` sends codec writes to threads as well, should a codec's allocation
ever need to wait for the disk; the chain's locking keeps that correct, and the tests run
both ways.

Remote bases: what the disk does with a block its cache does not hold yet (fetch and plan
again, or say "not now" on the synchronous paths) is told in :mod:`cowd.disk.remote`.

Errors: every failure of a request raises :class:`~cowd.disk.api.DiskError` (a
``RequestError``) carrying the errno a frontend replies with.  ``ImageIOError`` keeps its
errno; ``ImageReadOnly`` and writes to a read-only disk are EPERM; reads out of range are
EINVAL, writes past the end ENOSPC; ``CorruptImage`` is EIO and marks the disk corrupt
(read-only from then on).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

import trio

from formats.base import Kind
from formats.errors import (
    CorruptImage,
    FormatError,
    SyncFailed,
)
from formats.opener import OpenPolicy
from formats.remote import NotCached

from ..remap import RemapCache
from .api import MAX_REQUEST_BYTES, DiskError, WriteEnd, disk_error
from .backing_io import WouldBlock, pwrite_from
from .boottrace import BootTrace
from .chain import Chain, ChainFile, InPlace, PlanState, Segment
from .hooks import DiskHooks
from .lending import Lending
from .locks import GranuleLocks
from .mapping import DiskMap
from .pool import ImagePool, Layer
from .remote import FETCHER, Deadline, fetch_missing, warm_chain
from .streams import KeptPlans, Streams, advise_segments

# write_zeroes and trim carry no payload and may span the whole disk (mkfs discards
# everything); they are worked through in pieces of this size, each under its range lock.
ZERO_CHUNK_BYTES = 32 << 20

DEFAULT_READAHEAD_CLUSTERS = 16

# A request that needs remote blocks fetches and plans again at most this many times (each
# round fetches something: metadata, then data).
MAX_FETCH_ROUNDS = 64

# Run codec writes (allocation, write-zeroes, trim) in worker threads?  No: a thread hop
# costs more than an allocation (see the module docstring).
OFFLOAD_WRITES = False


class Disk:
    """One virtual disk served by the daemon; see the module docstring."""

    def __init__(self, chain: Chain, *, readahead_clusters: int, offload_writes: bool,
                 boot_trace: bool = False):
        self.path = chain.path
        self.chain = chain
        self._chain = chain.layers
        self._top = chain.top
        self._cache = chain.cache
        self.readahead_clusters = max(0, readahead_clusters)
        self.offload_writes = offload_writes
        self.readonly = not self._top.image.writable
        self.readonly_reason = self._top.image.read_only_reason
        self.corrupt_reason: str | None = None
        self.flush_failed: str | None = None  # sticky: see flush()
        self.counters = chain.counters  # lookups made for this disk
        self.prime_seconds: float | None = None
        self._locks = GranuleLocks()
        self._streams = Streams(self._top.granule)
        # Bumped whenever the top layer's mapping changes; a kept plan is good only while
        # the generation it was made in lasts.
        self.mapping_generation = 0
        # Plans of reads that had to wait for the disk: advise() and the read that follows
        # use the plan instead of planning again.
        self._kept_plans = KeptPlans()
        self._closed = False
        self._ops = {k: 0 for k in ("reads", "writes", "writes_in_place", "library_writes",
                                    "write_zeroes", "trims", "flushes", "block_status",
                                    "prefetches", "bytes_read", "bytes_written",
                                    "lock_waits", "allocations", "lent", "adopted",
                                    "adopted_units", "given_back")}
        # Jobs in modules of their own (see the module docstring), given this disk's hooks.
        hooks = DiskHooks(
            chain, self._locks, self._ops,
            writable=lambda: not self.readonly and self.corrupt_reason is None,
            check_open=self._check_open, check_read=self._check_read,
            check_write=self._check_write, translate=self._translate,
            granules=self._granules, change_mapping=self._change_mapping,
            plan_fetching=self._plan_fetching, fetch=self._fetch)
        self.mapping = DiskMap(hooks)  # segments, block status, prefetch, priming
        self.lending = Lending(hooks)  # clusters lent to the kernel shim's pool
        # Boot-trace priming (cowd/disk/boottrace.py): the bottom layer's reads are noted
        # (a remote base's too: its trace lives beside its cache, its prefetch fills it).
        bottom = self._chain[-1]
        why_not = "no base: a disk of one layer" if len(self._chain) < 2 else None
        self._trace_depth = len(self._chain) - 1
        self._trace_file = bottom.image.file
        self.trace = BootTrace(None if why_not else bottom.image.file.fd,
                               None if why_not else bottom.image.path,
                               enabled=boot_trace and why_not is None, why_not=why_not,
                               remote=None if why_not else bottom.remote)

    # ---- opening and closing ---------------------------------------------------------------

    @classmethod
    async def open(cls, path: str, *, pool: ImagePool, cache: RemapCache,
                   readonly: bool = False,
                   readahead_clusters: int = DEFAULT_READAHEAD_CLUSTERS,
                   fmt: str | None = None,
                   offload_writes: bool = OFFLOAD_WRITES,
                   policy: OpenPolicy | None = None,
                   boot_trace: bool = False) -> Disk:
        """Open ``path`` (writable unless ``readonly``) and its chain, parents from ``pool``.

        Format errors propagate as ``formats.FormatError``; serving a file twice, or writing a
        file that is another disk's parent, is a ``UsageError``.  ``boot_trace``: record the
        base's first touches and load its trace (cowd/disk/boottrace.py; the caller starts
        the prefetch with ``disk.trace.start(nursery)``).
        """
        await trio.lowlevel.checkpoint()
        warm = None
        if policy is not None and policy.remote is not None and policy.remote.hosts != set():
            # A remote base's connection and the metadata its codec reads at open are had
            # in a thread (the same open, without the pool), so the open below finds them in
            # the cache instead of waiting for the network in the event loop.
            warm = await trio.to_thread.run_sync(warm_chain, path, fmt, policy)
        try:
            deadline = Deadline()
            for _ in range(MAX_FETCH_ROUNDS):
                try:
                    chain = Chain.open(path, pool=pool, cache=cache, writable=not readonly,
                                       fmt=fmt, policy=policy)
                    break
                except NotCached as miss:
                    await fetch_missing(miss, deadline=deadline)
            else:
                raise DiskError(errno.EIO, f"{path}: a remote base kept missing blocks")
        finally:
            if warm is not None:
                warm.close_chain()
        disk = cls(chain, readahead_clusters=readahead_clusters,
                   offload_writes=offload_writes, boot_trace=boot_trace)
        if disk.trace.enabled:
            await trio.to_thread.run_sync(disk.trace.load)
        return disk

    async def close(self) -> None:
        """Flush (if writable) and release the images.  Idempotent."""
        if self._closed:
            return
        await self.trace.stop()
        if self.trace.enabled:
            await trio.to_thread.run_sync(self.trace.save)
        err: BaseException | None = None
        if not self.readonly and self.corrupt_reason is None:
            try:
                await self.flush()
            except DiskError as e:
                err = e
        self._closed = True
        try:
            self.chain.close()  # some codecs write metadata when closed
        except (FormatError, OSError) as e:
            err = err or self._translate(e)
        if err is not None:
            raise err

    # ---- properties ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._top.size

    @property
    def cluster_size(self) -> int:
        return self._top.image.cluster_size

    @property
    def granule(self) -> int:
        return self._top.granule

    @property
    def layers(self) -> Sequence[Layer]:
        return tuple(self._chain)

    @property
    def trace_file(self) -> ChainFile:
        """The file whose reads the boot trace notes: the bottom layer's."""
        return self._trace_file

    def files(self) -> list[ChainFile]:
        """The chain's open files that can hold data, top first, each once (what the kernel
        shim is handed, so that remaps can name a file by index)."""
        return self.chain.files()

    # ---- checks and errors -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DiskError(errno.ESHUTDOWN, f"{self.path}: disk is closed")

    def _check_read(self, offset: int, length: int, limit: int | None = MAX_REQUEST_BYTES) -> None:
        # Every read passes here: no further method or property calls on the good path.
        if self._closed:
            self._check_open()
        if offset < 0 or length < 0 or offset + length > self._top.size:
            raise DiskError(errno.EINVAL, f"{self.path}: range outside the disk "
                                          f"(offset={offset}, length={length}, size={self.size})")
        if limit is not None and length > limit:
            raise DiskError(errno.EINVAL, f"{self.path}: request too long "
                                          f"(length={length}, max={limit})")

    def _check_write(self, offset: int, length: int, limit: int | None = MAX_REQUEST_BYTES) -> None:
        self._check_open()
        if self.readonly or self.corrupt_reason is not None:
            why = self.corrupt_reason or self.readonly_reason or "opened read-only"
            raise DiskError(errno.EPERM, f"{self.path}: disk is read-only ({why})")
        if offset < 0 or length < 0:
            raise DiskError(errno.EINVAL, f"{self.path}: negative range "
                                          f"(offset={offset}, length={length})")
        if offset + length > self.size:
            raise DiskError(errno.ENOSPC, f"{self.path}: write past the end of the disk "
                                          f"(offset={offset}, length={length}, size={self.size})")
        if limit is not None and length > limit:
            raise DiskError(errno.EINVAL, f"{self.path}: request too long "
                                          f"(length={length}, max={limit})")

    def _translate(self, e: Exception) -> DiskError:
        """The request's DiskError for a library failure (:func:`~cowd.disk.api.disk_error`),
        noting the two that change the disk for good: a failed fdatasync (every later flush
        fails too) and a corrupt image (read-only from then on)."""
        if isinstance(e, SyncFailed):
            self.flush_failed = self.flush_failed or str(e)
        elif isinstance(e, CorruptImage):
            self.corrupt_reason = str(e)
        return disk_error(e, self.path)

    # ---- reading ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """The guest bytes at [offset, offset + length)."""
        self._check_read(offset, length)
        buf = bytearray(length)
        await self._read(offset, memoryview(buf), zeroed=True)
        return bytes(buf)

    async def read_into(self, offset: int, dest: memoryview | bytearray,
                        deadline: Deadline | None = None) -> None:
        """Read ``len(dest)`` bytes at ``offset`` into ``dest`` (the zero-copy :meth:`read`);
        ``deadline``: the request's, when it fetched already (a worker's miss)."""
        view = memoryview(dest).cast("B")
        self._check_read(offset, len(view))
        await self._read(offset, view, zeroed=False, deadline=deadline)

    def try_read_into(self, offset: int, dest: memoryview | bytearray, *,
                      may_block: bool = False) -> bool:
        """Synchronous :meth:`read_into` for the common case: True when the read is done.
        False when it would have to wait for a lock or, unless ``may_block``, for the disk
        (data not in the page cache; then :meth:`advise` it and try again with
        ``may_block``, or call :meth:`read_into`).  Lets a frontend answer a batch of
        requests in one wakeup, with no task or checkpoint each."""
        view = memoryview(dest).cast("B")
        self._check_read(offset, len(view))
        try:
            return bool(len(view)) and self._try_read(offset, view, zeroed=False,
                                                      nowait=not may_block)
        except NotCached as miss:
            FETCHER.start(miss)  # read_into waits for it
            return False

    def advise(self, offset: int, length: int) -> None:
        """Start reading the range's data into the page cache without waiting
        (POSIX_FADV_WILLNEED on the planned DATA runs): a frontend that advises every read of
        a batch before doing the first one has the disk work on all of them at once, the way
        an AIO server does, with no thread.  The plan of a read that just had to wait is
        used, not made again."""
        segs = self._kept_plans.get(offset, length, self.mapping_generation, pop=False)
        if segs is None:
            req = PlanState()
            segs = []
            try:
                if self.chain.plan(offset, offset + length, segs, req) is not None:
                    return
            except NotCached as miss:
                FETCHER.start(miss)  # a remote layer's metadata
                return
            except (FormatError, OSError, ValueError):
                return  # advice only: the read itself reports the error
            self._kept_plans.keep(offset, length, self.mapping_generation, segs)
        advise_segments(segs)

    def advise_write(self, offset: int, length: int) -> bool:
        """Will this write copy up from the parents?  If so, start reading what the copy-up
        needs (the parents' data under the partly written clusters) into the page cache
        without waiting, and return True: a frontend advises every such write of a batch
        before doing the first, so the disk fetches their copy-up sources in parallel."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            return False
        try:
            lib = self.chain.plan_write(offset, offset + length, count=False).allocating
        except (FormatError, OSError, ValueError):
            return False  # the write itself reports it
        # Only the copy-up units (clusters; subclusters with extended L2) the write covers
        # partly are copied up: the head of the first and the tail of the last unit of each
        # piece.  Advise those (whole units that the write replaces need nothing from the
        # parents; advising a 4 KiB write's whole 128 KiB cluster read 32x what it needed).
        cs = self._top.image.copy_up_size
        fetch = False
        for gs, ge in lib:
            head = gs - gs % cs
            tail = ge - ge % cs
            if head < gs:
                self.advise(head, min(cs, self.size - head))
                fetch = True
            if tail < ge and ge < self.size and (tail >= gs or head == gs):
                self.advise(tail, min(cs, self.size - tail))
                fetch = True
        return fetch

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: Callable[[WriteEnd], None]) -> bool:
        """Nothing here is written now and answered later: try_write, else write."""
        return False

    def try_write(self, offset: int, data: bytes | bytearray | memoryview, *,
                  allocate: bool = True) -> bool:
        """Synchronous :meth:`write` (without FUA): True when done (in place, or allocated
        through the library inline), False when it must wait for a lock or the library
        writes in worker threads (then call :meth:`write`).  ``allocate=False``: only a
        write that changes no mapping (every byte to clusters the top layer owns); False,
        having written nothing, for any other (its plan not counted as a request's lookup:
        the caller goes on to :meth:`write`, which counts its own)."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_write(offset, length)
        if not length:
            return False
        end = offset + length
        first, gend = self._granules(offset, end)
        lookups = 0
        try:
            inplace, lib = self.chain.plan_write(offset, end, count=allocate)
            if self._locks.any_held(first, gend) or (lib and not allocate):
                return False
            if lib and (self.offload_writes or self.chain.locked_any() or self.chain.remote):
                return False  # (over a remote base: its copy-up sources are fetched first)
            # Allocation runs inline too (measured: cheaper than a thread hop or a task, see
            # the module docstring); with no await until the end, nothing can interleave.
            self._pwrite_all(inplace, view, offset)
            for gs, ge in lib:
                lookups += self._library_write_inline(gs, view[gs - offset:ge - offset])
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._cache.note_request(lookups, self.counters)
        if not lib:
            self._ops["writes_in_place"] += 1
        self._ops["writes"] += 1
        self._ops["bytes_written"] += length
        return True

    def _try_read(self, offset: int, dest: memoryview, zeroed: bool,
                  nowait: bool = False) -> bool:
        """Plan and read with no await: False if a layer lock is in the way or (``nowait``)
        the data is not in the page cache.  Nothing is counted as done then; the caller
        reads again (with the plan kept, in the second case)."""
        if self._kept_plans.plans:
            kept = self._kept_plans.get(offset, len(dest), self.mapping_generation, pop=True)
            if kept is not None:
                return self._read_planned(offset, dest, kept, zeroed, nowait)
        end = offset + len(dest)
        sequential = self._streams.note(offset, end)
        req = PlanState(self.readahead_clusters if sequential else 0)
        segs: list[Segment] = []
        try:
            if self.chain.plan(offset, end, segs, req) is not None:
                return False
            if self.chain.read_segments(offset, dest, segs, zeroed, owned=False,
                                        nowait=nowait) is not None:
                return False  # a compressed cluster's layer is busy in a worker thread
        except WouldBlock:
            # For advise() and the read after it.
            self._kept_plans.keep(offset, len(dest), self.mapping_generation, segs)
            if sequential:
                # A stream that outran the page cache: its data ahead is what it waits for
                # next (the read that follows uses the kept plan and does not come back here).
                self._streams.advise_ahead(segs, len(dest))
            return False
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        if self.trace.recording:
            self._note_base(segs)
        self._done_read(req, len(dest))
        if sequential:
            self._streams.advise_ahead(segs, len(dest))
        return True

    def _read_planned(self, offset: int, dest: memoryview, segs: list[Segment],
                      zeroed: bool, nowait: bool) -> bool:
        """:meth:`_try_read` with a kept plan (no planning, no resolver calls)."""
        try:
            if self.chain.read_segments(offset, dest, segs, zeroed, owned=False,
                                        nowait=nowait) is not None:
                return False
        except WouldBlock:
            self._kept_plans.keep(offset, len(dest), self.mapping_generation, segs)
            return False
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        if self.trace.recording:
            self._note_base(segs)
        self._done_read(PlanState(), len(dest))
        return True

    def _note_base(self, segs: list[Segment]) -> None:
        """The boot trace's note of the plan's runs in the base's file."""
        depth, base = self._trace_depth, self._trace_file
        for seg in segs:
            if seg.depth == depth and seg.extent.file is base:
                self.trace.note(seg.file_offset, seg.length)

    def _done_read(self, req: PlanState, length: int) -> None:
        self._cache.note_request(req.lookups, self.counters)
        self._ops["reads"] += 1
        self._ops["bytes_read"] += length

    async def _read(self, offset: int, dest: memoryview, zeroed: bool,
                    deadline: Deadline | None = None) -> None:
        length = len(dest)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        deadline = deadline or Deadline()
        for _ in range(MAX_FETCH_ROUNDS):
            try:
                if self._try_read(offset, dest, zeroed):
                    return
                await self._read_locked(offset, dest)
                return
            except NotCached as miss:
                await self._fetch(miss, deadline)
                zeroed = False
        raise DiskError(errno.EIO, f"{self.path}: a remote base kept missing blocks "
                        f"(offset={offset}, length={length})")

    async def _fetch(self, miss: NotCached, deadline: Deadline | None = None) -> None:
        """Fetch a remote layer's missing blocks (cowd/disk/remote.py); EIO past the
        deadline (the request's, over all its rounds, when it passes one)."""
        try:
            await fetch_missing(miss, deadline=deadline)
        except (FormatError, OSError) as e:
            raise self._translate(e) from e

    async def _read_locked(self, offset: int, dest: memoryview) -> None:
        length = len(dest)
        # A layer is busy in a worker thread (a flush, an offloaded copy-up): plan and read
        # again under every lock.  Part of ``dest`` may hold bytes of the first attempt, so
        # zero explicitly instead of trusting ``zeroed``.  (Waiting for one lock and trying
        # again would convoy: a released trio lock passes straight to the next waiter.)
        self._ops["lock_waits"] += 1
        req = PlanState()
        try:
            async with self.chain.exclusive(will_await=True):
                req.owned = True
                segs: list[Segment] = []
                self.chain.plan(offset, offset + length, segs, req)
                self.chain.read_segments(offset, dest, segs, False, owned=True)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        if self.trace.recording:
            self._note_base(segs)
        self._done_read(req, length)

    # ---- writing ---------------------------------------------------------------------------

    def _granules(self, offset: int, end: int) -> tuple[int, int]:
        g = self._top.granule
        return offset // g, (end - 1) // g + 1

    def _cluster_granules(self, offset: int, end: int) -> tuple[int, int]:
        """Granules covering every top cluster that [offset, end) touches (what an allocation
        or discard there may change)."""
        cs = max(1, self._top.image.cluster_size)
        g = self._top.granule
        c0 = offset // cs * cs
        c1 = -(-end // cs) * cs
        return c0 // g, -(-min(c1, self.size) // g)

    @staticmethod
    def _pwrite_all(inplace: list[InPlace], view: memoryview, offset: int) -> None:
        for fd, fo, gofs, n in inplace:
            pwrite_from(fd, view[gofs - offset:gofs - offset + n], fo)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durable when this returns."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_write(offset, length)
        if length:
            end = offset + length
            first, gend = self._granules(offset, end)
            try:
                inplace, lib = self.chain.plan_write(offset, end, count=True)
                if not lib and not self._locks.any_held(first, gend):
                    # The fast path: nothing but pwrite, no await, no lock.
                    self._pwrite_all(inplace, view, offset)
                    self._cache.note_request(0, self.counters)
                    self._ops["writes_in_place"] += 1
                else:
                    lookups = 0
                    async with self._locks.hold(first, gend):
                        inplace, lib = self.chain.plan_write(offset, end, count=False)
                        self._pwrite_all(inplace, view, offset)
                        for gs, ge in lib:
                            if self.chain.remote:
                                await self._ready_copy_up(gs, ge, whole=False)
                            lookups += await self._library_write(
                                gs, view[gs - offset:ge - offset])
                    self._cache.note_request(lookups, self.counters)
                    if not lib:
                        self._ops["writes_in_place"] += 1
            except (FormatError, OSError, ValueError) as e:
                raise self._translate(e) from e
            self._ops["writes"] += 1
            self._ops["bytes_written"] += length
        if fua:
            await self.flush()
        elif not length:
            await trio.lowlevel.checkpoint()

    async def _library_write(self, guest_offset: int, view: memoryview) -> int:
        """``Image.write`` for one piece (caller holds its granules); refills the touched
        clusters' entries.  Returns the resolver calls made."""
        deadline = Deadline()
        for _ in range(MAX_FETCH_ROUNDS):
            try:
                return await self._library_write_once(guest_offset, view)
            except NotCached as miss:  # a copy-up source the fetch before did not cover
                await self._fetch(miss, deadline)
        raise DiskError(errno.EIO, f"{self.path}: a remote base kept missing blocks")

    async def _library_write_once(self, guest_offset: int, view: memoryview) -> int:
        offload = self.offload_writes
        async with self.chain.exclusive(will_await=offload):
            if not offload:
                return self._library_write_inline(guest_offset, view)
            top = self._top
            c0, c1 = self._cluster_granules(guest_offset, guest_offset + len(view))
            self._ops["library_writes"] += 1
            self._invalidate(c0, c1)
            await self.chain.run(top.image.write, guest_offset, view, offload=True)
            return self._refill(c0, c1)

    def _library_write_inline(self, guest_offset: int, view: memoryview) -> int:
        """The library write with no await in it: the caller makes sure nothing else can
        touch the chain meanwhile (no lock held, or it holds them)."""
        self._ops["library_writes"] += 1
        return self._change_mapping(guest_offset, guest_offset + len(view),
                                    self._top.image.write, guest_offset, view)

    def _change_mapping(self, offset: int, end: int, call: Callable[..., object],
                        *args: Any, refill: bool = True) -> int:
        """``call(*args)`` (no await: the caller makes sure nothing else touches the chain)
        changes the top layer's mapping of the clusters [offset, end) touches: their entries
        invalidated before, refilled after (``refill=False``: left to the next lookup, for
        changes the daemon will not read soon: a worker's adopted subclusters).  Returns the
        resolver calls made."""
        c0, c1 = self._cluster_granules(offset, end)
        self._invalidate(c0, c1)
        call(*args)
        if not refill:
            self.mapping_generation += 1
            return 0
        return self._refill(c0, c1)

    def _invalidate(self, c0: int, c1: int) -> None:
        """The top layer's mapping of granules [c0, c1) is about to change: drop their cache
        entries and every kept read plan (``mapping_generation``)."""
        self.mapping_generation += 1
        self._cache.invalidate_range(self._top.layer_id, c0, c1)

    def _refill(self, c0: int, c1: int) -> int:
        """... and has changed: cache the new entries; returns the resolver calls made."""
        self.mapping_generation += 1
        return self.chain.refill(c0, c1)

    async def _metadata_op(self, what: str, offset: int, length: int,
                           call: Callable[[int, int], None]) -> None:
        """write_zeroes / trim: in ZERO_CHUNK_BYTES pieces, each under its range lock, the
        touched clusters' entries invalidated before and after the library call."""
        offload = self.offload_writes
        end = offset + length
        pos = offset
        try:
            while pos < end:
                n = min(ZERO_CHUNK_BYTES, end - pos)
                first, gend = self._granules(pos, pos + n)
                c0, c1 = self._cluster_granules(pos, pos + n)
                async with self._locks.hold(first, gend):
                    if self.chain.remote:
                        await self._ready_copy_up(pos, pos + n, whole=False)
                    async with self.chain.exclusive(will_await=offload):
                        self._invalidate(c0, c1)
                        await self.chain.run(call, pos, n, offload=offload)
                        self._invalidate(c0, c1)
                pos += n
                if pos < end:
                    await trio.lowlevel.checkpoint()
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._cache.note_request(0, self.counters)
        self._ops[what] += 1

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None:
        """Make [offset, offset + length) read as zeroes — in the top layer, never a parent."""
        self._check_write(offset, length, limit=None)
        image = self._top.image

        def call(pos: int, n: int) -> None:
            image.write_zeroes(pos, n, may_unmap)

        if length:
            await self._metadata_op("write_zeroes", offset, length, call)
        if fua:
            await self.flush()
        elif not length:
            await trio.lowlevel.checkpoint()

    async def trim(self, offset: int, length: int) -> None:
        """Discard [offset, offset + length): afterwards it reads as zeroes."""
        self._check_write(offset, length, limit=None)
        if length:
            await self._metadata_op("trims", offset, length, self._top.image.discard)
        else:
            await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        """Every write completed before this call (on any connection) becomes durable."""
        self._check_open()
        self._ops["flushes"] += 1
        if self.readonly:
            await trio.lowlevel.checkpoint()
            return
        if self.flush_failed is not None:
            raise DiskError(errno.EIO, f"{self.path}: an earlier flush failed, so no later "
                            f"one can promise durability ({self.flush_failed})")
        top = self._top
        try:
            async with self.chain.exclusive([top], will_await=True):
                await self.chain.run(top.image.flush, offload=True)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e

    # ---- the kernel shim's questions --------------------------------------------------------

    async def segments(self, offset: int, length: int, ahead: int = 0,
                       deadline: Deadline | None = None, *,
                       direct: bool = False) -> list[Segment]:
        """Where the range lives, as remaps may name it (:meth:`DiskMap.segments`)."""
        return await self.mapping.segments(offset, length, ahead, deadline, direct=direct)

    async def allocate(self, offset: int, length: int) -> list[Segment]:
        """Make every top-layer cluster touching the range DATA that the top layer owns,
        copying up from the parents, without changing a guest byte: afterwards writes there
        can go in place (the kernel shim's first write to a cluster).  Returns the range's
        segments as they are now, planned under the same range lock from the entries the
        allocation just cached (the caller does not plan it again)."""
        self._check_write(offset, length)
        if not length:
            await trio.lowlevel.checkpoint()
            return []
        end = offset + length
        first, gend = self._granules(offset, end)
        top = self._top
        offload = self.offload_writes
        req = PlanState()
        try:
            async with self._locks.hold(first, gend):
                for gs, ge in self.chain.plan_write(offset, end, count=False).allocating:
                    if self.chain.remote:
                        await self._ready_copy_up(gs, ge, whole=True)
                    async with self.chain.exclusive(will_await=offload):
                        c0, c1 = self._cluster_granules(gs, ge)
                        self._invalidate(c0, c1)
                        await self.chain.run(top.image.allocate, gs, ge - gs, offload=offload)
                        self._refill(c0, c1)
                    self._ops["allocations"] += 1
                segs = await self._plan_fetching(offset, end, req)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._cache.note_request(req.lookups, self.counters)
        return self.mapping.mappable(segs)

    async def _plan_fetching(self, start: int, end: int, req: PlanState) -> list[Segment]:
        """``Chain.plan_locked``, fetching a remote layer's metadata as it is needed (by the
        request's deadline, ``req.deadline``, when it has one)."""
        if req.deadline is None:
            req.deadline = Deadline()
        deadline = req.deadline
        for _ in range(MAX_FETCH_ROUNDS):
            try:
                return await self.chain.plan_locked(start, end, req)
            except NotCached as miss:
                await self._fetch(miss, deadline)
        raise DiskError(errno.EIO, f"{self.path}: a remote base kept missing blocks")

    async def _ready_copy_up(self, start: int, end: int, whole: bool) -> None:
        """Fetch the remote blocks a codec will copy up for [start, end): the top's copy-up
        units the range covers in part (all the clusters it touches with ``whole``, as
        ``allocate`` copies)."""
        cs = max(1, self.cluster_size if whole else self._top.image.copy_up_size)
        head, tail = start - start % cs, -(-end // cs) * cs
        pieces = [(head, min(tail, self.size))] if whole else \
            [(a, min(a + cs, self.size)) for a in {head, tail - cs}
             if (a < start or min(a + cs, self.size) > end) and a < self.size]
        deadline = Deadline()
        for a, b in pieces:
            for _ in range(MAX_FETCH_ROUNDS):
                segs: list[Segment] = []
                try:
                    # Best effort: a layer busy in a thread stops the plan (the codec's
                    # copy-up then fetches what is left: _library_write).
                    self.chain.plan_below(0, a, b, segs, PlanState())
                    for seg in segs:
                        remote = self._chain[seg.depth].remote if seg.depth >= 0 else None
                        if remote is not None and seg.kind is Kind.DATA:
                            remote.ready(seg.file_offset, seg.length)
                    break
                except NotCached as miss:
                    await self._fetch(miss, deadline)

    # ---- block status, prefetch, priming (cowd/disk/mapping.py) ---------------------------

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]:
        """NBD base:allocation for a prefix of the range: :meth:`DiskMap.block_status`."""
        return await self.mapping.block_status(offset, length)

    async def prefetch(self, offset: int, length: int) -> None:
        """NBD CACHE: fill the remap cache for the range (:meth:`DiskMap.prefetch`)."""
        await self.mapping.prefetch(offset, length)

    async def prime(self) -> float:
        """Cache every layer's mapping (:meth:`DiskMap.prime`); returns the seconds taken."""
        self.prime_seconds = await self.mapping.prime()
        return self.prime_seconds

    # ---- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of this disk (lookups made for it; the shared cache has its own)."""
        return {
            "path": self.path,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "granule": self.granule,
            "readonly": self.readonly,
            "corrupt": self.corrupt_reason,
            "flush_failed": self.flush_failed,
            "readahead_clusters": self.readahead_clusters,
            "prime_seconds": self.prime_seconds,
            "boot_trace": self.trace.stats(),
            "layers": [
                {"path": lay.image.path, "format": lay.image.format_name,
                 "layer_id": lay.layer_id, "granule": lay.granule, "shared_by": lay.refs}
                for lay in self._chain
            ],
            "remap": self.counters.as_dict(),
            "ops": {**self._ops, "lock_waits": self._ops["lock_waits"] + self.chain.lock_waits,
                    "plans_reused": self._kept_plans.reused},
        }


__all__ = ["DEFAULT_READAHEAD_CLUSTERS", "MAX_REQUEST_BYTES", "Disk", "DiskError"]
