"""Layer: cowd workers — a disk as the control plane serves it to its workers: :class:`Served`
(its id, the files the workers were given, who may reach it) and its :class:`ChangeGate`, the
granule ranges whose mapping is being changed right now.

The gate is how the contract of :mod:`cowd.workers` keeps "no remap from before a change
after its invalidation": a change enters it before it invalidates the workers and leaves it
once done; a plan never sends remaps of a granule inside it (cowd/workers/host.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from ..disk import ChainFile, Disk, Segment
from . import wire as W

# ---- the change gate ---------------------------------------------------------------------------


class ChangeGate:
    """Granule ranges of one disk whose mapping is being changed (a multiset of
    [first, end) ranges; short: one per change in flight)."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, object]] = []
        self._left = trio.Event()

    def overlaps(self, first: int, end: int, *, but: object = None) -> bool:
        return any(a < end and first < b and who is not but for a, b, who in self._ranges)

    def clear_prefix(self, first: int, end: int) -> int:
        """The end of the longest run of granules from ``first`` that no change touches."""
        for a, b, _ in self._ranges:
            if a < end and first < b:
                end = max(first, a) if a > first else first
        return end

    async def wait_clear(self, first: int, end: int) -> None:
        while self.overlaps(first, end):
            await self._left.wait()

    @asynccontextmanager
    async def changing(self, first: int, end: int) -> AsyncIterator[object]:
        async with self.changing_many([(first, end)]) as token:
            yield token

    @asynccontextmanager
    async def changing_many(self, ranges: list[tuple[int, int]]) -> AsyncIterator[object]:
        """One change of several granule ranges (a batch of adoptions)."""
        token = object()
        entries = [(first, end, token) for first, end in ranges]
        self._ranges.extend(entries)
        try:
            yield token
        finally:
            for entry in entries:
                self._ranges.remove(entry)
            self._left.set()
            self._left = trio.Event()


@dataclass
class Served:
    """A disk as the pool serves it to workers."""

    disk_id: int
    name: str
    disk: Disk
    files: list[ChainFile]
    scope: str = W.SCOPE_SERVE  # who may reach it in a worker (wire.py's scopes)
    fuse_ino: int = 0  # its inode in the FUSE mount (0: not a FUSE file)
    file_index: dict[int, int] = field(default_factory=dict)  # id(file) -> index
    gate: ChangeGate = field(default_factory=ChangeGate)
    readonly_told: bool = False  # the workers know the disk turned read-only

    def __post_init__(self) -> None:
        self.file_index = {id(f): i for i, f in enumerate(self.files)}

    def lend_file(self) -> int:
        """The index of the file whose free clusters a worker may be lent for its first
        writes (the top layer's), or -1: the disk cannot lend (cowd/disk/lending.py says
        why), or a granule is not one cluster (a worker writes lent clusters whole, one
        per granule it maps)."""
        disk = self.disk
        if disk.readonly or disk.granule != disk.cluster_size or \
                disk.lending.problem() is not None:
            return -1
        return self.file_index.get(id(disk.chain.top.image.file), -1)

    def unit(self) -> int:
        """The subcluster a worker may write at its place and have adopted (ADOPT_UNITS: an
        extended-L2 overlay that lends), or 0."""
        return self.disk.lending.unit_size() if self.lend_file() >= 0 else 0

    def granules(self, guest_offset: int, guest_end: int) -> tuple[int, int]:
        """Granules covering every cluster that [guest_offset, guest_end) touches (what a
        change there may remap)."""
        g = self.disk.granule
        cs = max(1, self.disk.cluster_size)
        return guest_offset // cs * cs // g, -(-(-(-guest_end // cs) * cs) // g)

    def runs(self, segs: list[Segment], *, but_gated: object | None = None,
             skip_gated: bool = True) -> list[W.RemapRun]:
        """The remap runs of ``segs``: DATA in a file the workers have, and zeroes; what
        cannot be expressed (compressed clusters) and granules inside the gate (other than
        ``but_gated``'s own change) are left out."""
        out: list[W.RemapRun] = []
        g = self.disk.granule
        readonly = self.disk.readonly
        gate = self.gate
        for seg in segs:
            if seg.is_data:
                fi = self.file_index.get(id(seg.file), -1)
                if fi < 0:
                    continue
                flags = W.REMAP_WRITABLE if seg.writable and not readonly else 0
                run = W.RemapRun(seg.guest_offset, seg.length, fi, flags, seg.file_offset)
            elif seg.is_zero:
                run = W.RemapRun(seg.guest_offset, seg.length, W.ZERO_FILE, 0, 0)
            else:
                continue
            if skip_gated and gate.overlaps(run.guest_offset // g,
                                            -(-(run.guest_offset + run.length) // g),
                                            but=but_gated):
                continue
            if out and out[-1].guest_offset + out[-1].length == run.guest_offset and \
                    out[-1].file_index == run.file_index and out[-1].flags == run.flags and \
                    (run.file_index < 0 or
                     out[-1].file_offset + out[-1].length == run.file_offset):
                prev = out[-1]
                out[-1] = W.RemapRun(prev.guest_offset, prev.length + run.length,
                                     prev.file_index, prev.flags, prev.file_offset)
            else:
                out.append(run)
        return out



__all__ = ["ChangeGate", "Served"]
