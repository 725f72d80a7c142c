"""Layer: formats.  qcow (version 1) images, read-only.

qcow v1 is qcow2's ancestor: a 48-byte big-endian header, an optional backing file name, one
L1 table of 64-bit file offsets of L2 tables, and L2 tables of 64-bit file offsets of data
clusters.  There are no refcounts, snapshots, zero clusters or extensions.  cowd reads qcow v1
images (as bases under a qcow2 or VHD overlay) and never writes them: a writable open comes
back read-only with ``read_only_reason`` set, and the base class refuses every write.

Invariants:

- Every header field is checked against a named limit and against the file size before
  anything it sizes is allocated; the L1 table is read whole at open (bounded by
  ``QCOW_MAX_L1_BYTES``), L2 tables on demand into an LRU of ``L2_CACHE_TABLES`` tables.
- Malformed metadata raises :class:`CorruptImage`, features we do not implement (encryption,
  other versions) :class:`UnsupportedImage`; both read ``<file>: <what> (<field>=<value>)``.

Theory of operation (what qemu's block/qcow.c does, which is what images in the wild rely on):

- ``virtual_size`` is the header's ``size`` rounded *down* to 512-byte sectors (qemu keeps a
  sector count), while the L1 table covers ``ceil(size / 2**(cluster_bits + l2_bits))``
  entries computed from the unrounded size.
- A zero L1 entry or a zero L2 entry means "not in this layer": read the backing file, or
  zeroes when there is none.  qcow v1 has no "reads as zero" state of its own.
- An L2 entry with bit 63 (``QCOW_OFLAG_COMPRESSED``) set describes a compressed cluster:
  bits ``62 .. 63-cluster_bits`` hold the compressed length in bytes (always below one
  cluster), the bits below hold the file offset of a raw-deflate stream (no zlib header) that
  inflates to exactly one cluster.  Any other non-zero entry is the file offset of a data
  cluster; qemu only demands that it be 512-byte aligned, not cluster aligned.
- ``resolve`` merges consecutive clusters of one kind: unallocated runs (skipping whole L1
  spans with a zero entry) and data runs whose file offsets are contiguous.  A compressed
  cluster is always its own extent.  A bad entry *after* the first cluster only ends the run;
  it is reported when the caller asks for that cluster itself.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from typing import Any

from .base import SECTOR, CheckResult, Extent, HostFile, Image, Kind, NearOpener, require
from .errors import CorruptImage, UnsupportedImage

QCOW_MAGIC = b"QFI\xfb"
QCOW_VERSION = 1
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63

# magic, version, backing_file_offset, backing_file_size, mtime, size, cluster_bits, l2_bits,
# padding, crypt_method, l1_table_offset
_HEADER = struct.Struct(">4sIQIIQBBHIQ")
QCOW_HEADER_SIZE = _HEADER.size  # 48 bytes

# qemu accepts clusters of 512 B .. 64 KiB and L2 tables of 512 B .. 64 KiB (l2_bits counts
# 8-byte entries).  Larger values would let one compressed length or one L2 table grow past
# what this reader is prepared to buffer.
QCOW_MIN_CLUSTER_BITS = 9
QCOW_MAX_CLUSTER_BITS = 16
QCOW_MIN_L2_BITS = 9 - 3
QCOW_MAX_L2_BITS = 16 - 3

# qemu's limit for the backing file name (it keeps it in a 1024-byte C string).
QCOW_MAX_BACKING_FILE_SIZE = 1023

# The L1 table is read whole at open.  32 MiB (4 Mi entries, as qcow2's QCOW_MAX_L1_SIZE)
# covers 128 GiB at the smallest geometry and 8 TiB at qemu's default (4 KiB clusters, 512
# entries per L2 table) -- far beyond any qcow v1 image anyone still has.
QCOW_MAX_L1_BYTES = 32 << 20

# L2 tables kept decoded in memory (qemu's qcow driver keeps 16 too): at most 1 MiB of entries.
L2_CACHE_TABLES = 16

_L1_ENTRY_BYTES = 8


def _be64_array(data: bytes) -> array[int]:
    table = array("Q", data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


class QcowImage(Image):
    format_name = "qcow"
    checkable = True

    def __init__(self, path: str, file: HostFile, writable: bool):
        super().__init__(path, file, writable)
        self.cluster_bits = 0
        self.l2_bits = 0
        self.l1_size = 0
        self.l1_table_offset = 0
        self.l1: array[int] = array("Q")
        self.mtime = 0
        self.header_size_bytes = 0  # the header's `size` field, before rounding to sectors
        self.backing_file_offset = 0
        self.backing_file_size = 0
        self.file_size = 0  # of the host file at open; the image is never written
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._cluster_cache: tuple[int, bytes] | None = None  # (file offset, inflated cluster)

    # ---- probing and opening -------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        return (len(head) >= QCOW_HEADER_SIZE and head[:4] == QCOW_MAGIC
                and struct.unpack_from(">I", head, 4)[0] == QCOW_VERSION)

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool,
             near: NearOpener | None = None) -> QcowImage:
        img = cls(path, file, False)
        if writable:
            img.read_only_reason = "qcow (v1) images are read-only in cowd; convert to qcow2"
        img._parse(file.size())
        return img

    def _parse(self, file_size: int) -> None:
        path = self.path
        self.file_size = file_size
        require(file_size >= QCOW_HEADER_SIZE, path, "file too small for a qcow header",
                "file_size", file_size)
        raw = self.file.pread_exact(0, QCOW_HEADER_SIZE, "qcow header")
        (magic, version, backing_file_offset, backing_file_size, mtime, size, cluster_bits,
         l2_bits, _padding, crypt_method, l1_table_offset) = _HEADER.unpack(raw)

        require(magic == QCOW_MAGIC, path, "not a qcow image: bad magic", "magic", magic)
        if version != QCOW_VERSION:
            raise UnsupportedImage(path, "unsupported qcow version", "version", version)
        require(QCOW_MIN_CLUSTER_BITS <= cluster_bits <= QCOW_MAX_CLUSTER_BITS, path,
                "cluster size out of range (512 B .. 64 KiB)", "cluster_bits", cluster_bits)
        require(QCOW_MIN_L2_BITS <= l2_bits <= QCOW_MAX_L2_BITS, path,
                "L2 table size out of range (512 B .. 64 KiB)", "l2_bits", l2_bits)
        if crypt_method == QCOW_CRYPT_AES:
            raise UnsupportedImage(path, "encrypted qcow images are not supported",
                                   "crypt_method", crypt_method)
        require(crypt_method == QCOW_CRYPT_NONE, path, "unknown encryption method",
                "crypt_method", crypt_method)

        shift = cluster_bits + l2_bits
        l1_size = (size + (1 << shift) - 1) >> shift
        require(l1_size * _L1_ENTRY_BYTES <= QCOW_MAX_L1_BYTES, path,
                "image too large: L1 table exceeds its limit", "size", size)
        l1_bytes = l1_size * _L1_ENTRY_BYTES
        if l1_size:
            require(l1_table_offset >= QCOW_HEADER_SIZE, path, "L1 table overlaps the header",
                    "l1_table_offset", l1_table_offset)
            require(l1_table_offset + l1_bytes <= file_size, path,
                    "L1 table past end of file", "l1_table_offset", l1_table_offset)

        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_bits = l2_bits
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.mtime = mtime
        self.header_size_bytes = size
        self.virtual_size = size // SECTOR * SECTOR  # qemu counts whole sectors

        if backing_file_offset:
            require(backing_file_size <= QCOW_MAX_BACKING_FILE_SIZE, path,
                    "backing file name too long", "backing_file_size", backing_file_size)
            require(backing_file_offset >= QCOW_HEADER_SIZE, path,
                    "backing file name overlaps the header", "backing_file_offset",
                    backing_file_offset)
            require(backing_file_offset + backing_file_size <= file_size, path,
                    "backing file name past end of file", "backing_file_offset",
                    backing_file_offset)
            name = self.file.pread_exact(backing_file_offset, backing_file_size,
                                         "backing file name")
            name = name.split(b"\0", 1)[0]  # qemu treats it as a C string
            self.backing_file_offset = backing_file_offset
            self.backing_file_size = backing_file_size
            self.backing_name = os.fsdecode(name) or None
        self.backing_format = None  # qcow v1 does not record it: the opener probes

        self.l1 = _be64_array(self.file.pread_exact(l1_table_offset, l1_bytes, "L1 table")
                              if l1_size else b"")
        self._check_l1()

    def _check_l1(self) -> None:
        """Every L2 table the L1 names must lie inside the file and after the header."""
        if not self.l1_size:
            return
        l2_bytes = _L1_ENTRY_BYTES << self.l2_bits
        limit = self.file_size - l2_bytes
        if max(self.l1) <= limit:  # the common case, checked in C
            return
        for index, l2_offset in enumerate(self.l1):
            if l2_offset and l2_offset > limit:
                raise CorruptImage(self.path, "L2 table past end of file", f"l1[{index}]",
                                   l2_offset)

    # ---- mapping -------------------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> array[int]:
        """The L2 table for one L1 entry (which must be non-zero), through the LRU."""
        l2_offset = self.l1[l1_index]
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            self._l2_cache.move_to_end(l2_offset)
            return table
        l2_bytes = _L1_ENTRY_BYTES << self.l2_bits
        field = f"l1[{l1_index}]"
        require(l2_offset >= QCOW_HEADER_SIZE, self.path, "L2 table overlaps the header",
                field, l2_offset)
        require(l2_offset + l2_bytes <= self.file_size, self.path, "L2 table past end of file",
                field, l2_offset)
        table = _be64_array(self.file.pread_exact(l2_offset, l2_bytes, "L2 table"))
        self._l2_cache[l2_offset] = table
        if len(self._l2_cache) > L2_CACHE_TABLES:
            self._l2_cache.popitem(last=False)
        return table

    def _entry(self, guest_offset: int) -> int:
        """The raw L2 entry for the cluster holding guest_offset (0 if the L1 entry is 0)."""
        l1_index = guest_offset >> (self.cluster_bits + self.l2_bits)
        if not self.l1[l1_index]:
            return 0
        l2_index = (guest_offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
        return self._l2_table(l1_index)[l2_index]

    def _compressed(self, entry: int, field: str) -> tuple[int, int]:
        """(file offset, length in bytes) of a compressed cluster's stream, validated."""
        shift = 63 - self.cluster_bits
        file_offset = entry & ((1 << shift) - 1)
        length = (entry >> shift) & (self.cluster_size - 1)
        require(length > 0, self.path, "compressed cluster of length zero", field, entry)
        require(file_offset >= QCOW_HEADER_SIZE, self.path,
                "compressed cluster overlaps the header", field, entry)
        require(file_offset + length <= self.file_size, self.path,
                "compressed cluster past end of file", field, entry)
        return file_offset, length

    def _field(self, guest_offset: int) -> str:
        l1_index = guest_offset >> (self.cluster_bits + self.l2_bits)
        l2_index = (guest_offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
        return f"l1[{l1_index}].l2[{l2_index}]"

    def resolve(self, guest_offset: int, length: int) -> Extent:
        end = min(guest_offset + length, self.virtual_size)
        if guest_offset < 0 or guest_offset >= end:
            return Extent(guest_offset, 0, Kind.UNALLOCATED)
        cs = self.cluster_size
        cluster_guest_offset = guest_offset & ~(cs - 1)
        in_cluster = guest_offset - cluster_guest_offset
        entry = self._entry(guest_offset)

        if entry & QCOW_OFLAG_COMPRESSED:
            file_offset, compressed_length = self._compressed(entry, self._field(guest_offset))
            n = min(end, cluster_guest_offset + cs) - guest_offset
            return Extent(guest_offset, n, Kind.COMPRESSED, self.file, file_offset,
                          compressed_length=compressed_length,
                          cluster_guest_offset=cluster_guest_offset)

        pos = cluster_guest_offset + cs
        if entry == 0:
            span = 1 << (self.cluster_bits + self.l2_bits)
            while pos < end:
                if not self.l1[pos >> (self.cluster_bits + self.l2_bits)]:
                    pos = (pos | (span - 1)) + 1  # the whole L1 span is unallocated
                    continue
                if self._entry_or_none(pos) != 0:
                    break
                pos += cs
            return Extent(guest_offset, min(pos, end) - guest_offset, Kind.UNALLOCATED)

        field = self._field(guest_offset)
        require(entry % SECTOR == 0, self.path, "data cluster not sector-aligned", field, entry)
        require(entry < self.file_size, self.path, "data cluster past end of file", field,
                entry)
        expected = entry + cs
        while pos < end and expected < self.file_size and self._entry_or_none(pos) == expected:
            pos += cs
            expected += cs
        return Extent(guest_offset, min(pos, end) - guest_offset, Kind.DATA, self.file,
                      entry + in_cluster)

    def _entry_or_none(self, guest_offset: int) -> int | None:
        """Like _entry, but a broken L2 table only ends a run (None) instead of raising."""
        try:
            return self._entry(guest_offset)
        except CorruptImage:
            return None

    def read_compressed(self, extent: Extent) -> bytes:
        cluster = self._inflate(extent.file_offset, extent.compressed_length,
                                extent.cluster_guest_offset)
        start = extent.guest_offset - extent.cluster_guest_offset
        return cluster[start : start + extent.length]

    def _inflate(self, file_offset: int, compressed_length: int,
                 cluster_guest_offset: int) -> bytes:
        cached = self._cluster_cache
        if cached is not None and cached[0] == file_offset:
            return cached[1]
        field = self._field(cluster_guest_offset)
        stream = self.file.pread_exact(file_offset, compressed_length, "compressed cluster")
        try:
            # Raw deflate; max_length bounds the output to one cluster whatever the stream says.
            cluster = zlib.decompressobj(-15).decompress(stream, self.cluster_size)
        except zlib.error as e:
            raise CorruptImage(self.path, f"compressed cluster does not inflate: {e}", field,
                               file_offset) from None
        # Like qemu: the stream must fill the cluster (it may stop short of its end marker).
        require(len(cluster) == self.cluster_size, self.path,
                "compressed cluster inflates to less than a cluster", field, len(cluster))
        self._cluster_cache = (file_offset, cluster)
        return cluster

    # ---- inspection ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "cluster_size": self.cluster_size,
            "cluster_bits": self.cluster_bits,
            "l2_bits": self.l2_bits,
            "l1_size": self.l1_size,
            "l1_table_offset": self.l1_table_offset,
            "mtime": self.mtime,
            "backing_file": self.backing_name,
            "backing_format": None,
            "encrypted": False,
        }

    def check(self, repair: bool = False) -> CheckResult:
        """Tables and clusters inside the file, and no two of them overlapping.

        qcow v1 has no refcounts, so there are no leaks to find.  Nothing is ever repaired.
        """
        res = CheckResult(self.path)
        cs = self.cluster_size
        l2_bytes = _L1_ENTRY_BYTES << self.l2_bits
        shift = self.cluster_bits + self.l2_bits
        regions: list[tuple[int, int, str]] = [(0, QCOW_HEADER_SIZE, "header")]
        if self.backing_file_size:
            regions.append((self.backing_file_offset,
                            self.backing_file_offset + self.backing_file_size, "backing name"))
        if self.l1_size:
            regions.append((self.l1_table_offset,
                            self.l1_table_offset + self.l1_size * _L1_ENTRY_BYTES, "L1 table"))
        total = (self.virtual_size + cs - 1) // cs
        res.total_clusters = total
        for l1_index, l2_offset in enumerate(self.l1):
            if not l2_offset:
                continue
            name = f"l1[{l1_index}]"
            if l2_offset + l2_bytes > self.file_size:
                res.corruptions.append(f"L2 table past end of file ({name}={l2_offset:#x})")
                continue
            regions.append((l2_offset, l2_offset + l2_bytes, f"L2 table {name}"))
            table = _be64_array(self.file.pread_exact(l2_offset, l2_bytes, "L2 table"))
            for l2_index, entry in enumerate(table):
                if not entry:
                    continue
                guest = (l1_index << shift) | (l2_index << self.cluster_bits)
                if guest < self.virtual_size:
                    res.allocated_clusters += 1
                where = f"cluster {name}.l2[{l2_index}]"
                if entry & QCOW_OFLAG_COMPRESSED:
                    try:
                        start, length = self._compressed(entry, f"{name}.l2[{l2_index}]")
                    except CorruptImage as e:
                        res.corruptions.append(str(e))
                        continue
                    regions.append((start, start + length, where))
                    continue
                if entry % SECTOR or entry + cs > self.file_size:
                    res.corruptions.append(
                        f"data cluster misaligned or past end of file ({where}={entry:#x})")
                    continue
                regions.append((entry, entry + cs, where))
        regions.sort()
        reach, reach_name = 0, ""  # the furthest end so far, and whose it is
        for start, end, name in regions:
            if start < reach:
                res.corruptions.append(f"{name} at {start:#x} overlaps {reach_name}")
            if end > reach:
                reach, reach_name = end, name
        res.image_end_offset = max((end for _s, end, _n in regions), default=0)
        return res
