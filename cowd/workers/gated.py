"""Layer: cowd workers — the daemon's own use of a disk that its workers also serve.

The daemon still serves some requests of a disk itself while workers hold remaps of it: its
FUSE session reads the mount's descriptor beside the workers' clones, and takes its share of
the kernel's requests.  Whatever the daemon does there that changes or frees the disk's
mapping must keep the contract of :mod:`cowd.workers` like a worker's forwarded request does:
enter the change gate and invalidate every worker's remaps first.  :class:`GatedDisk` is that
view of a :class:`~cowd.disk.Disk`: reads, flushes and in-place writes go straight to the
Disk; a write that allocates, write-zeroes and trim go through the pool's ``changing``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from ..disk import Disk
from ..disk.api import WriteEnd
from . import wire as W
from .served import Served

# WorkerPool.changing, bound: (served, guest_offset, length, requester=, ack_requester=).
Changing = Callable[..., AbstractAsyncContextManager[object | None]]


async def zero_range(disk: Disk, op: W.Op, guest_offset: int, length: int,
                     flags: int) -> None:
    """A TRIM or WRITE_ZEROES of a worker's request, or of the daemon's own (GatedDisk)."""
    if op == W.Op.TRIM:
        await disk.trim(guest_offset, length)
        if flags & W.FLAG_FUA:
            await disk.flush()
    else:
        await disk.write_zeroes(guest_offset, length,
                                may_unmap=bool(flags & W.FLAG_MAY_UNMAP),
                                fua=bool(flags & W.FLAG_FUA))


class GatedDisk:
    """A :class:`~cowd.disk.api.BlockDisk` over ``served``'s Disk for the daemon's own
    frontends; see the module docstring."""

    def __init__(self, served: Served, changing: Changing):
        self.served = served
        self.disk: Disk = served.disk
        self._changing = changing

    # -- what stays the Disk's -------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.disk.path

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def cluster_size(self) -> int:
        return self.disk.cluster_size

    @property
    def readonly(self) -> bool:
        return self.disk.readonly

    def try_read_into(self, offset: int, dest: memoryview | bytearray, *,
                      may_block: bool = False) -> bool:
        return self.disk.try_read_into(offset, dest, may_block=may_block)

    def advise(self, offset: int, length: int) -> None:
        self.disk.advise(offset, length)

    def advise_write(self, offset: int, length: int) -> bool:
        return self.disk.advise_write(offset, length)

    async def read_into(self, offset: int, dest: memoryview | bytearray) -> None:
        await self.disk.read_into(offset, dest)

    async def flush(self) -> None:
        await self.disk.flush()

    async def prefetch(self, offset: int, length: int) -> None:
        await self.disk.prefetch(offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]:
        return await self.disk.block_status(offset, length)

    # -- what changes the mapping ----------------------------------------------------------

    def _allocates(self, offset: int, length: int) -> bool:
        """Would this write change the mapping (not every byte lands in DATA the top layer
        owns, as far as the cache knows)?"""
        if length <= 0:
            return False
        return bool(self.disk.chain.plan_write(offset, offset + length,
                                               count=False).allocating)

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        # In place only: an allocation has to wait for the workers' acknowledgements.
        if self._allocates(offset, len(memoryview(data))):
            return False
        return self.disk.try_write(offset, data)

    def start_write(self, offset: int, data: bytes | bytearray | memoryview,
                    done: Callable[[WriteEnd], None]) -> bool:
        return False

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        length = len(memoryview(data))
        if not self._allocates(offset, length):
            # No await between the look and the pwrite in Disk.write's in-place path.
            await self.disk.write(offset, data, fua=fua)
            return
        async with self._changing(self.served, offset, length, requester=None,
                                  ack_requester=True):
            await self.disk.write(offset, data, fua=fua)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None:
        flags = (W.FLAG_MAY_UNMAP if may_unmap else 0) | (W.FLAG_FUA if fua else 0)
        async with self._changing(self.served, offset, length, requester=None,
                                  ack_requester=True):
            await zero_range(self.disk, W.Op.WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int) -> None:
        async with self._changing(self.served, offset, length, requester=None,
                                  ack_requester=True):
            await zero_range(self.disk, W.Op.TRIM, offset, length, 0)


__all__ = ["GatedDisk", "zero_range"]
