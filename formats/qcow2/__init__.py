"""Layer: formats.  qcow2 images, compat 0.10 (version 2) and 1.1 (version 3): read, write,
check and create.  Imports nothing from ``cowd``.

Spec: qemu's docs/interop/qcow2.txt.  On-disk constants keep the spec's (and qemu's) names.

Invariants
----------
- Every count or offset the file controls is checked against a named limit (QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS, ...) and against the file's size before anything
  is allocated; malformed metadata raises CorruptImage, unknown features UnsupportedImage.
- The active L1 table and the refcount table live in memory; L2 tables and refcount blocks
  are cached in bounded LRUs (L2_CACHE_BYTES, REFCOUNT_CACHE_BYTES).  Refcount blocks are
  write-through; L2 tables and L1 entries are write-back (see the ordering below).
- Only the active L1 serves I/O.  Snapshot tables are parsed and bounds-checked; a data
  cluster may be written in place only when its L2 entry has QCOW_OFLAG_COPIED (refcount 1),
  which is also what ``Extent.writable`` reports.
- An image with the corrupt bit opens read-only (``read_only_reason`` says why).  An image with
  the dirty bit (lazy refcounts) is readable as is; opened writable, its refcounts are rebuilt
  from the L1/L2 tables first (like qemu does on open) and the bit is cleared.
- Like qemu, the disk is whole 512-byte sectors: a header size that is not a multiple of 512
  is rounded down on open (and ``create`` rounds up, as qemu-img create does).
- A relative external data file name is opened relative to the image's directory (qemu 7.2
  uses its working directory); names with a protocol prefix are refused.
- Writing needs the backing chain open (``formats.open_image``): copy-up reads through it.

Theory of operation (mapping)
-----------------------------
guest_offset -> (l1 index, l2 index) -> L2 entry.  A standard entry is one of: compressed
(bit 62; a byte-granular host offset plus a sector count), zero (bit 0; v2 images are honoured
too, like qemu), unallocated (offset 0) or data at a cluster-aligned host offset.  With extended
L2 entries every entry carries a second 64-bit word: 32 "allocated" bits and 32 "reads as
zero" bits, one per subcluster, and the mapping is resolved per subcluster.  ``resolve``
returns the longest run of one kind starting at ``guest_offset``, merging DATA across clusters
while the host offsets stay contiguous (qemu's qcow2_get_host_offset does the same).  With an
external data file, DATA lives in that file (host offset == guest offset) and is never
refcounted.

Writes allocate on first touch: the unwritten head and tail of the cluster (or, with extended
L2, of the touched subclusters) are copied up from what the chain shows there now
(``Image.read``: backing image, zeroes, a compressed cluster or a snapshot-shared cluster).
Shared clusters and shared L2 tables (no COPIED bit) are copied before they are modified and
the old host cluster loses one reference.  write_zeroes sets the zero flag (v3) or the zero
bits (extended L2) and frees the host cluster; v2 images have no zero flag, so whole clusters
are unallocated when no backing image shows through there, and zeroes are written otherwise.

Crash-safety ordering (power loss at any instant)
-------------------------------------------------
The promise: ``qemu-img check`` accepts the image (leaked clusters at worst), and no guest
range that held an acknowledged, flushed write ever shows garbage, stale data or the parent's
data.  The rules, each of which the code below follows:

1. Refcounts before references.  Host clusters are *reserved* in batches
   (RESERVE_BATCH_BYTES): their refcounts are set to 1 (pwrite), then clusters are handed
   out from the batch.  No L2 or L1 entry is ever written before an fdatasync of the image
   that follows those refcount writes: flush syncs before it writes any L2/L1 entry, and the
   eviction of a dirty table syncs first too (``_sync_data``).  So the sync rule 1 needs is
   the one rule 3 needs anyway, and allocation costs no fdatasync of its own.  A crash leaks
   the unused part of the batch; close gives it back and truncates the file.
2. New refcount structures before they are published.  A new refcount block (placed inside
   the range it covers, so it counts itself) or a relocated, grown refcount table is written
   and synced before the refcount-table entry or the header field that makes it reachable is
   written (and synced).  The old table is freed only after the header switch is durable.
3. Data before the metadata that reaches it.  Guest data and copied-up head/tail bytes are
   written with pwrite at once, but the L2 entries that point at them are kept in the L2
   cache (dirty) and L1 changes in memory.  ``flush`` (and the eviction of a dirty L2 table
   from the cache) first writes L2 tables that no on-disk L1 entry reaches yet, syncs the data
   file and the image (data, copy-up and those new tables are now durable), then writes the
   reachable L2 tables and the L1 entries, and syncs again.  So an on-disk L2 entry never
   points at data that is not yet on disk, and an on-disk L1 entry never points at an L2
   table that is not yet on disk.
4. Frees after the unlink is durable.  When a write, discard or copy-on-write drops this
   layer's reference to a host cluster (or to an L2 table), the refcount decrement is queued
   and applied only at the end of the next ``flush``, after the L2/L1 change is durable.  A
   crash before that leaks the cluster; the cluster cannot be reused (and so cannot show one
   guest cluster's new data at another guest address, or be overwritten while an on-disk L2
   entry still points at it) before then.
5. flush = fdatasync of the data file and of the image, in the order of rule 3.
6. The first modification clears the auto-clear feature bits this code does not maintain
   (bitmaps, unknown bits; data_file_raw is honoured by writing zeroes to the data file) and
   syncs the header before anything else is written.  Persistent bitmaps are inconsistent
   from then on and every reader ignores them, so their clusters are freed (rule 4) rather
   than leaked.  The dirty bit is never set: refcounts are kept exact (rule 1) rather than
   lazily, which lazy_refcounts permits.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
import os
import struct
from array import array
from collections.abc import Callable
from typing import Any, NoReturn

from ..base import (
    NOTHING_BELOW,
    SECTOR,
    CheckResult,
    Extent,
    HostFile,
    Image,
    Kind,
    NearOpener,
    require,
)
from ..errors import CorruptImage, FormatError, ImageIOError, ImageReadOnly, UnsupportedImage
from ..names import canonical_format
from ..opener import PROTOCOL_RE
from .compressed import decompress
from .header import (
    BitmapRegions,
    Qcow2Header,
    Qcow2Snapshot,
    bitmap_regions,
    check_table,
    parse_header,
    read_snapshots,
)
from .l2cache import L2Cache, L2Table
from .layout import (
    AUTOCLEAR_KEPT,
    COMPRESSION_NAMES,
    DEFAULT_CLUSTER_SIZE,
    HEADER_AUTOCLEAR_FEATURES_AT,
    HEADER_INCOMPATIBLE_FEATURES_AT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_CLUSTER_BITS_EXTL2,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCOW2_V2_HEADER_LENGTH,
    QCOW2_V3_HEADER_LENGTH,
    QCOW2_V3_HEADER_MIN_LENGTH,
    QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_MAGIC,
    QCOW_MAX_BACKING_FILE_NAME,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
    WRITE_GATHER_BYTES,
    ZERO_CHUNK_BYTES,
    HostRange,
    Region,
    compressed_range,
    div_round_up,
    words,
    words_bytes,
)
from .refcounts import Clash, Refcounts


class Qcow2Image(Image):
    format_name = "qcow2"

    def __init__(self, path: str, file: HostFile, writable: bool):
        super().__init__(path, file, writable)
        self.hdr: Qcow2Header | None = None
        self.version = 3
        self.cluster_bits = 16
        self.l2_bits = 13
        self.extended_l2 = False
        self.subcluster_bits = 16
        self.incompatible_features = 0
        self.compatible_features = 0
        self.autoclear_features = 0
        self.compression_type = QCOW2_COMPRESSION_TYPE_ZLIB
        self.l1_table_offset = 0
        self.l1: array[int] = array("Q")
        self.snapshots: list[Qcow2Snapshot] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.data_file: HostFile | None = None
        self.data_file_name: str | None = None
        self.feature_names: dict[tuple[int, int], str] = {}
        self.refcounts: Refcounts  # set by open
        self.l2_cache: L2Cache  # set by open
        self._cc_key: tuple[int, int] | None = None  # decompressed-cluster cache
        self._cc_data = b""
        # write state (see the module docstring's ordering rules)
        self._modified = False
        self._data_dirty = False
        self._l1_dirty: set[int] = set()
        self._pending_free: list[HostRange] = []
        self._open_file_size = 0
        self._closed = False

    # ---- geometry helpers ----------------------------------------------------------------

    @property
    def _cs(self) -> int:
        return 1 << self.cluster_bits

    def _l2_entries(self) -> int:
        return 1 << self.l2_bits

    def _data_host(self) -> HostFile:
        return self.data_file if self.data_file is not None else self.file

    def _has_host(self, entry: int) -> bool:
        """A standard (non-compressed) entry that names a host cluster."""
        if entry & L2E_OFFSET_MASK:
            return True
        return self.data_file is not None and bool(entry & QCOW_OFLAG_COPIED)

    # ---- probing and opening -------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        # qcow (v1) shares the magic; version 2 and later are ours (later ones are refused
        # with a clear message at open).
        return len(head) >= 8 and head[:4] == QCOW_MAGIC and struct.unpack_from(">I", head,
                                                                                  4)[0] >= 2

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool,
             near: NearOpener | None = None) -> Qcow2Image:
        img = cls(path, file, writable)
        try:
            img._load(near)
        except BaseException:
            if img.data_file is not None:
                img.data_file.close()
            raise
        return img

    def _load(self, near: NearOpener | None) -> None:
        path = self.path
        file_size = self.file.size()
        self._open_file_size = file_size
        fixed = self.file.pread_data(0, QCOW2_V3_HEADER_MIN_LENGTH)
        cbits = struct.unpack_from(">I", fixed, 20)[0]
        if MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
            head = self.file.pread_data(0, 1 << cbits)
        else:
            head = fixed
        hdr = parse_header(path, head, file_size)
        self.hdr = hdr
        self.version = hdr.version
        self.cluster_bits = cb = hdr.cluster_bits
        cs = 1 << cb
        self.cluster_size = cs
        self.incompatible_features = hdr.incompatible_features
        self.compatible_features = hdr.compatible_features
        self.autoclear_features = hdr.autoclear_features
        self.compression_type = hdr.compression_type
        self.feature_names = hdr.feature_names
        if hdr.crypt_method != 0:
            raise UnsupportedImage(path, "encrypted qcow2 images are not supported",
                                   "crypt_method", hdr.crypt_method)
        self.extended_l2 = bool(hdr.incompatible_features & QCOW2_INCOMPAT_EXTL2)
        self.l2_bits = cb - (4 if self.extended_l2 else 3)
        self.subcluster_bits = cb - 5 if self.extended_l2 else cb
        # qemu addresses qcow2 images in whole 512-byte sectors: a partial last sector of
        # hdr.size is not part of the disk (bs->total_sectors = size / 512).
        self.virtual_size = hdr.size // SECTOR * SECTOR
        self.backing_name = hdr.backing_file
        self.backing_format = hdr.backing_format if hdr.backing_file else None
        if self.backing_format is not None:
            try:
                canonical_format(self.backing_format)
            except ValueError:
                raise UnsupportedImage(path, "unknown backing file format", "backing_format",
                                       self.backing_format) from None
        self.l2_cache = L2Cache(path, self.file, cb, before_writeback=self._sync_data)

        # Active L1 table.
        require(hdr.l1_size <= QCOW_MAX_L1_SIZE // 8, path, "L1 table too large",
                "l1_size", hdr.l1_size)
        require(hdr.size < 1 << 63, path, "virtual size too large", "size", hdr.size)
        needed = div_round_up(hdr.size, cs << self.l2_bits)
        require(hdr.l1_size >= needed, path, "L1 table too small for the virtual size",
                "l1_size", hdr.l1_size)
        self.l1_table_offset = hdr.l1_table_offset
        if hdr.l1_size:
            check_table(path, cs, hdr.l1_table_offset, hdr.l1_size * 8, file_size,
                        "L1 table", "l1_table_offset")
            self.l1 = words(self.file.pread_exact(hdr.l1_table_offset, hdr.l1_size * 8,
                                                   "L1 table"))
        # Refcount table.
        require(hdr.refcount_table_clusters <= QCOW_MAX_REFTABLE_SIZE // cs, path,
                "refcount table too large", "refcount_table_clusters",
                hdr.refcount_table_clusters)
        reftable: array[int] = array("Q")
        if hdr.refcount_table_clusters:
            check_table(path, cs, hdr.refcount_table_offset, hdr.refcount_table_clusters * cs,
                        file_size, "refcount table", "refcount_table_offset")
            reftable = words(self.file.pread_exact(
                hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, "refcount table"))
        self.refcounts = Refcounts(
            path, self.file, cluster_bits=cb, refcount_order=hdr.refcount_order,
            reftable=reftable, reftable_offset=hdr.refcount_table_offset,
            reftable_clusters=hdr.refcount_table_clusters, in_use=self._in_use,
            corrupt=self._signal_corruption)
        # Snapshot table.
        self.snapshots_offset = hdr.snapshots_offset
        self.snapshots, self.snapshots_size = read_snapshots(path, self.file, hdr, file_size)
        self._check_overlaps()

        # External data file.
        if hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            if not hdr.data_file:
                raise UnsupportedImage(path, "external data file bit set but no data file "
                                       "name recorded", "incompatible_features",
                                       hdr.incompatible_features)
            self.data_file_name = hdr.data_file
        # Corrupt / dirty.
        if hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT and self.writable:
            self.writable = False
            self.read_only_reason = ("image is marked corrupt (incompatible feature bit 1); "
                                     "repair it with qemu-img check -r all")
        if self.data_file_name is not None:
            self.data_file = self._open_data_file(self.data_file_name, near)
        if hdr.incompatible_features & QCOW2_INCOMPAT_DIRTY and self.writable:
            self._repair_dirty()

    def _static_metadata(self) -> list[Region]:
        """The structures the header reaches directly."""
        out = [Region("header", 0, self._cs)]
        if len(self.l1):
            out.append(Region("L1 table", self.l1_table_offset, len(self.l1) * 8))
        rc = self.refcounts
        if rc.reftable_clusters:
            out.append(Region("refcount table", rc.reftable_offset,
                              rc.reftable_clusters << self.cluster_bits))
        if self.snapshots_size:
            out.append(Region("snapshot table", self.snapshots_offset, self.snapshots_size))
        for i, sn in enumerate(self.snapshots):
            if sn.l1_size:
                out.append(Region(f"snapshot[{i}] L1 table", sn.l1_table_offset,
                                  sn.l1_size * 8))
        return out

    def _check_overlaps(self) -> None:
        cb = self.cluster_bits
        spans = sorted((off >> cb, (off + n - 1) >> cb, what)
                       for what, off, n in self._static_metadata())
        for (_s0, e0, w0), (s1, _e1, w1) in itertools.pairwise(spans):
            require(s1 > e0, self.path, f"{w1} overlaps the {w0}", "cluster", s1)

    def _open_data_file(self, name: str, near: NearOpener | None) -> HostFile:
        """The external data file, opened only as the caller's opener allows (confined to
        the image's folder unless the user said otherwise: formats/opener.py)."""
        if near is not None:
            return near(name, self.writable, "data_file", "data file")
        from ..opener import ChainOpener, OpenPolicy

        with ChainOpener(self.path, OpenPolicy()) as opener:
            got = opener.open_named(self.path, opener.top_place(), name, self.writable,
                                    "data_file", "data file")
        if got is None:
            raise ImageIOError(self.path, f"data file not found: {name}", errno_mod.ENOENT)
        return got[0]

    # ---- L2 tables -------------------------------------------------------------------------

    def _l2_get(self, l1_index: int) -> L2Table | None:
        """The L2 table of an active L1 entry (None where the entry is unallocated)."""
        l1e = self.l1[l1_index]
        off = l1e & L1E_OFFSET_MASK
        if not off:
            return None
        return self.l2_cache.get(off, l1_index, l1e)

    # ---- mapping ---------------------------------------------------------------------------

    def _piece(self, pos: int, end: int) -> tuple[Kind, int, int, bool, int]:
        """The run of one kind starting at ``pos`` inside one cluster (or one unallocated L2
        range): (kind, file_offset at pos, run end, writable, entry)."""
        cb = self.cluster_bits
        ci = pos >> cb
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            raise CorruptImage(self.path, "guest offset beyond the L1 table", "offset", pos)
        tbl = self._l2_get(l1i)
        if tbl is None:
            return Kind.UNALLOCATED, 0, min(end, (l1i + 1) << (self.l2_bits + cb)), False, 0
        idx = ci & ((1 << self.l2_bits) - 1)
        cstart = ci << cb
        cend = min(end, cstart + (1 << cb))
        if not self.extended_l2:
            e = tbl.entries[idx]
            if e & QCOW_OFLAG_COMPRESSED:
                return Kind.COMPRESSED, 0, cend, False, e
            if e & QCOW_OFLAG_ZERO:
                return Kind.ZERO, 0, cend, False, e
            if not self._has_host(e):
                return Kind.UNALLOCATED, 0, cend, False, e
            host = e & L2E_OFFSET_MASK
            if host & ((1 << cb) - 1):
                raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                                   f"l2 entry of guest cluster {ci}", e)
            return (Kind.DATA, host + (pos - cstart), cend,
                    self.writable and bool(e & QCOW_OFLAG_COPIED), e)
        e = tbl.entries[2 * idx]
        bm = tbl.entries[2 * idx + 1]
        if e & QCOW_OFLAG_COMPRESSED:
            return Kind.COMPRESSED, 0, cend, False, e
        self._check_bitmap(ci, e, bm)
        host = e & L2E_OFFSET_MASK
        if host & ((1 << cb) - 1):
            raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                               f"l2 entry of guest cluster {ci}", e)
        sb = self.subcluster_bits
        sc = (pos - cstart) >> sb

        def state(i: int) -> Kind:
            if bm >> i & 1:
                return Kind.DATA
            if bm >> (32 + i) & 1:
                return Kind.ZERO
            return Kind.UNALLOCATED

        kind = state(sc)
        j = sc + 1
        while j < QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER and cstart + (j << sb) < cend:
            if state(j) is not kind:
                break
            j += 1
        run_end = min(cend, cstart + (j << sb))
        if kind is Kind.DATA:
            return (Kind.DATA, host + (pos - cstart), run_end,
                    self.writable and bool(e & QCOW_OFLAG_COPIED), e)
        return kind, 0, run_end, False, e

    def _check_bitmap(self, ci: int, e: int, bm: int) -> None:
        if (bm >> 32) & bm & QCOW_L2_BITMAP_ALL_ALLOC:
            raise CorruptImage(self.path, "subcluster both allocated and zero",
                               f"l2 bitmap of guest cluster {ci}", bm)
        if bm & QCOW_L2_BITMAP_ALL_ALLOC and not self._has_host(e):
            raise CorruptImage(self.path, "allocated subclusters without a host cluster",
                               f"l2 bitmap of guest cluster {ci}", bm)

    def resolve(self, guest_offset: int, length: int) -> Extent:
        vs = self.virtual_size
        if guest_offset < 0 or guest_offset > vs or length < 0:
            raise ValueError(f"{self.path}: offset {guest_offset} outside the disk "
                             f"(virtual_size={vs})")
        end = min(guest_offset + length, vs)
        if guest_offset >= end:
            return Extent(guest_offset, 0, Kind.UNALLOCATED)
        kind, start_file, pos, writable, entry = self._piece(guest_offset, end)
        if kind is Kind.COMPRESSED:
            if self.data_file is not None:
                raise CorruptImage(self.path, "compressed cluster in an image with an "
                                   "external data file", "l2 entry", entry)
            coff, clen = compressed_range(entry, self.cluster_bits)
            cstart = (guest_offset >> self.cluster_bits) << self.cluster_bits
            return Extent(guest_offset, pos - guest_offset, Kind.COMPRESSED, self.file, coff,
                          compressed_length=clen, cluster_guest_offset=cstart)
        while pos < end:
            k, foff, nxt, w, _ = self._piece(pos, end)
            if k is not kind or w != writable:
                break
            if k is Kind.DATA and foff != start_file + (pos - guest_offset):
                break
            pos = nxt
        if kind is Kind.DATA:
            return Extent(guest_offset, pos - guest_offset, Kind.DATA, self._data_host(),
                          start_file, writable=writable)
        return Extent(guest_offset, pos - guest_offset, kind)

    # ---- compressed clusters ---------------------------------------------------------------

    def read_compressed(self, extent: Extent) -> bytes:
        key = (extent.file_offset, extent.compressed_length)
        if self._cc_key != key:
            stream = self.file.pread_data(extent.file_offset, extent.compressed_length)
            self._cc_data = decompress(self.path, self.compression_type, stream, self._cs,
                                       extent.file_offset)
            self._cc_key = key
        at = extent.guest_offset - extent.cluster_guest_offset
        return self._cc_data[at : at + extent.length]

    # ---- allocation ------------------------------------------------------------------------

    def _in_use(self, clusters: list[int]) -> Clash | None:
        """Cheap cross-check (qemu's "cached" overlap check): is a supposedly free cluster
        in use by a structure we know of?"""
        cb = self.cluster_bits
        spans = [(r.file_offset >> cb, (r.file_offset + r.length - 1) >> cb, r.what)
                 for r in self._static_metadata()]
        for ci in clusters:
            for first, last, what in spans:
                if first <= ci <= last:
                    return Clash(ci, what)
            if ci << cb in self.l2_cache:
                return Clash(ci, "L2 table")
            if self.refcounts.caches_block(ci << cb):
                return Clash(ci, "refcount block")
        return None

    def _host_range(self, entry: int) -> HostRange | None:
        """The host bytes an entry holds a reference to (None: nothing refcounted)."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return compressed_range(entry, self.cluster_bits)
        if self.data_file is not None:
            return None
        off = entry & L2E_OFFSET_MASK
        return HostRange(off, self._cs) if off else None

    def mark_corrupt(self, what: str, field: str | None = None,
                     value: object = None) -> CorruptImage:
        try:
            self._signal_corruption(what, field, value)
        except CorruptImage as e:
            return e

    def _signal_corruption(self, what: str, fieldname: str | None = None,
                           value: object = None) -> NoReturn:
        """Mark the image corrupt (v3: incompatible bit 1), go read-only, raise."""
        if self.writable and self.version >= 3:
            try:
                self.incompatible_features |= QCOW2_INCOMPAT_CORRUPT
                self.file.pwrite(HEADER_INCOMPATIBLE_FEATURES_AT,
                                 struct.pack(">Q", self.incompatible_features))
                self.file.sync()
            except FormatError:
                pass
        self.writable = False
        self.read_only_reason = f"marked corrupt: {what}"
        raise CorruptImage(self.path, what, fieldname, value)

    # ---- writing: common -------------------------------------------------------------------

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

    def _sync_image(self) -> None:
        self.file.sync()
        self.refcounts.unsynced = False
        if self.data_file is None:
            self._data_dirty = False

    def _sync_data(self) -> None:
        """Make guest data and reserved refcounts durable (before an L2/L1 write)."""
        if self.data_file is not None and self._data_dirty:
            self.data_file.sync()
            self._data_dirty = False
        if self._data_dirty or self.refcounts.unsynced:
            self._sync_image()

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
            self._pending_free.append(HostRange(off, self._cs))  # rule 4
        else:
            entries = array("Q", bytes(self._cs))
        new_off = self.refcounts.alloc()
        tbl = L2Table(new_off, entries, dirty=True)
        self.l1[l1_index] = new_off | QCOW_OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        self.l2_cache.insert_unpublished(tbl)
        return tbl

    def _get_entry(self, tbl: L2Table, idx: int) -> tuple[int, int]:
        if self.extended_l2:
            return tbl.entries[2 * idx], tbl.entries[2 * idx + 1]
        return tbl.entries[idx], 0

    def _set_entry(self, tbl: L2Table, idx: int, entry: int, bitmap: int = 0) -> None:
        if self.extended_l2:
            tbl.entries[2 * idx] = entry
            tbl.entries[2 * idx + 1] = bitmap
        else:
            tbl.entries[idx] = entry

    def _valid_bytes(self, cstart: int) -> int:
        return min(self._cs, self.virtual_size - cstart)

    def _for_each_table(self, guest_offset: int, end: int,
                        fn: Callable[[int, int, int], None]) -> None:
        span = 1 << (self.l2_bits + self.cluster_bits)
        pos = guest_offset
        while pos < end:
            l1i = pos // span
            tend = min(end, (l1i + 1) * span)
            fn(l1i, pos, tend)
            pos = tend

    class _Batch:
        """Gathered data writes of one request, then the L2 updates that reach them."""

        def __init__(self, img: Qcow2Image):
            self.img = img
            self.writes: list[tuple[HostFile, int, bytes | bytearray | memoryview]] = []
            self.bytes = 0

        def add(self, f: HostFile, off: int, data: bytes | bytearray | memoryview) -> None:
            if self.writes:
                pf, poff, pdata = self.writes[-1]
                if pf is f and poff + len(pdata) == off and not isinstance(pdata, memoryview):
                    if isinstance(pdata, bytes):
                        pdata = bytearray(pdata)
                        self.writes[-1] = (pf, poff, pdata)
                    pdata += data
                    self.bytes += len(data)
                    if self.bytes >= WRITE_GATHER_BYTES:
                        self.issue()
                    return
            self.writes.append((f, off, data))
            self.bytes += len(data)
            if self.bytes >= WRITE_GATHER_BYTES:
                self.issue()

        def issue(self) -> None:
            for f, off, data in self.writes:
                f.pwrite(off, data)
                self.img._data_dirty = True
            self.writes = []
            self.bytes = 0

    # ---- writing: data ---------------------------------------------------------------------

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
        batch = self._Batch(self)
        updates: list[tuple[int, int, int]] = []
        frees: list[HostRange] = []
        pos = start
        while pos < end:
            ci = pos >> cb
            cstart = ci << cb
            cend = min(end, cstart + (1 << cb))
            idx = ci & ((1 << self.l2_bits) - 1)
            chunk = view[pos - start : cend - start]
            a, b = pos - cstart, cend - cstart
            if self.extended_l2:
                self._plan_write_ext(tbl, idx, ci, a, b, chunk, batch, updates, frees)
            else:
                self._plan_write_std(tbl, idx, ci, a, b, chunk, batch, updates, frees)
            pos = cend
        self._commit_table(tbl, batch, updates, frees)

    def _commit_table(self, tbl: L2Table, batch: Qcow2Image._Batch,
                      updates: list[tuple[int, int, int]],
                      frees: list[HostRange]) -> None:
        """End of a per-L2-table write, zero or allocate pass: the data first (rule 3: the
        L2 entries stay in the cache until flush), then the entries, then queue the frees
        for after the next flush (rule 4)."""
        batch.issue()
        for idx, e, bm in updates:
            self._set_entry(tbl, idx, e, bm)
        if updates:
            self.l2_cache.mark_dirty(tbl)
        self._pending_free.extend(frees)

    def _copy_up(self, cstart: int, r0: int, r1: int, a: int, b: int,
                 chunk: memoryview | bytes) -> bytearray:
        """Bytes [r0, r1) of the cluster at cstart: the chain's current content with
        ``chunk`` at [a, b)."""
        buf = bytearray()
        if a > r0:
            buf += self.read(cstart + r0, a - r0)
        buf += chunk
        if r1 > b:
            buf += self.read(cstart + b, r1 - b)
        return buf

    def _plan_write_std(self, tbl: L2Table, idx: int, ci: int, a: int, b: int,
                        chunk: memoryview, batch: Qcow2Image._Batch,
                        updates: list[tuple[int, int, int]],
                        frees: list[HostRange]) -> None:
        e = tbl.entries[idx]
        f = self._data_host()
        cstart = ci << self.cluster_bits
        in_place = not e & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO) and self._has_host(e) and (
            bool(e & QCOW_OFLAG_COPIED) or self.data_file is not None)
        if in_place:
            host = e & L2E_OFFSET_MASK
            if host & (self._cs - 1):
                raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                                   f"l2 entry of guest cluster {ci}", e)
            batch.add(f, host + a, chunk)
            return
        valid = self._valid_bytes(cstart)
        buf = self._copy_up(cstart, 0, valid, a, b, chunk)
        host = cstart if self.data_file is not None else self.refcounts.alloc()
        batch.add(f, host, buf)
        updates.append((idx, host | QCOW_OFLAG_COPIED, 0))
        old = self._host_range(e)
        if old is not None:
            frees.append(old)

    def _plan_write_ext(self, tbl: L2Table, idx: int, ci: int, a: int, b: int,
                        chunk: memoryview, batch: Qcow2Image._Batch,
                        updates: list[tuple[int, int, int]],
                        frees: list[HostRange]) -> None:
        e, bm = tbl.entries[2 * idx], tbl.entries[2 * idx + 1]
        f = self._data_host()
        cb, sb = self.cluster_bits, self.subcluster_bits
        cstart = ci << cb
        valid = self._valid_bytes(cstart)
        sc0 = a >> sb
        sc1 = (b + (1 << sb) - 1) >> sb
        touched = ((1 << sc1) - 1) & ~((1 << sc0) - 1)
        comp = bool(e & QCOW_OFLAG_COMPRESSED)
        if not comp:
            self._check_bitmap(ci, e, bm)
        has_host = not comp and self._has_host(e)
        owned = has_host and (bool(e & QCOW_OFLAG_COPIED) or self.data_file is not None)
        host = e & L2E_OFFSET_MASK
        if not comp and host & ((1 << cb) - 1):
            raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                               f"l2 entry of guest cluster {ci}", e)
        new_bm = (bm | touched) & ~(touched << 32)
        if owned:
            if bm & touched == touched:
                batch.add(f, host + a, chunk)
                return
            r0 = a if bm >> sc0 & 1 else sc0 << sb
            r1 = b if bm >> (sc1 - 1) & 1 else min(sc1 << sb, valid)
            batch.add(f, host + r0, self._copy_up(cstart, r0, r1, a, b, chunk))
            updates.append((idx, e, new_bm))
            return
        if not has_host and not comp:
            new = cstart if self.data_file is not None else self.refcounts.alloc()
            r0, r1 = sc0 << sb, min(sc1 << sb, valid)
            batch.add(f, new + r0, self._copy_up(cstart, r0, r1, a, b, chunk))
            updates.append((idx, new | QCOW_OFLAG_COPIED, new_bm))
            return
        # Compressed or shared with a snapshot: copy the whole cluster.
        new = self.refcounts.alloc()
        batch.add(f, new, self._copy_up(cstart, 0, valid, a, b, chunk))
        updates.append((idx, new | QCOW_OFLAG_COPIED, QCOW_L2_BITMAP_ALL_ALLOC))
        old = self._host_range(e)
        if old is not None:
            frees.append(old)

    # ---- writing: zeroes and discard -------------------------------------------------------

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

        def one_table(l1i: int, start: int, tend: int) -> None:
            self._zero_table(l1i, start, tend, fallback)

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

    def _zero_table(self, l1i: int, start: int, end: int,
                    fallback: list[tuple[int, int]]) -> None:
        cb, sb = self.cluster_bits, self.subcluster_bits
        raw = bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        if not raw and not self.backing_name and not self.l1[l1i] & L1E_OFFSET_MASK:
            return  # unallocated with nothing below: already reads as zeroes
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
                return  # all unallocated already
        tbl = self._l2_for_write(l1i)
        batch = self._Batch(self)
        updates: list[tuple[int, int, int]] = []
        frees: list[HostRange] = []
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
                    t = ((1 << sc1) - 1) & ~((1 << sc0) - 1)
                    batch.add(self.data_file, host + (pos - cstart), bytes(cend - pos))
                    updates.append((idx, host | QCOW_OFLAG_COPIED,
                                    ((bm if not comp else 0) | t) & ~(t << 32)))
                elif mapped and not e & QCOW_OFLAG_ZERO:
                    batch.add(self.data_file, host + (pos - cstart), bytes(cend - pos))
                elif whole:
                    batch.add(self.data_file, cstart, bytes(valid))
                    updates.append((idx, cstart | QCOW_OFLAG_COPIED, 0))
                else:
                    fallback.append((pos, cend))
            elif self.version < 3:
                if not self._backing_shows(cstart) and (e or old):
                    updates.append((idx, 0, 0))
                    if old is not None:
                        frees.append(old)
            elif not self.extended_l2:
                if e != QCOW_OFLAG_ZERO:
                    updates.append((idx, QCOW_OFLAG_ZERO, 0))
                    if old is not None:
                        frees.append(old)
            elif whole:
                if e or bm != QCOW_L2_BITMAP_ALL_ZEROES:
                    updates.append((idx, 0, QCOW_L2_BITMAP_ALL_ZEROES))
                    if old is not None:
                        frees.append(old)
            elif e & QCOW_OFLAG_COMPRESSED:
                fallback.append((pos, cend))  # partial: copy the cluster up, then zero
            else:
                sc0, sc1 = (pos - cstart) >> sb, div_round_up(cend - cstart, 1 << sb)
                t = ((1 << sc1) - 1) & ~((1 << sc0) - 1)
                updates.append((idx, e, (bm & ~t) | (t << 32)))
            pos = cend
        self._commit_table(tbl, batch, updates, frees)

    def discard(self, guest_offset: int, length: int) -> None:
        """Drop the range: it reads as zeroes afterwards (never as the backing image)."""
        self.write_zeroes(guest_offset, length, may_unmap=True)

    # ---- writing: allocate -----------------------------------------------------------------

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
        cb, sb = self.cluster_bits, self.subcluster_bits
        tbl = self._l2_for_write(l1i)
        batch = self._Batch(self)
        updates: list[tuple[int, int, int]] = []
        frees: list[HostRange] = []
        f = self._data_host()
        for ci in range(start >> cb, div_round_up(end, 1 << cb)):
            cstart = ci << cb
            idx = ci & ((1 << self.l2_bits) - 1)
            valid = self._valid_bytes(cstart)
            e, bm = self._get_entry(tbl, idx)
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
                    continue
                new = cstart if self.data_file is not None else self.refcounts.alloc()
                batch.add(f, new, self.read(cstart, valid))
                updates.append((idx, new | QCOW_OFLAG_COPIED, 0))
                old = self._host_range(e)
                if old is not None:
                    frees.append(old)
                continue
            if not comp:
                self._check_bitmap(ci, e, bm)
            nsub = div_round_up(valid, 1 << sb)
            valid_mask = (1 << nsub) - 1
            if owned:
                if bm & valid_mask == valid_mask:
                    continue
                i = 0
                while i < nsub:  # copy up runs of unallocated subclusters only
                    if bm >> i & 1:
                        i += 1
                        continue
                    j = i
                    while j < nsub and not bm >> j & 1:
                        j += 1
                    r0, r1 = i << sb, min(j << sb, valid)
                    batch.add(f, host + r0, self.read(cstart + r0, r1 - r0))
                    i = j
                updates.append((idx, e, QCOW_L2_BITMAP_ALL_ALLOC))
                continue
            new = (cstart if self.data_file is not None and not comp
                   else self.refcounts.alloc())
            batch.add(f, new, self.read(cstart, valid))
            updates.append((idx, new | QCOW_OFLAG_COPIED, QCOW_L2_BITMAP_ALL_ALLOC))
            old = self._host_range(e)
            if old is not None:
                frees.append(old)
        self._commit_table(tbl, batch, updates, frees)

    # ---- flush and close -------------------------------------------------------------------

    def flush(self) -> None:
        """Rules 3-5: data and new L2 tables, sync, reachable L2 tables and L1, sync, frees."""
        if not self.writable:
            return
        if not self._modified:
            self._data_host().sync()
            if self.data_file is not None:
                self.file.sync()
            return
        self.l2_cache.write_unpublished()
        if self.data_file is not None:
            self.data_file.sync()
        self._data_dirty = False
        self._sync_image()
        wrote = self.l2_cache.write_dirty()
        if self._l1_dirty:
            self._write_l1_entries(sorted(self._l1_dirty))
            self._l1_dirty.clear()
            wrote = True
        if wrote:
            self.file.sync()
        self.l2_cache.all_published()
        if self._pending_free:
            pending, self._pending_free = self._pending_free, []
            self._cc_key = None  # a freed compressed cluster's bytes may be reused
            self.refcounts.apply_frees(pending)

    def _write_l1_entries(self, indices: list[int]) -> None:
        i = 0
        while i < len(indices):
            j = i
            while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
                j += 1
            lo, hi = indices[i], indices[j] + 1
            self.file.pwrite(self.l1_table_offset + 8 * lo, words_bytes(self.l1[lo:hi]))
            i = j + 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable and (self._modified or self.refcounts.touched):
                self.flush()
                self.refcounts.release_pool()
                self._truncate_tail()
                self.file.sync()
        finally:
            if self.data_file is not None:
                self.data_file.close()
            self.file.close()

    def _truncate_tail(self) -> None:
        """Drop unreferenced clusters at the end of the file (never below its size at open)."""
        try:
            end = (self.refcounts.highest_used() + 1) << self.cluster_bits
        except CorruptImage:
            return  # best effort: a damaged refcount table keeps the file as it is
        end = max(end, self._open_file_size)
        if self.file.size() > end:
            self.file.truncate(end)

    # ---- dirty images ------------------------------------------------------------------------

    def _repair_dirty(self) -> None:
        res = self.check(repair=True, fix_errors=True)
        if res.corruptions:
            self.writable = False
            self.read_only_reason = ("dirty image whose refcounts could not be rebuilt: "
                                     + res.corruptions[0])
            return
        self.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
        self.file.pwrite(HEADER_INCOMPATIBLE_FEATURES_AT,
                         struct.pack(">Q", self.incompatible_features))
        self.file.sync()

    # ---- check -----------------------------------------------------------------------------

    def check(self, repair: bool = False, *, fix_errors: bool = False) -> CheckResult:
        """qemu-img check's walk: expected refcounts from every L1/L2 table (active and
        snapshots), the refcount structures, the snapshot table and the bitmaps; compare
        with the stored refcounts.  ``repair`` fixes leaks; ``fix_errors`` also raises
        refcounts that are too low (what a dirty image needs).  Also checks COPIED flags."""
        if repair or fix_errors:
            self.require_writable()
        if self.writable and self._modified:
            self.flush()
            self.refcounts.release_pool()
        res = CheckResult(self.path)
        cb, cs = self.cluster_bits, self._cs
        file_size = self.file.size()
        expected: dict[int, int] = {}

        def inc(off: int, n: int, what: str) -> None:
            if n <= 0:
                return
            if off + n - file_size >= cs:
                res.corruptions.append(f"{what} at 0x{off:x} lies past the end of the file")
            for ci in range(off >> cb, ((off + n - 1) >> cb) + 1):
                expected[ci] = expected.get(ci, 0) + 1

        inc(0, cs, "header")
        if len(self.l1):
            inc(self.l1_table_offset, len(self.l1) * 8, "L1 table")
        allocated = self._check_l1(self.l1, "active", inc, res, file_size)
        if self.snapshots_size:
            inc(self.snapshots_offset, self.snapshots_size, "snapshot table")
        for i, sn in enumerate(self.snapshots):
            if not sn.l1_size:
                continue
            inc(sn.l1_table_offset, sn.l1_size * 8, f"snapshot[{i}] L1 table")
            l1 = words(self.file.pread_exact(sn.l1_table_offset, sn.l1_size * 8, "L1 table"))
            self._check_l1(l1, f"snapshot[{i}]", inc, res, file_size)
        rc = self.refcounts
        if rc.reftable_clusters:
            inc(rc.reftable_offset, rc.reftable_clusters * cs,
                "refcount table")
        for r, e in enumerate(rc.reftable):
            off = e & REFT_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                res.corruptions.append(f"refcount block {r} offset 0x{off:x} unaligned")
                continue
            inc(off, cs, f"refcount block {r}")
        self._check_bitmaps(inc, res, file_size)

        actual, problems = rc.stored()
        res.corruptions += problems
        fixes: dict[int, int] = {}
        maxval = (1 << rc.refcount_bits) - 1
        for ci in sorted(set(expected) | set(actual)):
            want, have = expected.get(ci, 0), actual.get(ci, 0)
            if want > maxval:
                res.corruptions.append(f"cluster {ci}: {want} references exceed the "
                                       f"{rc.refcount_bits}-bit refcount")
            elif have < want:
                res.corruptions.append(f"cluster {ci}: refcount={have} but {want} "
                                       "references (refcount too low)")
                if fix_errors:
                    fixes[ci] = want
            elif have > want:
                res.leaks.append(f"cluster {ci}: refcount={have} but {want} references "
                                 "(leaked)")
                if repair:
                    fixes[ci] = want
        if fixes:
            used = max(list(expected) + list(actual) + [0]) + 1
            rc.apply_above(fixes, max(used, div_round_up(file_size, cs)))
            if repair:
                res.leaks_fixed = len(res.leaks)
                res.leaks = []
            if fix_errors:
                low = [c for c in res.corruptions if "refcount too low" in c]
                res.corruptions_fixed += len(low)
                res.corruptions = [c for c in res.corruptions if "refcount too low" not in c]
        self._check_copied(res, repair or fix_errors)
        res.allocated_clusters = allocated
        res.total_clusters = div_round_up(self.virtual_size, cs)
        res.image_end_offset = (max(expected) + 1) * cs if expected else 0
        return res

    def _check_l1(self, l1: array[int], which: str, inc: Callable[[int, int, str], None],
                  res: CheckResult, file_size: int) -> int:
        cs = self._cs
        allocated = 0
        step = 2 if self.extended_l2 else 1
        for i, l1e in enumerate(l1):
            off = l1e & L1E_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                res.corruptions.append(f"{which} l1[{i}]: L2 table offset 0x{off:x} unaligned")
                continue
            inc(off, cs, f"{which} L2 table l1[{i}]")
            if off + cs > file_size:
                continue
            l2 = words(self.file.pread_exact(off, cs, "L2 table"))
            for j in range(0, len(l2), step):
                e = l2[j]
                if not e and (step == 1 or not l2[j + 1]):
                    continue
                where = f"{which} l1[{i}] l2[{j // step}]"
                if e & QCOW_OFLAG_COMPRESSED:
                    if self.data_file is not None:
                        res.corruptions.append(f"{where}: compressed cluster with a data file")
                        continue
                    coff, clen = compressed_range(e, self.cluster_bits)
                    inc(coff, clen, f"{where} compressed cluster")
                    allocated += 1
                    continue
                if step == 2:
                    bm = l2[j + 1]
                    if (bm >> 32) & bm & QCOW_L2_BITMAP_ALL_ALLOC:
                        res.corruptions.append(f"{where}: subcluster allocated and zero")
                    if bm & QCOW_L2_BITMAP_ALL_ALLOC and not self._has_host(e):
                        res.corruptions.append(f"{where}: allocated subclusters, no cluster")
                host = e & L2E_OFFSET_MASK
                if not host:
                    if self._has_host(e) and not (e & QCOW_OFLAG_ZERO and step == 1):
                        allocated += 1
                    continue
                if host % cs:
                    res.corruptions.append(f"{where}: data offset 0x{host:x} unaligned")
                    continue
                if not (e & QCOW_OFLAG_ZERO and step == 1):
                    allocated += 1
                if self.data_file is None:
                    inc(host, cs, f"{where} data cluster")
        return allocated

    def _check_bitmaps(self, inc: Callable[[int, int, str], None], res: CheckResult,
                       file_size: int) -> None:
        # Like qemu: bitmaps count only while their auto-clear bit vouches for them.
        if not self.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            return
        found = self._bitmap_regions(file_size)
        res.corruptions += found.problems
        for r in found.regions:
            inc(r.file_offset, r.length, r.what)

    def _bitmap_regions(self, file_size: int) -> BitmapRegions:
        if self.hdr is None:
            return BitmapRegions([], [])
        return bitmap_regions(self.file, self.hdr, file_size)

    def _check_copied(self, res: CheckResult, repair: bool) -> None:
        """In the active tables, COPIED must be set exactly where the refcount is 1."""
        if self.data_file is not None:
            return
        cb, cs = self.cluster_bits, self._cs
        step = 2 if self.extended_l2 else 1
        l1_fixed = False
        for i, l1e in enumerate(self.l1):
            off = l1e & L1E_OFFSET_MASK
            if not off or off % cs or off + cs > self.file.size():
                continue
            rc = self.refcounts.get(off >> cb)
            if (rc == 1) != bool(l1e & QCOW_OFLAG_COPIED):
                res.corruptions.append(f"l1[{i}]: COPIED flag wrong for refcount {rc}")
                if repair:
                    self.l1[i] = off | (QCOW_OFLAG_COPIED if rc == 1 else 0)
                    l1_fixed = True
                    res.corruptions_fixed += 1
                    res.corruptions.pop()
            l2 = words(self.file.pread_exact(off, cs, "L2 table"))
            changed = False
            for j in range(0, len(l2), step):
                e = l2[j]
                host = e & L2E_OFFSET_MASK
                if e & QCOW_OFLAG_COMPRESSED or not host or host % cs:
                    continue
                rc = self.refcounts.get(host >> cb)
                if (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                    res.corruptions.append(f"l1[{i}] l2[{j // step}]: COPIED flag wrong for "
                                           f"refcount {rc}")
                    if repair:
                        l2[j] = (e & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if rc == 1
                                                               else 0)
                        changed = True
                        res.corruptions_fixed += 1
                        res.corruptions.pop()
            if changed:
                self.file.pwrite(off, words_bytes(l2))
                self.l2_cache.drop(off)
        if l1_fixed:
            self.file.pwrite(self.l1_table_offset, words_bytes(self.l1))
        if repair:
            self.file.sync()

    # ---- inspection ------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "compat": "1.1" if self.version >= 3 else "0.10",
            "version": self.version,
            "cluster_size": self._cs,
            "refcount_bits": self.refcounts.refcount_bits,
            "lazy_refcounts": bool(self.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS),
            "extended_l2": self.extended_l2,
            "compression_type": COMPRESSION_NAMES.get(self.compression_type, "?"),
            "data_file": self.data_file_name,
            "data_file_raw": bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW),
            "dirty": bool(self.incompatible_features & QCOW2_INCOMPAT_DIRTY),
            "corrupt": bool(self.incompatible_features & QCOW2_INCOMPAT_CORRUPT),
            "snapshots": len(self.snapshots),
            "backing_file": self.backing_name,
            "backing_format": self.backing_format,
            "l1_size": len(self.l1),
        }


# ---- create --------------------------------------------------------------------------------

# qemu's names for formats recorded in the backing-format extension.
_QEMU_FORMAT_NAMES = {"raw": "raw", "qcow2": "qcow2", "qcow": "qcow", "vhd": "vpc"}

_FEATURE_TABLE = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


def _ext(etype: int, data: bytes) -> bytes:
    return struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)


def create(path: str, virtual_size: int, *, backing_name: str | None = None,
           backing_format: str | None = None, cluster_size: int = DEFAULT_CLUSTER_SIZE,
           compat: str = "1.1", refcount_bits: int = 16, extended_l2: bool = False,
           lazy_refcounts: bool = False, data_file: str | None = None) -> None:
    """Create an empty qcow2 image (optionally over a backing file, or with an external
    data file).  Raises ValueError for options that cannot be combined."""
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise ValueError(f"{path}: unknown compat level {compat!r} (use 0.10 or 1.1)")
    if cluster_size < 1 << MIN_CLUSTER_BITS or cluster_size > 1 << MAX_CLUSTER_BITS or (
            cluster_size & (cluster_size - 1)):
        raise ValueError(f"{path}: cluster size must be a power of two from 512 B to 2 MiB "
                         f"(cluster_size={cluster_size})")
    cb = cluster_size.bit_length() - 1
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"{path}: refcount width must be a power of two up to 64 "
                         f"(refcount_bits={refcount_bits})")
    if version == 2 and (refcount_bits != 16 or extended_l2 or lazy_refcounts or data_file):
        raise ValueError(f"{path}: compat 0.10 supports none of refcount_bits!=16, "
                         "extended_l2, lazy_refcounts, data_file")
    if extended_l2 and cb < MIN_CLUSTER_BITS_EXTL2:
        raise ValueError(f"{path}: extended L2 entries need clusters of 16 KiB or more")
    if virtual_size < 0:
        raise ValueError(f"{path}: negative size")
    virtual_size = div_round_up(virtual_size, SECTOR) * SECTOR  # like qemu-img create
    if data_file and PROTOCOL_RE.match(data_file):
        raise ValueError(f"{path}: data file names a protocol, not a file ({data_file!r})")
    fmt_name = None
    if backing_format:
        fmt_name = _QEMU_FORMAT_NAMES[canonical_format(backing_format)]
    name_bytes = os.fsencode(backing_name) if backing_name else b""
    if len(name_bytes) > QCOW_MAX_BACKING_FILE_NAME:
        raise ValueError(f"{path}: backing file name longer than 1023 bytes")

    l2_bits = cb - (4 if extended_l2 else 3)
    l1_entries = div_round_up(virtual_size, cluster_size << l2_bits)
    if l1_entries * 8 > QCOW_MAX_L1_SIZE:
        raise ValueError(f"{path}: virtual size too large for this cluster size "
                         f"(size={virtual_size}, cluster_size={cluster_size})")
    l1_clusters = max(1, div_round_up(l1_entries * 8, cluster_size))
    refcount_order = refcount_bits.bit_length() - 1
    epb = cluster_size * 8 // refcount_bits
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        rb_new = div_round_up(total, epb)
        rt_new = max(1, div_round_up(rb_new * 8, cluster_size))
        if (rb_new, rt_new) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = rb_new, rt_new
    rt_off = cluster_size
    rb_off = rt_off + rt_clusters * cluster_size
    l1_off = rb_off + rb_count * cluster_size

    incompat = compat_bits = 0
    if extended_l2:
        incompat |= QCOW2_INCOMPAT_EXTL2
    if data_file:
        incompat |= QCOW2_INCOMPAT_DATA_FILE
    if lazy_refcounts:
        compat_bits |= QCOW2_COMPAT_LAZY_REFCOUNTS
    header_length = QCOW2_V3_HEADER_LENGTH if version == 3 else QCOW2_V2_HEADER_LENGTH
    exts = b""
    if fmt_name:
        exts += _ext(QCOW2_EXT_MAGIC_BACKING_FORMAT, fmt_name.encode())
    if data_file:
        exts += _ext(QCOW2_EXT_MAGIC_DATA_FILE, os.fsencode(data_file))
    table = b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in _FEATURE_TABLE)
    feature_ext = _ext(QCOW2_EXT_MAGIC_FEATURE_TABLE, table) if version == 3 else b""
    end_ext = _ext(QCOW2_EXT_MAGIC_END, b"")
    if header_length + len(exts) + len(feature_ext) + len(end_ext) + len(name_bytes) <= (
            cluster_size):
        exts += feature_ext  # only a help for other tools: dropped when space is short
    exts += end_ext
    backing_off = header_length + len(exts) if name_bytes else 0
    if header_length + len(exts) + len(name_bytes) > cluster_size:
        raise ValueError(f"{path}: header, extensions and backing name do not fit in one "
                         f"cluster (cluster_size={cluster_size})")
    head = struct.pack(">4sIQIIQIIQQIIQ", QCOW_MAGIC, version, backing_off, len(name_bytes), cb,
                       virtual_size, 0, l1_entries, l1_off, rt_off, rt_clusters, 0, 0)
    if version == 3:
        head += struct.pack(">QQQII", incompat, compat_bits, 0, refcount_order, header_length)
        head += bytes(header_length - len(head))  # compression_type 0 (zlib) + padding
    head += exts + name_bytes

    reftable = array("Q", [rb_off + i * cluster_size for i in range(rb_count)])
    reftable.extend([0] * (rt_clusters * cluster_size // 8 - rb_count))
    blocks = bytearray(rb_count * cluster_size)
    for ci in range(total):  # every metadata cluster has refcount 1
        bit = ci * refcount_bits
        if refcount_bits >= 8:
            w = refcount_bits // 8
            blocks[ci * w + w - 1] = 1
        else:
            blocks[bit >> 3] |= 1 << (bit & 7)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.pwrite(fd, words_bytes(reftable), rt_off)
        os.pwrite(fd, bytes(blocks), rb_off)
        os.ftruncate(fd, l1_off + l1_clusters * cluster_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if data_file:
        full = data_file if os.path.isabs(data_file) else os.path.join(
            os.path.dirname(os.path.abspath(path)), data_file)
        dfd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(dfd).st_size < virtual_size:
                os.ftruncate(dfd, virtual_size)
            os.fsync(dfd)
        finally:
            os.close(dfd)


__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "L1E_OFFSET_MASK",
    "QCOW2_AUTOCLEAR_BITMAPS",
    "QCOW2_AUTOCLEAR_DATA_FILE_RAW",
    "QCOW2_INCOMPAT_COMPRESSION",
    "QCOW2_INCOMPAT_CORRUPT",
    "QCOW2_INCOMPAT_DATA_FILE",
    "QCOW2_INCOMPAT_DIRTY",
    "REFT_OFFSET_MASK",
    "Qcow2Header",
    "Qcow2Image",
    "Qcow2Snapshot",
    "create",
    "parse_header",
]
