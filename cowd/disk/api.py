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

from typing import Protocol

from ..errors import RequestError

# Longest READ or WRITE accepted in one request.  Frontends advertise it (NBD's maximum block
# size); it bounds the buffer one request can make the daemon allocate.
MAX_REQUEST_BYTES = 32 << 20


class DiskError(RequestError):
    """A request failed; ``errno`` is what the frontend answers with."""


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

    async def read_into(self, offset: int, dest: memoryview | bytearray) -> None: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def prefetch(self, offset: int, length: int) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]: ...


__all__ = ["MAX_REQUEST_BYTES", "BlockDisk", "DiskError"]
