"""Layer: formats.  Raw images: guest offset == file offset, no metadata, no backing.

Holes: a raw image opened read-only (a base, or any image the read commands open) reports
the holes of its host file as ZERO, found with SEEK_DATA/SEEK_HOLE (at most two lseeks per
``resolve``), as qemu's file driver does, so that map, NBD block status and convert see them
and convert keeps them sparse.  A writable raw image reports DATA everywhere: its holes
change under its own writes, and a writer must be able to write in place anywhere.  A file
system that cannot tell (EINVAL, EOPNOTSUPP) is all DATA.
Writes go straight to the file; write-zeroes punches a hole where the filesystem can, but only
when the caller allows unmapping (a raw *base* is never written by cowd: overlays are).
"""

from __future__ import annotations

from .base import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    Extent,
    HostFile,
    Image,
    Kind,
    NearOpener,
    fallocate,
)

# Granularity reported for remaps of raw images: any value works (raw is one linear mapping);
# 64 KiB matches qcow2's default so mixed chains line up.
RAW_CLUSTER_SIZE = 64 << 10


class RawImage(Image):
    format_name = "raw"
    find_holes = False  # report the host file's holes as ZERO (read-only opens)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        return True  # anything is a raw image; probed last

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool,
             near: NearOpener | None = None) -> RawImage:
        img = cls(path, file, writable)
        img.virtual_size = file.size()
        img.cluster_size = RAW_CLUSTER_SIZE
        img.find_holes = not writable and not file.is_block_device and file.sparse_is_zero
        return img

    def resolve(self, guest_offset: int, length: int) -> Extent:
        n = max(0, min(length, self.virtual_size - guest_offset))
        if self.find_holes and n:
            hole = self._hole_run(guest_offset, n)
            if hole is not None:
                if hole[0]:
                    return Extent(guest_offset, hole[1], Kind.ZERO)
                n = hole[1]
        return Extent(guest_offset, n, Kind.DATA, self.file, guest_offset, writable=self.writable)

    def _hole_run(self, guest_offset: int, n: int) -> tuple[bool, int] | None:
        """(is a hole, run length at most n) at guest_offset; None where the file system
        cannot tell (then nothing more is asked of it)."""
        run = self.file.hole_run(guest_offset, n)
        if run is None:
            self.find_holes = False
        return run

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        self.require_writable()
        self.check_range(guest_offset, len(data))
        self.file.pwrite(guest_offset, data)

    def write_zeroes(self, guest_offset: int, length: int, may_unmap: bool = False) -> None:
        self.require_writable()
        self.check_range(guest_offset, length)
        if may_unmap and self.file.punch_hole(guest_offset, length):
            return
        try:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            fallocate(self.file.fd, mode, guest_offset, length)
            return
        except OSError:
            pass
        chunk = bytes(min(length, 1 << 20))
        pos = guest_offset
        end = guest_offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            self.file.pwrite(pos, chunk[:n])
            pos += n

    def allocate(self, guest_offset: int, length: int) -> None:
        self.require_writable()  # raw is always allocated

    def info(self) -> dict[str, object]:
        return {}
