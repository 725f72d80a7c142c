"""Layer: cowd disk.  What a frontend may call on a disk: :class:`BlockDisk`, the longest
request it may make (MAX_REQUEST_BYTES), and the error it gets back: :class:`DiskError`.

Two classes have this shape: :class:`~cowd.disk.disk.Disk`, the disk itself in the control
plane, and :class:`~cowd.workers.mapped.MappedDisk`, a worker's view of one (mapped I/O done
locally, everything else asked of the control plane).  A frontend (the NBD server, the FUSE
server) is written against this protocol and serves either unchanged.

The synchronous calls never wait: ``try_read_into``/``try_write`` return False when the
request needs something that would (a lock, the disk, the control plane), and the frontend
then awaits ``read_into``/``write``.  Errors are :class:`DiskError` with the errno to answer.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from formats.errors import (
    CorruptImage,
    FormatError,
    ImageIOError,
    ImageReadOnly,
    SyncFailed,
    UnsupportedImage,
)

from ..errors import DiskError

# Longest READ or WRITE accepted in one request.  Frontends advertise it (NBD's maximum block
# size); it bounds the buffer one request can make the daemon allocate.
MAX_REQUEST_BYTES = 32 << 20


def disk_error(e: Exception, path: str) -> DiskError:
    """The DiskError a request answers with when the library (or the host) raised ``e``."""
    if isinstance(e, DiskError):
        return e
    if isinstance(e, ImageReadOnly):
        return DiskError(errno.EPERM, str(e))
    if isinstance(e, SyncFailed):
        # After a failed fdatasync (in a flush, or one a codec makes by itself in a write)
        # the kernel may have dropped the dirty pages it could not write and marked them
        # clean, so the next fdatasync can succeed without the data: like qemu's
        # file-posix, the disk fails every later flush too (Disk._translate notes it).  A
        # failed pwrite, e.g. ENOSPC, loses nothing: the codec keeps its dirty state and
        # the next flush writes it again.
        return DiskError(e.errno or errno.EIO, str(e))
    if isinstance(e, ImageIOError):
        return DiskError(e.errno or errno.EIO, str(e))
    if isinstance(e, CorruptImage):
        return DiskError(errno.EIO, f"{e} (disk marked corrupt, now read-only)")
    if isinstance(e, UnsupportedImage):
        return DiskError(errno.EOPNOTSUPP, str(e))
    if isinstance(e, FormatError):
        return DiskError(errno.EIO, str(e))
    if isinstance(e, OSError):
        where = e.filename or path
        return DiskError(e.errno or errno.EIO, f"{where}: {e.strerror or e}")
    return DiskError(errno.EINVAL, f"{path}: {e}")


@dataclass(frozen=True, slots=True)
class WriteEnd:
    """How a write started with :meth:`BlockDisk.start_write` ended: done (``errno`` 0),
    failed (``errno``, ``message``), or not done after all (``redo``: do it with ``write``)."""

    errno: int = 0
    message: str = ""
    redo: bool = False


class BlockDisk(Protocol):
    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def cluster_size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    def try_read_into(self, offset: int, dest: memoryview | bytearray, *,
                      may_block: bool = False) -> bool: ...

    def advise(self, offset: int, length: int) -> None: ...

    def advise_write(self, offset: int, length: int) -> bool: ...

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool: ...

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: Callable[[WriteEnd], None]) -> bool:
        """Start a write that is written now but answered later (a worker's first write of
        whole subclusters, waiting for its adoption): True if started, and then ``done`` is
        called exactly once, from another task, with how it ended; the caller keeps ``data``
        until then (a ``redo`` needs it).  False: nothing was done (``write`` it)."""
        ...

    async def read_into(self, offset: int, dest: memoryview | bytearray) -> None: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def prefetch(self, offset: int, length: int) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]: ...


__all__ = ["MAX_REQUEST_BYTES", "BlockDisk", "DiskError", "WriteEnd", "disk_error"]
