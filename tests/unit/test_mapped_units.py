"""A worker's first writes of whole subclusters (cowd/workers/mapped.py, extended L2), against
a scripted control plane: where each write lands (the guest cluster's own host cluster, a
lent one, the lent one a write under way already took), one ADOPT_UNITS for the writes
waiting, the table patched from the reply (merged runs), a refused write redone and its
lent cluster back in the pool only once no adopted run uses it, and ADOPTED from another
worker applied only to entries the table still holds."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from cowd.disk.api import WriteEnd
from cowd.workers import wire as W
from cowd.workers.mapped import MappedDisk, Run

KiB = 1024
CLUSTER = 128 * KiB
UNIT = 4 * KiB


class Plane:
    """Answers each ADOPT_UNITS with the next scripted result bytes; records the runs."""

    def __init__(self, nursery: trio.Nursery, results: list[bytes]):
        self.nursery = nursery
        self.results = results
        self.batches: list[list[W.Adoption]] = []

    async def miss(self, disk_id: int, guest_offset: int, length: int) -> W.Reply:
        raise AssertionError("no miss expected")

    async def request(self, disk_id: int, op: W.Op, flags: int, guest_offset: int,
                      length: int, data: bytes | bytearray | memoryview = b"",
                      on_reply: Callable[[W.Reply], None] | None = None) -> W.Reply:
        if op == W.Op.LEND:
            return W.Reply(0, 0, b"")  # lends nothing more: the test fills the pool
        assert op == W.Op.ADOPT_UNITS, op
        await trio.lowlevel.checkpoint()
        self.batches.append(W.parse_adoptions(data))
        reply = W.Reply(0, 0, self.results.pop(0))
        if on_reply is not None:
            on_reply(reply)
        return reply

    def background(self, task: Callable[[], Awaitable[None]]) -> None:
        self.nursery.start_soon(task)


def _disk(tmp: Path, plane: Plane) -> tuple[MappedDisk, int, int]:
    top = os.open(tmp / "top", os.O_RDWR | os.O_CREAT)
    base = os.open(tmp / "base", os.O_RDWR | os.O_CREAT)
    os.ftruncate(base, 4 * CLUSTER)
    spec = W.DiskSpec(1, "d", str(tmp / "top"), 4 * CLUSTER, CLUSTER, CLUSTER, False,
                      (True, False), lend_file=0, unit=UNIT, fds=(top, base))
    disk = MappedDisk(spec, plane)
    # Granules 0 and 2: all the base's.  Granule 1: its first 8 KiB the top's own (at 1 MiB).
    disk.install([W.RemapRun(0, CLUSTER, 1, 0, 0),
                   W.RemapRun(CLUSTER, 8 * KiB, 0, W.REMAP_WRITABLE, 1 << 20),
                   W.RemapRun(CLUSTER + 8 * KiB, CLUSTER - 8 * KiB, 1, 0, CLUSTER + 8 * KiB),
                   W.RemapRun(2 * CLUSTER, CLUSTER, 1, 0, 2 * CLUSTER)])
    disk._pool.append([4 << 20, 2 * CLUSTER])  # two lent clusters at 4 MiB
    disk._pool_bytes = 2 * CLUSTER
    return disk, top, base


async def test_unit_writes_land_in_place_and_patch_the_table(tmp_path: Path) -> None:
    ends: dict[str, WriteEnd] = {}
    async with trio.open_nursery() as nursery:
        plane = Plane(nursery, [b"\x01\x01\x01"])
        disk, top, _base = _disk(tmp_path, plane)
        for name, off in (("a", 8 * KiB), ("b", 12 * KiB), ("c", CLUSTER + 12 * KiB)):
            assert disk.start_write(off, bytes([ord(name)]) * UNIT,
                                    lambda end, name=name: ends.__setitem__(name, end))
    assert ends == {"a": WriteEnd(), "b": WriteEnd(), "c": WriteEnd()}
    # One batch; a and b share the lent cluster taken for granule 0, c went to granule 1's
    # own cluster.
    assert plane.batches == [[W.Adoption(8 * KiB, UNIT, (4 << 20) + 8 * KiB),
                              W.Adoption(12 * KiB, UNIT, (4 << 20) + 12 * KiB),
                              W.Adoption(CLUSTER + 12 * KiB, UNIT, (1 << 20) + 12 * KiB)]]
    assert os.pread(top, 8 * KiB, (4 << 20) + 8 * KiB) == b"a" * UNIT + b"b" * UNIT
    assert os.pread(top, UNIT, (1 << 20) + 12 * KiB) == b"c" * UNIT
    base = disk._fds[1]
    assert disk._table[0] == (Run(0, 8 * KiB, base, 0, False),
                              Run(8 * KiB, 16 * KiB, top, (4 << 20) + 8 * KiB, True),
                              Run(16 * KiB, CLUSTER, base, 16 * KiB, False))
    # The cluster taken stays out of the pool; the other lent one is still there.
    assert disk._pool_bytes == CLUSTER and not disk._unit_lent and not disk._unit_refs
    # A later write next to c: in place no more (c's neighbour is the base's), merged runs.
    ends.clear()
    async with trio.open_nursery() as nursery:
        plane.nursery = nursery
        plane.results.append(b"\x01")
        assert disk.start_write(CLUSTER + 8 * KiB, b"d" * UNIT,
                                lambda end: ends.__setitem__("d", end))
    assert disk._table[1][0] == Run(CLUSTER, CLUSTER + 16 * KiB, top, 1 << 20, True)


async def test_refused_writes_are_redone_and_their_cluster_given_back(tmp_path: Path) -> None:
    ends: dict[str, WriteEnd] = {}
    async with trio.open_nursery() as nursery:
        plane = Plane(nursery, [b"\x00\x00"])
        disk, _top, _base = _disk(tmp_path, plane)
        before = list(disk._pool[0])
        assert disk.start_write(0, b"x" * UNIT, lambda end: ends.__setitem__("x", end))
        assert disk.start_write(2 * CLUSTER, b"y" * UNIT, lambda end: ends.__setitem__("y", end))
    assert ends == {"x": WriteEnd(redo=True), "y": WriteEnd(redo=True)}
    # Nothing adopted: the table is as it was, both lent clusters back in the pool.
    assert disk._table[0] == (Run(0, CLUSTER, disk._fds[1], 0, False),)
    assert disk._pool_bytes == 2 * CLUSTER
    assert sorted(p[0] for p in disk._pool) == [before[0], before[0] + CLUSTER]


async def test_adopted_elsewhere_patches_only_entries_still_held(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        disk, top, _base = _disk(tmp_path, Plane(nursery, []))
    disk.invalidate(CLUSTER, CLUSTER)  # granule 1 dropped: the patch must not bring it back
    disk.apply_adopted([W.Adoption(4 * KiB, UNIT, (8 << 20) + 4 * KiB),
                        W.Adoption(CLUSTER + 20 * KiB, UNIT, (1 << 20) + 20 * KiB)])
    assert 1 not in disk._table
    assert disk._table[0][1] == Run(4 * KiB, 8 * KiB, top, (8 << 20) + 4 * KiB, True)
    # Read-only now: an adopted run is dropped, never made writable.
    disk.install([W.RemapRun(CLUSTER, CLUSTER, 1, 0, CLUSTER)])
    disk.make_readonly("test")
    disk.install([W.RemapRun(CLUSTER, CLUSTER, 1, 0, CLUSTER)])
    disk.apply_adopted([W.Adoption(CLUSTER, UNIT, 1 << 20)])
    assert 1 not in disk._table
