"""Layer: formats (the bottom of cowd, imports nothing from ``cowd``).

The vocabulary shared by every image format: the host file an image lives in, the extents a
guest range resolves to, and the :class:`Image` base class whose subclasses are the codecs.

Contract of an :class:`Image` (every format honours it):

- ``resolve(guest_offset, length)`` returns the *longest* run of guest bytes starting at
  ``guest_offset`` (at most ``length``) that has one allocation kind in *this* layer:
  DATA at a file offset, ZERO, COMPRESSED (one cluster at most), or UNALLOCATED (ask the
  backing image).  It may read metadata from disk but never data.  It is cheap enough that the
  daemon caches its answers as remaps.
- ``read`` / ``write`` / ``write_zeroes`` / ``discard`` take guest offsets and act on this
  layer over what lies beneath it: an UNALLOCATED range reads through ``below``, and a write
  allocates in this layer, copying up the unwritten head and tail of a cluster from
  ``below``.  A codec never walks the chain itself: ``below`` (a :class:`Below`) is
  injected by whoever owns the chain — the library's own reader (formats/chain.py) or the
  daemon's cached planner — so copy-up reads go through the same path as guest reads.
- ``flush`` makes every completed write durable, data before the metadata that reaches it.
- An image object is *not* thread-safe: one caller at a time (the daemon serialises metadata
  changes per image and may read DATA extents it resolved itself, concurrently, with pread).
- Every length or count that the file controls is checked against a named limit before
  anything is allocated; malformed metadata raises :class:`~formats.errors.CorruptImage`.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .errors import CorruptImage, FormatError, ImageIOError, ImageReadOnly, SyncFailed

SECTOR = 512

# A backing chain deeper than this is refused (qemu has no hard limit, but a deep chain is
# almost always a mistake or a loop that escaped inode detection, e.g. over bind mounts).
MAX_CHAIN_DEPTH = 64

# Largest single read or write the library performs for a caller in one piece; larger
# requests are split so a hostile length can never make it allocate without bound.
MAX_IO_BYTES = 64 << 20


# Opens a file an image names, from that image's folder and as the caller's policy allows
# (formats/opener.py): ``near(name, writable, field, what)``, e.g. what="data file".
NearOpener = Callable[[str, bool, str, str], "HostFile"]


class Below(Protocol):
    """What lies beneath a layer, as the chain's owner reads it (the copy-up source)."""

    @property
    def size(self) -> int:
        """Guest bytes the layers beneath present (0: nothing is beneath)."""
        ...

    def read_into(self, guest_offset: int, dest: memoryview) -> None:
        """Fill ``dest`` with the bytes beneath at [guest_offset, +len(dest)); zeroes past
        ``size``.  Into the caller's buffer: a copy-up reads straight into the cluster it
        writes."""
        ...

    def zero_prefix(self, guest_offset: int, length: int) -> int:
        """How many bytes from ``guest_offset`` (at most ``length``) surely read as zeroes
        beneath; 0 when the first may not."""
        ...


class _NothingBelow:
    """Beneath a layer with no backing file: zeroes."""

    size = 0

    def read_into(self, guest_offset: int, dest: memoryview) -> None:
        dest[:] = bytes(len(dest))

    def zero_prefix(self, guest_offset: int, length: int) -> int:
        return length


NOTHING_BELOW: Below = _NothingBelow()


class Kind(enum.Enum):
    DATA = "data"  # bytes live at file_offset of file
    ZERO = "zero"  # reads as zeroes in this layer (hides the backing image)
    UNALLOCATED = "unallocated"  # not in this layer: ask the backing image (or zero if none)
    COMPRESSED = "compressed"  # a compressed cluster: decode with Image.read_compressed


@dataclass(frozen=True, slots=True)
class Extent:
    guest_offset: int
    length: int
    kind: Kind
    file: HostFile | None = None  # DATA / COMPRESSED: the file holding the bytes
    file_offset: int = 0  # DATA: where guest_offset lives; COMPRESSED: start of the stream
    compressed_length: int = 0  # COMPRESSED: bytes of the stream (an upper bound)
    # DATA only: the bytes may be overwritten in place (they belong to this writable layer
    # and to nothing else, e.g. not shared with a qcow2 snapshot).
    writable: bool = False
    # COMPRESSED only: the guest offset of the cluster the stream decodes to.
    cluster_guest_offset: int = 0

    @property
    def end(self) -> int:
        return self.guest_offset + self.length


def io_error(path: str, what: str, e: OSError) -> ImageIOError:
    """The ImageIOError for a failed host-file syscall (EIO when the OS gave no errno)."""
    return ImageIOError(path, what, e.errno or errno_mod.EIO)


class HostFile:
    """An open host file (an image, an external data file).  Thin, explicit syscalls."""

    # A hole in the file reads as zeroes (a raw image reports it as ZERO); not so for a
    # remote base's cache file, whose holes are blocks not fetched yet (formats/remote/).
    sparse_is_zero = True

    def __init__(self, path: str, writable: bool, *, fd: int | None = None):
        self.path = path
        self.writable = writable
        if fd is None:
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise io_error(path, f"cannot open: {e.strerror}", e) from None
        self.fd = fd
        # No fdatasync at all: for a file nobody needs durable before it is closed (the new
        # output of ``convert -t unsafe``, which a crash leaves partial whatever the order).
        self.skip_sync = False
        st = os.fstat(fd)
        self.dev_ino = (st.st_dev, st.st_ino)
        # A block device's st_size is 0: its size is where its end is.
        self.is_block_device = stat.S_ISBLK(st.st_mode)

    def __repr__(self) -> str:
        return f"HostFile({self.path!r}, fd={self.fd}, writable={self.writable})"

    def size(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def pread_exact(self, file_offset: int, length: int, what: str = "metadata") -> bytes:
        """Read metadata: a short read means the structure runs past the end of file."""
        data = self._pread(file_offset, length)
        if len(data) != length:
            raise CorruptImage(self.path, f"{what} past end of file", "offset", file_offset)
        return data

    def pread_into(self, file_offset: int, dest: memoryview) -> None:
        """Read guest data into ``dest``: what lies past the end of the file reads as
        zeroes."""
        got = 0
        n = len(dest)
        while got < n:
            try:
                k = os.preadv(self.fd, [dest[got:got + MAX_IO_BYTES]], file_offset + got)
            except OSError as e:
                raise io_error(self.path, f"read failed: {e.strerror}", e) from None
            if not k:
                dest[got:] = bytes(n - got)
                return
            got += k

    def pread_data(self, file_offset: int, length: int) -> bytes:
        """Read guest data: what lies past the end of the file reads as zeroes."""
        data = self._pread(file_offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def _pread(self, file_offset: int, length: int) -> bytes:
        parts = []
        got = 0
        while got < length:
            try:
                chunk = os.pread(self.fd, min(length - got, MAX_IO_BYTES), file_offset + got)
            except OSError as e:
                raise io_error(self.path, f"read failed: {e.strerror}", e) from None
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pwrite(self, file_offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise ImageReadOnly(self.path, "file is open read-only")
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done:], file_offset + done)
            except OSError as e:
                raise io_error(self.path, f"write failed: {e.strerror}", e) from None
            if n == 0:
                raise ImageIOError(self.path, "write made no progress", errno_mod.EIO)
            done += n

    def sync(self) -> None:
        if not self.writable or self.skip_sync:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise SyncFailed(self.path, f"fdatasync failed: {e.strerror}",
                             e.errno or errno_mod.EIO) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise io_error(self.path, f"truncate failed: {e.strerror}", e) from None

    def punch_hole(self, file_offset: int, length: int) -> bool:
        """Deallocate host space; returns False where the filesystem cannot."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, file_offset, length)
        except OSError:
            return False
        return True

    def hole_run(self, file_offset: int, length: int) -> tuple[bool, int] | None:
        """(is a hole, run length at most ``length``) at ``file_offset``, found with
        SEEK_DATA/SEEK_HOLE (two lseeks at most); past the end of the file is a hole.
        None where the file cannot tell (a block device, a file system without
        SEEK_DATA, a remote base's cache file whose holes are not zeroes)."""
        if self.is_block_device or not self.sparse_is_zero or length <= 0:
            return None
        try:
            data = os.lseek(self.fd, file_offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno_mod.ENXIO:  # no data from here to the end of the file
                return True, length
            return None
        if data > file_offset:
            return True, min(length, data - file_offset)
        try:
            hole = os.lseek(self.fd, file_offset, os.SEEK_HOLE)
        except OSError:
            return None
        return False, max(1, min(length, hole - file_offset))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc: Any = None


@dataclass
class CheckResult:
    """What ``check`` found, in qemu-img check's terms."""

    path: str
    corruptions: list[str] = field(default_factory=list)  # errors: refcount too low, overlaps
    leaks: list[str] = field(default_factory=list)  # clusters referenced by nothing
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    allocated_clusters: int = 0
    total_clusters: int = 0
    image_end_offset: int = 0
    fragmented_clusters: int = 0  # data clusters not right after the previous one in the file
    compressed_clusters: int = 0
    check_errors: int = 0  # parts of the walk that could not be done (qemu's check-errors)

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


class Image:
    """Base class of a format codec; see the module docstring for the contract."""

    format_name: ClassVar[str] = "?"
    # Whether check() looks at anything (qemu-img check exits 63 for a format it cannot
    # check: raw has no metadata to check).
    checkable: ClassVar[bool] = False

    def __init__(self, path: str, file: HostFile, writable: bool):
        self.path = path
        self.file = file
        self.writable = writable
        self.virtual_size = 0
        self.cluster_size = SECTOR  # allocation granularity of this layer, in guest bytes
        self.backing: Image | None = None  # the parent image, for inspection (info, map)
        # What reads and copy-ups fall through to; set by the chain's owner with the parent.
        self.below: Below = NOTHING_BELOW
        self.backing_name: str | None = None  # as recorded in the image
        self.backing_format: str | None = None  # as recorded, if the format records one
        self.backing_path: str | None = None  # the resolved host path, set by the opener
        self.read_only_reason: str | None = None  # why a writable open was refused, if so

    @property
    def copy_up_size(self) -> int:
        """What a first write copies up from the parents, in guest bytes: a write that covers
        whole aligned units of it copies nothing.  The allocation unit, unless the format
        allocates in larger pieces than it copies (a qcow2 subcluster with extended L2)."""
        return self.cluster_size

    # ---- probing and opening -------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        """Does this header (the file's first 4 KiB, or less) look like this format?"""
        raise NotImplementedError

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool,
             near: NearOpener | None = None) -> Image:
        """Parse and validate the metadata; do not open the backing image.  Other files the
        image names (a qcow2's data file) are opened only through ``near``."""
        raise NotImplementedError

    def backing_candidates(self) -> list[str]:
        """Names to try, in order, for the backing image (relative to this image's dir)."""
        return [self.backing_name] if self.backing_name else []

    def check_backing(self, backing: Image) -> None:
        """Reject a backing image that cannot be this image's parent (e.g. VHD parent UUID)."""

    # ---- mapping -------------------------------------------------------------------------

    def resolve(self, guest_offset: int, length: int) -> Extent:
        raise NotImplementedError

    def read_compressed(self, extent: Extent) -> bytes:
        """Decode the part of a COMPRESSED extent it covers."""
        raise CorruptImage(self.path, "compressed extent in a format without compression")

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """This layer's extents over [start, end), merged where kind and mapping continue."""
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        pos = start
        while pos < end:
            ext = self.resolve(pos, end - pos)
            if ext.length <= 0:
                raise CorruptImage(self.path, "resolver made no progress", "offset", pos)
            yield ext
            pos = ext.end

    # ---- reading -------------------------------------------------------------------------

    def check_range(self, guest_offset: int, length: int) -> None:
        if guest_offset < 0 or length < 0 or guest_offset + length > self.virtual_size:
            raise ValueError(
                f"{self.path}: range {guest_offset}+{length} outside the disk "
                f"(virtual_size={self.virtual_size})"
            )

    def read(self, guest_offset: int, length: int) -> bytes:
        """Guest bytes: this layer's own, and ``below``'s where this layer has none."""
        out = bytearray(length)
        self.read_into(guest_offset, memoryview(out))
        return bytes(out)

    def read_into(self, guest_offset: int, dest: memoryview) -> None:
        """:meth:`read` into the caller's buffer (whatever it held is overwritten)."""
        length = len(dest)
        self.check_range(guest_offset, length)
        pos = guest_offset
        end = guest_offset + length
        while pos < end:
            ext = self.resolve(pos, end - pos)
            n = ext.length
            if n <= 0:
                raise CorruptImage(self.path, "resolver made no progress", "offset", pos)
            at = pos - guest_offset
            part = dest[at : at + n]
            if ext.kind is Kind.DATA:
                assert ext.file is not None
                ext.file.pread_into(ext.file_offset, part)
            elif ext.kind is Kind.COMPRESSED:
                part[:] = self.read_compressed(ext)
            elif ext.kind is Kind.UNALLOCATED:
                self.below.read_into(pos, part)
            else:  # ZERO
                part[:] = bytes(n)
            pos += n

    # ---- writing -------------------------------------------------------------------------

    def require_writable(self) -> None:
        if not self.writable:
            why = f": {self.read_only_reason}" if self.read_only_reason else ""
            raise ImageReadOnly(self.path, f"image is open read-only{why}")

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        raise ImageReadOnly(self.path, f"writing {self.format_name} images is not supported")

    def write_zeroes(self, guest_offset: int, length: int, may_unmap: bool = False) -> None:
        raise ImageReadOnly(self.path, f"writing {self.format_name} images is not supported")

    def discard(self, guest_offset: int, length: int) -> None:
        """Drop data; afterwards the range reads as zeroes (never as the backing image)."""
        self.write_zeroes(guest_offset, length, may_unmap=True)

    def allocate(self, guest_offset: int, length: int) -> None:
        """Make every cluster touching the range DATA and writable in this layer, copying up
        whole clusters from the backing chain, so that a caller can then write in place."""
        raise ImageReadOnly(self.path, f"writing {self.format_name} images is not supported")

    def flush(self) -> None:
        if self.writable:
            self.file.sync()

    def mark_corrupt(self, what: str, field: str | None = None,
                     value: object = None) -> CorruptImage:
        """A caller found this image inconsistent (e.g. data past the end of a truncated
        file): no more writes through this object; a format with an on-disk corrupt flag
        sets it.  Returns the error for the caller to raise."""
        self.writable = False
        self.read_only_reason = f"marked corrupt: {what}"
        return CorruptImage(self.path, what, field, value)

    def close(self) -> None:
        self.file.close()

    def close_chain(self) -> None:
        layer: Image | None = self
        while layer is not None:
            nxt = layer.backing
            layer.close()
            layer = nxt

    # ---- inspection ----------------------------------------------------------------------

    def check(self, repair: bool = False) -> CheckResult:
        """Consistency of this layer's metadata (qemu-img check's leaks and corruptions)."""
        return CheckResult(self.path)

    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``cowd info`` (JSON-serialisable)."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} size={self.virtual_size}>"


def require(
    cond: bool, path: str, what: str, field: str | None = None, value: object = None
) -> None:
    """Raise CorruptImage unless ``cond``; the one-line validation idiom of the codecs."""
    if not cond:
        raise CorruptImage(path, what, field, value)


__all__ = [
    "MAX_CHAIN_DEPTH",
    "SECTOR",
    "CheckResult",
    "Extent",
    "FormatError",
    "HostFile",
    "Image",
    "Kind",
    "require",
]
