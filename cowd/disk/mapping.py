"""Layer: cowd disk, beside :mod:`cowd.disk.disk`.  Questions about a disk's mapping that
move no guest bytes: :class:`DiskMap`, which a :class:`~cowd.disk.disk.Disk` makes (as
``disk.mapping``) and asks for its ``segments``, ``block_status``, ``prefetch`` and ``prime``.

- ``segments`` (the kernel shim's and the workers' question) plans the range and returns the
  runs as remaps may name them (``mappable``: over a remote base, a block the local cache
  does not hold is left unmapped, so its reads come to the disk as misses).
- ``block_status`` (NBD base:allocation, FUSE's SEEK_DATA/SEEK_HOLE) plans the range through
  the chain, as a read does, and folds the plan into data and hole runs; it answers a prefix
  of at most MAX_STATUS_BYTES in at most MAX_STATUS_EXTENTS runs.
- ``prefetch`` (NBD CACHE) plans the range in request-sized pieces, so the remap cache holds
  it, and has the kernel read its data ahead; no more than half of what the cache can map.
- ``prime`` walks every layer's metadata into the cache at attach time, granules that hold
  something first, then the empty ones an overlay read falls through, PRIME_CHUNK_GRANULES
  at a time with a checkpoint in between; it never evicts (it stops when the cache is full),
  and a shared parent, which never changes, is primed once.

Trio-thread only.  Planning goes through the disk's ``plan_fetching`` (the chain's planner,
waiting for busy layers and fetching a remote layer's missing metadata); a remote layer's
missing block met while priming is fetched and the chunk primed again.
"""

from __future__ import annotations

import time

import trio

from formats.base import Extent, Kind
from formats.errors import FormatError
from formats.remote import NotCached

from ..remap import Origin
from .api import MAX_REQUEST_BYTES
from .chain import PlanState, Segment, clip
from .hooks import DiskHooks
from .remote import Deadline
from .streams import advise_segments

# block_status answers at most this much of the asked range (NBD lets the server answer a
# prefix) and at most this many extents, so a status walk of a huge sparse disk is bounded.
MAX_STATUS_BYTES = 256 << 20
MAX_STATUS_EXTENTS = 4096

# Priming works through a layer in pieces of this many granules, yielding to other tasks in
# between, so a big image does not stall the daemon.
PRIME_CHUNK_GRANULES = 4096


class DiskMap:
    """A disk's mapping as segments, block status, prefetch and priming see it; see the
    module docstring.  Made by the disk, with its :class:`~cowd.disk.hooks.DiskHooks`."""

    def __init__(self, hooks: DiskHooks):
        self._hooks = hooks
        self.chain = hooks.chain

    async def segments(self, offset: int, length: int, ahead: int = 0,
                       deadline: Deadline | None = None, *,
                       direct: bool = False) -> list[Segment]:
        """Where [offset, offset + length) lives: its :class:`Segment` runs in guest order
        (``depth`` is the layer's index in the chain, BELOW_CHAIN: zeroes), :meth:`mappable`.
        A miss also resolves ``ahead`` more granules into the cache.  The kernel frontend
        and the workers turn these into remaps.  ``deadline``: the request's, for a remote
        layer's fetches (a worker's miss plans, then may read).  ``direct`` (priming a long
        range): from the layers' resolvers, an extent at a time, where the chain allows it
        (``Chain.plan_direct``), else as without; the cache is neither asked nor filled (the
        request and its resolver calls are counted, as ``requests`` and
        ``metadata_lookups``)."""
        self._hooks.check_read(offset, length, None)
        if direct:
            # The checkpoint before the plan, never between it and the caller (which queues
            # what it makes of the plan in the same synchronous step).
            await trio.lowlevel.checkpoint()
            st = PlanState()
            try:
                segs = self.chain.plan_direct(offset, offset + length, st)
            except (FormatError, OSError, ValueError) as e:
                raise self._hooks.translate(e) from e
            if segs is not None:
                self.chain.cache.note_request(st.lookups, self.chain.counters)
                return self.mappable(segs)
        req = PlanState(ahead=ahead)
        req.deadline = deadline
        try:
            segs = await self._hooks.plan_fetching(offset, offset + length, req)
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        self.chain.cache.note_request(req.lookups, self.chain.counters)
        return self.mappable(segs)

    def mappable(self, segs: list[Segment]) -> list[Segment]:
        """A plan as a worker or the kernel may map it: over a remote base, the DATA of
        remote layers whose blocks the cache does not hold is left out (as unmappable runs),
        because those must not be read from the cache file: they come to the disk as misses
        and are answered with the data (cowd/disk/disk.py's docstring)."""
        if not self.chain.remote:
            return segs
        out: list[Segment] = []
        for seg in segs:
            remote = self.chain.layers[seg.depth].remote if seg.depth >= 0 else None
            if remote is None or seg.kind is not Kind.DATA:
                out.append(seg)
                continue
            for fo, n, held in remote.held_runs(seg.file_offset, seg.length):
                g = seg.guest_offset + (fo - seg.file_offset)
                ext = clip(seg.extent, g, n) if held else Extent(g, n, Kind.UNALLOCATED)
                out.append(Segment(g, n, seg.depth, ext))
        return out

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]:
        """NBD base:allocation for a prefix of [offset, offset + length): a list of
        ``(length, is_hole, is_zero)``.  DATA and compressed clusters anywhere in the chain
        are data; ZERO clusters and ranges no layer has are holes that read as zeroes."""
        self._hooks.check_read(offset, length, None)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return []
        end = offset + min(length, MAX_STATUS_BYTES)
        req = PlanState(ahead_origin=Origin.PREFETCH, end=end, to_end=True)
        try:
            segs = await self._hooks.plan_fetching(offset, end, req)
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        out: list[tuple[int, bool, bool]] = []
        for seg in segs:
            n = seg.length
            hole = seg.kind is Kind.ZERO
            if out and out[-1][1] == hole:
                out[-1] = (out[-1][0] + n, hole, hole)
            elif len(out) >= MAX_STATUS_EXTENTS:
                break
            else:
                out.append((n, hole, hole))
        self.chain.cache.note_request(req.lookups, self.chain.counters)
        self._hooks.ops["block_status"] += 1
        return out

    async def prefetch(self, offset: int, length: int) -> None:
        """NBD CACHE: fill the remap cache for the range (and ask the kernel to read the data
        ahead).  Work is bounded by the cache: a range longer than half of what the cache
        can map is prefetched only up to that point."""
        self._hooks.check_read(offset, length, None)
        cache = self.chain.cache
        g = self.chain.top.granule
        reach = max(g, cache.max_entries // 2 * g)
        end = offset + min(length, reach)
        pos = offset
        try:
            while pos < end:
                n = min(end - pos, MAX_REQUEST_BYTES)
                req = PlanState(ahead_origin=Origin.PREFETCH, end=pos + n, to_end=True)
                segs = await self._hooks.plan_fetching(pos, pos + n, req)
                advise_segments(segs)  # (starts fetching a remote layer's missing blocks)
                cache.note_request(req.lookups, self.chain.counters)
                pos += n
                await trio.lowlevel.checkpoint()
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        if length == 0:
            await trio.lowlevel.checkpoint()
        self._hooks.ops["prefetches"] += 1

    async def prime(self) -> float:
        """Walk every layer's metadata and cache every granule that holds anything, then
        (room permitting) the empty ones an overlay read falls through; returns the seconds
        it took.  Never evicts: it stops when the cache is full."""
        self._hooks.check_open()
        t0 = time.perf_counter()
        cache = self.chain.cache
        layers = self.chain.layers
        complete = True
        try:
            for want_allocated in (True, False):
                for depth, layer in enumerate(layers):
                    if depth > 0 and layer.primed:
                        continue
                    g = layer.granule
                    pos = 0
                    while pos < layer.size:
                        if len(cache) >= cache.max_entries:
                            complete = False
                            break
                        chunk_end = min(layer.size, pos + PRIME_CHUNK_GRANULES * g)
                        try:
                            if layer.lock.locked():
                                async with layer.lock:
                                    self.chain.prime_chunk(layer, pos, chunk_end,
                                                           want_allocated)
                            else:
                                self.chain.prime_chunk(layer, pos, chunk_end, want_allocated)
                        except NotCached as miss:
                            await self._hooks.fetch(miss)  # a remote layer's metadata: again
                            continue
                        pos = chunk_end
                        await trio.lowlevel.checkpoint()
        except (FormatError, OSError, ValueError) as e:
            raise self._hooks.translate(e) from e
        if complete:
            for layer in layers[1:]:
                layer.primed = True
        return time.perf_counter() - t0


__all__ = ["MAX_STATUS_BYTES", "MAX_STATUS_EXTENTS", "PRIME_CHUNK_GRANULES", "DiskMap"]
