"""Priming's direct planner (``Disk.segments(..., direct=True)``, ``Chain.plan_direct``):
one segment per extent from the layers' resolvers must map every guest byte exactly as the
planner through the remap cache does, on every chain kind, before and after writes, and
it must step aside (plan through the cache) while a layer's lock is held."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from cowd.disk import Disk, ImagePool, Segment
from cowd.disk.chain import PlanState
from tests.integration.test_disk import WRITABLE_KINDS, make_chain, new_cache

KiB = 1024


def canonical(segs: list[Segment]) -> list[tuple[int, int, tuple[object, ...], int]]:
    """Segments as maximal runs of (depth, kind, file, file offset continuing, writable)."""
    out: list[tuple[int, int, tuple[object, ...], int]] = []
    for s in segs:
        fo = s.file_offset if s.is_data else 0
        key = (s.depth, s.kind, id(s.file) if s.file is not None else 0, s.writable)
        if out:
            start, n, last_key, last_fo = out[-1]
            if start + n == s.guest_offset and last_key == key and \
                    (not s.is_data or last_fo + n == fo):
                out[-1] = (start, n + s.length, key, last_fo)
                continue
        out.append((s.guest_offset, s.length, key, fo))
    return out


async def same_plans(disk: Disk, rng: random.Random) -> None:
    spans = [(0, disk.size)] + [
        (off, rng.randrange(1, disk.size - off + 1))
        for off in (rng.randrange(0, disk.size) for _ in range(20))]
    for off, n in spans:
        cached = await disk.segments(off, n)
        direct = await disk.segments(off, n, direct=True)
        assert canonical(direct) == canonical(cached), (off, n)
        assert sum(s.length for s in direct) == n
        if disk.size >= 1 << 20 and n == disk.size:
            assert len(direct) <= len(cached)


@pytest.mark.parametrize("kind", ["qcow", *WRITABLE_KINDS])
async def test_direct_plan_maps_like_the_cached_plan(kind: str, tmp_path: Path,
                                                     rng: random.Random) -> None:
    chain = make_chain(kind, tmp_path, rng)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache(),
                           readonly=kind == "qcow")
    try:
        await same_plans(disk, rng)
        if not disk.readonly:
            for _ in range(12):  # first writes, in-place writes, zeroes, trims
                off = rng.randrange(0, disk.size - 64 * KiB)
                n = rng.randrange(1, 64 * KiB)
                op = rng.randrange(3)
                if op == 0:
                    await disk.write(off, rng.randbytes(n))
                elif op == 1:
                    await disk.write_zeroes(off, n)
                else:
                    await disk.trim(off, n)
            await same_plans(disk, rng)
    finally:
        await disk.close()


async def test_direct_plan_steps_aside_while_a_layer_is_locked(tmp_path: Path,
                                                               rng: random.Random) -> None:
    chain = make_chain("qcow2", tmp_path, rng)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    try:
        assert disk.chain.plan_direct(0, disk.size, PlanState()) is not None
        locked = trio.Event()
        release = trio.Event()

        async def holder() -> None:
            async with disk.chain.top.lock:
                locked.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await locked.wait()
            assert disk.chain.plan_direct(0, disk.size, PlanState()) is None
            with trio.move_on_after(0.2) as scope:  # the fallback waits for the lock
                await disk.segments(0, disk.size, direct=True)
            assert scope.cancelled_caught
            release.set()
        cached = await disk.segments(0, disk.size)
        assert canonical(await disk.segments(0, disk.size, direct=True)) == canonical(cached)
    finally:
        await disk.close()
