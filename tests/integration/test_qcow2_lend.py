"""formats/qcow2/lend.py without the kernel: clusters lent to an outside writer, written by it
(plain os.pwrite on its own file descriptor, as the kernel shim writes through its own open
file), adopted, flushed — then qemu-img checks and reads the image.  Also: a process killed
with clusters lent and allocations adopted but not flushed leaves leaks only, which
``cowd check --repair`` frees; and simulated power loss at every point of the pwrite/fdatasync
log never loses flushed data nor shows garbage.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import formats
from formats import qcow2 as q2
from formats.errors import UnsupportedImage
from formats.qcow2.layout import HostRange
from tests.support.peers import qemu_check, qemu_img, qemu_raw, run, sha256
from tests.support.powerloss import IoLog, check_crash_points, record_flush

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _overlay(d: Path, size: int, seed: int = 7, **kw: Any) -> tuple[Path, Path, bytearray]:
    base = d / "base.raw"
    data = random.Random(seed).randbytes(size)
    base.write_bytes(data)
    top = d / "top.qcow2"
    q2.create(str(top), size, backing_name="base.raw", backing_format="raw", **kw)
    return top, base, bytearray(data)


def _open(top: Path) -> tuple[q2.Qcow2Image, q2.Lender]:
    img = formats.open_image(str(top), writable=True)
    assert isinstance(img, q2.Qcow2Image)
    return img, q2.Lender(img)


class OutsideWriter:
    """What the kernel shim does with a lent cluster: read the guest cluster's current bytes
    (copy-up, here from the model), put the new bytes in, write the whole cluster to the lent
    host offset with its own file descriptor, and only then report it."""

    def __init__(self, top: Path, cluster: int):
        self.fd = os.open(top, os.O_RDWR)
        self.cluster = cluster
        self.free: list[int] = []  # lent host offsets not used yet
        self.log: list[tuple[int, bytes]] | None = None  # (file offset, bytes) written

    def take(self, runs: list[HostRange]) -> None:
        for off, n in runs:
            self.free.extend(range(off, off + n, self.cluster))

    def write(self, model: bytearray, guest_offset: int, data: bytes) -> tuple[int, int]:
        """Write ``data`` (inside one cluster) the way a first write does; returns the
        (guest cluster offset, host offset) report."""
        cs = self.cluster
        g = guest_offset // cs * cs
        assert guest_offset + len(data) <= g + cs
        host = self.free.pop(0)
        model[guest_offset:guest_offset + len(data)] = data
        whole = bytes(model[g:g + cs]).ljust(cs, b"\0")
        os.pwrite(self.fd, whole, host)
        if self.log is not None:
            self.log.append((host, whole))
        return g, host

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("kw", [{}, {"cluster_size": 4096}, {"cluster_size": 4096,
                                                               "compat": "0.10"},
                                {"cluster_size": 16384, "extended_l2": True},
                                {"cluster_size": 512, "refcount_bits": 1}])
def test_lend_write_adopt_reads_like_qemu(tmp_path: Path, kw: dict[str, Any]) -> None:
    size = 2 * MiB + 3 * 512  # a last cluster cut short
    top, base, model = _overlay(tmp_path, size, **kw)
    base_sha = sha256(base)
    img, lender = _open(top)
    cs = img.cluster_size
    nclusters = -(-size // cs)
    r = random.Random(len(kw))
    w = OutsideWriter(top, cs)
    w.take(lender.lend(24))
    assert lender.lent == 24
    # The codec writes too, between the outside writer's clusters (its own allocations and
    # the L2 tables adopt needs come from its own reserve, never from the lent clusters).
    for i in range(20):
        c = r.randrange(nclusters)
        off = c * cs + r.randrange(cs // 512) * 512
        n = min(512 * r.randrange(1, 4), size - off, c * cs + cs - off)
        if n <= 0:
            continue
        if i % 4 == 3:
            data = r.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
            continue
        if img.resolve(off, n).writable:
            continue  # already this layer's: the kernel writes it in place, no lending
        g, host = w.write(model, off, r.randbytes(n))
        lender.adopt(g, cs, host)
        if i % 5 == 0:
            img.flush()
    # A run of consecutive guest clusters adopted in one call.
    last_g = (nclusters - 3) * cs
    hosts = [w.write(model, last_g + k * cs, r.randbytes(cs if k < 2 else 512))[1]
             for k in range(3)]
    if hosts == list(range(hosts[0], hosts[0] + 3 * cs, cs)):
        lender.adopt(last_g, 3 * cs, hosts[0])
    else:
        for k, h in enumerate(hosts):
            lender.adopt(last_g + k * cs, cs, h)
    _finish(img, lender, w, tmp_path, model[:size], base_sha)


def _finish(img: q2.Qcow2Image, lender: q2.Lender, w: OutsideWriter | UnitWriter, tmp: Path,
            model: bytearray, base_sha: str) -> None:
    """Flush, give back what the writer never used, close; then qemu-img checks the image
    and reads the model, and the base is untouched."""
    img.flush()
    lender.give_back([HostRange(h, img.cluster_size) for h in w.free])
    assert lender.lent == 0
    w.close()
    img.close_chain()
    top = Path(img.path)
    qemu_check(top)
    assert qemu_raw(top, tmp) == bytes(model)
    assert sha256(top.parent / "base.raw") == base_sha


def test_adopt_replaces_a_snapshot_shared_cluster(tmp_path: Path) -> None:
    """A cluster shared with a snapshot (no COPIED bit) that the outside writer copied up: the
    adopted entry replaces it and the snapshot's reference is the only one left."""
    src = tmp_path / "src.raw"
    data = random.Random(1).randbytes(MiB)
    src.write_bytes(data)
    top = tmp_path / "top.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", src, top)
    qemu_img("snapshot", "-c", "s1", top)
    img, lender = _open(top)
    assert not img.resolve(8192, 4096).writable
    model = bytearray(data)
    w = OutsideWriter(top, 4096)
    w.take(lender.lend(2))
    g, host = w.write(model, 8192 + 100, b"new bytes")
    lender.adopt(g, 4096, host)
    img.flush()
    lender.give_back_all()
    w.close()
    img.close_chain()
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == bytes(model)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", top, snap)
    assert snap.read_bytes() == data


def test_adopt_refuses_what_was_not_lent(tmp_path: Path) -> None:
    top, _base, _model = _overlay(tmp_path, MiB, cluster_size=4096)
    img, lender = _open(top)
    runs = lender.lend(4)
    host = runs[0].file_offset
    with pytest.raises(ValueError, match="not lent"):
        lender.adopt(0, 4096, host + (1 << 30))
    with pytest.raises(ValueError, match="whole clusters"):
        lender.adopt(512, 4096, host)
    with pytest.raises(ValueError, match="whole clusters"):
        lender.adopt(MiB, 4096, host)  # past the disk's end
    lender.adopt(0, 4096, host)
    with pytest.raises(ValueError, match="not lent"):
        lender.adopt(4096, 4096, host)  # adopted already
    img.flush()
    lender.give_back_all()
    img.close_chain()
    qemu_check(top)


def test_lending_refused_where_it_cannot_work(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    q2.create(str(top), MiB, data_file=str(tmp_path / "top.data"), cluster_size=4096)
    img = formats.open_image(str(top), writable=True)
    assert q2.lend_problem(img) == "the image has an external data file"
    with pytest.raises(UnsupportedImage, match="external data file"):
        q2.Lender(img)  # type: ignore[arg-type]
    img.close_chain()
    ro = formats.open_image(str(top), writable=False)
    assert q2.lend_problem(ro) == "the image is read-only"
    ro.close_chain()
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    r = formats.open_image(str(raw), writable=True)
    assert q2.lend_problem(r) == "only qcow2 images lend clusters"
    r.close_chain()


KILLED = r'''
import os, random, signal, sys
sys.path.insert(0, sys.argv[1])
import formats
from formats import qcow2 as q2
top, stage = sys.argv[2], sys.argv[3]
img = formats.open_image(top, writable=True)
lender = q2.Lender(img)
cs = img.cluster_size
runs = lender.lend(16)
hosts = [h for off, n in runs for h in range(off, off + n, cs)]
fd = os.open(top, os.O_RDWR)
def outside(guest_cluster, fill):
    host = hosts.pop(0)
    os.pwrite(fd, bytes([fill]) * cs, host)
    lender.adopt(guest_cluster * cs, cs, host)
# Written by the outside writer, never reported (it died first): garbage in a leaked cluster.
os.pwrite(fd, b"\xee" * cs, hosts.pop())
if stage != "lent":
    for c in range(4):
        outside(c, 0xA0 + c)  # flushed below: must survive
    img.flush()
    for c in range(4, 8):
        outside(c, 0xB0 + c)  # adopted, never flushed: may be lost, never garbage
    img.write(9 * cs, b"\xcc" * cs)  # the codec's own unflushed write
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize("stage", ["lent", "adopted"])
def test_killed_writer_leaves_leaks_that_repair_frees(tmp_path: Path, stage: str) -> None:
    top, _base, model = _overlay(tmp_path, MiB, cluster_size=4096)
    cs = 4096
    p = subprocess.run([sys.executable, "-c", KILLED, str(Path(__file__).parents[2]), str(top),
                        stage], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and "ready" in p.stdout, p.stderr
    chk = qemu_img("check", top, check=False)
    assert chk.returncode == 3, chk.stdout.decode()  # leaked clusters, no corruption
    assert b"leaked clusters" in chk.stdout
    got = qemu_raw(top, tmp_path)
    if stage == "adopted":
        for c in range(4):
            assert got[c * cs:(c + 1) * cs] == bytes([0xA0 + c]) * cs, c
        for c in range(4, 8):
            assert got[c * cs:(c + 1) * cs] in (bytes([0xB0 + c]) * cs,
                                                bytes(model[c * cs:(c + 1) * cs])), c
        assert got[8 * cs:] == bytes(model[8 * cs:]) or \
            got[9 * cs:10 * cs] == b"\xcc" * cs
    else:
        assert got == bytes(model)
    run(sys.executable, "-m", "cowd.cli", "check", "--repair", top)
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == got


def test_power_loss_never_loses_flushed_data(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pwrite (the codec's and the outside writer's, 512-byte sectors each) and every
    fdatasync recorded; the image rebuilt as a crash at many points would leave it (writes
    after the last sync may or may not have landed): qemu-img check finds leaks at worst, and
    every sector shows the last flushed content or a later write."""
    size = MiB
    cs = 1024  # 128 KiB per L2 table: the disk needs eight, and one is cached
    top, _base, model = _overlay(tmp_path, size, seed=11, cluster_size=cs)
    initial = top.read_bytes()
    log = IoLog(monkeypatch, str(top))
    img, lender = _open(top)
    img.l2_cache.max_tables = 1  # exercise dirty-table eviction (its sync before writeback)
    w = OutsideWriter(top, cs)
    w.log = []
    r = random.Random(5)
    flushed: list[bytes] = [bytes(model)]
    writes: list[tuple[int, int, bytes]] = []  # (flush index when issued, offset, data)
    for step in range(70):
        if not w.free:
            w.take(lender.lend(8))
        k = r.randrange(10)
        c = r.randrange(size // cs // 2) if r.random() < 0.7 else r.randrange(size // cs)
        off = c * cs + r.randrange(cs // 512) * 512
        n = min(512 * r.randrange(1, 4), c * cs + cs - off)
        data = r.randbytes(n)
        if k < 2:
            log.events.append(("op", len(writes)))
            writes.append((len(flushed) - 1, off, data))
            img.write(off, data)
            model[off:off + n] = data
        elif k < 7:
            if img.resolve(off, n).writable:
                continue
            log.events.append(("op", len(writes)))
            writes.append((len(flushed) - 1, off, data))
            g, host = w.write(model, off, data)
            log.sectors(host, w.log[-1][1])  # the outside writer's pwrite
            lender.adopt(g, cs, host)
        else:
            img.flush()
            record_flush(flushed, writes)
            log.events.append(("flushed", len(flushed) - 1))
        del step
    img.flush()
    lender.give_back([HostRange(h, cs) for h in w.free])
    w.close()
    img.close_chain()
    events = log.events
    monkeypatch.undo()
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == bytes(model)
    check_crash_points(tmp_path, initial, events, writes, flushed, r, max_cuts=60)


# ---- subclusters (extended L2): adopt_units -------------------------------------------------


def _own_host(img: q2.Qcow2Image, guest: int) -> int:
    """The host cluster the guest cluster owns (COPIED, not compressed), or 0."""
    ci = guest // img.cluster_size
    l1i = ci >> img.l2_bits
    if not img.l1[l1i] & q2.L1E_OFFSET_MASK:
        return 0
    tbl = img._l2_get(l1i)
    assert tbl is not None
    e, _bm = img._get_entry(tbl, ci & ((1 << img.l2_bits) - 1))
    if e & q2.QCOW_OFLAG_COMPRESSED or not e & q2.QCOW_OFLAG_COPIED:
        return 0
    return e & q2.L2E_OFFSET_MASK


class UnitWriter:
    """What a cowd worker does with a write of whole subclusters: write them at their place in
    the guest cluster's own host cluster, or in a lent one, then report them."""

    def __init__(self, top: Path, img: q2.Qcow2Image, lender: q2.Lender):
        self.fd = os.open(top, os.O_RDWR)
        self.img, self.lender = img, lender
        self.free: list[int] = []
        self.log: list[tuple[int, bytes]] | None = None

    def write(self, model: bytearray, guest: int, data: bytes) -> q2.Units:
        img = self.img
        cs = img.cluster_size
        cstart = guest // cs * cs
        host = _own_host(img, guest)
        taken = 0
        if not host:
            if not self.free:
                self.free.extend(h for off, n in self.lender.lend(8)
                                 for h in range(off, off + n, cs))
            host = taken = self.free.pop(0)
        at = host + guest - cstart
        os.pwrite(self.fd, data, at)
        if self.log is not None:
            self.log.append((at, data))
        got = self.lender.adopt_units(guest, len(data), at)
        if got is q2.Units.REFUSED:
            if taken:
                self.free.insert(0, taken)
        else:
            model[guest:guest + len(data)] = data
        return got

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("cs", [16384, 65536, 131072])
def test_adopt_units_reads_like_qemu(tmp_path: Path, cs: int) -> None:
    """Whole subclusters written by an outside writer (into owned and lent clusters), mixed
    with the codec's own partial writes, zeroes and discards, and flushes: qemu-img reads
    the model and finds nothing wrong."""
    size = 4 * MiB + 3 * 512  # a last cluster cut short
    top, base, model = _overlay(tmp_path, size, cluster_size=cs, extended_l2=True)
    base_sha = sha256(base)
    img, lender = _open(top)
    unit = cs // 32
    w = UnitWriter(top, img, lender)
    r = random.Random(cs)
    nclusters = -(-size // cs)
    outcomes = {q2.Units.OWNED: 0, q2.Units.LENT: 0, q2.Units.REFUSED: 0}
    for i in range(300):
        c = r.randrange(nclusters // 2) if r.random() < 0.7 else r.randrange(nclusters)
        cstart = c * cs
        valid = min(cs, size - cstart)
        u0 = r.randrange(-(-valid // unit))
        nu = r.randrange(1, 4)
        off = cstart + u0 * unit
        n = min(nu * unit, cstart + cs - off)
        k = r.randrange(10)
        if k < 6:
            if off + n > size:
                continue  # the last cluster's units past the end: the codec's write
            taken = any(img.resolve(u, unit).writable for u in range(off, off + n, unit))
            data = r.randbytes(n)
            outcome = w.write(model, off, data)
            outcomes[outcome] += 1
            # Refused exactly when a unit is allocated already (one writer here: the
            # guest cluster's host is always the one the writer used).
            assert (outcome is q2.Units.REFUSED) == taken, (i, off, n, outcome)
            if outcome is q2.Units.REFUSED:
                img.write(off, data)  # what cowd does with a refused one: forwards it
                model[off:off + n] = data
        elif k < 8:
            o2 = off + 512 * r.randrange(2)
            data = r.randbytes(min(512 * r.randrange(1, 9), size - o2))
            img.write(o2, data)
            model[o2:o2 + len(data)] = data
        elif k < 9:
            n = min(n, size - off)
            img.write_zeroes(off, n, may_unmap=r.random() < 0.5)
            model[off:off + n] = bytes(n)
        else:
            img.flush()
    assert outcomes[q2.Units.OWNED] and outcomes[q2.Units.LENT], outcomes
    _finish(img, lender, w, tmp_path, model[:size], base_sha)


def test_adopt_units_refuses_what_it_cannot_know(tmp_path: Path) -> None:
    """Refused (nothing changes): another host cluster, a cluster neither owned nor lent, an
    allocated unit, a compressed cluster; not whole subclusters of one cluster: ValueError."""
    cs, unit = 65536, 2048
    top, _base, model = _overlay(tmp_path, MiB, cluster_size=cs, extended_l2=True)
    img, lender = _open(top)
    w = UnitWriter(top, img, lender)
    lent = lender.lend(2)[0].file_offset
    assert w.write(model, 0, b"a" * unit) is q2.Units.LENT  # cluster 0 takes a lent one
    own = _own_host(img, 0)
    img.flush()
    before = qemu_raw(top, tmp_path)
    R = q2.Units.REFUSED
    assert lender.adopt_units(unit, unit, lent + cs + unit) is R  # not cluster 0's host
    assert lender.adopt_units(cs, unit, own + 10 * cs) is R  # no host, not lent
    assert lender.adopt_units(0, unit, own) is R  # allocated already
    assert lender.adopt_units(cs, unit, lent + cs, may_take_lent=False) is R
    with pytest.raises(ValueError, match="whole subclusters"):
        lender.adopt_units(512, unit, own + 512)
    with pytest.raises(ValueError, match="whole subclusters"):
        lender.adopt_units(cs - unit, 2 * unit, own + cs - unit)  # two clusters
    with pytest.raises(ValueError, match="whole subclusters"):
        lender.adopt_units(unit, unit, own + 3 * unit)  # not its place
    img.flush()
    assert qemu_raw(top, tmp_path) == before
    lender.give_back_all()
    w.close()
    img.close_chain()
    qemu_check(top)
    (tmp_path / "p").mkdir()
    plain, _b, _m = _overlay(tmp_path / "p", MiB)
    pimg, plender = _open(plain)
    with pytest.raises(ValueError, match="no subclusters"):
        plender.adopt_units(0, 4096, plender.lend(1)[0].file_offset)
    plender.give_back_all()
    pimg.close_chain()


def test_adopt_units_leaves_a_compressed_cluster_alone(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(2).randbytes(64 * 1024) * 4)
    top = tmp_path / "top.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             "cluster_size=65536,extended_l2=on", src, top)
    img, lender = _open(top)
    lent = lender.lend(1)[0].file_offset
    assert lender.adopt_units(0, 2048, lent) is q2.Units.REFUSED
    lender.give_back_all()
    img.close_chain()
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == src.read_bytes()
