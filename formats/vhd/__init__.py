"""Layer: formats.  VHD images (Virtual PC / Hyper-V, qemu's "vpc"): fixed, dynamic, differencing.

On-disk layout (the "Virtual Hard Disk Image Format Specification", 1.0; all big-endian):

- *fixed*: the guest bytes, then the 512-byte hard disk footer.
- *dynamic* / *differencing*: a copy of the footer at file offset 0, the 1024-byte dynamic
  disk header (cookie "cxsparse") at the footer's Data Offset, the Block Allocation Table
  (BAT: Max Table Entries big-endian u32 sector numbers, 0xFFFFFFFF = unused), data blocks,
  and the footer in the file's last 512 bytes.  A data block is a sector bitmap (one bit a
  sector, most significant bit first, padded to whole sectors) followed by Block Size bytes.
  A differencing disk also names its parent: Parent Unique Id, Parent Time Stamp, Parent
  Unicode Name (UTF-16 BE) and up to 8 parent locators (W2ru / W2ku: UTF-16 LE Windows paths,
  relative / absolute; MacX: a UTF-8 file:// URL).

Invariants this module keeps:

- Every length, count and offset the file controls is checked against the file size and a
  named limit (``VHD_MAX_*`` below) before anything is read or allocated.
- The virtual size follows qemu's rule so that every byte matches ``qemu-img convert -f
  vpc``: cylinders x heads x sectors-per-track sectors, except for the creator applications
  that size by Current Size (Hyper-V, disk2vhd, XenServer, qemu's force_size) and for the
  maximal geometry.  Images we create have a Current Size equal to their geometry's size,
  or the maximal geometry, so that rule and libvhdi's (always Current Size) agree.
- Semantics of the sector bitmap: in a *differencing* disk a clear bit means "ask the parent"
  (Kind.UNALLOCATED).  In a *dynamic* disk qemu reads an allocated block whole, ignoring the
  bitmap, and we do the same; a clear bit there only makes the bytes non-writable in place
  (``Extent.writable``), so a caller that writes through a remap first calls ``allocate`` and
  the bit gets set, keeping readers that do honour the bitmap (libvhdi) in agreement.

Theory of operation (writing):

- A new block goes at the end of the file, *after* the current trailing footer, which is
  never overwritten: the new footer is written first at the new end, then the block's data.
  The block's data start is aligned to ``VHD_DATA_ALIGNMENT`` (the bitmap sits just before
  it), which also leaves the old footer intact in the gap.  So the file's last 512 bytes are
  a footer before and after the allocation; qemu reads the copy at offset 0, which never
  changes, and our reader falls back to that copy when the tail is not a footer (a crash
  while the file was growing on a filesystem that persisted the new size before the new
  footer); ``check(repair=True)`` then rewrites the tail footer so libvhdi opens it again.
- Metadata that makes data reachable (BAT entries, sector bitmap bits) is updated in memory
  at once, so this object reads its own writes, and written to the file only by ``flush``:
  fdatasync (data, new blocks, new footer durable), write the dirty bitmaps and BAT sectors,
  fdatasync again.  A crash therefore never leaves a BAT entry or a set bitmap bit pointing
  at data that is not on disk; it may leak the space of blocks allocated since the last
  flush, which is harmless.  ``close`` flushes.  Dirty metadata is bounded
  (``VHD_MAX_DIRTY_BITMAP_BYTES``): past it, a write flushes by itself.
- A differencing disk takes ownership of guest bytes in 4 KiB granules, one bitmap byte
  (``VHD_GRANULE_SECTORS``; its ``cluster_size``): a write copies up from the parent the
  sectors of its first and last granule that it does not cover and are not ours yet, then
  writes its data and sets the granules' bits.  Write-zeroes and discard do the same with
  zeroes, so the zeroes hide the parent.  Reading honours any bitmap, sector by sector.
- A fixed disk is written in place.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import re
import struct
import sys
import time
import urllib.parse
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..base import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    MAX_IO_BYTES,
    NOTHING_BELOW,
    SECTOR,
    CheckResult,
    Extent,
    HostFile,
    Image,
    Kind,
    NearOpener,
    fallocate,
    require,
)
from ..errors import CorruptImage, ImageIOError, UnsupportedImage

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
_FOOTER_CHECKSUM_AT = 64
# Dynamic disk header up to the locators: cookie, data offset, table offset, header version,
# max table entries, block size, checksum, parent unique id, parent time stamp, reserved,
# parent unicode name.  Then 8 locators and 256 reserved bytes.
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_HEADER_CHECKSUM_AT = 36
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
# Clean sector bitmaps kept in memory (LRU); dirty ones stay until flushed.
VHD_MAX_CACHED_BITMAP_BYTES = 16 << 20
# Dirty sector bitmaps kept in memory between flushes before a write flushes by itself.
VHD_MAX_DIRTY_BITMAP_BYTES = 8 << 20
# New blocks put their data at this file alignment (good for O_DIRECT and page-cache I/O).
VHD_DATA_ALIGNMENT = 4096
# A differencing disk takes ownership of sectors VHD_GRANULE_SECTORS at a time (one bitmap
# byte, 4 KiB), so every bitmap byte it writes is 0x00 or 0xff: libvhdi 20210425 tests a
# bit as ``byte >> (7 - bit)`` without masking and misreads bytes whose set bits do not run
# to the byte's low-order end.  It also bounds copy-up to 4 KiB on each side of a write.
VHD_GRANULE_SECTORS = 8
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

# Allocation granularity reported for fixed disks (one linear mapping, like raw images).
FIXED_CLUSTER_SIZE = 64 << 10

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
        self.checksum = vhd_checksum(out, _FOOTER_CHECKSUM_AT)
        struct.pack_into(">I", out, _FOOTER_CHECKSUM_AT, self.checksum)
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


def check_footer(buf: bytes) -> tuple[Footer | None, str, str, object]:
    """Parse a footer; on failure (None, what is wrong, field, value) for the error message."""
    if len(buf) < FOOTER_SIZE or buf[:8] != VHD_COOKIE:
        return None, "no VHD footer", "cookie", bytes(buf[:8])
    f = Footer.unpack(buf)
    want = vhd_checksum(buf[:FOOTER_SIZE], _FOOTER_CHECKSUM_AT)
    if f.checksum != want:
        return None, f"footer checksum mismatch (computed {want:#010x})", "checksum", f.checksum
    return f, "", "", None


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
        self.checksum = vhd_checksum(out, _HEADER_CHECKSUM_AT)
        struct.pack_into(">I", out, _HEADER_CHECKSUM_AT, self.checksum)
        return bytes(out)


def bitmap_bytes(block_size: int) -> int:
    """Size of a block's sector bitmap: one bit a sector, padded to whole sectors."""
    sectors = block_size // SECTOR
    return ((sectors + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR


def spec_geometry(total_sectors: int) -> tuple[int, int, int]:
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
    return cyl_heads // heads, heads, spt


def size_for_create(virtual_size: int, round_to_geometry: bool = False
                    ) -> tuple[int, tuple[int, int, int]]:
    """(Current Size in bytes, geometry) for a new disk of ``virtual_size`` bytes (rounded up
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
    max_geometry = (65535, 16, 255)
    if sectors > VHD_MAX_GEOMETRY:
        return sectors * SECTOR, max_geometry
    if not round_to_geometry:
        c, h, s = spec_geometry(sectors)
        return sectors * SECTOR, ((c, h, s) if c * h * s == sectors else max_geometry)
    for extra in range(_GEOMETRY_SEARCH_LIMIT):
        c, h, s = spec_geometry(sectors + extra)
        if c * h * s >= sectors:
            if c * h * s == VHD_MAX_GEOMETRY:
                return sectors * SECTOR, (c, h, s)
            return c * h * s * SECTOR, (c, h, s)
    raise AssertionError(f"no CHS geometry covers {sectors} sectors")  # pragma: no cover


def vhd_time_stamp(unix_time: float) -> int:
    return max(0, min(int(unix_time) - VHD_EPOCH, 0xFFFFFFFF))


def _bit_runs(bitmap: bytes | bytearray, first: int, limit: int) -> tuple[bool, int]:
    """(state, count): the run of equal bits starting at sector ``first``, at most up to
    sector ``limit`` (exclusive).  Bits are most significant first."""
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


def _set_bits(bitmap: bytearray, first: int, end: int) -> bool:
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


# ---- parent names -----------------------------------------------------------------------------

_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def _decode_utf16(data: bytes, encoding: str, path: str, what: str) -> str:
    if len(data) % 2:
        data = data[:-1]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise CorruptImage(path, f"{what} is not valid UTF-16", "bytes", data[:32]) from None
    return text.split("\0", 1)[0]


def windows_to_posix(name: str, relative: bool) -> str | None:
    """A Windows path as a POSIX one, or None when it cannot name a file here (a drive
    letter or a UNC share)."""
    if not name or _DRIVE_RE.match(name) or name.startswith("\\\\"):
        return None
    p = name.replace("\\", "/")
    if relative:
        while p.startswith("./"):
            p = p[2:]
    return p or None


def file_url_to_path(url: str) -> str | None:
    """A MacX locator (file://[localhost]/abs or blktap's file://./rel) as a path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    path = urllib.parse.unquote(parts.path)
    if parts.netloc in ("", "localhost"):
        return path or None
    if parts.netloc in (".", ".."):  # blktap writes relative URLs as file://./name
        rel = parts.netloc + path
        return windows_to_posix(rel, relative=True)
    return None


def windows_relative(name: str) -> str:
    """How Windows records a relative parent path: backslashes, ``.\\`` before a plain one."""
    p = name.replace("/", "\\")
    return p if p.startswith("..\\") or p.startswith(".\\") else ".\\" + p


# ---- the codec --------------------------------------------------------------------------------


@dataclass
class _Segment:
    kind: Kind
    length: int
    file_offset: int = 0
    writable: bool = False


class VhdImage(Image):
    format_name = "vhd"

    def __init__(self, path: str, file: HostFile, writable: bool):
        super().__init__(path, file, writable)
        self.footer = Footer()
        self.footer_source = "end of file"
        self.header: DynamicHeader | None = None
        self.disk_type = DISK_TYPE_FIXED
        self.block_size = 0
        self.bitmap_size = 0
        self.sectors_per_block = 0
        self._granule_sectors = 1  # sectors a differencing disk takes ownership of at once
        self.bat = array.array("I")
        self.parent_unique_id = b""
        self.parent_name = ""
        self.locators: list[tuple[bytes, str]] = []  # (platform code, decoded text)
        # Where the trailing footer is (None: the tail is not a footer; the copy at 0 serves).
        self._tail_footer_offset: int | None = None
        self._data_end = 0  # blocks and metadata lie below this file offset
        self._footer_bytes = b""
        self._metadata_regions: list[tuple[int, int, str]] = []  # (start, end, name)
        self._bitmaps: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty_bitmaps: set[int] = set()
        self._dirty_bat: set[int] = set()

    # ---- probing and opening -----------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        # Dynamic and differencing disks start with the footer copy.  A fixed disk can only be
        # found at its end, which probing does not see (qemu does not probe fixed VHDs either):
        # open it with an explicit format.
        return head[:8] == VHD_COOKIE

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool,
             near: NearOpener | None = None) -> VhdImage:
        img = cls(path, file, writable)
        img._load()
        return img

    @property
    def differencing(self) -> bool:
        return self.disk_type == DISK_TYPE_DIFFERENCING

    @property
    def fixed(self) -> bool:
        return self.disk_type == DISK_TYPE_FIXED

    def _load(self) -> None:
        path = self.path
        file_size = self.file.size()
        require(file_size >= FOOTER_SIZE, path, "file too short for a VHD footer",
                "file_size", file_size)
        tail_buf = self.file.pread_exact(file_size - FOOTER_SIZE, FOOTER_SIZE, "footer")
        tail, t_what, t_field, t_value = check_footer(tail_buf)
        head_buf = self.file.pread_exact(0, FOOTER_SIZE, "footer copy")
        head, h_what, h_field, h_value = check_footer(head_buf)
        if tail is not None:
            footer, raw = tail, tail_buf
            self._tail_footer_offset = file_size - FOOTER_SIZE
            self._data_end = file_size - FOOTER_SIZE
        elif head is not None and head.disk_type in (DISK_TYPE_DYNAMIC, DISK_TYPE_DIFFERENCING):
            # The spec: "if the footer is corrupted, use the copy at the start of the file".
            footer, raw = head, head_buf
            self.footer_source = "copy at offset 0"
            self._data_end = file_size
        elif tail_buf[:8] == VHD_COOKIE or h_field != "checksum":
            raise CorruptImage(path, t_what, t_field, t_value)
        else:  # no footer at the end and a damaged copy at 0: say what is wrong with it
            raise CorruptImage(path, "footer copy at offset 0: " + h_what, h_field, h_value)
        self.footer = footer
        self._footer_bytes = bytes(raw)  # as found, reserved bytes included

        if footer.file_format_version >> 16 != FILE_FORMAT_VERSION >> 16:
            raise UnsupportedImage(path, "unsupported VHD file format version",
                                   "file_format_version", footer.file_format_version)
        if footer.disk_type not in DISK_TYPE_NAMES:
            raise UnsupportedImage(path, "unsupported VHD disk type", "disk_type",
                                   footer.disk_type)
        self.disk_type = footer.disk_type
        sectors = footer.virtual_sectors()
        if sectors > VHD_MAX_SECTORS:
            raise UnsupportedImage(path, "virtual size above the VHD limit of 2040 GiB",
                                   "current_size" if footer.sized_by_current_size
                                   else "geometry_sectors", sectors * SECTOR)
        self.virtual_size = sectors * SECTOR

        if self.fixed:
            require(self._tail_footer_offset is not None, path, "fixed disk without footer")
            require(self.virtual_size <= self._data_end, path,
                    "fixed disk shorter than its virtual size", "virtual_size",
                    self.virtual_size)
            self.cluster_size = FIXED_CLUSTER_SIZE
        else:
            self._load_dynamic()

        if self.writable and footer.saved_state:
            # The spec: a disk in a saved state must not be modified.
            self.writable = False
            self.read_only_reason = "the VHD is in a saved state (saved_state=1)"

    def _load_dynamic(self) -> None:
        path = self.path
        f = self.footer
        end = self._data_end
        require(SECTOR <= f.data_offset <= end - DYNAMIC_HEADER_SIZE, path,
                "dynamic disk header offset outside the file", "data_offset", f.data_offset)
        buf = self.file.pread_exact(f.data_offset, DYNAMIC_HEADER_SIZE, "dynamic disk header")
        require(buf[:8] == DYNAMIC_COOKIE, path, "bad dynamic disk header cookie", "cookie",
                bytes(buf[:8]))
        h = DynamicHeader.unpack(buf)
        want = vhd_checksum(buf, _HEADER_CHECKSUM_AT)
        require(h.checksum == want, path,
                f"dynamic disk header checksum mismatch (computed {want:#010x})", "checksum",
                h.checksum)
        if h.header_version >> 16 != HEADER_VERSION >> 16:
            raise UnsupportedImage(path, "unsupported dynamic disk header version",
                                   "header_version", h.header_version)
        bs = h.block_size
        require(VHD_MIN_BLOCK_SIZE <= bs <= VHD_MAX_BLOCK_SIZE and bs & (bs - 1) == 0, path,
                "block size not a power of two between 512 B and 256 MiB", "block_size", bs)
        needed = (self.virtual_size + bs - 1) // bs
        require(h.max_table_entries >= needed, path,
                f"BAT too small for the virtual size (needs {needed} entries)",
                "max_table_entries", h.max_table_entries)
        require(h.max_table_entries * 4 <= VHD_MAX_BAT_BYTES, path,
                "BAT larger than the 64 MiB limit", "max_table_entries", h.max_table_entries)
        bat_bytes = h.max_table_entries * 4
        require(h.table_offset >= SECTOR and h.table_offset + bat_bytes <= end, path,
                "BAT outside the file", "table_offset", h.table_offset)
        header_region = (f.data_offset, f.data_offset + DYNAMIC_HEADER_SIZE)
        bat_region = (h.table_offset, h.table_offset + bat_bytes)
        require(bat_region[1] <= header_region[0] or header_region[1] <= bat_region[0], path,
                "BAT overlaps the dynamic disk header", "table_offset", h.table_offset)
        self.header = h
        self.block_size = bs
        self.bitmap_size = bitmap_bytes(bs)
        self.sectors_per_block = bs // SECTOR
        self._granule_sectors = min(VHD_GRANULE_SECTORS, self.sectors_per_block)
        self.cluster_size = self._granule_sectors * SECTOR if self.differencing else bs
        regions = [(0, FOOTER_SIZE, "footer copy"), (*header_region, "dynamic disk header"),
                   (*bat_region, "BAT")]

        if self.differencing:
            self.backing_format = "vhd"
            self.parent_unique_id = h.parent_unique_id
            self.parent_name = _decode_utf16(h.parent_unicode_name, "utf-16-be", path,
                                             "parent unicode name")
            for i, loc in enumerate(h.parent_locators):
                if loc.platform_code == PLATFORM_NONE:
                    continue
                n, off = loc.platform_data_length, loc.platform_data_offset
                if loc.platform_code not in (PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX):
                    continue  # deprecated Wi2r/Wi2k and Mac alias records: not paths we read
                require(n <= VHD_MAX_LOCATOR_BYTES, path,
                        "parent locator longer than 64 KiB", f"locator[{i}].data_length", n)
                require(off >= SECTOR and off + n <= end, path,
                        "parent locator outside the file", f"locator[{i}].data_offset", off)
                for start, stop, name in regions[:3]:
                    require(off + n <= start or stop <= off or n == 0, path,
                            f"parent locator overlaps the {name}",
                            f"locator[{i}].data_offset", off)
                data = self.file.pread_exact(off, n, "parent locator")
                if loc.platform_code == PLATFORM_MACX:
                    try:
                        text = data.decode("utf-8").split("\0", 1)[0]
                    except UnicodeDecodeError:
                        raise CorruptImage(path, "MacX parent locator is not UTF-8",
                                           f"locator[{i}].data_offset", off) from None
                else:
                    text = _decode_utf16(data, "utf-16-le", path,
                                         f"{loc.platform_code.decode()} parent locator")
                self.locators.append((loc.platform_code, text))
                if n:
                    regions.append((off, off + n, f"parent locator {i}"))
            cands = self.backing_candidates()
            self.backing_name = cands[0] if cands else None
            require(self.backing_name is not None, path,
                    "differencing disk names no parent", "parent_unicode_name",
                    self.parent_name)
        self._metadata_regions = regions

        raw = self.file.pread_exact(h.table_offset, bat_bytes, "BAT")
        bat = array.array("I")
        assert bat.itemsize == 4
        bat.frombytes(raw)
        if not _NATIVE_IS_BIG:
            bat.byteswap()
        self.bat = bat
        span = self.bitmap_size + bs
        for i, entry in enumerate(bat):
            if entry == BAT_ENTRY_UNUSED:
                continue
            start = entry * SECTOR
            stop = start + span
            require(stop <= end, path, "data block past end of file", f"bat[{i}]", start)
            for r_start, r_end, name in regions:
                require(stop <= r_start or r_end <= start, path,
                        f"data block overlaps the {name}", f"bat[{i}]", start)
        if self.writable:
            clash = self._block_overlap()
            if clash is not None:
                raise CorruptImage(path, "two data blocks overlap; refusing to write",
                                   f"bat[{clash}]", bat[clash] * SECTOR)

    def _block_overlap(self) -> int | None:
        """Index of a block overlapping the one before it in file order, if any."""
        used = sorted((e, i) for i, e in enumerate(self.bat) if e != BAT_ENTRY_UNUSED)
        span = self.bitmap_size + self.block_size
        for (e0, _), (e1, i1) in itertools.pairwise(used):
            if e0 * SECTOR + span > e1 * SECTOR:
                return i1
        return None

    # ---- backing ------------------------------------------------------------------------------

    def backing_candidates(self) -> list[str]:
        if not self.differencing:
            return []
        by_code: dict[bytes, list[str]] = {}
        for code, text in self.locators:
            by_code.setdefault(code, []).append(text)
        out: list[str] = []
        for text in by_code.get(PLATFORM_W2RU, []):
            p = windows_to_posix(text, relative=True)
            if p:
                out.append(p)
        for text in by_code.get(PLATFORM_W2KU, []):
            p = windows_to_posix(text, relative=False)
            if p:
                out.append(p)
        for text in by_code.get(PLATFORM_MACX, []):
            p = file_url_to_path(text)
            if p:
                out.append(p)
        if self.parent_name:
            p = windows_to_posix(self.parent_name, relative=True)
            if p is None:  # "C:\dir\base.vhd": try its file name beside this image
                p = self.parent_name.replace("\\", "/").rsplit("/", 1)[-1].split(":")[-1]
            if p:
                out.append(p)
        seen: set[str] = set()
        return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]

    def check_backing(self, backing: Image) -> None:
        if not self.differencing:
            return
        if not isinstance(backing, VhdImage):
            raise CorruptImage(self.path, f"parent {backing.path} is not a VHD", "format",
                               backing.format_name)
        if backing.footer.unique_id != self.parent_unique_id:
            raise CorruptImage(
                self.path,
                f"parent {backing.path} has unique id {uuid.UUID(bytes=backing.footer.unique_id)}"
                ", not the one recorded", "parent_unique_id",
                str(uuid.UUID(bytes=self.parent_unique_id)))

    # ---- mapping ------------------------------------------------------------------------------

    def _bitmap(self, idx: int) -> bytearray:
        bm = self._bitmaps.get(idx)
        if bm is not None:
            self._bitmaps.move_to_end(idx)
            return bm
        bm = bytearray(self.file.pread_exact(self.bat[idx] * SECTOR, self.bitmap_size,
                                             "sector bitmap"))
        self._bitmaps[idx] = bm
        limit = max(1, VHD_MAX_CACHED_BITMAP_BYTES // self.bitmap_size)
        if len(self._bitmaps) > limit:
            for old in list(self._bitmaps):
                if len(self._bitmaps) <= limit:
                    break
                if old not in self._dirty_bitmaps and old != idx:
                    del self._bitmaps[old]
        return bm

    def _segment(self, guest_offset: int, end: int) -> _Segment:
        """The run of one state from guest_offset, within its block, up to end."""
        bs = self.block_size
        idx = guest_offset // bs
        block_start = idx * bs
        stop = min(end, block_start + bs)
        entry = self.bat[idx]
        if entry == BAT_ENTRY_UNUSED:
            kind = Kind.UNALLOCATED if self.differencing else Kind.ZERO
            return _Segment(kind, stop - guest_offset)
        data_offset = entry * SECTOR + self.bitmap_size
        file_offset = data_offset + guest_offset - block_start
        if not self.differencing and not self.writable:
            return _Segment(Kind.DATA, stop - guest_offset, file_offset)
        sector = (guest_offset - block_start) // SECTOR
        last = (stop - block_start + SECTOR - 1) // SECTOR
        state, count = _bit_runs(self._bitmap(idx), sector, last)
        run_end = min(stop, block_start + (sector + count) * SECTOR)
        if self.differencing and not state:
            return _Segment(Kind.UNALLOCATED, run_end - guest_offset)
        return _Segment(Kind.DATA, run_end - guest_offset, file_offset,
                        writable=state and self.writable)

    def resolve(self, guest_offset: int, length: int) -> Extent:
        n = max(0, min(length, self.virtual_size - guest_offset))
        if self.fixed or n == 0:
            return Extent(guest_offset, n, Kind.DATA, self.file, guest_offset,
                          writable=self.writable)
        end = guest_offset + n
        first = self._segment(guest_offset, end)
        total = first.length
        while guest_offset + total < end:
            seg = self._segment(guest_offset + total, end)
            if seg.kind is not first.kind or seg.writable != first.writable:
                break
            if first.kind is Kind.DATA and seg.file_offset != first.file_offset + total:
                break
            total += seg.length
        if first.kind is Kind.DATA:
            return Extent(guest_offset, total, Kind.DATA, self.file, first.file_offset,
                          writable=first.writable)
        return Extent(guest_offset, total, first.kind)

    # ---- writing ------------------------------------------------------------------------------

    def _blocks(self, guest_offset: int, length: int) -> list[tuple[int, int, int]]:
        """(block index, offset in block, length) pieces of a guest range."""
        out = []
        pos, end = guest_offset, guest_offset + length
        while pos < end:
            idx = pos // self.block_size
            off = pos - idx * self.block_size
            n = min(end - pos, self.block_size - off)
            out.append((idx, off, n))
            pos += n
        return out

    def _allocate_block(self, idx: int) -> None:
        """Put a new block at the end of the file (see "Theory of operation")."""
        after = (self._tail_footer_offset + FOOTER_SIZE if self._tail_footer_offset is not None
                 else (self.file.size() + SECTOR - 1) // SECTOR * SECTOR)
        data_offset = ((after + self.bitmap_size + VHD_DATA_ALIGNMENT - 1)
                       // VHD_DATA_ALIGNMENT * VHD_DATA_ALIGNMENT)
        bitmap_offset = data_offset - self.bitmap_size
        if bitmap_offset >= VHD_MAX_BLOCK_FILE_OFFSET:
            raise ImageIOError(self.path, "file too large for another VHD block (BAT entries "
                               "are 32-bit sector numbers)", errno.EFBIG)
        footer_offset = data_offset + self.block_size
        # The new footer first: the file keeps ending in a footer, and the old one stays.
        self.file.pwrite(footer_offset, self._footer_bytes)
        self._tail_footer_offset = footer_offset
        self._data_end = footer_offset
        # Fresh file space reads as zeroes: a dynamic block is all ours (qemu marks it so
        # too), a differencing block starts empty.
        fill = b"\xff" if not self.differencing else b"\0"
        self._bitmaps[idx] = bytearray(fill * self.bitmap_size)
        self._dirty_bitmaps.add(idx)
        self.bat[idx] = bitmap_offset // SECTOR
        self._dirty_bat.add(idx)

    def _maybe_flush(self) -> None:
        if len(self._dirty_bitmaps) * self.bitmap_size > VHD_MAX_DIRTY_BITMAP_BYTES:
            self.flush()

    def _mark(self, idx: int, first_sector: int, end_sector: int) -> None:
        if _set_bits(self._bitmap(idx), first_sector, end_sector):
            self._dirty_bitmaps.add(idx)

    def _require_parent(self) -> None:
        # Copy-up reads the parent: without it open, a write would hide the parent's bytes
        # behind zeroes.
        if self.differencing and self.below is NOTHING_BELOW:
            raise UnsupportedImage(self.path, "cannot write a differencing VHD whose parent "
                                   "is not open", "backing_file", self.backing_name)

    def _data_offset(self, idx: int) -> int:
        return self.bat[idx] * SECTOR + self.bitmap_size

    def _granule_range(self, off: int, end: int) -> tuple[int, int]:
        """The sectors of the ownership granules (bitmap bytes) that [off, end) touches."""
        g = self._granule_sectors
        s_lo = off // SECTOR // g * g
        end_sector = (end + SECTOR - 1) // SECTOR
        s_hi = min(self.sectors_per_block, (end_sector + g - 1) // g * g)
        return s_lo, s_hi

    def _copy_up(self, idx: int, s_lo: int, s_hi: int) -> None:
        """Copy from the parent every sector of [s_lo, s_hi) whose bit is clear (the caller
        sets the bits once its own data is written too)."""
        base = self._data_offset(idx)
        s = s_lo
        while s < s_hi:
            state, count = _bit_runs(self._bitmap(idx), s, s_hi)
            if not state:
                pos = 0
                while pos < count * SECTOR:
                    k = min(count * SECTOR - pos, MAX_IO_BYTES)
                    guest = idx * self.block_size + s * SECTOR + pos
                    self.file.pwrite(base + s * SECTOR + pos, self.below.read(guest, k))
                    pos += k
            s += count

    def _prepare_differencing(self, idx: int, off: int, end: int) -> tuple[int, int]:
        """Before writing [off, end) of block idx: copy up what the write leaves of its
        granules.  Returns the sector range whose bits to set once the data is written."""
        s_lo, s_hi = self._granule_range(off, end)
        c_lo, c_hi = -(-off // SECTOR), end // SECTOR  # sectors the write covers whole
        if c_lo < c_hi:
            self._copy_up(idx, s_lo, c_lo)
            self._copy_up(idx, c_hi, s_hi)
        else:
            self._copy_up(idx, s_lo, s_hi)
        return s_lo, s_hi

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        self.require_writable()
        self._require_parent()
        self.check_range(guest_offset, len(data))
        if self.fixed:
            self.file.pwrite(guest_offset, data)
            return
        view = memoryview(data).cast("B")
        done = 0
        for idx, off, n in self._blocks(guest_offset, len(view)):
            if self.bat[idx] == BAT_ENTRY_UNUSED:
                self._allocate_block(idx)
            end = off + n
            if self.differencing:
                s_lo, s_hi = self._prepare_differencing(idx, off, end)
            else:
                s_lo, s_hi = off // SECTOR, -(-end // SECTOR)
            self.file.pwrite(self._data_offset(idx) + off, view[done : done + n])
            self._mark(idx, s_lo, s_hi)
            done += n
        self._maybe_flush()

    def write_zeroes(self, guest_offset: int, length: int, may_unmap: bool = False) -> None:
        self.require_writable()
        self._require_parent()
        self.check_range(guest_offset, length)
        if self.fixed:
            self._zero_file(guest_offset, length, may_unmap)
            return
        for idx, off, n in self._blocks(guest_offset, length):
            new = False
            if self.bat[idx] == BAT_ENTRY_UNUSED:
                if not self.differencing:
                    continue  # an unallocated dynamic block already reads as zeroes
                self._allocate_block(idx)
                new = True
            base = self._data_offset(idx)
            end = off + n
            if not self.differencing:
                self._zero_file(base + off, n, may_unmap)
                continue
            s_lo, s_hi = self._prepare_differencing(idx, off, end)
            if new:
                # Fresh file space is zero: only the partial sectors copied up need zeroes.
                head_end = min(end, -(-off // SECTOR) * SECTOR)
                tail_start = max(off, end // SECTOR * SECTOR)
                if head_end > off:
                    self.file.pwrite(base + off, bytes(head_end - off))
                if end > tail_start and tail_start >= head_end:
                    self.file.pwrite(base + tail_start, bytes(end - tail_start))
            else:
                self._zero_file(base + off, n, may_unmap)
            self._mark(idx, s_lo, s_hi)
        self._maybe_flush()

    def _zero_file(self, file_offset: int, length: int, may_unmap: bool) -> None:
        if length <= 0:
            return
        if may_unmap and self.file.punch_hole(file_offset, length):
            return
        try:
            fallocate(self.file.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, file_offset,
                      length)
            return
        except OSError:
            pass
        chunk = bytes(min(length, 1 << 20))
        pos, end = file_offset, file_offset + length
        while pos < end:
            k = min(len(chunk), end - pos)
            self.file.pwrite(pos, chunk[:k])
            pos += k

    def allocate(self, guest_offset: int, length: int) -> None:
        self.require_writable()
        self._require_parent()
        self.check_range(guest_offset, length)
        if self.fixed:
            return
        for idx, off, n in self._blocks(guest_offset, length):
            if self.bat[idx] == BAT_ENTRY_UNUSED:
                self._allocate_block(idx)
            if self.differencing:
                # Clusters are granules: copy up every touched one that is not all ours.
                s_lo, s_hi = self._granule_range(off, off + n)
                self._copy_up(idx, s_lo, s_hi)
                self._mark(idx, s_lo, s_hi)
            else:
                # Clusters are blocks: own all of each touched block.
                self._mark(idx, 0, self.sectors_per_block)
        self._maybe_flush()

    def flush(self) -> None:
        if not self.writable:
            return
        self.file.sync()  # data, new blocks and the new footer first
        if not (self._dirty_bitmaps or self._dirty_bat):
            return
        for idx in sorted(self._dirty_bitmaps):
            self.file.pwrite(self.bat[idx] * SECTOR, self._bitmaps[idx])
        assert self.header is not None
        if self._dirty_bat:
            raw = array.array("I", self.bat)
            if not _NATIVE_IS_BIG:
                raw.byteswap()
            blob = raw.tobytes()
            per_sector = SECTOR // 4
            for sec in sorted({i // per_sector for i in self._dirty_bat}):
                lo = sec * SECTOR
                self.file.pwrite(self.header.table_offset + lo, blob[lo : lo + SECTOR])
        self.file.sync()
        self._dirty_bitmaps.clear()
        self._dirty_bat.clear()

    def close(self) -> None:
        if self.file.fd >= 0 and self.writable:
            try:
                self.flush()
            finally:
                self.file.close()
            return
        self.file.close()

    # ---- inspection ---------------------------------------------------------------------------

    def check(self, repair: bool = False) -> CheckResult:
        """Re-read the file and report: a missing or different trailing footer or footer
        copy, BAT entries past the end of the file or over metadata, overlapping blocks.
        ``repair`` rewrites the footers from the one in use (the BAT is left alone: an entry
        that points nowhere cannot be repaired without losing what it was meant to hold)."""
        if self.writable:
            self.flush()
        res = CheckResult(self.path)
        size = self.file.size()
        want = self._footer_bytes
        tail_buf = self.file.pread_data(max(0, size - FOOTER_SIZE), FOOTER_SIZE)
        tail, t_what, _, _ = check_footer(tail_buf)
        footer_problems: list[tuple[str, int]] = []  # (what, where the footer belongs)
        if tail is None:
            footer_problems.append((f"no valid footer at the end of the file ({t_what})",
                                    (size + SECTOR - 1) // SECTOR * SECTOR))
        elif tail_buf != want:
            footer_problems.append(("footer at the end of the file differs from the one in "
                                    "use", size - FOOTER_SIZE))
        if not self.fixed:
            head_buf = self.file.pread_data(0, FOOTER_SIZE)
            if head_buf != want:
                _, h_what, _, _ = check_footer(head_buf)
                footer_problems.append(("footer copy at offset 0 "
                                        + (f"invalid ({h_what})" if h_what else "differs"), 0))
            res.corruptions += self._check_blocks(size - FOOTER_SIZE if tail else size)
            res.allocated_clusters = sum(1 for e in self.bat if e != BAT_ENTRY_UNUSED)
            res.total_clusters = (self.virtual_size + self.block_size - 1) // self.block_size
        res.image_end_offset = size if tail is not None else size + FOOTER_SIZE
        if repair and footer_problems and self.writable:
            for _, offset in footer_problems:
                self.file.pwrite(offset, want)
                if offset:
                    self._tail_footer_offset = self._data_end = offset
                    res.image_end_offset = offset + FOOTER_SIZE
            self.file.sync()
            res.corruptions_fixed = len(footer_problems)
        else:
            res.corruptions = [what for what, _ in footer_problems] + res.corruptions
        return res

    def _check_blocks(self, data_end: int) -> list[str]:
        """Problems of the BAT as it is on disk now."""
        assert self.header is not None
        raw = self.file.pread_data(self.header.table_offset, len(self.bat) * 4)
        disk_bat = array.array("I")
        disk_bat.frombytes(raw)
        if not _NATIVE_IS_BIG:
            disk_bat.byteswap()
        out = []
        span = self.bitmap_size + self.block_size
        used = []
        for i, e in enumerate(disk_bat):
            if e == BAT_ENTRY_UNUSED:
                continue
            start = e * SECTOR
            if start + span > data_end:
                out.append(f"bat[{i}]: data block past end of file ({start:#x})")
            for r0, r1, name in self._metadata_regions:
                if not (start + span <= r0 or r1 <= start):
                    out.append(f"bat[{i}]: data block overlaps the {name} ({start:#x})")
            used.append((start, i))
        used.sort()
        for (a, _), (b, i) in itertools.pairwise(used):
            if a + span > b:
                out.append(f"bat[{i}]: data block overlaps another block ({b:#x})")
        return out

    def info(self) -> dict[str, Any]:
        f = self.footer
        out: dict[str, Any] = {
            "disk_type": DISK_TYPE_NAMES.get(f.disk_type, str(f.disk_type)),
            "unique_id": str(uuid.UUID(bytes=f.unique_id)),
            "creator_application": f.creator_application.decode("latin-1"),
            "creator_version": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
            "creator_host_os": f.creator_host_os.decode("latin-1"),
            "time_stamp": f.time_stamp + VHD_EPOCH,
            "original_size": f.original_size,
            "current_size": f.current_size,
            "geometry": {"cylinders": f.cylinders, "heads": f.heads,
                         "sectors_per_track": f.sectors_per_track},
            "saved_state": bool(f.saved_state),
            "footer_source": self.footer_source,
        }
        if self.header is not None:
            out["block_size"] = self.block_size
            out["max_table_entries"] = self.header.max_table_entries
            out["allocated_blocks"] = sum(1 for e in self.bat if e != BAT_ENTRY_UNUSED)
        if self.differencing:
            assert self.header is not None
            out["parent_unique_id"] = str(uuid.UUID(bytes=self.parent_unique_id))
            out["parent_time_stamp"] = self.header.parent_time_stamp + VHD_EPOCH
            out["parent_unicode_name"] = self.parent_name
            out["parent_locators"] = [{"platform_code": c.decode("latin-1"), "path": t}
                                      for c, t in self.locators]
        return out


# ---- creating ---------------------------------------------------------------------------------


def _new_footer(disk_type: int, current_size: int, geometry: tuple[int, int, int],
                data_offset: int) -> Footer:
    c, h, s = geometry
    return Footer(data_offset=data_offset, time_stamp=vhd_time_stamp(time.time()),
                  original_size=current_size, current_size=current_size, cylinders=c,
                  heads=h, sectors_per_track=s, disk_type=disk_type,
                  unique_id=uuid.uuid4().bytes)


def _write_new_file(path: str, parts: list[tuple[int, bytes]], size: int) -> None:
    """Create ``path`` (never over an existing file) with ``parts`` at their offsets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, blob in parts:
            view = memoryview(blob)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _dynamic_layout(footer: Footer, header: DynamicHeader,
                    extra: list[tuple[int, bytes]]) -> tuple[list[tuple[int, bytes]], int]:
    """Footer copy, header, an empty BAT, ``extra`` (already placed), trailing footer."""
    bat = b"\xff" * (header.max_table_entries * 4)
    end = header.table_offset + (len(bat) + SECTOR - 1) // SECTOR * SECTOR
    for offset, blob in extra:
        end = max(end, offset + (len(blob) + SECTOR - 1) // SECTOR * SECTOR)
    fb = footer.pack()
    parts = [(0, fb), (footer.data_offset, header.pack()), (header.table_offset, bat),
             *extra, (end, fb)]
    return parts, end + FOOTER_SIZE


def create(path: str, virtual_size: int, *, kind: str = "dynamic",
           block_size: int = DEFAULT_BLOCK_SIZE, round_to_geometry: bool = False) -> None:
    """Create a fixed or dynamic VHD (never over an existing file) of ``virtual_size`` bytes,
    rounded up to a sector, or, with ``round_to_geometry``, up to the spec's CHS geometry as
    ``qemu-img create -f vpc`` does; see :func:`size_for_create`."""
    if kind not in ("dynamic", "fixed"):
        raise ValueError(f"VHD kind must be 'dynamic' or 'fixed', not {kind!r}")
    if virtual_size < 0:
        raise ValueError(f"negative size {virtual_size}")
    current_size, geometry = size_for_create(virtual_size, round_to_geometry)
    if kind == "fixed":
        footer = _new_footer(DISK_TYPE_FIXED, current_size, geometry, NO_DATA_OFFSET)
        _write_new_file(path, [(current_size, footer.pack())], current_size + FOOTER_SIZE)
        return
    if not (VHD_MIN_BLOCK_SIZE <= block_size <= VHD_MAX_BLOCK_SIZE
            and block_size & (block_size - 1) == 0):
        raise ValueError(f"VHD block size must be a power of two in [512, 256 MiB], "
                         f"not {block_size}")
    entries = (current_size + block_size - 1) // block_size
    if entries * 4 > VHD_MAX_BAT_BYTES:
        raise ValueError(f"block size {block_size} too small for {current_size} bytes")
    footer = _new_footer(DISK_TYPE_DYNAMIC, current_size, geometry, FOOTER_SIZE)
    header = DynamicHeader(table_offset=FOOTER_SIZE + DYNAMIC_HEADER_SIZE,
                           max_table_entries=entries, block_size=block_size)
    parts, size = _dynamic_layout(footer, header, [])
    _write_new_file(path, parts, size)


def create_differencing(path: str, parent: VhdImage, parent_name: str) -> None:
    """Create an empty differencing VHD over ``parent`` (an open VHD of any type).

    ``parent_name`` is how the child names the parent, relative to the child's directory
    where possible.  The child records the parent's unique id and modification time, the
    name as Parent Unicode Name, and three locators: W2ru (the relative path, Windows
    style), W2ku (the absolute path) and MacX (a file:// URL).
    """
    parent_abs = os.path.abspath(parent.path)
    child_dir = os.path.dirname(os.path.abspath(path))
    relative = os.path.relpath(parent_abs, child_dir) if os.path.isabs(parent_name) else parent_name
    pf = parent.footer
    size = parent.virtual_size
    if pf.geometry_sectors * SECTOR == size:
        geometry = (pf.cylinders, pf.heads, pf.sectors_per_track)
    else:
        # The parent is sized by Current Size: the maximal geometry tells readers that
        # size by geometry (qemu) to use Current Size for the child too.
        geometry = (65535, 16, 255)
    block_size = parent.block_size or DEFAULT_BLOCK_SIZE
    entries = (size + block_size - 1) // block_size
    footer = _new_footer(DISK_TYPE_DIFFERENCING, size, geometry, FOOTER_SIZE)
    name16 = parent_name.encode("utf-16-be")
    if len(name16) > PARENT_NAME_BYTES:  # keep the file name; the locators hold the path
        name16 = os.path.basename(parent_name).encode("utf-16-be")[:PARENT_NAME_BYTES]
    header = DynamicHeader(table_offset=FOOTER_SIZE + DYNAMIC_HEADER_SIZE,
                           max_table_entries=entries, block_size=block_size,
                           parent_unique_id=pf.unique_id,
                           parent_time_stamp=vhd_time_stamp(os.stat(parent_abs).st_mtime),
                           parent_unicode_name=name16.ljust(PARENT_NAME_BYTES, b"\0"))
    blobs = [
        (PLATFORM_W2RU, windows_relative(relative).encode("utf-16-le")),
        (PLATFORM_W2KU, parent_abs.replace("/", "\\").encode("utf-16-le")),
        (PLATFORM_MACX, ("file://" + urllib.parse.quote(parent_abs)).encode("utf-8")),
    ]
    offset = header.table_offset + (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
    extra = []
    for code, blob in blobs:
        if len(blob) > VHD_MAX_LOCATOR_BYTES:
            raise ValueError(f"parent path too long for a VHD locator: {parent_abs!r}")
        space = max(SECTOR, (len(blob) + SECTOR - 1) // SECTOR * SECTOR)
        # Platform Data Space: the spec says sectors, Windows writes bytes; readers (and
        # Windows) accept bytes as long as they cover the data, so we write bytes.
        header.parent_locators.append(ParentLocator(code, space, len(blob), 0, offset))
        extra.append((offset, blob))
        offset += space
    parts, file_size = _dynamic_layout(footer, header, extra)
    _write_new_file(path, parts, file_size)


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DynamicHeader",
    "Footer",
    "VhdImage",
    "create",
    "create_differencing",
    "size_for_create",
    "spec_geometry",
]
