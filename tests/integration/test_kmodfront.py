"""The kernel frontend's remaps, without a kernel: a model of the kernel's table built from the
REMAP messages cowd/frontends/kmod/channel.py would send must read every remapped cluster
exactly as qemu reads the image (``qemu-img convert``), and a WRITE miss must leave writable
remaps.

The model does what kmod/cowd.c does on a hit: per cluster, pread from the named file at the
named offset, or zeroes for ZERO.  Clusters with no remap are the ones the kernel asks the
daemon about (compressed data); the test checks they are only those.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cowd.disk import Disk, ImagePool
from cowd.frontends.kmod import abi
from cowd.frontends.kmod.channel import KmodDevice, chain_files, granule_for
from cowd.remap import RemapCache
from tests.support.peers import need, qemu_img, qemu_io, qemu_raw

MiB = 1 << 20


def _table(dev: KmodDevice, msgs: list[bytes]) -> dict[int, tuple[int, int, int]]:
    """cluster -> (file index or -1, file offset, flags), as the kernel would hold it."""
    table: dict[int, tuple[int, int, int]] = {}
    g = dev.granule
    for m in msgs:
        _size, mtype, _ver, file, flags, gofs, length, fofs = abi.REMAP.unpack(m)
        assert mtype == abi.MSG_REMAP
        assert gofs % g == 0 and length % g == 0 and length > 0
        for i in range(length // g):
            table[gofs // g + i] = (-1 if flags & abi.REMAP_ZERO else file,
                                    0 if flags & abi.REMAP_ZERO else fofs + i * g, flags)
    return table


def _read_cluster(dev: KmodDevice, entry: tuple[int, int, int], n: int) -> bytes:
    file, fofs, _flags = entry
    if file < 0:
        return bytes(n)
    data = os.pread(dev._files[file].fd, n, fofs)
    return data + bytes(n - len(data))  # past EOF reads as zeroes, as in the kernel


async def _device(path: Path, fmt: str | None = None) -> KmodDevice:
    disk = await Disk.open(str(path), fmt=fmt, pool=ImagePool(), cache=RemapCache(4096))
    return KmodDevice(disk, 0, -1, granule_for(disk), chain_files(disk))


@pytest.mark.parametrize("case", ["qcow2-raw", "qcow2-qcow2-compressed", "vhd"])
async def test_remaps_read_like_qemu(case: str, tmp_path: Path) -> None:
    need("qemu-img")
    rng = random.Random(case)
    size = 8 * MiB + 4096 * 3  # a last cluster cut short
    if case == "vhd":
        raw = tmp_path / "b.raw"
        raw.write_bytes(rng.randbytes(size))
        base = tmp_path / "base.vhd"
        qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
                 str(raw), str(base))
        top = tmp_path / "top.vhd"
        from formats import create_overlay
        create_overlay(str(top), str(base), "vhd")
        fmt = "vpc"  # written by cowd below: qemu's vpc driver ignores parent locators
    else:
        base = tmp_path / "base.raw"
        half = (size - 3 * 4096) // 2  # random, then compressible text, then zeroes
        text = b"".join(b"line %d of the base\n" % i for i in range(half // 16))[:half]
        base.write_bytes(rng.randbytes(half) + text + bytes(size - 2 * half))
        if case == "qcow2-qcow2-compressed":
            mid = tmp_path / "mid.qcow2"
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=4096",
                     str(base), str(mid))
            base = mid
        top = tmp_path / "top.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "raw" if base.suffix == ".raw" else "qcow2",
                 "-b", base.name, str(top))
        qemu_io(top, "write -P 0x33 100k 200k", "write -z 2M 64k", "write -P 0x44 5M 64k",
                "discard 5M 64k", fmt="qcow2")
        fmt = "qcow2"
    dev = await _device(top, fmt)
    disk = dev.disk
    if case == "vhd":
        # qemu reads a differencing VHD without its parent: the oracle is a bytearray model.
        model = bytearray(raw.read_bytes())
        for off, data in ((4096, b"\x11" * 8192), (MiB, b"\x22" * (300 << 10))):
            await disk.write(off, data)
            model[off:off + len(data)] = data
        await disk.flush()
        want = bytes(model)
    else:
        want = qemu_raw(top, tmp_path, fmt)
    segs = await disk.segments(0, disk.size)
    msgs, covered = dev._remaps(segs, 0, disk.size)
    table = _table(dev, msgs)
    g = dev.granule
    nclusters = -(-disk.size // g)
    missing = [c for c in range(nclusters) if c not in table]
    for c, entry in table.items():
        n = min(g, disk.size - c * g)
        assert _read_cluster(dev, entry, n) == want[c * g:c * g + n], f"cluster {c}"
    if case == "qcow2-qcow2-compressed":
        assert missing, "compressed clusters must be answered with data, not remapped"
        assert covered < disk.size
    else:
        assert missing == [] and covered == disk.size
    # Only clusters the overlay owns may be writable.
    for c, (file, _fo, flags) in table.items():
        if flags & abi.REMAP_WRITABLE:
            assert dev._files[file].writable, c
    await disk.close()


async def test_write_miss_gives_writable_remaps(tmp_path: Path) -> None:
    """What a WRITE miss does (allocate with copy-up, then remaps): every cluster of the range
    becomes writable in the overlay's file, and still reads as the base did."""
    need("qemu-img")
    rng = random.Random(3)
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(4 * MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", base.name, str(top))
    dev = await _device(top, "qcow2")
    start, end = dev._aligned(65536 * 3 + 512, 200_000)
    segs = await dev.disk.allocate(start, end - start)
    assert segs == await dev.disk.segments(start, end - start)  # what allocate planned holds
    msgs, covered = dev._remaps(segs, start, end, writable_only=True)
    assert covered == end - start
    table = _table(dev, msgs)
    for c, entry in table.items():
        assert entry[2] & abi.REMAP_WRITABLE and dev._files[entry[0]].writable
        data = _read_cluster(dev, entry, dev.granule)
        assert data == base.read_bytes()[c * dev.granule:(c + 1) * dev.granule]
    await dev.disk.flush()
    await dev.disk.close()
    assert qemu_raw(top, tmp_path, "qcow2") == base.read_bytes()
