"""Layer: cowd disk (below the frontends, above ``formats``).  The remap cache.

Pure bookkeeping: no I/O, no trio, no clock of its own (the clock is injected).  It remembers,
per *layer* of an image chain, where each guest granule's bytes live, as the layer's own
resolver said: a tuple of :class:`formats.Extent` clipped to the granule, in guest order,
covering it without gaps (up to the layer's virtual size).  An extent's kind says what to do:

- ``DATA`` with ``writable=True``: the bytes are in this (top, writable) layer's file and may
  be overwritten in place with pwrite;
- ``DATA`` with ``writable=False``: read them from the file; a write must go to the library;
- ``ZERO``: reads as zeroes in this layer;
- ``UNALLOCATED``: fall through to the next layer of the chain;
- ``COMPRESSED``: decode with the layer's ``read_compressed``.

Theory of operation
-------------------
Keys are ``(layer_id, granule_index)`` with ``granule_index = guest_offset // granule``.  The
granule is chosen per layer by its owner (the daemon uses the layer's own cluster size, so a
qcow2 top of 64 KiB clusters has 64 KiB granules).  One entry may hold several extents: a VHD
block has a sector bitmap inside it and a qcow2 cluster may have subclusters.  Because an
entry records only its own layer's answer, an overlay's entry for a thin cluster just says
"UNALLOCATED" and the reader then looks up the *base layer's* key — so many overlays on one
base share the base's entries (the base layer has one ``layer_id`` however many disks use it).

Entries leave the cache in four ways, each counted: an age limit (``max_age_s`` since the
entry was inserted, checked lazily on lookup and by :meth:`RemapCache.expire`), LRU eviction
when ``max_entries`` is reached, explicit invalidation (a write, write-zeroes or discard
changed the layer's metadata), and dropping a whole layer when its image is closed.  Entries
inserted by read-ahead are flagged until their first hit, so that read-ahead that was never
used can be counted when it leaves.

Contract (who may touch it)
---------------------------
The cache is owned by the trio thread of the daemon: only code running in that thread calls
its methods, never a worker thread.  Every method is synchronous and short, so no ``await``
can happen while the cache is being mutated; callers must compute an entry (call the layer's
resolver) and insert it in the same synchronous step, with no ``await`` in between, and only
while no other party may be changing that layer's metadata (the disk's per-image lock).  An
extents tuple returned by :meth:`RemapCache.lookup` is immutable and remains a true statement
about the layer until the layer's metadata next changes; a caller that awaits after a lookup
must look up again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from formats.base import Extent

# Default bound on entries.  An entry costs about 450 bytes of Python objects (measured with
# tracemalloc: key tuple, entry, extents tuple with one Extent, the OrderedDict's share), so
# 2^16 entries are ~30 MiB and map 4 GiB of 64 KiB clusters; 2^20 would be ~450 MiB.
DEFAULT_MAX_ENTRIES = 1 << 16

# Default age limit.  Invalidation is exact (this daemon is the only writer of every image it
# serves), so age only retires cold entries; ten minutes keeps a primed cache useful for a
# booting VM while letting memory go back to the LRU for long-idle disks.
DEFAULT_MAX_AGE_S: float | None = 600.0

# An entry holding more extents than this is not cached (the caller uses the answer once and
# asks again next time).  A VHD block whose sector bitmap alternates every sector would need
# 4096 extents for one 2 MiB granule; caching it would cost megabytes for no benefit.
MAX_EXTENTS_PER_ENTRY = 256

LayerId = int
Key = tuple[LayerId, int]  # (layer id, granule index)
Extents = tuple[Extent, ...]

# Entry flags.
_READAHEAD_UNUSED = 1  # inserted by read-ahead and not hit yet
_PRIMED = 2  # inserted by priming


class Origin:
    """Why an entry is being inserted (selects the counter that moves)."""

    MISS = 0  # a request needed it
    READAHEAD = 1  # sequential-miss read-ahead
    PRIME = 2  # priming at attach time
    PREFETCH = 3  # an explicit prefetch (NBD CACHE) or a block-status walk
    REFILL = 4  # replaced right after the disk changed the layer's metadata


@dataclass
class RemapCounters:
    """What happened to lookups and entries.  One set per cache and, optionally, one per disk
    (lookups made on a disk's behalf also move that disk's set; entry-level events such as
    evictions and expiries move only the cache's set, since entries are shared)."""

    hits: int = 0
    misses: int = 0
    expiries: int = 0  # entries dropped because of age
    evictions: int = 0  # entries dropped by LRU under pressure
    invalidations: int = 0  # entries dropped because the layer changed (or was closed)
    inserted: int = 0  # every insertion, whatever the origin
    primed: int = 0  # insertions by priming
    readahead_inserted: int = 0
    readahead_used: int = 0  # read-ahead entries hit at least once
    readahead_unused: int = 0  # read-ahead entries that left the cache without a hit
    uncacheable: int = 0  # answers too fragmented to cache (MAX_EXTENTS_PER_ENTRY)
    requests: int = 0  # requests that went through the cache (see note_request)
    metadata_lookups: int = 0  # resolver calls made for those requests
    max_metadata_lookups: int = 0  # most resolver calls made by one request

    def as_dict(self) -> dict[str, int | float]:
        d: dict[str, int | float] = dict(asdict(self))
        looked = self.hits + self.misses
        d["hit_rate"] = round(self.hits / looked, 6) if looked else 0.0
        d["metadata_lookups_per_request"] = (
            round(self.metadata_lookups / self.requests, 6) if self.requests else 0.0
        )
        return d

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


class _Entry:
    __slots__ = ("born", "extents", "flags")

    def __init__(self, extents: Extents, born: float, flags: int):
        self.extents = extents
        self.born = born
        self.flags = flags


class RemapCache:
    """Bounded, expiring, LRU map of ``(layer_id, granule_index)`` to extents."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_s: float | None = DEFAULT_MAX_AGE_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_entries < 1:
            raise ValueError(
                f"remap cache: max_entries must be at least 1 (max_entries={max_entries})")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"remap cache: max_age_s must be positive (max_age_s={max_age_s})")
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        # Least recently used first.  A hit moves the entry to the end.
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.counters = RemapCounters()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Presence only: no counters, no LRU touch, no expiry check."""
        return key in self._entries

    # ---- lookups ---------------------------------------------------------------------------

    def lookup(self, key: Key, local: RemapCounters | None = None) -> Extents | None:
        """The extents of ``key``, or None on a miss.  A hit makes the entry most recent."""
        entry = self._entries.get(key)
        c = self.counters
        if (entry is not None and self.max_age_s is not None
                and self._clock() - entry.born > self.max_age_s):
            self._drop(key, entry)
            c.expiries += 1
            entry = None
        if entry is None:
            c.misses += 1
            if local is not None:
                local.misses += 1
            return None
        self._entries.move_to_end(key)
        c.hits += 1
        if local is not None:
            local.hits += 1
        if entry.flags & _READAHEAD_UNUSED:
            entry.flags &= ~_READAHEAD_UNUSED
            c.readahead_used += 1
            if local is not None:
                local.readahead_used += 1
        return entry.extents

    def peek(self, key: Key) -> Extents | None:
        """The extents of ``key`` if present and not expired; no counters, no LRU touch."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.max_age_s is not None and self._clock() - entry.born > self.max_age_s:
            return None
        return entry.extents

    # ---- insertion -------------------------------------------------------------------------

    def insert(self, key: Key, extents: Extents, origin: int = Origin.MISS,
               local: RemapCounters | None = None) -> bool:
        """Insert or replace ``key``; evicts the least recently used entry when full.

        Returns False (and caches nothing) for an answer with more than
        MAX_EXTENTS_PER_ENTRY extents.
        """
        c = self.counters
        if len(extents) > MAX_EXTENTS_PER_ENTRY:
            c.uncacheable += 1
            if local is not None:
                local.uncacheable += 1
            self.invalidate(key)
            return False
        flags = 0
        if origin == Origin.READAHEAD:
            flags = _READAHEAD_UNUSED
            c.readahead_inserted += 1
            if local is not None:
                local.readahead_inserted += 1
        elif origin == Origin.PRIME:
            flags = _PRIMED
            c.primed += 1
            if local is not None:
                local.primed += 1
        old = self._entries.pop(key, None)
        if old is not None:
            if old.flags & _READAHEAD_UNUSED:
                c.readahead_unused += 1
        else:
            while len(self._entries) >= self.max_entries:
                _, e = self._entries.popitem(last=False)
                c.evictions += 1
                if e.flags & _READAHEAD_UNUSED:
                    c.readahead_unused += 1
        born = self._clock() if self.max_age_s is not None else 0.0
        self._entries[key] = _Entry(extents, born, flags)
        c.inserted += 1
        if local is not None:
            local.inserted += 1
        return True

    # ---- removal ---------------------------------------------------------------------------

    def invalidate(self, key: Key) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._count_gone(entry)
        self.counters.invalidations += 1
        return True

    def invalidate_range(self, layer_id: LayerId, first_index: int, end_index: int) -> int:
        """Drop the layer's entries with ``first_index <= granule_index < end_index``."""
        if end_index <= first_index:
            return 0
        if end_index - first_index <= len(self._entries):
            n = 0
            for i in range(first_index, end_index):
                if self.invalidate((layer_id, i)):
                    n += 1
            return n
        doomed = [k for k in self._entries
                  if k[0] == layer_id and first_index <= k[1] < end_index]
        for k in doomed:
            self.invalidate(k)
        return len(doomed)

    def drop_layer(self, layer_id: LayerId) -> int:
        """Forget every entry of a layer (its image is being closed)."""
        doomed = [k for k in self._entries if k[0] == layer_id]
        for k in doomed:
            self.invalidate(k)
        return len(doomed)

    def expire(self) -> int:
        """Drop every entry older than ``max_age_s`` (a periodic sweep; lookups also expire)."""
        if self.max_age_s is None:
            return 0
        limit = self._clock() - self.max_age_s
        doomed = [(k, e) for k, e in self._entries.items() if e.born < limit]
        for k, e in doomed:
            self._drop(k, e)
        self.counters.expiries += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        for k in list(self._entries):
            self.invalidate(k)

    def _drop(self, key: Key, entry: _Entry) -> None:
        del self._entries[key]
        self._count_gone(entry)

    def _count_gone(self, entry: _Entry) -> None:
        if entry.flags & _READAHEAD_UNUSED:
            self.counters.readahead_unused += 1

    # ---- per-request accounting --------------------------------------------------------------

    def note_request(self, metadata_lookups: int, local: RemapCounters | None = None) -> None:
        """Record one request and how many resolver calls it needed (in the shared counters
        and in ``local``).  Once per request: written out for the two, no loop."""
        c = self.counters
        c.requests += 1
        if metadata_lookups:
            c.metadata_lookups += metadata_lookups
            if metadata_lookups > c.max_metadata_lookups:
                c.max_metadata_lookups = metadata_lookups
        if local is None:
            return
        local.requests += 1
        if metadata_lookups:
            local.metadata_lookups += metadata_lookups
            if metadata_lookups > local.max_metadata_lookups:
                local.max_metadata_lookups = metadata_lookups

    def stats(self) -> dict[str, int | float | None]:
        d: dict[str, int | float | None] = dict(self.counters.as_dict())
        d["entries"] = len(self._entries)
        d["max_entries"] = self.max_entries
        d["max_age_s"] = self.max_age_s
        return d


__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_ENTRIES",
    "MAX_EXTENTS_PER_ENTRY",
    "Extents",
    "Key",
    "LayerId",
    "Origin",
    "RemapCache",
    "RemapCounters",
]
