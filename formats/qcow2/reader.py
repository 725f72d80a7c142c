"""Layer: formats.qcow2, above the components (header, compressed, l2cache, refcounts) and
below writer.py.  :class:`Qcow2Reader`: an open qcow2 image that resolves guest offsets.

The reader holds the whole state of an open image: the parsed header, the active L1 table,
the :class:`~.l2cache.L2Cache` and the :class:`~.refcounts.Refcounts` it reads through, the
external data file, and the two syncs that the crash-safety rules order (rules 1 and 3 in
formats/qcow2/__init__.py; here because the L2 cache's write-back needs them as much as the
writer does).  writer.py adds writing, image.py the life cycle (open, flush, close) and check.

Invariants
----------
- Every count or offset the file controls is checked against a named limit (QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS, ...) and against the file's size before anything
  is allocated; malformed metadata raises CorruptImage, unknown features UnsupportedImage.
- The active L1 table and the refcount table live in memory; L2 tables and refcount blocks
  are cached in bounded LRUs (L2_CACHE_BYTES, REFCOUNT_CACHE_BYTES).  Refcount blocks are
  write-through; L2 tables and L1 entries are write-back (rule 3).
- Only the active L1 serves I/O.  Snapshot tables are parsed and bounds-checked; a data
  cluster may be written in place only when its L2 entry has QCOW_OFLAG_COPIED (refcount 1),
  which is also what ``Extent.writable`` reports.
- An image with the corrupt bit opens read-only (``read_only_reason`` says why).  An image
  with the dirty bit (lazy refcounts) is readable as is (image.py rebuilds its refcounts when
  it is opened writable).
- Like qemu, the disk is whole 512-byte sectors: a header size that is not a multiple of 512
  is rounded down on open (and ``create`` rounds up, as qemu-img create does).
- A relative external data file name is opened relative to the image's directory (qemu 7.2
  uses its working directory); names with a protocol prefix are refused.

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

``resolve`` is the daemon's hot path (its planner calls it on every remap-cache miss, over
long ranges), and ``_piece`` runs once per cluster it walks: it reads the L1 entry and the
L2 cache itself (not through ``_l2_get``) and tests ``_has_host`` inline, both use Kind's
members bound once (below), and a Piece is made without the named tuple's ``__new__``.
"""

from __future__ import annotations

import errno as errno_mod
import functools
import itertools
import struct
from array import array
from collections.abc import Iterator
from typing import NamedTuple, NoReturn

from ..base import SECTOR, Extent, HostFile, Image, Kind, NearOpener, require
from ..errors import CorruptImage, FormatError, ImageIOError, UnsupportedImage
from ..names import canonical_format
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
    HEADER_INCOMPATIBLE_FEATURES_AT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    QCOW2_V3_HEADER_MIN_LENGTH,
    QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_MAGIC,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    Region,
    compressed_range,
    div_round_up,
    words,
)
from .refcounts import Clash, Refcounts

# Kind's members, bound once: on Python 3.11 an enum member lookup (Kind.DATA) costs about
# 50 ns, and resolve makes several for every cluster it walks.
DATA, ZERO, UNALLOCATED, COMPRESSED = Kind.DATA, Kind.ZERO, Kind.UNALLOCATED, Kind.COMPRESSED


class Piece(NamedTuple):
    """The run of one kind from a guest offset, inside one cluster (or, where no L2 table
    is allocated, inside that table's guest range)."""

    kind: Kind
    file_offset: int  # DATA: where the run's first byte lives in the data host; else 0
    guest_end: int  # where the run ends
    writable: bool  # DATA: this layer owns the cluster (QCOW_OFLAG_COPIED) and is writable
    entry: int  # the L2 entry (its first word with extended L2); 0 without an L2 table


# Piece((kind, file_offset, guest_end, writable, entry)) without the named tuple's
# Python-level __new__ (as cowd/disk/chain.py makes its Segments): resolve makes one per
# cluster it walks, and that __new__ alone would cost it 15% on long runs.
_new_piece = functools.partial(tuple.__new__, Piece)


class Qcow2Reader(Image):
    """An open qcow2 image: its state, opening and validating, and ``resolve``."""

    format_name = "qcow2"
    checkable = True

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
        self.refcounts: Refcounts  # set by _load
        self.l2_cache: L2Cache  # set by _load
        self._cc_key: tuple[int, int] | None = None  # decompressed-cluster cache
        self._cc_data = b""
        self._open_file_size = 0
        # Guest data (or copy-up) written since the last sync of the file it went to (rule 3).
        self._data_dirty = False

    # ---- geometry helpers ----------------------------------------------------------------

    def _data_host(self) -> HostFile:
        return self.data_file if self.data_file is not None else self.file

    def _has_host(self, entry: int) -> bool:
        """A standard (non-compressed) entry that names a host cluster."""
        if entry & L2E_OFFSET_MASK:
            return True
        return self.data_file is not None and bool(entry & QCOW_OFLAG_COPIED)

    @property
    def copy_up_size(self) -> int:
        """A subcluster: with extended L2, a write of whole subclusters copies nothing."""
        return 1 << self.subcluster_bits

    # ---- probing and opening -------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        # qcow (v1) shares the magic; version 2 and later are ours (later ones are refused
        # with a clear message at open).
        return len(head) >= 8 and head[:4] == QCOW_MAGIC and struct.unpack_from(">I", head,
                                                                                  4)[0] >= 2

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
        table = read_snapshots(path, self.file, hdr, file_size)
        self.snapshots, self.snapshots_size = table.snapshots, table.size_bytes
        self._check_overlaps()

        # External data file.
        if hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE:
            if not hdr.data_file:
                raise UnsupportedImage(path, "external data file bit set but no data file "
                                       "name recorded", "incompatible_features",
                                       hdr.incompatible_features)
            self.data_file_name = hdr.data_file
        # Corrupt.
        if hdr.incompatible_features & QCOW2_INCOMPAT_CORRUPT and self.writable:
            self.writable = False
            self.read_only_reason = ("image is marked corrupt (incompatible feature bit 1); "
                                     "repair it with qemu-img check -r all")
        if self.data_file_name is not None:
            self.data_file = self._open_data_file(self.data_file_name, near)

    def _static_metadata(self) -> list[Region]:
        """The structures the header reaches directly."""
        out = [Region("header", 0, self.cluster_size)]
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

    def _in_use(self, clusters: list[int]) -> Clash | None:
        """Cheap cross-check (qemu's "cached" overlap check): is a supposedly free cluster
        in use by a structure we know of?  (Refcounts asks before it reserves clusters.)"""
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

    def _bitmap_regions(self, file_size: int) -> BitmapRegions:
        if self.hdr is None:
            return BitmapRegions([], [])
        return bitmap_regions(self.file, self.hdr, file_size)

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

    # ---- durability (rules 1 and 3) ------------------------------------------------------

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

    # ---- mapping -------------------------------------------------------------------------

    def _l2_get(self, l1_index: int) -> L2Table | None:
        """The L2 table of an active L1 entry (None where the entry is unallocated)."""
        l1e = self.l1[l1_index]
        off = l1e & L1E_OFFSET_MASK
        if not off:
            return None
        return self.l2_cache.get(off, l1_index, l1e)

    def _piece(self, guest_offset: int, guest_end: int) -> Piece:
        """The run of one kind starting at ``guest_offset``, ending by ``guest_end``."""
        cb = self.cluster_bits
        ci = guest_offset >> cb
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            raise CorruptImage(self.path, "guest offset beyond the L1 table", "offset",
                               guest_offset)
        l1e = self.l1[l1i]  # _l2_get, inline: this is the hot path
        tbl_off = l1e & L1E_OFFSET_MASK
        if not tbl_off:
            return _new_piece((UNALLOCATED, 0, min(guest_end, (l1i + 1) << (self.l2_bits + cb)),
                               False, 0))
        tbl = self.l2_cache.get(tbl_off, l1i, l1e)
        idx = ci & ((1 << self.l2_bits) - 1)
        cstart = ci << cb
        cend = min(guest_end, cstart + (1 << cb))
        if not self.extended_l2:
            e = tbl.entries[idx]
            if e & QCOW_OFLAG_COMPRESSED:
                return _new_piece((COMPRESSED, 0, cend, False, e))
            if e & QCOW_OFLAG_ZERO:
                return _new_piece((ZERO, 0, cend, False, e))
            host = e & L2E_OFFSET_MASK
            if not host and not (self.data_file is not None and e & QCOW_OFLAG_COPIED):
                return _new_piece((UNALLOCATED, 0, cend, False, e))  # (_has_host, inline)
            if host & ((1 << cb) - 1):
                raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                                   f"l2 entry of guest cluster {ci}", e)
            return _new_piece((DATA, host + (guest_offset - cstart), cend,
                               self.writable and bool(e & QCOW_OFLAG_COPIED), e))
        e = tbl.entries[2 * idx]
        bm = tbl.entries[2 * idx + 1]
        if e & QCOW_OFLAG_COMPRESSED:
            return _new_piece((COMPRESSED, 0, cend, False, e))
        self._check_bitmap(ci, e, bm)
        host = e & L2E_OFFSET_MASK
        if host & ((1 << cb) - 1):
            raise CorruptImage(self.path, "data cluster offset not cluster aligned",
                               f"l2 entry of guest cluster {ci}", e)
        sb = self.subcluster_bits
        sc = (guest_offset - cstart) >> sb
        # The run of subclusters in sc's state, with bit arithmetic (a loop over 32 bits per
        # piece cost more than the rest of a first write): `same` has a bit per subcluster
        # in that state; the run ends at the first clear bit above sc.
        alloc = bm & QCOW_L2_BITMAP_ALL_ALLOC
        zero = (bm >> 32) & QCOW_L2_BITMAP_ALL_ALLOC
        if alloc >> sc & 1:
            kind, same = DATA, alloc
        elif zero >> sc & 1:
            kind, same = ZERO, zero
        else:
            kind, same = UNALLOCATED, ~(alloc | zero)
        other = ~same & QCOW_L2_BITMAP_ALL_ALLOC & ~((1 << sc) - 1)
        j = (other & -other).bit_length() - 1 if other else QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
        run_end = min(cend, cstart + (j << sb))
        if kind is DATA:
            return _new_piece((DATA, host + (guest_offset - cstart), run_end,
                               self.writable and bool(e & QCOW_OFLAG_COPIED), e))
        return _new_piece((kind, 0, run_end, False, e))

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
            return Extent(guest_offset, 0, UNALLOCATED)
        return self._extent(guest_offset, end, self._piece(guest_offset, end))[0]

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """As :meth:`Image.extents`, looking each piece up once: the piece that ends one
        extent's run starts the next (resolving afresh looked it up twice, and an extended
        L2 cluster's refill after a first write is a run of pieces)."""
        vs = self.virtual_size
        end = vs if end is None else min(end, vs)
        if start < 0 or start > vs:
            raise ValueError(f"{self.path}: offset {start} outside the disk "
                             f"(virtual_size={vs})")
        pos = start
        nxt: Piece | None = None
        while pos < end:
            ext, nxt = self._extent(pos, end, nxt or self._piece(pos, end))
            if ext.length <= 0:
                raise CorruptImage(self.path, "resolver made no progress", "offset", pos)
            yield ext
            pos = ext.end

    def _extent(self, guest_offset: int, end: int, first: Piece) -> tuple[Extent, Piece | None]:
        """The extent starting with piece ``first`` at ``guest_offset`` (pieces merged while
        kind and mapping continue, up to ``end``), and the piece after it if one was looked
        up."""
        kind, start_file, pos, writable, entry = first
        if kind is COMPRESSED:
            if self.data_file is not None:
                raise CorruptImage(self.path, "compressed cluster in an image with an "
                                   "external data file", "l2 entry", entry)
            coff, clen = compressed_range(entry, self.cluster_bits)
            cstart = (guest_offset >> self.cluster_bits) << self.cluster_bits
            return Extent(guest_offset, pos - guest_offset, COMPRESSED, self.file, coff,
                          compressed_length=clen, cluster_guest_offset=cstart), None
        piece = self._piece
        after: Piece | None = None
        while pos < end:
            p = piece(pos, end)
            k, foff, nxt, w, _ = p
            if k is not kind or w != writable or \
                    (k is DATA and foff != start_file + (pos - guest_offset)):
                after = p
                break
            pos = nxt
        if kind is DATA:
            return Extent(guest_offset, pos - guest_offset, DATA, self._data_host(),
                          start_file, writable=writable), after
        return Extent(guest_offset, pos - guest_offset, kind), after

    def zero_host_offset(self, guest_offset: int) -> int | None:
        """The host offset of the byte at ``guest_offset`` in a run :meth:`resolve`
        answered ZERO, where its cluster keeps one (qemu's ZERO_ALLOC: qemu-img map shows
        it), else None.  Reporting only: the data path never asks."""
        cb = self.cluster_bits
        ci = guest_offset >> cb
        tbl = self._l2_get(ci >> self.l2_bits)
        if tbl is None:
            return None
        idx = ci & ((1 << self.l2_bits) - 1)
        e = tbl.entries[2 * idx if self.extended_l2 else idx]
        host = e & L2E_OFFSET_MASK
        return host + (guest_offset - (ci << cb)) if host else None

    def read_compressed(self, extent: Extent) -> bytes:
        key = (extent.file_offset, extent.compressed_length)
        if self._cc_key != key:
            stream = self.file.pread_data(extent.file_offset, extent.compressed_length)
            self._cc_data = decompress(self.path, self.compression_type, stream,
                                       self.cluster_size, extent.file_offset)
            self._cc_key = key
        at = extent.guest_offset - extent.cluster_guest_offset
        return self._cc_data[at : at + extent.length]

    # ---- corruption ----------------------------------------------------------------------

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
