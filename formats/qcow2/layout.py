"""Layer: formats.qcow2, the bottom (imports nothing of the package).  The on-disk layout:

- the spec's constants, named as in qemu's docs/interop/qcow2.txt and block/qcow2.h;
- the limits that bound every count, size and offset an image file controls (checked before
  anything is allocated: STYLE.md);
- the tunables of this implementation (cache sizes, batch sizes);
- the codec of the tables qcow2 is made of (L1, L2, refcount table: big-endian 64-bit words)
  and of the L2 entry fields more than one module reads.

Invariant: no I/O here, and nothing that depends on one open image but what its arguments say.
"""

from __future__ import annotations

import functools
import struct
import sys
from array import array
from typing import NamedTuple

from ..base import SECTOR

# ---- on-disk constants (qcow2.txt / qemu's names) --------------------------------------------

QCOW_MAGIC = b"QFI\xfb"
QCOW2_V2_HEADER_LENGTH = 72  # version 2: fixed header, no feature fields
QCOW2_V3_HEADER_MIN_LENGTH = 104  # version 3: up to and including header_length
QCOW2_V3_HEADER_LENGTH = 112  # what create() writes: + compression_type + padding

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's implementation limit (2 MiB clusters)
MIN_CLUSTER_BITS_EXTL2 = 14  # extended L2 entries need >= 16 KiB clusters
DEFAULT_CLUSTER_SIZE = 65536

# qemu's limits: the active (and every snapshot's) L1 table is at most 32 MiB, the refcount
# table at most 8 MiB; a file that claims more is refused before anything is allocated.
QCOW_MAX_L1_SIZE = 0x2000000
QCOW_MAX_REFTABLE_SIZE = 0x800000
QCOW_MAX_SNAPSHOTS = 65536
# qemu bounds the snapshot table to 1 KiB per allowed snapshot.
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_BACKING_FILE_NAME = 1023  # bytes; the spec's limit
# A data-file name lives in the header cluster; any path longer than PATH_MAX is nonsense.
QCOW_MAX_DATA_FILE_NAME = 4096
# qemu allows up to 65535 persistent bitmaps and a 64 MiB bitmap directory.
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
# L1/L2 entries address host clusters below 64 PiB (bits 9-55).
QCOW_MAX_HOST_OFFSET = 1 << 56

QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = (
    QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
    | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2
)
QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
# Auto-clear bits this code keeps valid while writing (all others are cleared on first write).
AUTOCLEAR_KEPT = QCOW2_AUTOCLEAR_DATA_FILE_RAW

QCOW2_COMPRESSION_TYPE_ZLIB = 0
QCOW2_COMPRESSION_TYPE_ZSTD = 1
COMPRESSION_NAMES = {QCOW2_COMPRESSION_TYPE_ZLIB: "zlib", QCOW2_COMPRESSION_TYPE_ZSTD: "zstd"}

QCOW2_EXT_MAGIC_END = 0
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441
FEATURE_NAME_ENTRY_SIZE = 48  # type(1) + bit(1) + name(46)
FEATURE_TYPES = {0: "incompatible", 1: "compatible", 2: "autoclear"}

# Header fields that are rewritten in place, by their byte offset in the header.
HEADER_REFCOUNT_TABLE_AT = 48  # refcount_table_offset (u64), refcount_table_clusters (u32)
HEADER_INCOMPATIBLE_FEATURES_AT = 72  # u64, version 3 only
HEADER_AUTOCLEAR_FEATURES_AT = 88  # u64, version 3 only

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
QCOW_L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32
QCOW2_COMPRESSED_SECTOR_SIZE = 512

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes, the fixed part of a table entry
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, the fixed part of a directory entry

# ---- tunables ----------------------------------------------------------------------------

# Bounded caches.  L2 tables are write-back (rule 3), refcount blocks are write-through.  A
# floor keeps a few tables even with 2 MiB clusters.
L2_CACHE_BYTES = 32 << 20
L2_CACHE_MIN_TABLES = 8
REFCOUNT_CACHE_BYTES = 8 << 20
REFCOUNT_CACHE_MIN_BLOCKS = 4
# Host clusters reserved (refcount set and synced) per batch; amortises the fdatasync that
# rule 1 needs.  At least RESERVE_BATCH_MIN_CLUSTERS, and at least what one request needs.
RESERVE_BATCH_BYTES = 1 << 20
RESERVE_BATCH_MIN_CLUSTERS = 2
# Allocating writes gather data in memory up to this much before issuing the pwrites.
WRITE_GATHER_BYTES = 8 << 20
# Largest chunk of zeroes written at once where zero flags cannot be used.
ZERO_CHUNK_BYTES = 1 << 20
# zstd streams are fed in small pieces so that a hostile stream cannot make one call produce
# unbounded output: a zstd block decodes to at most 128 KiB and needs at least 4 input bytes,
# so one call yields at most (ZSTD_FEED_BYTES / 4) * 128 KiB = 8 MiB.
ZSTD_FEED_BYTES = 256

# ---- tables and entries ------------------------------------------------------------------

_LITTLE = sys.byteorder == "little"


def words(data: bytes | bytearray) -> array[int]:
    """Big-endian 64-bit words (a table as stored) -> native array."""
    arr = array("Q")
    arr.frombytes(data)
    if _LITTLE:
        arr.byteswap()
    return arr


def words_bytes(arr: array[int]) -> bytes:
    """A native array -> big-endian 64-bit words, as stored."""
    if _LITTLE:
        arr = array("Q", arr)
        arr.byteswap()
    return arr.tobytes()


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def subclusters(first: int, end: int) -> int:
    """The allocation bits of subclusters [first, end) in an extended L2 bitmap (their zero
    bits are the same shifted left by 32)."""
    return ((1 << end) - 1) & ~((1 << first) - 1)


def allocated(bitmap: int, bits: int) -> int:
    """``bitmap`` with the subclusters of allocation ``bits`` allocated, their zero bits
    cleared."""
    return (bitmap | bits) & ~(bits << 32)


class Region(NamedTuple):
    """A metadata structure of the image file, named for messages."""

    what: str
    file_offset: int
    length: int


class HostRange(NamedTuple):
    """Bytes of the image file that one reference holds (a cluster, a compressed stream, a
    table): what a refcount counts."""

    file_offset: int
    length: int


# HostRange((file_offset, length)) without the named tuple's Python-level __new__ (as
# cowd/disk/chain.py makes its Segments): the write path makes one for every cluster it
# replaces, and a discard of allocated clusters would be 6% slower for it.
new_host_range = functools.partial(tuple.__new__, HostRange)


def compressed_range(entry: int, cluster_bits: int) -> HostRange:
    """The stream of a compressed cluster's L2 entry: a byte-granular host offset and a
    count of 512-byte sectors, split where the cluster size puts the boundary."""
    shift = 62 - (cluster_bits - 8)
    coffset = entry & ((1 << shift) - 1)
    nb_sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return HostRange(coffset, nb_sectors * QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & (SECTOR - 1)))
