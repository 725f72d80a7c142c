"""Layer: formats.qcow2, above layout.py.  The L2 table cache: :class:`L2Cache`, held by
the image (``Qcow2Image.l2_cache``).

Theory of operation
-------------------
L2 tables are read on demand and kept in a bounded LRU (L2_CACHE_BYTES, at least
L2_CACHE_MIN_TABLES tables), keyed by their file offset.  The cache is write-back: a write
changes entries in the cached table and marks it dirty; the table reaches the file when the
image flushes or when it is evicted.  The active L1 table is not here: the image keeps it
whole in memory (reader.py).

Invariants (rule 3 of the crash-safety rules in formats/qcow2/__init__.py):

- A table that no on-disk L1 entry reaches yet (a new one, or a copy of a snapshot's) is
  *unpublished*: it may be written at any time, since nothing on disk leads to it.
- Before a published table is written, everything its entries may point at must be durable:
  eviction calls the image's ``before_writeback`` (its ``_sync_data``) first; a flush writes
  the unpublished tables, syncs, then writes the rest (:meth:`write_unpublished`,
  :meth:`write_dirty`).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable

from ..base import HostFile
from .header import check_table
from .layout import L2_CACHE_BYTES, L2_CACHE_MIN_TABLES, words, words_bytes


class L2Table:
    """One cached L2 table; ``entries`` holds native 64-bit words (2 per entry with extended
    L2).  ``dirty`` means the cache is newer than the file."""

    __slots__ = ("dirty", "entries", "offset")

    def __init__(self, offset: int, entries: array[int], dirty: bool = False):
        self.offset = offset
        self.entries = entries
        self.dirty = dirty


class L2Cache:
    """The cached L2 tables of one image, least recently used first."""

    def __init__(self, path: str, file: HostFile, cluster_bits: int, *,
                 before_writeback: Callable[[], None]):
        self.path = path
        self.file = file
        self.cluster_bits = cluster_bits
        self.tables: OrderedDict[int, L2Table] = OrderedDict()  # by file offset
        self.max_tables = max(L2_CACHE_MIN_TABLES, L2_CACHE_BYTES // (1 << cluster_bits))
        self.unpublished: set[int] = set()  # offsets of tables no on-disk L1 entry reaches
        self._before_writeback = before_writeback

    def __contains__(self, file_offset: int) -> bool:
        return file_offset in self.tables

    def get(self, file_offset: int, l1_index: int, l1_entry: int) -> L2Table:
        """The table at ``file_offset``, which active L1 entry ``l1_index`` (``l1_entry``)
        names: from the cache, or read and checked."""
        tbl = self.tables.get(file_offset)
        if tbl is not None:
            self.tables.move_to_end(file_offset)
            return tbl
        cs = 1 << self.cluster_bits
        check_table(self.path, cs, file_offset, cs, self.file.size(), "L2 table",
                    f"l1[{l1_index}]", l1_entry)
        tbl = L2Table(file_offset, words(self.file.pread_exact(file_offset, cs, "L2 table")))
        self.insert(tbl)
        return tbl

    def insert(self, tbl: L2Table) -> None:
        """Cache ``tbl`` as the most recently used; evict (writing back) past the bound."""
        self.tables[tbl.offset] = tbl
        self.tables.move_to_end(tbl.offset)
        while len(self.tables) > self.max_tables:
            _, old = self.tables.popitem(last=False)
            if old.dirty:
                self._writeback(old)

    def insert_unpublished(self, tbl: L2Table) -> None:
        """Cache a table that this layer has just placed and no on-disk L1 entry reaches."""
        self.unpublished.add(tbl.offset)
        self.insert(tbl)

    def mark_dirty(self, tbl: L2Table) -> None:
        tbl.dirty = True
        if self.tables.get(tbl.offset) is not tbl:
            self.insert(tbl)

    def drop(self, file_offset: int) -> None:
        """Forget a table (not this layer's to cache, or rewritten on disk behind the cache)."""
        self.tables.pop(file_offset, None)

    def _writeback(self, tbl: L2Table) -> None:
        # Rule 3: a table an on-disk L1 entry reaches may only point at durable data.
        if tbl.offset not in self.unpublished:
            self._before_writeback()
        self.file.pwrite(tbl.offset, words_bytes(tbl.entries))
        tbl.dirty = False

    # ---- flush (rule 3: unpublished tables, sync, the others, L1, sync) -----------------

    def write_unpublished(self) -> None:
        """Write the dirty tables nothing on disk reaches yet (the flush's first step)."""
        for tbl in list(self.tables.values()):
            if tbl.dirty and tbl.offset in self.unpublished:
                self.file.pwrite(tbl.offset, words_bytes(tbl.entries))
                tbl.dirty = False

    def write_dirty(self) -> bool:
        """Write every dirty table (after the sync that made what they reach durable);
        returns whether any was written."""
        wrote = False
        for tbl in list(self.tables.values()):
            if tbl.dirty:
                self.file.pwrite(tbl.offset, words_bytes(tbl.entries))
                tbl.dirty = False
                wrote = True
        return wrote

    def all_published(self) -> None:
        """The L1 entries that reach every table are durable now."""
        self.unpublished.clear()
