"""cowd/disk.py: a Disk over real image chains, against a bytearray model and real peers.

Chains are made by qemu-img / qemu-io at test time (a differencing VHD overlay by formats/,
since qemu cannot make one).  After every writing test the disk is closed and the file is read
by a peer that shares no code with cowd — ``qemu-img convert`` (raw, qcow, qcow2) or libvhdi's
vhdimount (differencing VHD) — and compared with the model byte for byte; qcow2 overlays must
pass ``qemu-img check``, and a base's sha256 must not change.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from cowd.disk import MAX_REQUEST_BYTES, Adoption, Disk, DiskError, FileRange, ImagePool, Segment
from cowd.disk.chain import PlanState
from cowd.errors import CommandFailed, UsageError
from cowd.remap import RemapCache
from formats.base import NearOpener
from formats.errors import CorruptImage, ImageIOError
from tests.support.host import evict_pages
from tests.support.peers import (
    libvhdi_raw,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_raw,
    sha256,
    vhdimount_problem,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(120)]

KiB = 1024
MiB = 1024 * KiB
G = 64 * KiB  # the remap granule of every image used here (64 KiB clusters, or clamped up)


# ---- peers and oracles ----------------------------------------------------------------------

_probe_cache: dict[str, str | None] = {}


def qcow2_problem() -> str | None:
    """Why qcow2 overlays cannot be served yet (formats/qcow2/ is being written), or None."""
    if "qcow2" not in _probe_cache:
        reason: str | None = None
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "probe.qcow2"
            qemu_img("create", "-f", "qcow2", p, "1M")
            try:
                img = formats.open_one(str(p), True)
            except NotImplementedError:
                reason = "formats/qcow2/ is not implemented yet (open raises NotImplementedError)"
            else:
                if img.format_name != "qcow2":
                    reason = f"formats/ does not recognise qcow2 yet (probed as {img.format_name})"
                elif not img.writable:
                    reason = f"formats/qcow2/ cannot write yet ({img.read_only_reason})"
                img.close()
        _probe_cache["qcow2"] = reason
    return _probe_cache["qcow2"]


# ---- a tiny writable copy-on-write format, for this file only ------------------------------
#
# The disk's job over a chain is caching, invalidation and serialisation; the format library's
# codecs for writable overlays are being written alongside it.  "tcow" is a deliberately plain
# format (a header, a flat table of cluster entries, data clusters appended) that lets these
# tests drive real allocation with copy-up through a chain of any depth, and that *checks the
# library's threading contract*: a call that enters an image while another thread is inside
# it fails the test.

TCOW_MAGIC = b"TCOWTEST"
TCOW_HEADER_BYTES = 4096
TCOW_UNALLOCATED = 0
TCOW_ZERO = 1


class TcowImage(formats.Image):
    format_name = "tcow"

    def __init__(self, path: str, file: formats.HostFile, writable: bool):
        super().__init__(path, file, writable)
        self.table: list[int] = []
        self.data_start = 0
        self._owner: int | None = None
        self._depth = 0

    # The contract check: one thread at a time in an image (re-entry by that thread is fine).
    def _enter(self) -> None:
        me = threading.get_ident()
        if self._owner not in (None, me):
            raise AssertionError(f"{self.path}: two threads inside one image")
        self._owner = me
        self._depth += 1

    def _exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        return head.startswith(TCOW_MAGIC)

    @classmethod
    def open(cls, path: str, file: formats.HostFile, writable: bool,
             near: NearOpener | None = None) -> TcowImage:
        img = cls(path, file, writable)
        hdr = file.pread_exact(0, TCOW_HEADER_BYTES, "header")
        img.virtual_size, img.cluster_size, name_len = struct.unpack_from("<QII", hdr, 8)
        name = hdr[24:24 + name_len].decode()
        img.backing_name = name or None
        n = -(-img.virtual_size // img.cluster_size)
        img.table = list(struct.unpack(f"<{n}Q", file.pread_exact(TCOW_HEADER_BYTES, 8 * n)))
        cs = img.cluster_size
        img.data_start = -(-(TCOW_HEADER_BYTES + 8 * n) // cs) * cs
        return img

    def resolve(self, guest_offset: int, length: int) -> formats.Extent:
        self._enter()
        try:
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.0002)  # a copy-up's read of the parent, slowed down
            cs = self.cluster_size
            end = min(self.virtual_size, guest_offset + length)
            idx = guest_offset // cs
            first = self.table[idx]
            kind = (formats.Kind.UNALLOCATED if first == TCOW_UNALLOCATED else
                    formats.Kind.ZERO if first == TCOW_ZERO else formats.Kind.DATA)
            pos = (idx + 1) * cs
            while pos < end:
                e = self.table[pos // cs]
                if kind is formats.Kind.DATA:
                    if e != first + (pos // cs - idx) * cs:
                        break
                elif e != first:
                    break
                pos += cs
            n = min(pos, end) - guest_offset
            if kind is formats.Kind.DATA:
                return formats.Extent(guest_offset, n, kind, self.file,
                                      first + guest_offset - idx * cs, writable=self.writable)
            return formats.Extent(guest_offset, n, kind)
        finally:
            self._exit()

    def _set(self, idx: int, value: int) -> None:
        self.table[idx] = value
        self.file.pwrite(TCOW_HEADER_BYTES + 8 * idx, struct.pack("<Q", value))

    def _pieces(self, guest_offset: int, length: int) -> list[tuple[int, int, int]]:
        cs = self.cluster_size
        out = []
        pos, end = guest_offset, guest_offset + length
        while pos < end:
            idx = pos // cs
            n = min(end, (idx + 1) * cs) - pos
            out.append((idx, pos - idx * cs, n))
            pos += n
        return out

    def write(self, guest_offset: int, data: bytes | bytearray | memoryview) -> None:
        self.require_writable()
        self.check_range(guest_offset, len(data))
        self._enter()
        try:
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.0005)  # widen the window in which a contract breach shows
            view = memoryview(data).cast("B")
            cs = self.cluster_size
            done = 0
            for idx, off, n in self._pieces(guest_offset, len(view)):
                entry = self.table[idx]
                if entry > TCOW_ZERO:
                    self.file.pwrite(entry + off, view[done:done + n])
                else:
                    start = idx * cs
                    csize = min(cs, self.virtual_size - start)
                    buf = bytearray(csize)
                    if entry == TCOW_UNALLOCATED:
                        self.below.read_into(start, memoryview(buf))
                    buf[off:off + n] = view[done:done + n]
                    fo = max(self.data_start, -(-self.file.size() // cs) * cs)
                    self.file.pwrite(fo, buf)  # data before the entry that reaches it
                    self._set(idx, fo)
                done += n
        finally:
            self._exit()

    def write_zeroes(self, guest_offset: int, length: int, may_unmap: bool = False) -> None:
        self.require_writable()
        self.check_range(guest_offset, length)
        self._enter()
        try:
            cs = self.cluster_size
            for idx, off, n in self._pieces(guest_offset, length):
                if off == 0 and n == min(cs, self.virtual_size - idx * cs):
                    self._set(idx, TCOW_ZERO)
                else:
                    self.write(idx * cs + off, bytes(n))
        finally:
            self._exit()

    def flush(self) -> None:
        self._enter()
        try:
            super().flush()
        finally:
            self._exit()

    def check(self, repair: bool = False) -> formats.CheckResult:
        r = formats.CheckResult(self.path)
        data = [e for e in self.table if e > TCOW_ZERO]
        if len(set(data)) != len(data):
            r.corruptions.append("a data cluster is referenced twice")
        if any(e % self.cluster_size or e < self.data_start for e in data):
            r.corruptions.append("a data cluster is misplaced")
        return r


def tcow_create(path: Path, size: int, cluster_size: int, backing: str | None = None) -> None:
    name = (backing or "").encode()
    hdr = TCOW_MAGIC + struct.pack("<QII", size, cluster_size, len(name)) + name
    n = -(-size // cluster_size)
    path.write_bytes(hdr.ljust(TCOW_HEADER_BYTES, b"\0") + bytes(8 * n))


@pytest.fixture(autouse=True)
def tcow_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make formats/ probe tcow (first: raw accepts anything)."""
    monkeypatch.setattr(formats, "FORMATS", {"tcow": TcowImage, **formats.FORMATS})


@contextlib.contextmanager
def tcow_known() -> Iterator[None]:
    """The same, for code outside a test function (module fixtures, oracles)."""
    saved = formats.FORMATS
    formats.FORMATS = {"tcow": TcowImage, **saved}
    try:
        yield
    finally:
        formats.FORMATS = saved


def read_chain(top: Path) -> bytes:
    """The virtual disk through a fresh formats/ open (no cache, no Disk)."""
    with tcow_known():
        img = formats.open_image(str(top))
    try:
        return img.read(0, img.virtual_size)
    finally:
        img.close_chain()


def make_tcow_chain(tmp: Path, rng: random.Random, size: int) -> tuple[Path, Path]:
    """base.tcow (128 KiB clusters, a little shorter than the overlay; data, zero and
    unallocated clusters) under ov.tcow (32 KiB clusters, some data and zeroes of its own)."""
    base = tmp / "base.tcow"
    base_size = size - 200 * KiB + 3 * 512
    tcow_create(base, base_size, 128 * KiB)
    b = TcowImage.open(str(base), formats.HostFile(str(base), True), True)
    for i in range(-(-base_size // (128 * KiB))):
        r = rng.random()
        start = i * 128 * KiB
        n = min(128 * KiB, base_size - start)
        if r < 0.6:
            b.write(start, rng.randbytes(n))
        elif r < 0.75:
            b.write_zeroes(start, n)
    b.close()
    top = tmp / "ov.tcow"
    tcow_create(top, size, 32 * KiB, backing=base.name)
    with tcow_known():
        t = formats.open_image(str(top), True)
    for _ in range(10):
        off = rng.randrange(size - 100 * KiB)
        t.write(off, rng.randbytes(rng.randrange(1, 100 * KiB)))
    t.write_zeroes(32 * KiB, 64 * KiB)
    t.close_chain()
    return base, top


def vhd_write_problem(tmp: Path) -> str | None:
    """formats/vhd/'s writing is being written too: does a differencing write survive
    close and reopen yet?"""
    if "vhdwrite" not in _probe_cache:
        reason: str | None = None
        d = Path(tempfile.mkdtemp(dir=tmp))
        qemu_img("create", "-f", "vpc", d / "b.vhd", "1M")
        formats.create_overlay(str(d / "o.vhd"), str(d / "b.vhd"), "vhd")
        try:
            img = formats.open_image(str(d / "o.vhd"), True)
            img.write(4096, b"\x07" * 5000)
            img.close_chain()
            if read_chain(d / "o.vhd")[4096:9096] != b"\x07" * 5000:
                reason = "formats/vhd/: a differencing write does not survive close and reopen"
        except formats.FormatError as e:
            reason = f"formats/vhd/ cannot write a differencing image yet ({e})"
        shutil.rmtree(d)
        _probe_cache["vhdwrite"] = reason
    return _probe_cache["vhdwrite"]


@dataclass
class Chain:
    kind: str  # raw | tcow | qcow2 | vhd | qcow (read-only qcow v1 overlay)
    top: Path
    base: Path | None
    initial: bytes  # the virtual disk as a peer reads it before the test
    base_sha: str | None
    fmt: str | None = None  # the top's format, when probing is not enough

    def oracle(self, tmp: Path) -> bytes:
        if self.kind == "raw":
            return qemu_raw(self.top, tmp, "raw")
        if self.kind in ("qcow2", "qcow"):
            return qemu_raw(self.top, tmp, self.kind)
        if self.kind == "tcow":
            return read_chain(self.top)
        return libvhdi_raw(self.top, tmp)

    def check(self) -> None:
        """The top passes its peer's consistency check; the base is untouched."""
        if self.kind == "qcow2":
            qemu_check(self.top)
        elif self.kind in ("vhd", "tcow"):
            for path in (self.top, self.base):
                assert path is not None
                with tcow_known():
                    img = formats.open_one(str(path))
                try:
                    result = img.check()
                finally:
                    img.close()
                assert result.clean, (result.corruptions, result.leaks)
        if self.base is not None:
            assert sha256(self.base) == self.base_sha, f"{self.base} changed"


def fill_pattern(rng: random.Random, image: Path, fmt: str, size: int, count: int) -> None:
    """Random patterns, lengths and zero writes, by qemu-io."""
    cmds = []
    for _ in range(count):
        off = rng.randrange(0, size // 512) * 512
        n = min(size - off, rng.randrange(1, 64) * 4 * KiB)
        cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
    qemu_io(image, *cmds, fmt=fmt)


def make_chain(kind: str, tmp: Path, rng: random.Random, size: int = 4 * MiB) -> Chain:
    tmp.mkdir(parents=True, exist_ok=True)
    if kind == "raw":
        top = tmp / "top.raw"
        top.write_bytes(rng.randbytes(size))
        return Chain(kind, top, None, top.read_bytes(), None)
    if kind in ("qcow2", "qcow"):
        if kind == "qcow2" and (why := qcow2_problem()):
            pytest.skip(why)
        base = tmp / "base.raw"
        base.write_bytes(rng.randbytes(size))
        top = tmp / f"ov.{kind}"
        qemu_img("create", "-f", kind, "-b", base.name, "-F", "raw", top)
        fill_pattern(rng, top, kind, size, 12)
        if kind == "qcow2":
            qemu_io(top, "write -z 64k 128k", "write -z 1000k 64k", fmt="qcow2")
        return Chain(kind, top, base, qemu_raw(top, tmp, kind), sha256(base), kind)
    if kind == "tcow":
        base, top = make_tcow_chain(tmp, rng, size)
        return Chain(kind, top, base, read_chain(top), sha256(base))
    if kind == "vhd":
        if why := vhdimount_problem(tmp) or vhd_write_problem(tmp):
            pytest.skip(why)
        base = tmp / "base.vhd"
        qemu_img("create", "-f", "vpc", base, str(size))
        fill_pattern(rng, base, "vpc", size, 16)
        top = tmp / "ov.vhd"
        formats.create_overlay(str(top), str(base), "vhd")
        return Chain(kind, top, base, qemu_raw(base, tmp, "vpc"), sha256(base))
    raise AssertionError(kind)


def new_cache(max_entries: int = 1 << 14, **kw: object) -> RemapCache:
    return RemapCache(max_entries=max_entries, **kw)  # type: ignore[arg-type]


async def read_whole(disk: Disk, step: int = 3 * G + 4 * KiB) -> bytes:
    out = bytearray()
    pos = 0
    while pos < disk.size:
        n = min(step, disk.size - pos)
        out += await disk.read(pos, n)
        pos += n
    return bytes(out)


# ---- many tasks against a model --------------------------------------------------------------

async def hammer(disk: Disk, model: bytearray, seed: int, *, tasks: int = 8,
                 ops: int = 80, writes: bool = True) -> None:
    """Random reads, writes, write-zeroes, trims, flushes and status queries from many tasks.
    Concurrent requests never overlap in bytes (their result would be undefined) but share
    clusters all the time, which is what the disk must serialise."""
    size = disk.size
    active: list[tuple[int, int]] = []

    def pick(r: random.Random) -> tuple[int, int]:
        shape = r.random()
        if shape < 0.4:  # small, unaligned, clustered in the first MiB (clusters shared)
            off = r.randrange(0, min(size, 1 * MiB) - 1)
            n = r.randrange(1, 9 * KiB)
        elif shape < 0.7:  # 4 KiB aligned
            off = r.randrange(0, size // 4096) * 4096
            n = 4096 * r.randrange(1, 5)
        else:  # large, straddling granules
            off = r.randrange(0, size - 1)
            n = r.randrange(1, 384 * KiB)
        return off, max(1, min(n, size - off))

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(ops):
            for _attempt in range(50):
                off, n = pick(r)
                if not any(off < e and s < off + n for s, e in active):
                    break
                await trio.lowlevel.checkpoint()
            else:
                continue
            rng_op = r.random()
            if not writes:
                rng_op = 0.0
            active.append((off, off + n))
            try:
                if rng_op < 0.35:
                    got = await disk.read(off, n)
                    assert got == model[off:off + n], f"read {off}+{n}"
                elif rng_op < 0.75:
                    data = r.randbytes(n)
                    await disk.write(off, data, fua=r.random() < 0.1)
                    model[off:off + n] = data
                elif rng_op < 0.85:
                    await disk.write_zeroes(off, n, may_unmap=r.random() < 0.5,
                                            fua=r.random() < 0.1)
                    model[off:off + n] = bytes(n)
                elif rng_op < 0.92:
                    await disk.trim(off, n)
                    model[off:off + n] = bytes(n)
                elif rng_op < 0.96:
                    pos = off
                    for length, hole, zero in await disk.block_status(off, n):
                        assert length > 0 and hole == zero
                        if zero:
                            assert not any(model[pos:pos + length]), f"status zero at {pos}"
                        pos += length
                    assert off < pos <= off + n
                else:
                    await disk.flush()
            finally:
                active.remove((off, off + n))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(worker, seed * 1000 + i)


WRITABLE_KINDS = ["raw", "tcow", "vhd", "qcow2"]


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offload"])
@pytest.mark.parametrize("kind", WRITABLE_KINDS)
async def test_concurrent_random_ops_match_model(kind: str, offload: bool, tmp_path: Path,
                                                 rng: random.Random) -> None:
    chain = make_chain(kind, tmp_path, rng)
    model = bytearray(chain.initial)
    # A small cache: entries are evicted and refilled all the time.
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache(48),
                           offload_writes=offload, readahead_clusters=4)
    assert disk.size == len(model)
    with trio.fail_after(90):
        await hammer(disk, model, seed=rng.randrange(1 << 30))
        assert await read_whole(disk) == model
    stats = disk.stats()
    await disk.close()
    assert stats["ops"]["writes"] > 0 and stats["remap"]["hits"] > 0
    assert chain.oracle(tmp_path) == model
    chain.check()


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offload"])
@pytest.mark.parametrize("kind", WRITABLE_KINDS)
async def test_concurrent_first_writes_to_one_cluster(kind: str, offload: bool,
                                                      tmp_path: Path,
                                                      rng: random.Random) -> None:
    """Sixteen tasks write disjoint pieces of one never-written cluster at the same moment:
    every piece lands, and (where one allocation makes the cluster writable) only the first
    writer goes to the library — the others wait for it and then write in place."""
    chain = make_chain(kind, tmp_path, rng)
    model = bytearray(chain.initial)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache(),
                           offload_writes=offload)
    cluster = 2 * MiB + 3 * G  # never written by make_chain's pre-fill? any is fine: see below
    if kind == "qcow2":
        # Pick a cluster qemu-io left unallocated in the overlay.
        mapping = json.loads(qemu_img("map", "-U", "--output=json", "-f", "qcow2",
                                      chain.top).stdout)  # -U: the disk holds qemu's locks
        free = [e for e in mapping if e["depth"] > 0 and e["length"] >= G]
        cluster = -(-free[0]["start"] // G) * G
    go = trio.Event()
    pieces = [(cluster + i * 4096 + (i % 3) * 100, 3000 + i * 7) for i in range(16)]

    async def writer(off: int, n: int) -> None:
        data = bytes([(off // 7) & 0xFF]) * n
        await go.wait()
        await disk.write(off, data)
        model[off:off + n] = data

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for off, n in pieces:
                nursery.start_soon(writer, off, n)
            await trio.sleep(0.01)
            go.set()
        assert await disk.read(cluster - G, 3 * G) == model[cluster - G:cluster + 2 * G]
    ops = disk.stats()["ops"]
    await disk.close()
    if kind in ("raw", "qcow2"):
        assert ops["library_writes"] == 1, ops
        assert ops["writes_in_place"] == 15, ops
    assert chain.oracle(tmp_path) == model
    chain.check()


@pytest.mark.parametrize("kind", ["tcow", "vhd", "qcow2"])
async def test_writes_reach_only_the_overlay_and_survive_reopen(kind: str, tmp_path: Path,
                                                               rng: random.Random) -> None:
    """Write, close, open again in a new pool and cache: the data comes from the file."""
    chain = make_chain(kind, tmp_path, rng)
    model = bytearray(chain.initial)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    for i in range(40):
        off = rng.randrange(disk.size - 70 * KiB)
        data = rng.randbytes(rng.randrange(1, 70 * KiB))
        await disk.write(off, data, fua=i % 10 == 0)
        model[off:off + len(data)] = data
    await disk.write_zeroes(0, 5 * 512)
    model[0:5 * 512] = bytes(5 * 512)
    await disk.close()
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    assert await read_whole(disk) == model
    await disk.close()
    assert chain.oracle(tmp_path) == model
    chain.check()


# ---- a hypothesis property: any op sequence, any cache size ----------------------------------

@pytest.fixture(scope="module")
def tcow_template(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return make_chain("tcow", tmp_path_factory.mktemp("tcowtpl"), random.Random(7), 2 * MiB)


op_strategy = st.lists(
    st.tuples(st.sampled_from(["read", "write", "zero", "trim", "status", "prefetch"]),
              st.integers(0, 2 * MiB), st.integers(1, 200 * KiB), st.integers(0, 255)),
    min_size=1, max_size=25)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=op_strategy, max_entries=st.sampled_from([1, 2, 5, 1000]),
       readahead=st.sampled_from([0, 3]))
def test_op_sequences_match_model_with_any_cache_size(
        tcow_template: Chain, ops: list[tuple[str, int, int, int]], max_entries: int,
        readahead: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        assert tcow_template.base is not None
        shutil.copy(tcow_template.base, tmp / tcow_template.base.name)
        shutil.copy(tcow_template.top, tmp / tcow_template.top.name)
        top = tmp / tcow_template.top.name
        model = bytearray(tcow_template.initial)

        async def run() -> None:
            disk = await Disk.open(str(top), pool=ImagePool(), cache=new_cache(max_entries),
                                   readahead_clusters=readahead)
            size = disk.size
            for op, off, n, byte in ops:
                off = min(off, size - 1)
                n = min(n, size - off)
                if op == "read":
                    assert await disk.read(off, n) == model[off:off + n]
                elif op == "write":
                    await disk.write(off, bytes([byte]) * n)
                    model[off:off + n] = bytes([byte]) * n
                elif op == "zero":
                    await disk.write_zeroes(off, n, may_unmap=byte % 2 == 0)
                    model[off:off + n] = bytes(n)
                elif op == "trim":
                    await disk.trim(off, n)
                    model[off:off + n] = bytes(n)
                elif op == "status":
                    pos = off
                    for length, _hole, zero in await disk.block_status(off, n):
                        if zero:
                            assert not any(model[pos:pos + length])
                        pos += length
                else:
                    await disk.prefetch(off, n)
            assert await read_whole(disk) == model
            assert len(disk._cache) <= max_entries
            await disk.close()

        trio.run(run)
        assert read_chain(top) == model


# ---- read-only chains: qcow v1 over raw, compressed clusters, block status --------------------

async def test_readonly_qcow_chain_reads_and_refuses_writes(tmp_path: Path,
                                                            rng: random.Random) -> None:
    chain = make_chain("qcow", tmp_path, rng)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    assert disk.readonly  # qcow v1 is read-only in cowd, whatever was asked
    for _ in range(60):
        off = rng.randrange(disk.size)
        n = min(disk.size - off, rng.randrange(1, 300 * KiB))
        assert await disk.read(off, n) == chain.initial[off:off + n]
    assert await read_whole(disk) == chain.initial
    for call in (disk.write(0, b"x"), disk.write_zeroes(0, 512), disk.trim(0, 512)):
        with pytest.raises(DiskError) as ei:
            await call
        assert ei.value.errno == errno.EPERM
    await disk.flush()  # allowed, and nothing to do
    await disk.close()
    chain.check()


async def test_block_status_matches_qemu_img_map(tmp_path: Path, rng: random.Random) -> None:
    chain = make_chain("qcow", tmp_path, rng)
    # A longer base than overlay part: also hide some base data under nothing.
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    ours = bytearray(disk.size)  # 1 = data
    pos = 0
    while pos < disk.size:
        got = await disk.block_status(pos, disk.size - pos)
        for length, hole, _zero in got:
            ours[pos:pos + length] = (b"\0" if hole else b"\1") * length
            pos += length
    await disk.close()
    theirs = bytearray(len(ours))
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow", chain.top).stdout):
        theirs[e["start"]:e["start"] + e["length"]] = (b"\1" if e["data"] else b"\0") * e["length"]
    assert ours == theirs


async def test_compressed_clusters_are_decoded(tmp_path: Path, rng: random.Random) -> None:
    raw = tmp_path / "src.raw"
    content = bytearray()
    while len(content) < 1 * MiB:
        content += bytes([rng.randrange(256)]) * 4096 if rng.random() < 0.7 else \
            rng.randbytes(4096)
    raw.write_bytes(content)
    img = tmp_path / "c.qcow"
    # qemu-img 7.2 exits 1 after writing a complete compressed qcow image (DESIGN.md).
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow", raw, img, check=False)
    expect = qemu_raw(img, tmp_path, "qcow")
    assert expect == content
    disk = await Disk.open(str(img), pool=ImagePool(), cache=new_cache(), fmt="qcow")
    kinds = {e.kind.value for lay in disk.layers for e in lay.image.extents()}
    assert "compressed" in kinds
    assert await read_whole(disk, step=5000) == expect
    assert await read_whole(disk) == expect  # again, from the cache
    await disk.close()


# ---- priming, read-ahead, expiry ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["raw", "qcow", "tcow", "qcow2"])
async def test_prime_makes_first_reads_hits(kind: str, tmp_path: Path,
                                            rng: random.Random) -> None:
    chain = make_chain(kind, tmp_path, rng)
    cache = new_cache()
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=cache,
                           readahead_clusters=0)
    seconds = await disk.prime()
    assert 0 < seconds < 10
    c = disk.counters
    assert c.primed == len(cache) > 0
    assert c.misses == 0 and c.hits == 0
    assert await read_whole(disk) == chain.initial
    assert c.misses == 0, disk.stats()["remap"]
    assert c.hits > 0 and c.metadata_lookups == 0
    await disk.close()


async def test_prime_stops_at_the_bound_without_evicting(tmp_path: Path,
                                                         rng: random.Random) -> None:
    chain = make_chain("qcow", tmp_path, rng)
    cache = new_cache(10)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=cache)
    await disk.prime()
    assert len(cache) == 10 and cache.counters.evictions == 0
    assert cache.counters.primed == 10
    assert await read_whole(disk) == chain.initial
    await disk.close()


@pytest.mark.parametrize("kind", ["raw", "qcow"])
async def test_readahead_on_sequential_scan_only(kind: str, tmp_path: Path,
                                                 rng: random.Random) -> None:
    chain = make_chain(kind, tmp_path, rng)
    window = 7
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache(),
                           readahead_clusters=window)
    granules = -(-disk.size // G)
    for pos in range(0, disk.size, G):
        assert await disk.read(pos, G) == chain.initial[pos:pos + G]
    c = disk.counters
    layers = len(disk.layers)
    assert c.readahead_inserted > 0 and c.readahead_used > 0
    assert c.readahead_used <= c.readahead_inserted
    # One miss per layer opens the stream; then about one miss per window+1 granules.
    assert c.misses <= layers * (2 + granules // (window + 1) + 1), disk.stats()["remap"]
    assert c.hits >= granules - c.misses  # the top layer's, at least
    assert c.hits >= 5 * c.misses
    await disk.close()

    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache(),
                           readahead_clusters=window)
    order = list(range(0, disk.size - G, 3 * G))  # never within a granule of another
    random.Random(3).shuffle(order)
    for pos in order:
        assert await disk.read(pos, 512) == chain.initial[pos:pos + 512]
    assert disk.counters.readahead_inserted == 0
    await disk.close()


async def test_expired_entries_are_resolved_again(tmp_path: Path, rng: random.Random) -> None:
    chain = make_chain("qcow", tmp_path, rng)
    now = [0.0]
    cache = RemapCache(max_entries=1000, max_age_s=5.0, clock=lambda: now[0])
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=cache)
    await disk.prime()
    assert await read_whole(disk) == chain.initial
    assert cache.counters.expiries == 0 and disk.counters.misses == 0
    now[0] += 6.0
    assert await read_whole(disk) == chain.initial
    assert cache.counters.expiries > 0 and disk.counters.misses > 0
    await disk.close()


# ---- sharing a base between disks; the pool's rules -------------------------------------------

@pytest.mark.parametrize("kind", ["tcow", "qcow2"])
async def test_two_overlays_share_one_open_base(kind: str, tmp_path: Path,
                                                rng: random.Random) -> None:
    chain = make_chain(kind, tmp_path, rng)
    assert chain.base is not None
    ov2 = tmp_path / f"ov2.{kind}"
    if kind == "tcow":
        tcow_create(ov2, len(chain.initial), 32 * KiB, backing=chain.base.name)
    else:
        qemu_img("create", "-f", "qcow2", "-b", chain.base.name, "-F", "raw", ov2)
    second = Chain(kind, ov2, chain.base, b"", chain.base_sha)
    initial2 = second.oracle(tmp_path)
    pool, cache = ImagePool(), new_cache()
    d1 = await Disk.open(str(chain.top), fmt=chain.fmt, pool=pool, cache=cache)
    d2 = await Disk.open(str(ov2), pool=pool, cache=cache)
    assert pool.images_opened == 1 and pool.open_count() == 1
    base_layer = d1.layers[1]
    assert d2.layers[1] is base_layer and base_layer.refs == 2
    assert d1.layers[0].layer_id != d2.layers[0].layer_id

    # d2 (an empty overlay) fills the base's entries for the first MiB; d1 then misses only
    # in its own top layer: the base's answers are shared.
    assert await d2.read(0, 1 * MiB) == initial2[:1 * MiB]
    base_keys = {k for k in cache._entries if k[0] == base_layer.layer_id}
    assert len(base_keys) == -(-1 * MiB // base_layer.granule)
    misses_before = cache.counters.misses
    assert await d1.read(0, 1 * MiB) == chain.initial[:1 * MiB]
    assert {k for k in cache._entries if k[0] == base_layer.layer_id} == base_keys
    top1_granules = -(-1 * MiB // d1.layers[0].granule)
    assert d1.counters.misses == cache.counters.misses - misses_before <= top1_granules

    # A write through d1 is d1's alone.
    m1 = bytearray(chain.initial)
    await d1.write(100 * KiB, b"\xaa" * 300 * KiB)
    m1[100 * KiB:400 * KiB] = b"\xaa" * 300 * KiB
    assert await d2.read(0, 1 * MiB) == initial2[:1 * MiB]
    assert await d1.read(0, 1 * MiB) == m1[:1 * MiB]

    await d1.close()
    assert base_layer.refs == 1 and base_layer.image.file.fd >= 0
    assert await read_whole(d2) == initial2
    await d2.close()
    assert base_layer.image.file.fd == -1 and pool.open_count() == 0
    assert len(cache) == 0
    assert chain.oracle(tmp_path) == m1
    assert second.oracle(tmp_path) == initial2
    second.check()
    chain.check()


async def test_copy_up_in_a_thread_excludes_readers_of_the_shared_base(
        tmp_path: Path, rng: random.Random) -> None:
    """With library writes offloaded, a copy-up reads the base in a worker thread while the
    other disk's readers resolve the same base inline: the base's lock must keep them apart
    (tcow fails any call that enters an image another thread is inside)."""
    chain = make_chain("tcow", tmp_path, rng)
    assert chain.base is not None
    ov2 = tmp_path / "ov2.tcow"
    tcow_create(ov2, len(chain.initial), 32 * KiB, backing=chain.base.name)
    initial2 = read_chain(ov2)
    pool, cache = ImagePool(), new_cache(2)  # every lookup misses: constant base resolves
    d1 = await Disk.open(str(chain.top), pool=pool, cache=cache, offload_writes=True)
    d2 = await Disk.open(str(ov2), pool=pool, cache=cache, offload_writes=True)
    model = bytearray(chain.initial)
    done = trio.Event()

    async def writer() -> None:
        for i in range(40):
            off = (i * 97 * KiB) % (d1.size - 8 * KiB) + 1000
            data = rng.randbytes(5000)
            await d1.write(off, data)
            model[off:off + 5000] = data
        done.set()

    async def reader() -> None:
        r = random.Random(5)
        while not done.is_set():
            off = r.randrange(d2.size - 70 * KiB)
            assert await d2.read(off, 70 * KiB) == initial2[off:off + 70 * KiB]
            await trio.lowlevel.checkpoint()  # a hit may finish without one

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
            nursery.start_soon(reader)
    assert d2.stats()["ops"]["lock_waits"] > 0  # the readers did meet a busy base
    await d1.close()
    await d2.close()
    assert read_chain(chain.top) == model
    chain.check()


async def test_pool_refuses_conflicting_opens(tmp_path: Path, rng: random.Random) -> None:
    chain = make_chain("tcow", tmp_path, rng)
    assert chain.base is not None
    pool, cache = ImagePool(), new_cache()
    d1 = await Disk.open(str(chain.top), fmt=chain.fmt, pool=pool, cache=cache)
    with pytest.raises((UsageError, CommandFailed), match="already served"):
        await Disk.open(str(chain.top), fmt=chain.fmt, pool=pool, cache=cache)
    with pytest.raises((UsageError, CommandFailed), match="parent"):
        await Disk.open(str(chain.base), pool=pool, cache=cache)
    assert pool.open_count() == 1 and d1.layers[1].refs == 1  # failures left no references
    ro = await Disk.open(str(chain.base), pool=pool, cache=cache, readonly=True)
    ro2 = await Disk.open(str(chain.base), pool=pool, cache=cache, readonly=True)
    assert await ro.read(0, 4096) == read_chain(chain.base)[:4096]
    await ro.close()
    await d1.close()
    with pytest.raises((UsageError, CommandFailed), match="already served"):  # ro2 still reads it
        await Disk.open(str(chain.base), pool=pool, cache=cache)
    await ro2.close()
    # Once nobody uses it as a parent, the base may be served writable.
    d3 = await Disk.open(str(chain.base), pool=pool, cache=cache)
    ov2 = tmp_path / "ov2.tcow"
    tcow_create(ov2, 1 * MiB, 32 * KiB, backing=chain.base.name)
    with pytest.raises((UsageError, CommandFailed), match="writable"):
        await Disk.open(str(ov2), pool=pool, cache=cache)
    await d3.close()
    assert pool.open_count() == 0


# ---- errors -----------------------------------------------------------------------------------

async def test_request_errors_carry_errno(tmp_path: Path, rng: random.Random) -> None:
    chain = make_chain("raw", tmp_path, rng, size=1 * MiB)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    size = disk.size

    async def errno_of(call: Callable[[], object]) -> int:
        with pytest.raises(DiskError) as ei:
            await call()  # type: ignore[misc]
        return ei.value.errno

    assert await errno_of(lambda: disk.read(size - 10, 11)) == errno.EINVAL
    assert await errno_of(lambda: disk.read(-1, 1)) == errno.EINVAL
    assert await errno_of(lambda: disk.block_status(size, 1)) == errno.EINVAL
    assert await errno_of(lambda: disk.prefetch(size + 1, 0)) == errno.EINVAL
    assert await errno_of(lambda: disk.write(size - 1, b"xx")) == errno.ENOSPC
    assert await errno_of(lambda: disk.write_zeroes(size, 1)) == errno.ENOSPC
    assert await errno_of(lambda: disk.trim(0, size + 1)) == errno.ENOSPC
    assert await errno_of(lambda: disk.read(0, MAX_REQUEST_BYTES + 1)) == errno.EINVAL
    assert await disk.read(size, 0) == b""

    # The library's failures keep their errno; corruption marks the disk read-only.
    image = disk.layers[0].image

    def full(*_a: object) -> None:
        raise ImageIOError(image.path, "write failed: No space left on device", errno.ENOSPC)

    def corrupt(*_a: object) -> None:
        raise CorruptImage(image.path, "L2 table offset past end of file", "l1[3]", 0x7FFF0000)

    image.write = full  # type: ignore[method-assign,assignment]
    assert await errno_of(lambda: disk.write(3 * G, b"y" * 10)) == errno.ENOSPC
    image.write = corrupt  # type: ignore[method-assign,assignment]
    assert await errno_of(lambda: disk.write(5 * G, b"y" * 10)) == errno.EIO
    assert disk.corrupt_reason and "L2 table" in disk.corrupt_reason
    assert await errno_of(lambda: disk.write(0, b"z")) == errno.EPERM
    assert await disk.read(0, 100) == chain.initial[:100]  # reads go on
    await disk.close()
    assert await errno_of(lambda: disk.read(0, 1)) == errno.ESHUTDOWN


async def test_open_errors_leave_no_references(tmp_path: Path) -> None:
    mid = tmp_path / "mid.tcow"
    tcow_create(tmp_path / "base.tcow", 1 * MiB, 64 * KiB)
    tcow_create(mid, 1 * MiB, 64 * KiB, backing="base.tcow")
    tcow_create(tmp_path / "top.tcow", 1 * MiB, 64 * KiB, backing="mid.tcow")
    pool = ImagePool()
    held = await Disk.open(str(tmp_path / "base.tcow"), pool=pool, cache=new_cache(),
                           readonly=True)
    (tmp_path / "base.tcow").rename(tmp_path / "moved.tcow")
    top = tmp_path / "top.tcow"  # mid opens, then its parent is missing
    with pytest.raises(formats.FormatError, match="backing file not found"):
        await Disk.open(str(top), pool=pool, cache=new_cache())
    assert pool.open_count() == 0
    await held.close()


async def test_a_page_cache_miss_is_planned_once(tmp_path: Path, rng: random.Random) -> None:
    """A read whose data is not in the page cache: the nowait attempt plans it, advise()
    and the blocking read after it use that plan (no more resolver calls, and the bytes are
    right); a write that changes the mapping in between makes the kept plan stale."""
    chain = make_chain("qcow2", tmp_path, rng)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache(),
                           readahead_clusters=0)
    assert chain.base is not None
    off = 2 * MiB + 4096  # a range the overlay leaves to the base (fill_pattern may not)

    evict_pages(chain.base, chain.top)
    dest = bytearray(8192)
    if disk.try_read_into(off, dest):
        pytest.skip("the page cache kept the base (DONTNEED did not evict here)")
    lookups = disk.counters.metadata_lookups
    disk.advise(off, len(dest))
    assert disk.try_read_into(off, dest, may_block=True)
    assert bytes(dest) == chain.initial[off:off + len(dest)]
    assert disk.counters.metadata_lookups == lookups  # planned once, by the first attempt
    assert disk.stats()["ops"]["plans_reused"] == 2  # by advise() and by the read
    # A kept plan does not outlive a change of the mapping.
    evict_pages(chain.base, chain.top)
    other = bytearray(4096)
    assert not disk.try_read_into(off, other)
    await disk.write(off, b"x" * 4096)  # allocates: the plan of [off, off+4096) is stale
    assert disk.try_read_into(off, other, may_block=True)
    assert bytes(other) == b"x" * 4096
    assert disk.stats()["ops"]["plans_reused"] == 2
    await disk.close()
    chain.check()


async def test_lent_clusters_written_outside_and_adopted(tmp_path: Path,
                                                         rng: random.Random) -> None:
    """The kernel shim's pool without the kernel: clusters lent by the disk, written whole by
    another file descriptor (copy-up from the disk's own view, then new bytes), adopted;
    the disk reads them at once, qemu-img after the flush, and what was lent and not used
    is given back (qemu-img check finds no leak)."""
    chain = make_chain("qcow2", tmp_path, rng)
    disk = await Disk.open(str(chain.top), fmt=chain.fmt, pool=ImagePool(), cache=new_cache())
    lending = disk.lending
    assert lending.problem() is None
    cs = disk.cluster_size
    model = bytearray(chain.initial)
    runs = await lending.lend(6)
    assert lending.lent_clusters == 6
    hosts = [(r.file, h) for r in runs for h in range(r.file_offset, r.file_offset + r.length, cs)]
    assert all(f.writable for f, _ in hosts)
    fd = os.open(chain.top, os.O_RDWR)
    batch = []
    try:
        for g in (0, 5 * cs, 6 * cs):  # in the base, and two adjacent ones
            if (await disk.segments(g, cs))[0].writable:
                continue  # the overlay owns it already: written in place, not lent
            _f, host = hosts.pop(0)
            data = rng.randbytes(1000)
            whole = bytearray(await disk.read(g, cs))  # the copy-up
            whole[100:1100] = data
            os.pwrite(fd, whole, host)
            model[g + 100:g + 1100] = data
            batch.append(Adoption(g, cs, host))
    finally:
        os.close(fd)
    await lending.adopt(batch[:1])
    release = trio.Event()

    async def writer(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with disk._locks.hold(0, disk.size // disk.granule):
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:  # a writer holds the disk: the rest waits
        await nursery.start(writer)
        nursery.start_soon(lending.adopt, batch[1:])
        await trio.sleep(0.05)
        assert disk.stats()["ops"]["adopted"] == 1
        release.set()
    for a in batch:
        segs = await disk.segments(a.guest_offset, cs)
        assert segs[0].writable and segs[0].file_offset == a.file_offset
    assert await disk.read(0, 8 * cs) == bytes(model[:8 * cs])
    with pytest.raises(DiskError) as e:
        await lending.adopt([Adoption(cs, cs, hosts[0][1] + (1 << 30))])  # never lent
    assert e.value.errno == errno.EINVAL
    await disk.flush()
    assert await lending.give_back([FileRange(h, cs) for _f, h in hosts]) == len(hosts)
    assert lending.lent_clusters == 0
    ops = disk.stats()["ops"]
    assert ops["lent"] == 6 and ops["adopted"] + ops["given_back"] == 6
    await disk.close()
    chain.check()
    assert qemu_raw(chain.top, tmp_path) == bytes(model)


async def test_lending_refused_by_other_formats(tmp_path: Path, rng: random.Random) -> None:
    chain = make_chain("tcow", tmp_path, rng)
    disk = await Disk.open(str(chain.top), pool=ImagePool(), cache=new_cache())
    assert disk.lending.problem() == "only qcow2 images lend clusters"
    with pytest.raises(DiskError) as e:
        await disk.lending.lend(1)
    assert e.value.errno == errno.EOPNOTSUPP
    await disk.close()


# ---- the direct planner ------------------------------------------------------------------
# Priming's direct planner (``Disk.segments(..., direct=True)``, ``Chain.plan_direct``):
# one segment per extent from the layers' resolvers must map every guest byte exactly as the
# planner through the remap cache does, on every chain kind, before and after writes, and
# it must step aside (plan through the cache) while a layer's lock is held.


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
