"""Layer: cowd disk.  One open disk's chain — its layers, their files, its share of the
pool's parents — and the one place that walks it.

Theory of operation
-------------------
A :class:`Chain` is the top image (writable unless read-only) and its parents from the
:class:`~cowd.disk.pool.ImagePool`, top first.  It *plans*: a guest range becomes a list of
:class:`Segment` (DATA at a file offset, ZERO, COMPRESSED), found by walking the top layer's
granules through the :class:`~cowd.remap.RemapCache`; an UNALLOCATED extent sends the walk
one layer down (past a shorter parent's end, or below the last layer, the bytes are zero).
A miss calls that layer's resolver right there and inserts the answer, plus ``ahead`` more
granules for a sequential stream.  Planning and the DATA reads of the plan are one
synchronous step, so no write can change the mapping in between.

Copy-up uses the same walk: the chain injects a :class:`PlannedBelow` as the top image's
``below`` (formats/base.py's ``Below``), so a codec that allocates a cluster reads the
parents' bytes through this planner and the shared base cache, never by walking the chain
itself.  (Called from a worker thread — writes offloaded — it only peeks at the cache and
inserts nothing: the cache is the trio thread's.)

Locks
-----
Each :class:`Layer` has a ``trio.Lock``; code that calls into an image from a worker thread
holds the locks of every layer the call may touch (a write copies up from the whole chain; a
flush touches only the top).  Code that calls an image inline in the trio thread needs no
lock *if none is held* (it runs to completion without an await); if one is held it waits
for it.  Locks are taken top first, and chains are paths towards the root of one tree of
images, so the order is the same for every disk.  Cache entries are computed and inserted in
one synchronous step while the layer's lock is free or held by the caller.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import trio

import formats
from formats.base import Extent, HostFile, Image, Kind, NearOpener
from formats.errors import CorruptImage
from formats.opener import OpenPolicy

from ..remap import Extents, Origin, RemapCache, RemapCounters
from .backing_io import read_run, zero_fill
from .pool import ImagePool, Layer, file_key, lock_image

if TYPE_CHECKING:
    from .remote import Deadline

T = TypeVar("T")

# Read-ahead never inserts more than this fraction of the cache's bound in one go (a window
# larger than the cache would evict its own entries before they are used).
READAHEAD_MAX_FRACTION = 4

# The open file of a layer (an image, or a qcow2's data file) as the disk's users see it:
# ``fd``, ``path``, ``writable``.
ChainFile = HostFile

# The depth of a segment that no layer holds: below the last layer, or past a shorter
# parent's end.  It reads as zeroes.
BELOW_CHAIN = -1


class Segment(NamedTuple):
    """A planned run of guest bytes: ``length`` bytes from ``guest_offset`` live in
    ``extent`` of the layer at ``depth`` (0 is the top; :data:`BELOW_CHAIN`: zeroes).
    A named tuple, not a frozen dataclass: one is made per run of every request, and a
    tuple is made in half the time (hot loops unpack it)."""

    guest_offset: int
    length: int
    depth: int
    extent: Extent

    @property
    def kind(self) -> Kind:
        return self.extent.kind

    # What a frontend that maps guest ranges itself (the kernel shim) needs, without the
    # format library's vocabulary:
    @property
    def is_data(self) -> bool:
        """The bytes live in ``file`` at ``file_offset``."""
        return self.extent.kind is Kind.DATA and self.extent.file is not None

    @property
    def is_zero(self) -> bool:
        return self.extent.kind is Kind.ZERO

    @property
    def file(self) -> ChainFile | None:
        return self.extent.file

    @property
    def writable(self) -> bool:
        """DATA of the top layer that may be overwritten in place."""
        return self.depth == 0 and self.extent.writable

    @property
    def file_offset(self) -> int:
        """DATA: where ``guest_offset`` lives in ``extent.file``."""
        return self.extent.file_offset + (self.guest_offset - self.extent.guest_offset)


# Segment((guest_offset, length, depth, extent)) without the named tuple's Python-level
# __new__: the planner makes one per run of every request.
_segment = functools.partial(tuple.__new__, Segment)

_ZERO = Extent(0, 0, Kind.ZERO)


class InPlace(NamedTuple):
    """A run of a write that lands in DATA the top layer owns: ``length`` bytes for guest
    ``guest_offset`` go to ``file_offset`` of ``fd`` with a plain pwrite."""

    fd: int
    file_offset: int
    guest_offset: int
    length: int


class Allocating(NamedTuple):
    """A piece of a write [guest_offset, guest_end) that the codec must write (allocation
    with copy-up, or granules the cache does not hold)."""

    guest_offset: int
    guest_end: int


class WritePlan(NamedTuple):
    """A write split by :meth:`Chain.plan_write`, each list in guest order."""

    in_place: list[InPlace]
    allocating: list[Allocating]


# Without the named tuples' Python-level __new__ (one of each per write, on the hot path).
_in_place = functools.partial(tuple.__new__, InPlace)
_allocating = functools.partial(tuple.__new__, Allocating)
_write_plan = functools.partial(tuple.__new__, WritePlan)


def clip(ext: Extent, guest_offset: int, length: int) -> Extent:
    """The part of ``ext`` covering [guest_offset, guest_offset + length)."""
    if ext.kind is Kind.DATA:
        fo = ext.file_offset + (guest_offset - ext.guest_offset)
        return Extent(guest_offset, length, Kind.DATA, ext.file, fo, writable=ext.writable)
    if ext.kind is Kind.COMPRESSED:
        return Extent(guest_offset, length, Kind.COMPRESSED, ext.file, ext.file_offset,
                      ext.compressed_length, cluster_guest_offset=ext.cluster_guest_offset)
    return Extent(guest_offset, length, ext.kind)


class PlanState:
    """One planning pass: what a miss resolves beyond the granule it needs, and where a pass
    that met a busy layer stopped."""

    __slots__ = ("ahead", "ahead_origin", "cache_writes", "deadline", "end", "lookups", "owned",
                 "resume", "resume_len", "to_end")

    def __init__(self, ahead: int = 0, ahead_origin: int = Origin.READAHEAD,
                 end: int = 0, to_end: bool = False, *, owned: bool = False,
                 cache_writes: bool = True):
        self.lookups = 0  # resolver calls made
        self.ahead = ahead  # granules to resolve past a miss
        self.ahead_origin = ahead_origin
        self.end = end
        self.to_end = to_end  # resolve to the end of the request on a miss (status, prefetch)
        self.resume = 0
        self.resume_len = 0
        self.owned = owned  # the caller holds every layer's lock
        self.cache_writes = cache_writes  # False in a worker thread: peek, never insert
        # The request's deadline for fetching a remote layer's blocks, over all its rounds
        # (cowd/disk/remote.py's Deadline), when the caller has one.
        self.deadline: Deadline | None = None


class Chain:
    """An open disk's chain; see the module docstring.  Trio-thread only, except
    :class:`PlannedBelow`'s reads from a worker thread that holds every lock."""

    def __init__(self, path: str, layers: list[Layer], *, pool: ImagePool, cache: RemapCache,
                 top_key: tuple[int, int]):
        self.path = path
        self.layers = layers
        self.top = layers[0]
        self.pool = pool
        self.cache = cache
        self.top_key = top_key
        self.readonly = not self.top.image.writable
        self.counters = RemapCounters()  # lookups made for this disk
        self.lock_waits = 0
        self._trio_thread = threading.get_ident()
        # Some layer is a remote base (its reads may raise NotCached: cowd/disk/remote.py).
        self.remote = any(lay.remote is not None for lay in layers)
        if len(layers) > 1:
            self.top.image.below = PlannedBelow(self, 1)

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, pool: ImagePool, cache: RemapCache, writable: bool,
             fmt: str | None = None, policy: OpenPolicy | None = None) -> Chain:
        """Open ``path`` and its chain, parents from ``pool``.  Format errors propagate as
        ``formats.FormatError``; serving a file twice, or writing a file that is another
        disk's parent, is a ``UsageError``.  What the chain's names may reach is the user's
        choice (``policy``): confined to the top's folder by default (formats/opener.py)."""
        pool.check_top(path, file_key(path), writable)
        acquired: list[Layer] = []

        def open_parent(pfile: formats.HostFile, pfmt: str | None,
                        near: NearOpener) -> Image:
            img = pool.open_parent(pfile, pfmt, near)
            acquired.append(pool.layer_of(img))
            return img

        top_image: Image | None = None
        try:
            top_image = formats.open_image(path, writable, fmt, open_parent=open_parent,
                                           policy=policy)
            key = top_image.file.dev_ino
            pool.check_top(path, key, writable)
            lock_image(top_image, writable=top_image.writable)
            layers = [Layer(top_image)]
            layer: Image | None = top_image.backing
            while layer is not None:
                layers.append(pool.layer_of(layer))
                layer = layer.backing
            layers[0].refs = 1
        except BaseException:
            if top_image is not None:
                top_image.close()
            for lay in acquired:
                if pool.release(lay):
                    cache.drop_layer(lay.layer_id)
            raise
        # open_image walks a shared parent's own chain again, taking one more reference on
        # every link: exactly one per disk and layer, which close() gives back.
        pool.add_top(key, top_image.writable)
        return cls(path, layers, pool=pool, cache=cache, top_key=key)

    def close(self) -> None:
        """Close the top image (some codecs write metadata here) and give back the parents."""
        top = self.top
        self.cache.drop_layer(top.layer_id)
        try:
            top.image.close()
        finally:
            self.pool.remove_top(self.top_key)
            for lay in self.layers[1:]:
                if self.pool.release(lay):
                    self.cache.drop_layer(lay.layer_id)

    def files(self) -> list[ChainFile]:
        """Every open host file of the chain that can hold data (data files included), top
        first, each once."""
        seen: dict[int, HostFile] = {}
        for layer in self.layers:
            image = layer.image
            for f in (image.file, getattr(image, "data_file", None)):
                if isinstance(f, HostFile) and f.fd >= 0 and id(f) not in seen:
                    seen[id(f)] = f
        return list(seen.values())

    # ---- locking and calling into images -------------------------------------------------

    def locked_any(self, layers: Sequence[Layer] | None = None) -> bool:
        return any(lay.lock.locked() for lay in (self.layers if layers is None else layers))

    @asynccontextmanager
    async def exclusive(self, layers: Sequence[Layer] | None = None, *,
                        will_await: bool) -> AsyncIterator[None]:
        """Make calls into ``layers`` (default: all) safe.  Inline callers (no await in the
        body) need no lock when none is held; otherwise take them all, top first."""
        layers = self.layers if layers is None else layers
        if not will_await and not self.locked_any(layers):
            yield
            return
        self.lock_waits += self.locked_any(layers)
        async with AsyncExitStack() as stack:
            for lay in layers:
                await stack.enter_async_context(lay.lock)
            yield

    async def run(self, fn: Callable[..., T], *args: Any, offload: bool) -> T:
        """``fn(*args)`` inline, or in a worker thread of the pool's limiter."""
        if offload:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.pool.limiter)
        return fn(*args)

    # ---- cache fills ---------------------------------------------------------------------

    def fill(self, depth: int, idx: int, ahead: int, st: PlanState, *,
             first_origin: int = Origin.MISS, ahead_origin: int = Origin.READAHEAD,
             replace_ahead: bool = False) -> Extents:
        """Resolve granule ``idx`` of layer ``depth`` (plus ``ahead`` more) and cache them.
        Caller guarantees exclusivity (the layer's lock is free or its own, no await).
        Returns granule ``idx``'s extents whether or not they could be cached."""
        layer = self.layers[depth]
        g = layer.granule
        cap = self.cache.max_entries // READAHEAD_MAX_FRACTION
        ahead = max(0, min(ahead, cap))
        start = idx * g
        end = min(layer.size, (idx + 1 + ahead) * g)
        if start >= end:
            raise CorruptImage(layer.image.path, "granule past the end of the layer", "offset",
                               start)
        lid = layer.layer_id
        cache = self.cache
        local = self.counters
        first: Extents | None = None
        for gi, exts in self.split(layer, start, end, st):
            if gi == idx:
                first = exts
                if st.cache_writes:
                    cache.insert((lid, gi), exts, first_origin, local)
            elif st.cache_writes and (replace_ahead or (lid, gi) not in cache):
                cache.insert((lid, gi), exts, ahead_origin, local)
        if first is None:
            raise CorruptImage(layer.image.path, "resolver left a gap", "offset", start)
        return first

    def refill(self, c0: int, c1: int) -> int:
        """Replace the top layer's entries of granules [c0, c1) after its metadata changed;
        returns the resolver calls made."""
        st = PlanState()
        self.cache.invalidate_range(self.top.layer_id, c0, c1)
        self.fill(0, c0, c1 - c0 - 1, st, first_origin=Origin.REFILL,
                  ahead_origin=Origin.REFILL, replace_ahead=True)
        return st.lookups

    def split(self, layer: Layer, start: int, end: int,
              st: PlanState) -> Iterator[tuple[int, Extents]]:
        """Walk the layer's extents over [start, end) (granule-aligned, or ending at the
        layer's end) and yield ``(granule_index, extents clipped to the granule)``."""
        g = layer.granule
        size = layer.size
        gi = start // g
        gend = min(size, (gi + 1) * g)
        parts: list[Extent] = []
        pos = start
        for ext in layer.image.extents(start, end):
            st.lookups += 1
            ext_end = ext.guest_offset + ext.length
            e_end = min(ext_end, end)
            if ext.guest_offset != pos or e_end <= pos:
                raise CorruptImage(layer.image.path, "resolver answered out of order",
                                   "offset", pos)
            while pos < e_end:
                piece_end = min(e_end, gend)
                if pos == ext.guest_offset and piece_end == ext_end:
                    parts.append(ext)
                else:
                    parts.append(clip(ext, pos, piece_end - pos))
                pos = piece_end
                if pos == gend:
                    yield gi, tuple(parts)
                    parts = []
                    gi += 1
                    gend = min(size, gend + g)
        if pos != end:
            raise CorruptImage(layer.image.path, "resolver left a gap", "offset", pos)

    # ---- planning ------------------------------------------------------------------------

    def plan(self, start: int, end: int, segs: list[Segment], st: PlanState) -> Layer | None:
        """Append the segments of [start, end) to ``segs``.  Returns None when done, or the
        layer whose lock a worker thread holds: then ``st.resume``/``resume_len`` say where
        to start again once it is free."""
        st.resume = start
        st.resume_len = len(segs)
        return self._plan_layer(0, start, end, segs, st)

    def _plan_layer(self, depth: int, start: int, end: int, segs: list[Segment],
                    st: PlanState) -> Layer | None:
        layer = self.layers[depth]
        g = layer.granule
        lid = layer.layer_id
        writes = st.cache_writes
        lookup = self.cache.lookup
        peek = self.cache.peek
        local = self.counters
        idx = start // g
        pos = start
        while pos < end:
            gend = (idx + 1) * g
            if gend > end:
                gend = end
            exts = lookup((lid, idx), local) if writes else peek((lid, idx))
            if exts is None:
                if not st.owned and layer.lock.locked():
                    return layer
                ahead = st.ahead
                if st.to_end:
                    ahead = (st.end - 1) // g - idx
                exts = self.fill(depth, idx, ahead, st, ahead_origin=st.ahead_origin)
            for ext in exts:
                e_end = ext.guest_offset + ext.length
                if e_end <= pos:
                    continue
                if ext.guest_offset >= gend:
                    break
                if e_end > gend:
                    e_end = gend
                if ext.kind is Kind.UNALLOCATED:
                    blocked = self.plan_below(depth, pos, e_end, segs, st)
                    if blocked is not None:
                        return blocked
                else:
                    segs.append(_segment((pos, e_end - pos, depth, ext)))
                pos = e_end
            if pos != gend:
                raise CorruptImage(layer.image.path, "cached remap does not cover its cluster",
                                   "offset", pos)
            idx += 1
            if depth == 0:
                st.resume = pos
                st.resume_len = len(segs)
        return None

    def plan_below(self, depth: int, start: int, end: int, segs: list[Segment],
                   st: PlanState) -> Layer | None:
        """Plan [start, end) as the layers beneath ``depth`` present it."""
        nd = depth + 1
        if nd == len(self.layers):
            segs.append(_segment((start, end - start, BELOW_CHAIN, _ZERO)))
            return None
        psize = self.layers[nd].size
        mid = min(end, max(start, psize))
        if start < mid:
            blocked = self._plan_layer(nd, start, mid, segs, st)
            if blocked is not None:
                return blocked
        if mid < end:
            segs.append(_segment((mid, end - mid, BELOW_CHAIN, _ZERO)))
        return None

    def plan_direct(self, start: int, end: int, st: PlanState) -> list[Segment] | None:
        """The segments of [start, end) from the layers' resolvers, not granule by granule
        through the cache: one segment per extent (a run of many granules of one kind and
        mapping), so a long range of an empty overlay over a raw base costs a few calls
        instead of a lookup per granule per layer.  None where it may not be used: a layer's
        lock is held (a worker thread may be changing its metadata) or a layer is remote
        (its blocks must be fetched first).  Inserts nothing into the cache; the resolver
        calls are counted in ``st.lookups``.  As ``plan``, synchronous: the caller queues
        what it makes of the segments before any await."""
        if self.locked_any() or self.remote:
            return None
        segs: list[Segment] = []
        self._direct(0, start, end, segs, st)
        return segs

    def _direct(self, depth: int, start: int, end: int, segs: list[Segment],
                st: PlanState) -> None:
        if depth == len(self.layers):
            segs.append(_segment((start, end - start, BELOW_CHAIN, _ZERO)))
            return
        layer = self.layers[depth]
        mid = min(end, max(start, layer.size))
        pos = start
        if start < mid:
            for ext in layer.image.extents(start, mid):
                st.lookups += 1
                e_end = ext.guest_offset + ext.length
                if ext.guest_offset != pos or e_end <= pos:
                    raise CorruptImage(layer.image.path, "resolver answered out of order",
                                       "offset", pos)
                e_end = min(e_end, mid)
                if ext.kind is Kind.UNALLOCATED:
                    self._direct(depth + 1, pos, e_end, segs, st)
                else:
                    whole = ext.guest_offset == pos and ext.guest_offset + ext.length == e_end
                    segs.append(_segment((pos, e_end - pos, depth,
                                          ext if whole else clip(ext, pos, e_end - pos))))
                pos = e_end
            if pos != mid:
                raise CorruptImage(layer.image.path, "resolver left a gap", "offset", pos)
        if mid < end:
            segs.append(_segment((mid, end - mid, BELOW_CHAIN, _ZERO)))

    async def plan_locked(self, start: int, end: int, st: PlanState) -> list[Segment]:
        """Plan [start, end).  Inline when no layer lock is held; otherwise take every lock
        (top first) and plan the rest under them.  (Waiting for a lock to become free and
        trying again would convoy: a released trio lock passes straight to the next waiter,
        so it may never be seen free.)"""
        segs: list[Segment] = []
        if self.plan(start, end, segs, st) is None:
            return segs
        pos = st.resume
        del segs[st.resume_len:]
        self.lock_waits += 1
        async with self.exclusive(will_await=True):
            st.owned = True
            try:
                self.plan(pos, end, segs, st)
            finally:
                st.owned = False
        return segs

    # ---- planning a write ----------------------------------------------------------------

    def plan_write(self, guest_offset: int, guest_end: int, *, count: bool) -> WritePlan:
        """Split the write of [guest_offset, guest_end) into :class:`InPlace` runs — the top
        layer's writable DATA, merged where contiguous — and :class:`Allocating` pieces:
        everything else, including granules the cache does not hold (the codec's ``write``
        resolves those).  Looks only at the top layer's cache entries; ``count``: as lookups
        of this disk (the second look of a write under its range lock is not counted)."""
        top = self.top
        g = top.granule
        lid = top.layer_id
        lookup = self.cache.lookup
        peek = self.cache.peek
        local = self.counters
        inplace: list[InPlace] = []
        allocating: list[Allocating] = []
        idx = guest_offset // g
        pos = guest_offset
        while pos < guest_end:
            gend = min(guest_end, (idx + 1) * g)
            exts = lookup((lid, idx), local) if count else peek((lid, idx))
            ok = exts is not None
            if exts is not None:
                for ext in exts:
                    if ext.guest_offset + ext.length <= pos or ext.guest_offset >= gend:
                        continue
                    if ext.kind is not Kind.DATA or not ext.writable:
                        ok = False
                        break
            if ok and exts is not None:
                for ext in exts:
                    e_end = min(ext.guest_offset + ext.length, gend)
                    if e_end <= pos or ext.guest_offset >= gend:
                        continue
                    f = ext.file
                    assert f is not None
                    fo = ext.file_offset + (pos - ext.guest_offset)
                    n = e_end - pos
                    if inplace:
                        last = inplace[-1]
                        if last.fd == f.fd and last.file_offset + last.length == fo and \
                                last.guest_offset + last.length == pos:
                            inplace[-1] = _in_place((last.fd, last.file_offset,
                                                     last.guest_offset, last.length + n))
                            pos = e_end
                            continue
                    inplace.append(_in_place((f.fd, fo, pos, n)))
                    pos = e_end
            else:
                if allocating and allocating[-1].guest_end == pos:
                    allocating[-1] = _allocating((allocating[-1].guest_offset, gend))
                else:
                    allocating.append(_allocating((pos, gend)))
                pos = gend
            idx += 1
        return _write_plan((inplace, allocating))

    # ---- reading a plan ------------------------------------------------------------------

    def read_segments(self, offset: int, dest: memoryview, segs: list[Segment],
                      zeroed: bool, owned: bool, nowait: bool = False) -> Layer | None:
        """Do the planned reads (DATA first, in merged runs, then compressed clusters) into
        ``dest`` (guest offset ``offset``).  Returns a layer whose lock blocks a compressed
        decode (the caller waits and reads again) or None when done."""
        run_fd = -1
        run_fo = run_g = run_n = run_depth = 0
        compressed: list[Segment] = []
        for seg in segs:
            g, n, depth, ext = seg
            kind = ext.kind
            if kind is Kind.DATA:
                f = ext.file
                assert f is not None
                fd = f.fd
                fo = ext.file_offset + (g - ext.guest_offset)
                if fd == run_fd and fo == run_fo + run_n and g == run_g + run_n:
                    run_n += n
                    continue
                if run_n:
                    self._data_run(run_depth, run_fd,
                                   dest[run_g - offset:run_g - offset + run_n],
                                   run_fo, zeroed, nowait)
                run_fd, run_fo, run_g, run_n, run_depth = fd, fo, g, n, depth
            elif kind is Kind.COMPRESSED:
                compressed.append(seg)
            elif not zeroed:
                zero_fill(dest[g - offset:g - offset + n])
        if run_n:
            self._data_run(run_depth, run_fd, dest[run_g - offset:run_g - offset + run_n],
                           run_fo, zeroed, nowait)
        for seg in compressed:
            layer = self.layers[seg.depth]
            if not owned and layer.lock.locked():
                return layer
            g, n = seg.guest_offset, seg.length
            data = layer.image.read_compressed(clip(seg.extent, g, n))
            if len(data) != n:
                raise CorruptImage(layer.image.path, "compressed cluster decodes to the wrong "
                                   "length", "length", len(data))
            dest[g - offset:g - offset + n] = data
        return None

    def _data_run(self, depth: int, fd: int, view: memoryview, file_offset: int,
                  zeroed: bool, nowait: bool) -> None:
        """One merged DATA read from layer ``depth``.  A cluster the metadata places wholly
        past the end of the file means the file was truncated (or replaced) under us: EIO,
        and the disk — and a top image's own header, where the format has a corrupt flag —
        is marked corrupt, never silent zeroes."""
        layer = self.layers[depth]
        image = layer.image
        remote = layer.remote
        if remote is not None and not remote.ready(file_offset, len(view)):
            # A full cache kept some of these blocks in memory only (raises NotCached where
            # the blocks must be fetched first: cowd/disk/remote.py).
            got = remote.read_into(fd, file_offset, view)
            if got < len(view) and not zeroed:
                zero_fill(view[got:])
            return
        past = read_run(fd, view, file_offset, zeroed, nowait,
                        cluster_bytes=max(image.cluster_size, 1))
        if past < 0:
            return
        what = "data cluster past the end of the file (truncated while in use?)"
        if depth == 0 and not self.readonly:
            raise image.mark_corrupt(what, "offset", past)
        raise CorruptImage(image.path, what, "offset", past)

    # ---- priming -------------------------------------------------------------------------

    def prime_chunk(self, layer: Layer, start: int, end: int, want_allocated: bool) -> None:
        """Cache the granules of [start, end) of ``layer`` that hold something (or, with
        ``want_allocated`` false, the empty ones), never evicting."""
        cache = self.cache
        lid = layer.layer_id
        st = PlanState()
        for gi, exts in self.split(layer, start, end, st):
            allocated = any(e.kind is not Kind.UNALLOCATED for e in exts)
            if allocated != want_allocated or (lid, gi) in cache:
                continue
            if len(cache) >= cache.max_entries:
                return
            cache.insert((lid, gi), exts, Origin.PRIME, self.counters)

    def in_trio_thread(self) -> bool:
        return threading.get_ident() == self._trio_thread


class PlannedBelow:
    """The top image's ``below`` (formats/base.py's ``Below``): the layers from ``depth``
    down, read through the chain's planner and the shared cache.  The codec calls it in the
    middle of a write, which the disk runs with every layer's lock held or none held and no
    await, so the plan is ``owned``."""

    def __init__(self, chain: Chain, depth: int):
        self.chain = chain
        self.depth = depth

    @property
    def size(self) -> int:
        return self.chain.layers[self.depth].size

    def _plan(self, guest_offset: int, length: int) -> list[Segment]:
        segs: list[Segment] = []
        st = PlanState(owned=True, cache_writes=self.chain.in_trio_thread())
        self.chain.plan_below(self.depth - 1, guest_offset, guest_offset + length, segs, st)
        return segs

    def read_into(self, guest_offset: int, dest: memoryview) -> None:
        self.chain.read_segments(guest_offset, dest, self._plan(guest_offset, len(dest)),
                                 zeroed=False, owned=True)

    def zero_prefix(self, guest_offset: int, length: int) -> int:
        n = 0
        for seg in self._plan(guest_offset, length):
            if seg.kind is not Kind.ZERO:
                break
            n += seg.length
        return n


__all__ = ["BELOW_CHAIN", "Allocating", "Chain", "ChainFile", "InPlace", "PlanState",
           "PlannedBelow", "Segment", "WritePlan", "clip"]
