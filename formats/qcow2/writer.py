"""Layer: formats.qcow2, above reader.py.  :class:`Qcow2Writer`: writing a qcow2 image —
write, write_zeroes, discard, allocate, and the copy-up they share.

Theory of operation (writes)
----------------------------
Writes allocate on first touch: the unwritten head and tail of the cluster (or, with extended
L2, of the touched subclusters) are copied up from what the chain shows there now
(``Image.read``: backing image, zeroes, a compressed cluster or a snapshot-shared cluster).
Shared clusters and shared L2 tables (no COPIED bit) are copied before they are modified and
the old host cluster loses one reference.  write_zeroes sets the zero flag (v3) or the zero
bits (extended L2) and frees the host cluster; v2 images have no zero flag, so whole clusters
are unallocated when no backing image shows through there, and zeroes are written otherwise.

A request is cut at L2 table boundaries (``_for_each_table``).  For each table, what each
cluster needs is recorded in a :class:`TableChange` — the data to write (copy-up included),
the L2 entry that reaches it, the host range the old entry held — which applies it in the
order the crash-safety rules (formats/qcow2/__init__.py) ask.

Invariants:

- Writing needs the backing chain open (``formats.open_image``): copy-up reads through it,
  and a write without it is refused rather than hide the parent's bytes behind zeroes.
- The first modification clears the auto-clear bits this code does not keep (rule 6).
- Data reaches the file before any L2 entry that points at it (rule 3): entries change only
  in the cached table, which is written by flush or eviction after a sync.
- A reference this layer drops is freed only after the next flush (rule 4).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable

from ..base import NOTHING_BELOW, HostFile, Kind
from ..errors import CorruptImage, ImageReadOnly
from .l2cache import L2Table
from .layout import (
    AUTOCLEAR_KEPT,
    HEADER_AUTOCLEAR_FEATURES_AT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    WRITE_GATHER_BYTES,
    ZERO_CHUNK_BYTES,
    HostRange,
    allocated,
    compressed_range,
    div_round_up,
    new_host_range,
    subclusters,
)
from .reader import Qcow2Reader

# A write that covers at least this many whole clusters holding nothing yet takes the bulk
# path (_write_fresh): one allocation and one pwrite per adjacent run, from the caller's
# buffer.  Below it the per-cluster path is as fast.
FRESH_RUN_MIN_CLUSTERS = 2

# ---- plans -------------------------------------------------------------------------------


class TableChange:
    """What one request changes in one L2 table, recorded cluster by cluster and applied by
    :meth:`commit` in rule 3's order: the data first (gathered in memory, WRITE_GATHER_BYTES
    at a time, copy-up included), then the L2 entries in the cached table (which marks it
    dirty: it reaches the file at flush or eviction, after a sync), then the host ranges no
    longer referenced are queued to be freed after the next flush (rule 4).

    The records are plain tuples, private to this class and named by the methods that make
    them: the write path makes one or more per cluster, and a named tuple takes five times as
    long to make (per-cluster named-tuple plans made write_zeroes 28% slower)."""

    __slots__ = ("_entries", "_frees", "_gathered", "_writes", "img", "tbl")

    def __init__(self, img: Qcow2Writer, tbl: L2Table):
        self.img = img
        self.tbl = tbl
        self._writes: list[tuple[int, bytes | bytearray | memoryview]] = []  # (file_offset, data)
        self._gathered = 0
        self._entries: list[tuple[int, int, int]] = []  # (l2_index, entry, bitmap)
        self._frees: list[HostRange] = []  # what replaced entries held

    def write(self, file_offset: int, data: bytes | bytearray | memoryview) -> None:
        """Bytes for the data host (the image, or its external data file)."""
        if self._writes:
            poff, pdata = self._writes[-1]
            if poff + len(pdata) == file_offset and not isinstance(pdata, memoryview):
                if isinstance(pdata, bytes):
                    pdata = bytearray(pdata)
                    self._writes[-1] = (poff, pdata)
                pdata += data
                self._gathered += len(data)
                if self._gathered >= WRITE_GATHER_BYTES:
                    self._issue()
                return
        self._writes.append((file_offset, data))
        self._gathered += len(data)
        if self._gathered >= WRITE_GATHER_BYTES:
            self._issue()

    def set_entry(self, l2_index: int, entry: int, bitmap: int = 0,
                  drops: HostRange | None = None) -> None:
        """A new value for entry ``l2_index`` (and its subcluster bitmap, extended L2);
        ``drops``: the host range the old value held, which this layer no longer references
        (None: it held nothing, or it still holds it)."""
        self._entries.append((l2_index, entry, bitmap))
        if drops is not None:
            self._frees.append(drops)

    def _issue(self) -> None:
        if not self._writes:
            return
        file = self.img._data_host()
        for off, data in self._writes:
            file.pwrite(off, data)
            self.img._data_dirty = True
        self._writes = []
        self._gathered = 0

    def commit(self) -> None:
        self._issue()
        set_entry = self.img._set_entry
        for idx, e, bm in self._entries:
            set_entry(self.tbl, idx, e, bm)
        if self._entries:
            self.img.l2_cache.mark_dirty(self.tbl)
        self.img._pending_free.extend(self._frees)


# ---- the writer --------------------------------------------------------------------------


class Qcow2Writer(Qcow2Reader):
    """A qcow2 image that can be written (image.py adds flush, close and check)."""

    def __init__(self, path: str, file: HostFile, writable: bool):
        super().__init__(path, file, writable)
        self._modified = False  # written since open (rule 6 is done)
        self._l1_dirty: set[int] = set()  # active L1 entries newer than the file (rule 3)
        self._pending_free: list[HostRange] = []  # references dropped; freed at flush (rule 4)

    def _begin_modify(self) -> None:
        self.require_writable()
        if self._modified:
            return
        if self.backing_name and self.below is NOTHING_BELOW:
            # Copy-up would read zeroes where the backing image has data.
            raise ImageReadOnly(self.path, "writing needs the backing chain open (use "
                                "open_image)", "backing_file", self.backing_name)
        # Rule 6.
        if self.version >= 3 and self.autoclear_features & ~AUTOCLEAR_KEPT:
            had_bitmaps = bool(self.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)
            self.autoclear_features &= AUTOCLEAR_KEPT
            self.file.pwrite(HEADER_AUTOCLEAR_FEATURES_AT,
                             struct.pack(">Q", self.autoclear_features))
            self.file.sync()
            if had_bitmaps:
                # The bitmaps are now inconsistent and every reader ignores them (qemu says
                # so and drops them): give their clusters back rather than leak them.
                found = self._bitmap_regions(self.file.size())
                if not found.problems:
                    self._pending_free.extend(HostRange(r.file_offset, r.length)
                                              for r in found.regions)
        self._modified = True

    # ---- L2 tables and entries -----------------------------------------------------------

    def _l2_for_write(self, l1_index: int) -> L2Table:
        """The L2 table for ``l1_index``, allocated or copied so that this layer owns it."""
        l1e = self.l1[l1_index]
        off = l1e & L1E_OFFSET_MASK
        if off and l1e & QCOW_OFLAG_COPIED:
            tbl = self._l2_get(l1_index)
            assert tbl is not None
            return tbl
        if off:
            old = self._l2_get(l1_index)
            assert old is not None
            entries = array("Q", old.entries)
            self.l2_cache.drop(off)  # the snapshot's copy is not ours to cache
            self._pending_free.append(HostRange(off, self.cluster_size))  # rule 4
        else:
            entries = array("Q", bytes(self.cluster_size))
        new_off = self.refcounts.alloc()
        tbl = L2Table(new_off, entries, dirty=True)
        self.l1[l1_index] = new_off | QCOW_OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        self.l2_cache.insert_unpublished(tbl)
        return tbl

    def _get_entry(self, tbl: L2Table, idx: int) -> tuple[int, int]:
        """(entry, subcluster bitmap; 0 without extended L2)."""
        if self.extended_l2:
            return tbl.entries[2 * idx], tbl.entries[2 * idx + 1]
        return tbl.entries[idx], 0

    def _set_entry(self, tbl: L2Table, idx: int, entry: int, bitmap: int = 0) -> None:
        if self.extended_l2:
            tbl.entries[2 * idx] = entry
            tbl.entries[2 * idx + 1] = bitmap
        else:
            tbl.entries[idx] = entry

    def _host_range(self, entry: int) -> HostRange | None:
        """The host bytes an entry holds a reference to (None: nothing refcounted)."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return compressed_range(entry, self.cluster_bits)
        if self.data_file is not None:
            return None
        off = entry & L2E_OFFSET_MASK
        return new_host_range((off, self.cluster_size)) if off else None

    def _valid_bytes(self, cstart: int) -> int:
        """Bytes of the cluster at guest offset ``cstart`` that are part of the disk."""
        return min(self.cluster_size, self.virtual_size - cstart)

    def _for_each_table(self, guest_offset: int, guest_end: int,
                        fn: Callable[[int, int, int], None]) -> None:
        """``fn(l1_index, start, end)`` for each part of [guest_offset, guest_end) that one
        L2 table maps, in order."""
        span = 1 << (self.l2_bits + self.cluster_bits)
        pos = guest_offset
        while pos < guest_end:
            l1i = pos // span
            tend = min(guest_end, (l1i + 1) * span)
            fn(l1i, pos, tend)
            pos = tend

    def _current(self, guest_offset: int, length: int) -> bytearray:
        """What the chain shows at [guest_offset, +length) now, read into a fresh buffer
        (no copy on the way: the buffer is what gets written)."""
        buf = bytearray(length)
        self.read_into(guest_offset, memoryview(buf))
        return buf

    def _copy_up(self, cstart: int, r0: int, r1: int, a: int, b: int,
                 chunk: memoryview | bytes) -> bytearray:
        """Bytes [r0, r1) of the cluster at cstart: the chain's current content with
        ``chunk`` at [a, b)."""
        buf = bytearray(r1 - r0)
        view = memoryview(buf)
        if a > r0:
            self.read_into(cstart + r0, view[:a - r0])
        view[a - r0:b - r0] = chunk
        if r1 > b:
            self.read_into(cstart + b, view[b - r0:])
        return buf

    # ---- write ---------------------------------------------------------------------------

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        self.require_writable()
        view = memoryview(data).cast("B")
        self.check_range(guest_offset, len(view))
        if not len(view):
            return
        self._begin_modify()

        def one_table(l1i: int, start: int, end: int) -> None:
            self._write_table(l1i, start, end, view[start - guest_offset : end - guest_offset])

        self._for_each_table(guest_offset, guest_offset + len(view), one_table)

    def _write_table(self, l1i: int, start: int, end: int, view: memoryview) -> None:
        cb = self.cluster_bits
        tbl = self._l2_for_write(l1i)
        change = TableChange(self, tbl)
        write_cluster = self._write_cluster_ext if self.extended_l2 else self._write_cluster
        fresh_ok = not self.extended_l2 and self.data_file is None
        pos = start
        while pos < end:
            ci = pos >> cb
            cstart = ci << cb
            idx = ci & ((1 << self.l2_bits) - 1)
            if fresh_ok and pos == cstart:
                k = self._fresh_run(tbl, idx, (end - pos) >> cb)
                if k >= FRESH_RUN_MIN_CLUSTERS:
                    self._write_fresh(change, idx, k, view[pos - start : pos - start + (k << cb)])
                    pos += k << cb
                    continue
            cend = min(end, cstart + (1 << cb))
            write_cluster(change, idx, ci, pos - cstart, cend - cstart,
                          view[pos - start : cend - start])
            pos = cend
        change.commit()

    def _fresh_run(self, tbl: L2Table, idx: int, limit: int) -> int:
        """How many clusters from entry ``idx`` (at most ``limit``) hold no host cluster:
        unallocated, or zero-flagged without one.  A write that covers them whole needs no
        copy-up and frees nothing."""
        entries = tbl.entries
        k = 0
        stop = min(limit, len(entries) - idx)
        while k < stop and entries[idx + k] in (0, QCOW_OFLAG_ZERO):
            k += 1
        return k

    def _write_fresh(self, change: TableChange, idx: int, count: int,
                     chunk: memoryview) -> None:
        """Record ``chunk`` written over ``count`` whole fresh clusters from entry ``idx``:
        new host clusters, written from the caller's buffer in one pwrite per adjacent run
        (no copy-up, no per-cluster buffer)."""
        cb = self.cluster_bits
        hosts = self.refcounts.alloc_many(count)
        run = 0
        for i in range(1, count + 1):
            if i == count or hosts[i] != hosts[i - 1] + (1 << cb):
                change.write(hosts[run], chunk[run << cb : i << cb])
                run = i
        for i, host in enumerate(hosts):
            change.set_entry(idx + i, host | QCOW_OFLAG_COPIED)

    def _write_cluster(self, change: TableChange, idx: int, ci: int, a: int, b: int,
                       chunk: memoryview) -> None:
        """Record ``chunk`` written to bytes [a, b) of guest cluster ``ci`` (entry ``idx``
        of the change's table): in place where this layer owns the cluster, else to a new
        one with the rest of the cluster copied up."""
        e = change.tbl.entries[idx]
        cstart = ci << self.cluster_bits
        in_place = not e & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO) and self._has_host(e) and (
            bool(e & QCOW_OFLAG_COPIED) or self.data_file is not None)
        if in_place:
            host = e & L2E_OFFSET_MASK
            if host & (self.cluster_size - 1):
                raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                                   f"l2 entry of guest cluster {ci}", e)
            change.write(host + a, chunk)
            return
        valid = self._valid_bytes(cstart)
        buf = self._copy_up(cstart, 0, valid, a, b, chunk)
        host = cstart if self.data_file is not None else self.refcounts.alloc()
        change.write(host, buf)
        change.set_entry(idx, host | QCOW_OFLAG_COPIED, 0, self._host_range(e))

    def _write_cluster_ext(self, change: TableChange, idx: int, ci: int, a: int, b: int,
                           chunk: memoryview) -> None:
        """As :meth:`_write_cluster`, with extended L2: the touched subclusters become
        allocated, their unwritten head and tail copied up."""
        entries = change.tbl.entries
        e, bm = entries[2 * idx], entries[2 * idx + 1]
        cb, sb = self.cluster_bits, self.subcluster_bits
        cstart = ci << cb
        valid = self._valid_bytes(cstart)
        sc0 = a >> sb
        sc1 = (b + (1 << sb) - 1) >> sb
        touched = subclusters(sc0, sc1)
        comp = bool(e & QCOW_OFLAG_COMPRESSED)
        if not comp:
            self._check_bitmap(ci, e, bm)
        has_host = not comp and self._has_host(e)
        owned = has_host and (bool(e & QCOW_OFLAG_COPIED) or self.data_file is not None)
        host = e & L2E_OFFSET_MASK
        if not comp and host & ((1 << cb) - 1):
            raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                               f"l2 entry of guest cluster {ci}", e)
        new_bm = allocated(bm, touched)
        if owned:
            if bm & touched == touched:
                change.write(host + a, chunk)
                return
            r0 = a if bm >> sc0 & 1 else sc0 << sb
            r1 = b if bm >> (sc1 - 1) & 1 else min(sc1 << sb, valid)
            change.write(host + r0, self._copy_up(cstart, r0, r1, a, b, chunk))
            change.set_entry(idx, e, new_bm)
            return
        if not has_host and not comp:
            new = cstart if self.data_file is not None else self.refcounts.alloc()
            r0, r1 = sc0 << sb, min(sc1 << sb, valid)
            change.write(new + r0, self._copy_up(cstart, r0, r1, a, b, chunk))
            change.set_entry(idx, new | QCOW_OFLAG_COPIED, new_bm)
            return
        # Compressed or shared with a snapshot: copy the whole cluster.
        new = self.refcounts.alloc()
        change.write(new, self._copy_up(cstart, 0, valid, a, b, chunk))
        change.set_entry(idx, new | QCOW_OFLAG_COPIED, QCOW_L2_BITMAP_ALL_ALLOC,
                         self._host_range(e))

    # ---- zeroes and discard --------------------------------------------------------------

    def write_zeroes(self, guest_offset: int, length: int, may_unmap: bool = False) -> None:
        """Zero the range.  Whole clusters (subclusters) become zero-flagged and lose their
        host cluster whether or not ``may_unmap`` is set; partial ones get zeroes written."""
        self.require_writable()
        self.check_range(guest_offset, length)
        if not length:
            return
        self._begin_modify()
        end = guest_offset + length
        g = 1 << self.subcluster_bits
        a0 = div_round_up(guest_offset, g) * g
        b0 = end if end == self.virtual_size else end // g * g
        if a0 >= b0:
            self._write_zero_bytes(guest_offset, end)
            return
        if guest_offset < a0:
            self._write_zero_bytes(guest_offset, a0)
        if b0 < end:
            self._write_zero_bytes(b0, end)
        fallback: list[tuple[int, int]] = []

        def one_table(l1i: int, start: int, end: int) -> None:
            fallback.extend(self._zero_table(l1i, start, end))

        self._for_each_table(a0, b0, one_table)
        for s, e in fallback:
            self._write_zero_bytes(s, e)

    def _write_zero_bytes(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            ext = self.resolve(pos, end - pos)
            n = ext.length
            if ext.kind is Kind.ZERO:  # already reads zeroes here: skip
                pos += n
                continue
            if ext.kind is Kind.UNALLOCATED:
                skip = self.below.zero_prefix(pos, n)  # zeroes beneath: skip those too
                if skip:
                    pos += skip
                    continue
            zeros = bytes(min(n, ZERO_CHUNK_BYTES))
            self.write(pos, zeros)
            pos += len(zeros)

    def _backing_shows(self, cstart: int) -> bool:
        """Could the backing chain show non-zero data in the cluster at cstart?"""
        if not self.backing_name:
            return False
        if self.below is NOTHING_BELOW:
            return True
        return cstart < self.below.size

    def _zero_table(self, l1i: int, start: int, end: int) -> list[tuple[int, int]]:
        """Zero the clusters of one table through their entries; returns the guest ranges
        [start, end) that must get zeroes written instead."""
        cb, sb = self.cluster_bits, self.subcluster_bits
        fallback: list[tuple[int, int]] = []
        raw = bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        if not raw and not self.backing_name and not self.l1[l1i] & L1E_OFFSET_MASK:
            return fallback  # unallocated with nothing below: already reads as zeroes
        if self.version < 3 and not raw:
            # No zero flag: unallocate where nothing shows through, write zeroes elsewhere.
            pos = start
            while pos < end:
                cstart = pos >> cb << cb
                cend = min(end, cstart + (1 << cb))
                if self._backing_shows(cstart):
                    fallback.append((pos, cend))
                pos = cend
            if self.l1[l1i] & L1E_OFFSET_MASK == 0:
                return fallback  # all unallocated already
        tbl = self._l2_for_write(l1i)
        change = TableChange(self, tbl)
        pos = start
        while pos < end:
            ci = pos >> cb
            cstart = ci << cb
            cend = min(end, cstart + (1 << cb))
            idx = ci & ((1 << self.l2_bits) - 1)
            valid = self._valid_bytes(cstart)
            whole = pos == cstart and cend - cstart >= valid
            e, bm = self._get_entry(tbl, idx)
            old = self._host_range(e)
            if (not raw and not self.backing_name and e == 0
                    and not bm & QCOW_L2_BITMAP_ALL_ALLOC):
                pos = cend  # unallocated with nothing below: already reads as zeroes
                continue
            if raw:
                # data_file_raw: the data file must read as the disk, so the zeroes go there
                # and the range stays (or becomes) mapped, host offset == guest offset.
                assert self.data_file is not None
                comp = bool(e & QCOW_OFLAG_COMPRESSED)
                mapped = self._has_host(e) and not comp
                host = (e & L2E_OFFSET_MASK) if mapped else cstart
                if self.extended_l2:
                    sc0, sc1 = (pos - cstart) >> sb, div_round_up(cend - cstart, 1 << sb)
                    t = subclusters(sc0, sc1)
                    change.write(host + (pos - cstart), bytes(cend - pos))
                    change.set_entry(idx, host | QCOW_OFLAG_COPIED,
                                     allocated(bm if not comp else 0, t))
                elif mapped and not e & QCOW_OFLAG_ZERO:
                    change.write(host + (pos - cstart), bytes(cend - pos))
                elif whole:
                    change.write(cstart, bytes(valid))
                    change.set_entry(idx, cstart | QCOW_OFLAG_COPIED)
                else:
                    fallback.append((pos, cend))
            elif self.version < 3:
                if not self._backing_shows(cstart) and (e or old):
                    change.set_entry(idx, 0, 0, old)
            elif not self.extended_l2:
                if e != QCOW_OFLAG_ZERO:
                    change.set_entry(idx, QCOW_OFLAG_ZERO, 0, old)
            elif whole:
                if e or bm != QCOW_L2_BITMAP_ALL_ZEROES:
                    change.set_entry(idx, 0, QCOW_L2_BITMAP_ALL_ZEROES, old)
            elif e & QCOW_OFLAG_COMPRESSED:
                fallback.append((pos, cend))  # partial: copy the cluster up, then zero
            else:
                sc0, sc1 = (pos - cstart) >> sb, div_round_up(cend - cstart, 1 << sb)
                t = subclusters(sc0, sc1)
                change.set_entry(idx, e, (bm & ~t) | (t << 32))
            pos = cend
        change.commit()
        return fallback

    def discard(self, guest_offset: int, length: int) -> None:
        """Drop the range: it reads as zeroes afterwards (never as the backing image)."""
        self.write_zeroes(guest_offset, length, may_unmap=True)

    # ---- allocate ------------------------------------------------------------------------

    def allocate(self, guest_offset: int, length: int) -> None:
        self.require_writable()
        self.check_range(guest_offset, length)
        if not length:
            return
        self._begin_modify()
        cb = self.cluster_bits
        first = guest_offset >> cb << cb
        last = div_round_up(guest_offset + length, 1 << cb) << cb
        self._for_each_table(first, min(last, self.virtual_size), self._allocate_table)

    def _allocate_table(self, l1i: int, start: int, end: int) -> None:
        cb = self.cluster_bits
        change = TableChange(self, self._l2_for_write(l1i))
        for ci in range(start >> cb, div_round_up(end, 1 << cb)):
            self._allocate_cluster(change, ci & ((1 << self.l2_bits) - 1), ci)
        change.commit()

    def _allocate_cluster(self, change: TableChange, idx: int, ci: int) -> None:
        """Record guest cluster ``ci`` made this layer's, DATA and writable throughout, with
        what it does not hold yet copied up (nothing, where it already is)."""
        cb, sb = self.cluster_bits, self.subcluster_bits
        cstart = ci << cb
        valid = self._valid_bytes(cstart)
        e, bm = self._get_entry(change.tbl, idx)
        comp = bool(e & QCOW_OFLAG_COMPRESSED)
        owned = (not comp and not (e & QCOW_OFLAG_ZERO and not self.extended_l2)
                 and self._has_host(e)
                 and (bool(e & QCOW_OFLAG_COPIED) or self.data_file is not None))
        host = e & L2E_OFFSET_MASK
        if not comp and host & ((1 << cb) - 1):
            raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                               f"l2 entry of guest cluster {ci}", e)
        if not self.extended_l2:
            if owned:
                return
            new = cstart if self.data_file is not None else self.refcounts.alloc()
            change.write(new, self._current(cstart, valid))
            change.set_entry(idx, new | QCOW_OFLAG_COPIED, 0, self._host_range(e))
            return
        if not comp:
            self._check_bitmap(ci, e, bm)
        nsub = div_round_up(valid, 1 << sb)
        valid_mask = (1 << nsub) - 1
        if owned:
            if bm & valid_mask == valid_mask:
                return
            i = 0
            while i < nsub:  # copy up runs of unallocated subclusters only
                if bm >> i & 1:
                    i += 1
                    continue
                j = i
                while j < nsub and not bm >> j & 1:
                    j += 1
                r0, r1 = i << sb, min(j << sb, valid)
                change.write(host + r0, self._current(cstart + r0, r1 - r0))
                i = j
            change.set_entry(idx, e, QCOW_L2_BITMAP_ALL_ALLOC)
            return
        new = (cstart if self.data_file is not None and not comp
               else self.refcounts.alloc())
        change.write(new, self._current(cstart, valid))
        change.set_entry(idx, new | QCOW_OFLAG_COPIED, QCOW_L2_BITMAP_ALL_ALLOC,
                         self._host_range(e))
