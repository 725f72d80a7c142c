"""Layer: formats.vhd, the bottom (imports nothing of the package).  The on-disk structures
of the "Virtual Hard Disk Image Format Specification", 1.0 (all big-endian), and the rules that
size a disk:

- *fixed*: the guest bytes, then the 512-byte hard disk footer.
- *dynamic* / *differencing*: a copy of the footer at file offset 0, the 1024-byte dynamic
  disk header (cookie "cxsparse") at the footer's Data Offset, the Block Allocation Table
  (BAT: Max Table Entries big-endian u32 sector numbers, 0xFFFFFFFF = unused), data blocks,
  and the footer in the file's last 512 bytes.  A data block is a sector bitmap (one bit a
  sector, most significant bit first, padded to whole sectors) followed by Block Size bytes.
  A differencing disk also names its parent: Parent Unique Id, Parent Time Stamp, Parent
  Unicode Name (UTF-16 BE) and up to 8 parent locators (W2ru / W2ku: UTF-16 LE Windows paths,
  relative / absolute; MacX: a UTF-8 file:// URL).

Invariants:

- No I/O here: bytes in, structures out, and back (``pack`` computes the checksum).
- The virtual size follows qemu's rule so that every byte matches ``qemu-img convert -f
  vpc``: cylinders x heads x sectors-per-track sectors, except for the creator applications
  that size by Current Size (Hyper-V, disk2vhd, XenServer, qemu's force_size) and for the
  maximal geometry.  Images we create have a Current Size equal to their geometry's size,
  or the maximal geometry, so that rule and libvhdi's (always Current Size) agree.
- The limits (``VHD_MAX_*``) bound every length, count and offset a file controls; the codec
  (image.py) checks them before anything is read or allocated.
"""

from __future__ import annotations

import array
import itertools
import struct
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from ..base import SECTOR

# ---- on-disk constants (the spec's names) -----------------------------------------------------

VHD_COOKIE = b"conectix"  # hard disk footer cookie
DYNAMIC_COOKIE = b"cxsparse"  # dynamic disk header cookie
FOOTER_SIZE = 512
DYNAMIC_HEADER_SIZE = 1024
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2  # "must always be set"
FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_TYPE_FIXED: "fixed", DISK_TYPE_DYNAMIC: "dynamic",
                   DISK_TYPE_DIFFERENCING: "differencing"}
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF  # fixed disks: no next structure
BAT_ENTRY_UNUSED = 0xFFFFFFFF
PARENT_LOCATOR_COUNT = 8
PARENT_NAME_BYTES = 512  # Parent Unicode Name field
PLATFORM_NONE = b"\0\0\0\0"
PLATFORM_W2RU = b"W2ru"  # Windows relative path, UTF-16 LE
PLATFORM_W2KU = b"W2ku"  # Windows absolute path, UTF-16 LE
PLATFORM_MACX = b"MacX"  # file URL, UTF-8
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the origin of VHD time stamps

# Footer: cookie, features, file format version, data offset, time stamp, creator
# application, creator version, creator host OS, original size, current size, cylinders,
# heads, sectors per track, disk type, checksum, unique id, saved state (then 427 reserved).
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
FOOTER_CHECKSUM_AT = 64
# Dynamic disk header up to the locators: cookie, data offset, table offset, header version,
# max table entries, block size, checksum, parent unique id, parent time stamp, reserved,
# parent unicode name.  Then 8 locators and 256 reserved bytes.
_HEADER = struct.Struct(">8sQQIIII16sII512s")
HEADER_CHECKSUM_AT = 36
_LOCATOR = struct.Struct(">4sIIIQ")  # platform code, data space, data length, reserved, offset
_LOCATORS_AT = _HEADER.size  # 576

# ---- limits ----------------------------------------------------------------------------------

# The format's size limit: 2040 GiB (qemu's VHD_MAX_SECTORS; Hyper-V's VHD limit is the same).
VHD_MAX_SECTORS = 0xFF000000
# The largest geometry the spec's algorithm produces; images carrying it are sized by Current
# Size instead (qemu's VHD_MAX_GEOMETRY): it is how qemu's force_size marks its images.
VHD_MAX_GEOMETRY = 65535 * 16 * 255
# Block sizes: a power of two; at least a sector (qemu's lower bound), at most 256 MiB (a
# 64 KiB sector bitmap; Hyper-V uses 2 MiB, Virtual PC 512 KiB and 2 MiB).
VHD_MIN_BLOCK_SIZE = SECTOR
VHD_MAX_BLOCK_SIZE = 256 << 20
DEFAULT_BLOCK_SIZE = 2 << 20
# The BAT is read whole into memory: at most 64 MiB (16 Mi entries, i.e. 2040 GiB in
# 128 KiB blocks).  A file claiming more is refused before anything is allocated.
VHD_MAX_BAT_BYTES = 64 << 20
# A parent locator's path: Windows paths are at most 32767 UTF-16 units.
VHD_MAX_LOCATOR_BYTES = 65536
# A BAT entry is a u32 sector number: no block can start at or beyond this file offset.
VHD_MAX_BLOCK_FILE_OFFSET = BAT_ENTRY_UNUSED * SECTOR
# The geometry search in ``create`` adds sectors until the geometry covers the size; the spec's
# geometry loses less than one track group, far fewer than this many sectors.
_GEOMETRY_SEARCH_LIMIT = 1 << 16

# Creator applications whose images qemu sizes by Current Size rather than by geometry:
# Hyper-V, qemu's force_size, disk2vhd, XenConverter, XenServer.
CURRENT_SIZE_CREATORS = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"})

# What we put in images we create.
CREATOR_APPLICATION = b"cowd"
CREATOR_VERSION = 0x00000001  # cowd 0.1
CREATOR_HOST_OS = b"Lnx "

_NATIVE_IS_BIG = sys.byteorder == "big"


# ---- pure structures --------------------------------------------------------------------------


def vhd_checksum(buf: bytes | bytearray, checksum_at: int) -> int:
    """One's complement of the byte sum, skipping the 4-byte checksum field."""
    total = sum(buf) - sum(buf[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


@dataclass
class Footer:
    cookie: bytes = VHD_COOKIE
    features: int = FEATURE_RESERVED
    file_format_version: int = FILE_FORMAT_VERSION
    data_offset: int = NO_DATA_OFFSET
    time_stamp: int = 0
    creator_application: bytes = CREATOR_APPLICATION
    creator_version: int = CREATOR_VERSION
    creator_host_os: bytes = CREATOR_HOST_OS
    original_size: int = 0
    current_size: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors_per_track: int = 0
    disk_type: int = DISK_TYPE_DYNAMIC
    checksum: int = 0
    unique_id: bytes = bytes(16)
    saved_state: int = 0

    @classmethod
    def unpack(cls, buf: bytes) -> Footer:
        assert len(buf) >= FOOTER_SIZE
        return cls(*_FOOTER.unpack_from(buf))

    def pack(self) -> bytes:
        """The 512 bytes with a freshly computed checksum."""
        out = bytearray(FOOTER_SIZE)
        _FOOTER.pack_into(out, 0, self.cookie, self.features, self.file_format_version,
                          self.data_offset, self.time_stamp, self.creator_application,
                          self.creator_version, self.creator_host_os, self.original_size,
                          self.current_size, self.cylinders, self.heads,
                          self.sectors_per_track, self.disk_type, 0, self.unique_id,
                          self.saved_state)
        self.checksum = vhd_checksum(out, FOOTER_CHECKSUM_AT)
        struct.pack_into(">I", out, FOOTER_CHECKSUM_AT, self.checksum)
        return bytes(out)

    @property
    def geometry_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track

    @property
    def sized_by_current_size(self) -> bool:
        """qemu's rule: Current Size for some creators and for the maximal geometry."""
        return (self.creator_application in CURRENT_SIZE_CREATORS
                or self.geometry_sectors == VHD_MAX_GEOMETRY)

    def virtual_sectors(self) -> int:
        """The disk's size in sectors (see the module docstring)."""
        if self.sized_by_current_size:
            return self.current_size // SECTOR
        return self.geometry_sectors


class FooterCheck(NamedTuple):
    """A footer, or what is wrong with the bytes that should be one (for the message)."""

    footer: Footer | None
    problem: str  # "" when footer is not None
    field: str
    value: object


def check_footer(buf: bytes) -> FooterCheck:
    """Parse a footer; on failure say what is wrong, in which field, with which value."""
    if len(buf) < FOOTER_SIZE or buf[:8] != VHD_COOKIE:
        return FooterCheck(None, "no VHD footer", "cookie", bytes(buf[:8]))
    f = Footer.unpack(buf)
    want = vhd_checksum(buf[:FOOTER_SIZE], FOOTER_CHECKSUM_AT)
    if f.checksum != want:
        return FooterCheck(None, f"footer checksum mismatch (computed {want:#010x})",
                           "checksum", f.checksum)
    return FooterCheck(f, "", "", None)


@dataclass
class ParentLocator:
    platform_code: bytes
    platform_data_space: int
    platform_data_length: int
    reserved: int
    platform_data_offset: int


@dataclass
class DynamicHeader:
    cookie: bytes = DYNAMIC_COOKIE
    data_offset: int = NO_DATA_OFFSET
    table_offset: int = 0
    header_version: int = HEADER_VERSION
    max_table_entries: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    checksum: int = 0
    parent_unique_id: bytes = bytes(16)
    parent_time_stamp: int = 0
    reserved: int = 0
    parent_unicode_name: bytes = bytes(PARENT_NAME_BYTES)
    parent_locators: list[ParentLocator] = field(default_factory=list)

    @classmethod
    def unpack(cls, buf: bytes) -> DynamicHeader:
        assert len(buf) >= DYNAMIC_HEADER_SIZE
        h = cls(*_HEADER.unpack_from(buf))
        h.parent_locators = [ParentLocator(*_LOCATOR.unpack_from(buf, _LOCATORS_AT + i * 24))
                             for i in range(PARENT_LOCATOR_COUNT)]
        return h

    def pack(self) -> bytes:
        out = bytearray(DYNAMIC_HEADER_SIZE)
        _HEADER.pack_into(out, 0, self.cookie, self.data_offset, self.table_offset,
                          self.header_version, self.max_table_entries, self.block_size, 0,
                          self.parent_unique_id, self.parent_time_stamp, self.reserved,
                          self.parent_unicode_name)
        assert len(self.parent_locators) <= PARENT_LOCATOR_COUNT
        for i, loc in enumerate(self.parent_locators):
            _LOCATOR.pack_into(out, _LOCATORS_AT + i * 24, loc.platform_code,
                               loc.platform_data_space, loc.platform_data_length,
                               loc.reserved, loc.platform_data_offset)
        self.checksum = vhd_checksum(out, HEADER_CHECKSUM_AT)
        struct.pack_into(">I", out, HEADER_CHECKSUM_AT, self.checksum)
        return bytes(out)


def bitmap_bytes(block_size: int) -> int:
    """Size of a block's sector bitmap: one bit a sector, padded to whole sectors."""
    sectors = block_size // SECTOR
    return ((sectors + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR


def bat_from_bytes(raw: bytes) -> array.array[int]:
    """The Block Allocation Table as stored (big-endian u32) -> native array."""
    bat = array.array("I")
    assert bat.itemsize == 4
    bat.frombytes(raw)
    if not _NATIVE_IS_BIG:
        bat.byteswap()
    return bat


def bat_to_bytes(bat: array.array[int]) -> bytes:
    """A native BAT -> the bytes to store."""
    raw = array.array("I", bat)
    if not _NATIVE_IS_BIG:
        raw.byteswap()
    return raw.tobytes()


class Region(NamedTuple):
    """A metadata structure's bytes in the file, [file_offset, file_end), named for messages."""

    file_offset: int
    file_end: int
    what: str


def bat_overlaps(bat: array.array[int], span: int) -> list[int]:
    """Indices of the blocks that overlap the block before them in file order (``span``: a
    block's bytes, its bitmap included)."""
    used = sorted((e, i) for i, e in enumerate(bat) if e != BAT_ENTRY_UNUSED)
    return [i1 for (e0, _), (e1, i1) in itertools.pairwise(used)
            if e0 * SECTOR + span > e1 * SECTOR]


def bat_problems(bat: array.array[int], span: int, data_end: int,
                 regions: list[Region]) -> list[str]:
    """What is wrong with a BAT: blocks past ``data_end``, over a metadata region, or over
    another block."""
    out = []
    for i, e in enumerate(bat):
        if e == BAT_ENTRY_UNUSED:
            continue
        start = e * SECTOR
        if start + span > data_end:
            out.append(f"bat[{i}]: data block past end of file ({start:#x})")
        for r0, r1, name in regions:
            if not (start + span <= r0 or r1 <= start):
                out.append(f"bat[{i}]: data block overlaps the {name} ({start:#x})")
    for i in bat_overlaps(bat, span):
        out.append(f"bat[{i}]: data block overlaps another block ({bat[i] * SECTOR:#x})")
    return out


# ---- size and geometry ------------------------------------------------------------------------


class Geometry(NamedTuple):
    """A disk's CHS geometry, as the footer records it."""

    cylinders: int
    heads: int
    sectors_per_track: int


# The maximal geometry: sized by Current Size (VHD_MAX_GEOMETRY's sectors).
MAX_GEOMETRY = Geometry(65535, 16, 255)


class CreateSize(NamedTuple):
    current_size: int  # bytes
    geometry: Geometry


def spec_geometry(total_sectors: int) -> Geometry:
    """(cylinders, heads, sectors per track) for a size, by the spec's CHS algorithm."""
    total_sectors = min(total_sectors, VHD_MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total_sectors // spt
    else:
        spt = 17
        cyl_heads = total_sectors // spt
        heads = max(4, (cyl_heads + 1023) // 1024)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total_sectors // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total_sectors // spt
    return Geometry(cyl_heads // heads, heads, spt)


def size_for_create(virtual_size: int, round_to_geometry: bool = False) -> CreateSize:
    """Current Size in bytes and the geometry for a new disk of ``virtual_size`` bytes (rounded up
    to a sector) that readers sizing by geometry (qemu, Virtual PC) and by Current Size
    (Hyper-V, libvhdi) see alike.

    By default the size is kept: the spec's geometry when it covers the size exactly, else
    the maximal geometry, which tells qemu to use Current Size (what qemu-img's force_size
    does).  ``round_to_geometry`` instead grows the size until the spec's geometry covers it,
    as qemu-img create does by default (for Virtual PC, which knows only geometry).
    """
    sectors = (virtual_size + SECTOR - 1) // SECTOR
    if sectors > VHD_MAX_SECTORS:
        raise ValueError(f"VHD size {virtual_size} above the format's limit of 2040 GiB")
    if sectors > VHD_MAX_GEOMETRY:
        return CreateSize(sectors * SECTOR, MAX_GEOMETRY)
    if not round_to_geometry:
        g = spec_geometry(sectors)
        return CreateSize(sectors * SECTOR, g if g.cylinders * g.heads * g.sectors_per_track
                          == sectors else MAX_GEOMETRY)
    for extra in range(_GEOMETRY_SEARCH_LIMIT):
        g = spec_geometry(sectors + extra)
        covered = g.cylinders * g.heads * g.sectors_per_track
        if covered >= sectors:
            if covered == VHD_MAX_GEOMETRY:
                return CreateSize(sectors * SECTOR, g)
            return CreateSize(covered * SECTOR, g)
    raise AssertionError(f"no CHS geometry covers {sectors} sectors")  # pragma: no cover


def vhd_time_stamp(unix_time: float) -> int:
    return max(0, min(int(unix_time) - VHD_EPOCH, 0xFFFFFFFF))


# ---- sector bitmaps ---------------------------------------------------------------------------


def bit_runs(bitmap: bytes | bytearray, first: int, limit: int) -> tuple[bool, int]:
    """(state, count): the run of equal bits starting at sector ``first``, at most up to
    sector ``limit`` (exclusive).  Bits are most significant first.  (A plain pair: every
    resolve of a differencing disk makes one and unpacks it at once.)"""
    nbytes = (limit + 7) // 8
    nbits = nbytes * 8
    value = int.from_bytes(bitmap[:nbytes], "big")
    pos = nbits - 1 - first  # bit position of sector ``first``
    state = bool((value >> pos) & 1)
    if state:
        value = ~value & ((1 << nbits) - 1)
    rest = value & ((1 << (pos + 1)) - 1)  # sectors first.. as bits; the run is the zeroes
    stop = nbits - rest.bit_length() if rest else nbits
    return state, min(stop, limit) - first


def set_bits(bitmap: bytearray, first: int, end: int) -> bool:
    """Set the bits of sectors [first, end); True if any bit changed."""
    changed = False
    i = first
    while i < end:
        if i % 8 == 0 and end - i >= 8:
            nfull = (end - i) // 8
            lo = i // 8
            if bitmap[lo : lo + nfull] != b"\xff" * nfull:
                bitmap[lo : lo + nfull] = b"\xff" * nfull
                changed = True
            i += nfull * 8
            continue
        mask = 0x80 >> (i % 8)
        if not bitmap[i // 8] & mask:
            bitmap[i // 8] |= mask
            changed = True
        i += 1
    return changed
