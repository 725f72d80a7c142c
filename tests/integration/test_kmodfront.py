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
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from cowd.disk import Disk, ImagePool, boottrace
from cowd.frontends.kmod import abi, module
from cowd.frontends.kmod.channel import KmodDevice
from cowd.frontends.kmod.module import TouchPlan, chain_files, granule_for
from cowd.remap import RemapCache
from tests.support.peers import need, qemu_check, qemu_img, qemu_io, qemu_raw

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


class ModelKernel:
    """The kernel's end of a version-2 channel, as far as the pool goes: a SOCK_SEQPACKET
    socketpair carries whole messages each way.  It keeps the table from REMAPs (pinned
    clusters skip them, as in cowd.c), the pool from GRANTs, allocates first writes from the
    pool (copy-up from its table, the cluster written whole with its own file descriptor,
    then an ALLOC), holds a FLUSH until the ALLOCs before it are ACKed, and answers REVOKE."""

    def __init__(self, dev_files: list[int], granule: int):
        self.daemon_fd, self.fd = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.files = [os.open(f"/proc/self/fd/{fd}", os.O_RDWR if i == 0 else os.O_RDONLY)
                      for i, fd in enumerate(dev_files)]
        self.g = granule
        self.table: dict[int, tuple[int, int, int]] = {}
        self.pinned: dict[int, int] = {}  # cluster -> seq
        self.pool: list[tuple[int, int]] = []  # (file, file_offset) per cluster
        self.seq = self.acked = 0
        self.cookies = 0
        self.replies: dict[int, int] = {}
        self.revoked: list[tuple[int, int]] = []
        self.grants = 0
        self.touch_stops = 0
        self.changed = trio.Event()  # set (and replaced) after each packet from the daemon

    async def until(self, what: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not what():
                await self.changed.wait()

    def send(self, msg: bytes) -> None:
        self.fd.send(msg)

    async def run(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            data = self.fd.recv(1 << 21)
            if not data:
                return
            pos = 0
            while pos < len(data):
                size, mtype, _ver = abi.HDR.unpack_from(data, pos)
                m = data[pos:pos + size]
                pos += size
                if mtype == abi.MSG_REMAP:
                    _s, _t, _v, file, flags, gofs, length, fofs = abi.REMAP.unpack(m)
                    for i in range(length // self.g):
                        c = gofs // self.g + i
                        if c not in self.pinned:
                            self.table[c] = (-1 if flags & abi.REMAP_ZERO else file,
                                             fofs + i * self.g, flags)
                elif mtype == abi.MSG_GRANT:
                    _s, _t, _v, file, _fl, fofs, length = abi.GRANT.unpack(m)
                    self.pool += [(file, fofs + i * self.g) for i in range(length // self.g)]
                    self.grants += 1
                elif mtype == abi.MSG_ACK:
                    seq = abi.ACK.unpack(m)[3]
                    assert self.acked <= seq <= self.seq
                    self.acked = seq
                    self.pinned = {c: s for c, s in self.pinned.items() if s > seq}
                elif mtype == abi.MSG_REVOKE:
                    cookie = abi.REVOKE.unpack(m)[3]
                    self.revoked.append((cookie, len(self.pool)))
                    self.send(abi.REVOKED.pack(32, abi.MSG_REVOKED, 2, cookie, len(self.pool),
                                               self.seq))
                    self.pool = []
                elif mtype == abi.MSG_REPLY:
                    _s, _t, _v, cookie, result, _r = abi.REPLY.unpack(m[:abi.REPLY.size])
                    self.replies[cookie] = result
                elif mtype == abi.MSG_TOUCH_STOP:
                    assert m == abi.pack_touch_stop()
                    self.touch_stops += 1
            self.changed.set()
            self.changed = trio.Event()

    def first_write(self, guest_offset: int, data: bytes) -> bool:
        """A write inside one cluster whose entry is read-only: allocate it from the pool
        (False: no entry, a writable one, or an empty pool: a miss in the real kernel)."""
        c = guest_offset // self.g
        entry = self.table.get(c)
        if entry is None or entry[2] & abi.REMAP_WRITABLE or not self.pool:
            return False
        file, fofs, _flags = entry
        whole = bytearray(self.g) if file < 0 else bytearray(
            os.pread(self.files[file], self.g, fofs).ljust(self.g, b"\0"))
        at = guest_offset - c * self.g
        whole[at:at + len(data)] = data
        hfile, host = self.pool.pop(0)
        os.pwrite(self.files[hfile], whole, host)
        self.seq += 1
        self.table[c] = (hfile, host, abi.REMAP_WRITABLE)
        self.pinned[c] = self.seq
        self.send(abi.ALLOC.pack(48, abi.MSG_ALLOC, 2, self.seq, hfile, len(self.pool),
                                 c * self.g, self.g, host))
        return True

    async def flush(self) -> int:
        """A FLUSH: held until every ALLOC before it is acknowledged, then a miss."""
        seq = self.seq
        await self.until(lambda: self.acked >= seq)
        self.cookies += 1
        cookie = 1000 + self.cookies
        self.send(abi.MISS.pack(40, abi.MSG_MISS, 2, cookie, abi.OP_FLUSH, 0, 0, 0))
        await self.until(lambda: cookie in self.replies)
        return self.replies[cookie]

    def touch(self, records: list[tuple[int, int, int]], end: bool = False,
              deferred: int = 0) -> None:
        """A TOUCH message of (t_ns, file_offset, length) records, as cowd.c builds it."""
        self.send(abi.TOUCH.pack(abi.TOUCH.size + len(records) * abi.TOUCH_REC.size,
                                 abi.MSG_TOUCH, 2, len(records),
                                 abi.TOUCH_END if end else 0, deferred)
                  + b"".join(abi.TOUCH_REC.pack(t, off, n, 0) for t, off, n in records))

    def close(self) -> None:
        for fd in self.files:
            os.close(fd)
        self.fd.close()


async def test_pool_allocations_are_adopted_and_flushed(tmp_path: Path) -> None:
    """The daemon's side of the pool against a model kernel: it grants a pool after priming,
    adopts the kernel's allocations in order and ACKs them, answers a held FLUSH only with
    them durable, refills below the low-water mark, and on stop_pool gives back what the
    kernel never used — the image reads as the writes made it and has no leak."""
    need("qemu-img")
    rng = random.Random(16)
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(4 * MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", base.name, "-o",
             "cluster_size=65536", str(top))
    disk = await Disk.open(str(top), fmt="qcow2", pool=ImagePool(), cache=RemapCache(4096))
    files = chain_files(disk)
    g = granule_for(disk)
    kernel = ModelKernel([f.fd for f in files], g)
    dev = KmodDevice(disk, 0, kernel.daemon_fd.detach(), g, files, version=2)
    dev._table_bound = 64  # a pool of 16 clusters, refilled under 4
    model = bytearray(base.read_bytes())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel.run)
        await nursery.start(dev.serve)
        await dev.prime()
        await dev.start_pool()
        assert dev.pool_problem is None and dev.pool_target == 16
        await kernel.until(lambda: len(kernel.pool) == 16)
        for written, c in enumerate(rng.sample(range(4 * MiB // g), 40), 1):
            off = c * g + rng.randrange(g // 512) * 512
            data = rng.randbytes(512)
            await kernel.until(lambda: bool(kernel.pool))  # (being refilled)
            assert kernel.first_write(off, data)
            model[off:off + 512] = data
            if written % 7 == 0:
                assert await kernel.flush() == abi.REPLY_DONE
        assert await kernel.flush() == abi.REPLY_DONE
        assert dev.pool_ops["adopted"] == 40 and dev.pool_ops["refills"] >= 3
        assert kernel.grants == dev.pool_ops["refills"]
        assert not kernel.pinned  # every allocation acknowledged
        # A flush answered DONE made the allocations durable: qemu-img reads them now.
        assert qemu_raw(top, tmp_path, "qcow2") == bytes(model)
        await dev.stop_pool()
        assert kernel.revoked and disk.lending.lent_clusters == 0
        assert dev.pool_ops["given_back"] == kernel.revoked[-1][1]
        nursery.cancel_scope.cancel()
    dev.close()
    kernel.close()
    await disk.close()
    qemu_check(top)
    assert qemu_raw(top, tmp_path, "qcow2") == bytes(model)


async def _until(what: Callable[[], bool]) -> None:
    """Poll the daemon's state (a TOUCH makes it send nothing the model kernel could see)."""
    with trio.fail_after(10):
        while not what():  # noqa: ASYNC110
            await trio.sleep(0.005)


async def _traced_disk(tmp_path: Path) -> tuple[Path, Disk]:
    need("qemu-img")
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(7).randbytes(4 * MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", base.name, "-o",
             "cluster_size=65536", str(top))
    disk = await Disk.open(str(top), fmt="qcow2", pool=ImagePool(), cache=RemapCache(4096),
                           boot_trace=True)
    return base, disk


async def test_touch_plan_names_the_base_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """CREATE asks the kernel to record the base's file (its index in the device's file
    list) in the trace's granules only where it can: a version-2 channel to a module with
    COWD_FEAT_TOUCH, for a disk whose trace records."""
    _base, disk = await _traced_disk(tmp_path)
    files = chain_files(disk)
    monkeypatch.setattr(module, "module_features", lambda version: abi.FEATURES)
    plan = module.touch_plan(disk, files, 2)
    assert plan == TouchPlan(files.index(disk.trace_file), 16) and plan.file == 1
    assert "ABI 1" in str(module.touch_plan(disk, files, 1))
    monkeypatch.setattr(module, "module_features", lambda version: abi.FEATURES & ~abi.FEAT_TOUCH)
    assert "older module" in str(module.touch_plan(disk, files, 2))
    disk.trace.recording = False
    assert "records no boot trace" in str(module.touch_plan(disk, files, 2))
    await disk.close()
    one = await Disk.open(str(tmp_path / "base.raw"), fmt="raw", pool=ImagePool(),
                          cache=RemapCache(64), boot_trace=True)
    assert "no base" in str(module.touch_plan(one, chain_files(one), 2))
    await one.close()


async def test_kernel_first_touches_make_the_boot_trace(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's side of recording against a model kernel: TOUCH records reach the disk's
    boot trace as the reader reads them and when drain() reads what the reader has not; they
    merge with the daemon's own base reads by time, and the trace written at close is the
    first-touch order of both.  A trace that fills up sends TOUCH_STOP; a TOUCH_END ends the
    recording without one."""
    base, disk = await _traced_disk(tmp_path)
    files = chain_files(disk)
    g = granule_for(disk)
    base_index = files.index(disk.trace_file)
    kernel = ModelKernel([f.fd for f in files], g)
    dev = KmodDevice(disk, 0, kernel.daemon_fd.detach(), g, files, version=2,
                     touch=TouchPlan(base_index, 16))
    assert dev.touch_state == "recording"
    t0 = time.monotonic_ns()
    async with trio.open_nursery() as nursery:
        # No reader yet: only drain() can see the kernel's first batch.
        dev._nursery = nursery
        kernel.touch([(t0 + 1, 5 * g + 512, 4096), (t0 + 2, 2 * g, g)])
        await dev.drain()
        assert list(disk.trace.touched) == [5, 2]
        await dev.drain()  # nothing more: returns at once
        dev._nursery = None
        nursery.start_soon(kernel.run)
        await nursery.start(dev.serve)
        # The daemon's own read of the base (say a DATA reply) between the kernel's.
        await disk.read_into(7 * g, bytearray(4096))
        t1 = time.monotonic_ns()
        kernel.touch([(t1 + 1, 9 * g, 8192), (t1 + 2, 5 * g, 4096)], deferred=3)
        kernel.touch([(t1 + 3, 3 * g + g // 2, g)])  # the tail of one granule, the head of 4
        await _until(lambda: dev.touch_ops["records"] == 5)
        assert dev.touch_ops == {"messages": 3, "records": 5, "deferred": 3}
        # A full trace stops the kernel's recording.
        monkeypatch.setattr(boottrace, "MAX_TRACE_ENTRIES", len(disk.trace.touched) + 1)
        kernel.touch([(t1 + 4, 11 * g, 512), (t1 + 5, 12 * g, 512)])
        await kernel.until(lambda: kernel.touch_stops == 1)
        assert dev.touch_state == "stopped: the trace is full"
        kernel.touch([(t1 + 6, 13 * g, 512)])  # (sent before the kernel stopped)
        await _until(lambda: dev.touch_ops["records"] == 8)
        assert kernel.touch_stops == 1
        nursery.cancel_scope.cancel()
    dev.close()
    kernel.close()
    monkeypatch.undo()
    await disk.close()
    fd = os.open(base, os.O_RDONLY)
    try:
        identity = boottrace.BaseIdentity.of_fd(fd)
    finally:
        os.close(fd)
    granule, order = boottrace.read_trace(str(base) + ".cowd-trace", identity)
    assert granule == g and order == [5, 2, 7, 9, 3, 4, 11]


async def test_touch_end_ends_recording(tmp_path: Path) -> None:
    """The kernel's last TOUCH (its bound reached) says so: the daemon sends no TOUCH_STOP,
    and drain() no longer reads for it."""
    _base, disk = await _traced_disk(tmp_path)
    files = chain_files(disk)
    g = granule_for(disk)
    kernel = ModelKernel([f.fd for f in files], g)
    dev = KmodDevice(disk, 0, kernel.daemon_fd.detach(), g, files, version=2,
                     touch=TouchPlan(files.index(disk.trace_file), 16))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel.run)
        await nursery.start(dev.serve)
        kernel.touch([(time.monotonic_ns(), 0, 512)], end=True)
        await _until(lambda: dev.touch_ops["messages"] == 1)
        assert dev.touch_state.startswith("ended: the kernel's bound")
        assert list(disk.trace.touched) == [0] and disk.trace.recording
        assert kernel.touch_stops == 0
        nursery.cancel_scope.cancel()
    dev.close()
    kernel.close()
    await disk.close()
