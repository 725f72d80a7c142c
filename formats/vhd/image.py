"""Layer: formats.vhd, above structures.py and parents.py.  :class:`VhdImage`, the VHD codec
(Virtual PC / Hyper-V, qemu's "vpc"): fixed, dynamic and differencing disks — open and
validate, resolve, read, write, flush, check.

Invariants this module keeps:

- Every length, count and offset the file controls is checked against the file size and a
  named limit (``VHD_MAX_*`` in structures.py) before anything is read or allocated.
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
import uuid
from collections import OrderedDict
from dataclasses import dataclass
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
from .parents import ParentPath, decode_utf16, parent_candidates, read_locators
from .structures import (
    BAT_ENTRY_UNUSED,
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    DISK_TYPE_NAMES,
    DYNAMIC_COOKIE,
    DYNAMIC_HEADER_SIZE,
    FILE_FORMAT_VERSION,
    FOOTER_SIZE,
    HEADER_CHECKSUM_AT,
    HEADER_VERSION,
    VHD_COOKIE,
    VHD_EPOCH,
    VHD_MAX_BAT_BYTES,
    VHD_MAX_BLOCK_FILE_OFFSET,
    VHD_MAX_BLOCK_SIZE,
    VHD_MAX_SECTORS,
    VHD_MIN_BLOCK_SIZE,
    DynamicHeader,
    Footer,
    Region,
    bat_from_bytes,
    bat_overlaps,
    bat_problems,
    bat_to_bytes,
    bit_runs,
    bitmap_bytes,
    check_footer,
    set_bits,
    vhd_checksum,
)

# ---- tunables ---------------------------------------------------------------------------------

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
# Allocation granularity reported for fixed disks (one linear mapping, like raw images).
FIXED_CLUSTER_SIZE = 64 << 10


@dataclass
class _Segment:
    kind: Kind
    length: int
    file_offset: int = 0
    writable: bool = False


class VhdImage(Image):
    format_name = "vhd"
    checkable = True

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
        self.locators: list[ParentPath] = []
        # Where the trailing footer is (None: the tail is not a footer; the copy at 0 serves).
        self._tail_footer_offset: int | None = None
        self._data_end = 0  # blocks and metadata lie below this file offset
        self._footer_bytes = b""
        self._metadata_regions: list[Region] = []
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
        want = vhd_checksum(buf, HEADER_CHECKSUM_AT)
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
        regions = [Region(0, FOOTER_SIZE, "footer copy"),
                   Region(*header_region, "dynamic disk header"), Region(*bat_region, "BAT")]

        if self.differencing:
            self.backing_format = "vhd"
            self.parent_unique_id = h.parent_unique_id
            self.parent_name = decode_utf16(h.parent_unicode_name, "utf-16-be", path,
                                            "parent unicode name")
            found = read_locators(path, self.file, h, end, regions)
            self.locators = found.paths
            regions += found.regions
            cands = self.backing_candidates()
            self.backing_name = cands[0] if cands else None
            require(self.backing_name is not None, path,
                    "differencing disk names no parent", "parent_unicode_name",
                    self.parent_name)
        self._metadata_regions = regions

        bat = bat_from_bytes(self.file.pread_exact(h.table_offset, bat_bytes, "BAT"))
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
            clashes = bat_overlaps(bat, span)
            if clashes:
                raise CorruptImage(path, "two data blocks overlap; refusing to write",
                                   f"bat[{clashes[0]}]", bat[clashes[0]] * SECTOR)

    # ---- backing ------------------------------------------------------------------------------

    def backing_candidates(self) -> list[str]:
        if not self.differencing:
            return []
        return parent_candidates(self.locators, self.parent_name)

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
        state, count = bit_runs(self._bitmap(idx), sector, last)
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
        """(block index, offset in block, length) pieces of a guest range.  Plain tuples,
        unpacked at once by every caller: a named tuple costs a 4 KiB write 4% more CPU
        (measured), and its names would be read nowhere."""
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
        if set_bits(self._bitmap(idx), first_sector, end_sector):
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
            state, count = bit_runs(self._bitmap(idx), s, s_hi)
            if not state:
                pos = 0
                while pos < count * SECTOR:
                    k = min(count * SECTOR - pos, MAX_IO_BYTES)
                    guest = idx * self.block_size + s * SECTOR + pos
                    buf = bytearray(k)
                    self.below.read_into(guest, memoryview(buf))
                    self.file.pwrite(base + s * SECTOR + pos, buf)
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
            blob = bat_to_bytes(self.bat)
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
        disk_bat = bat_from_bytes(self.file.pread_data(self.header.table_offset,
                                                       len(self.bat) * 4))
        return bat_problems(disk_bat, self.bitmap_size + self.block_size, data_end,
                            self._metadata_regions)

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
