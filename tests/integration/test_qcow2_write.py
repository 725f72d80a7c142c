"""qcow2 writing: random write / write_zeroes / discard / allocate / flush / reopen sequences
against a bytearray model, then `qemu-img check` must be clean and `qemu-img convert -O raw`
must equal the model; the base image must be untouched.  Also: refcount-table growth,
snapshot copy-on-write, compressed clusters, dirty-image repair, check() against qemu-img
check, create() against qemu-img info, and simulated power loss at every point of a
recorded pwrite/fdatasync log.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats import Kind
from formats import qcow2 as q2
from tests.support.corruption import corrupted_copy
from tests.support.peers import qemu_check, qemu_img, qemu_io, qemu_raw, read_all, run, sha256
from tests.support.powerloss import IoLog, check_crash_points, record_flush

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def compressible(n: int, seed: int) -> bytes:
    r = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += (b"block %d " % r.randrange(100)) * 512 if r.random() < 0.7 else r.randbytes(4096)
    return bytes(out[:n])


# ---- configurations ------------------------------------------------------------------------


class Setup:
    """One overlay under test: where it is, what it should read as, what must not change."""

    def __init__(self, d: Path, top: Path, model: bytearray, base: Path | None = None,
                 snapshot: tuple[str, bytes] | None = None, raw_data_file: Path | None = None):
        self.d = d
        self.top = top
        self.model = model
        self.base = base
        self.base_sha = sha256(base) if base else None
        self.snapshot = snapshot
        self.raw_data_file = raw_data_file


def _raw_base(d: Path, size: int, seed: int = 7) -> tuple[Path, bytearray]:
    base = d / "base.raw"
    data = rand_bytes(size, seed)
    base.write_bytes(data)
    return base, bytearray(data)


def cfg_overlay(**kw: Any) -> Callable[[Path], Setup]:
    size = kw.pop("size", 2 * MiB)

    def make(d: Path) -> Setup:
        base, model = _raw_base(d, size)
        top = d / "top.qcow2"
        q2.create(str(top), size, backing_name="base.raw", backing_format="raw", **kw)
        return Setup(d, top, model, base)

    return make


def cfg_plain(**kw: Any) -> Callable[[Path], Setup]:
    size = kw.pop("size", 2 * MiB)

    def make(d: Path) -> Setup:
        top = d / "top.qcow2"
        q2.create(str(top), size, **kw)
        return Setup(d, top, bytearray(size))

    return make


def cfg_create_overlay(d: Path) -> Setup:
    base, model = _raw_base(d, 2 * MiB + 12345)
    top = d / "top.qcow2"
    formats.create_overlay(str(top), str(base))
    # qcow2 sizes are whole sectors (rounded up at create): the tail past the base reads 0.
    model += bytes(-len(model) % 512)
    return Setup(d, top, model, base)


def cfg_qemu(opts: str, compress: bool = False, snapshot: bool = False,
             size: int = 2 * MiB) -> Callable[[Path], Setup]:
    def make(d: Path) -> Setup:
        src = d / "src.raw"
        data = compressible(size, 3)
        src.write_bytes(data)
        top = d / "top.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
                 "-o", opts, src, top)
        snap = None
        if snapshot:
            qemu_img("snapshot", "-c", "s1", top)
            snap = ("s1", data)
        return Setup(d, top, bytearray(data), src, snap)

    return make


def cfg_data_file(d: Path) -> Setup:
    # Absolute: qemu 7.2 resolves a relative data file name against its cwd, cowd against
    # the image's directory.
    top = d / "top.qcow2"
    q2.create(str(top), 2 * MiB, data_file=str(d / "top.data"), cluster_size=4096)
    return Setup(d, top, bytearray(2 * MiB))


def cfg_raw_data_file(d: Path) -> Setup:
    top = d / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o",
        f"data_file={d / 'top.data'},data_file_raw=on", top, str(2 * MiB))
    return Setup(d, top, bytearray(2 * MiB), raw_data_file=d / "top.data")


CONFIGS: dict[str, Callable[[Path], Setup]] = {
    "v3-64k-over-raw": cfg_create_overlay,
    "v3-4k": cfg_overlay(cluster_size=4096),
    "v3-512-rc64-growth": cfg_overlay(cluster_size=512, refcount_bits=64, size=1 * MiB),
    "v2-4k-backing": cfg_overlay(compat="0.10", cluster_size=4096),
    "v2-64k-no-backing": cfg_plain(compat="0.10"),
    "extl2-16k-backing": cfg_overlay(extended_l2=True, cluster_size=16384),
    "extl2-64k-no-backing": cfg_plain(extended_l2=True),
    "rc1": cfg_overlay(refcount_bits=1, cluster_size=8192),
    "rc2-lazy": cfg_overlay(refcount_bits=2, cluster_size=4096, lazy_refcounts=True),
    "2M-clusters": cfg_overlay(cluster_size=2 << 20, size=6 * MiB),
    "data-file": cfg_data_file,
    "data-file-raw": cfg_raw_data_file,
    "compressed-zstd": cfg_qemu("cluster_size=4096,compression_type=zstd", compress=True),
    "snapshot": cfg_qemu("cluster_size=4096", snapshot=True),
    "snapshot-compressed-extl2": cfg_qemu("cluster_size=16384,extended_l2=on", compress=True,
                                          snapshot=True),
}

OPS = ["write", "write", "write", "zero", "zero", "discard", "allocate", "flush", "reopen",
       "small-cache"]


@st.composite
def op_lists(draw: st.DrawFn) -> list[tuple[str, float, int, int]]:
    n = draw(st.integers(1, 14))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(OPS))
        where = draw(st.floats(0, 1, exclude_max=True))
        length = draw(st.sampled_from([1, 511, 512, 4096, 5000, 16384, 65536, 70000, 200000]))
        out.append((kind, where, length, draw(st.integers(0, 1 << 30))))
    return out


def apply_ops(s: Setup, ops: list[tuple[str, float, int, int]]) -> None:
    img = formats.open_image(str(s.top), writable=True)
    try:
        size = img.virtual_size
        assert size == len(s.model)
        cluster = img.cluster_size
        for kind, where, length, seed in ops:
            off = int(where * size)
            if seed % 3 == 0:  # bias towards cluster boundaries
                off = off // cluster * cluster
            n = min(length, size - off)
            if kind == "write":
                data = rand_bytes(n, seed)
                img.write(off, data)
                s.model[off : off + n] = data
            elif kind in ("zero", "discard"):
                if kind == "zero":
                    img.write_zeroes(off, n, may_unmap=bool(seed & 1))
                else:
                    img.discard(off, n)
                s.model[off : off + n] = bytes(n)
            elif kind == "allocate":
                img.allocate(off, n)
                ext = img.resolve(off, n)
                assert ext.kind is Kind.DATA and ext.writable
            elif kind == "flush":
                img.flush()
            elif kind == "small-cache":
                assert isinstance(img, q2.Qcow2Image)
                img.l2_cache.max_tables = 1  # force dirty L2 tables out through write-back
            else:
                img.close_chain()
                img = formats.open_image(str(s.top), writable=True)
        assert read_all(img) == s.model
    finally:
        img.close_chain()


def verify(s: Setup) -> None:
    qemu_check(s.top)
    assert qemu_raw(s.top, s.d) == s.model
    if s.base is not None:
        assert sha256(s.base) == s.base_sha
    if s.snapshot is not None:
        name, content = s.snapshot
        out = s.d / "snap.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", s.top, out)
        assert out.read_bytes() == content
    if s.raw_data_file is not None:
        assert s.raw_data_file.read_bytes()[: len(s.model)] == s.model


@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=op_lists())
def test_random_ops_match_model(config: str, ops: list[tuple[str, float, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        s = CONFIGS[config](Path(d))
        apply_ops(s, ops)
        verify(s)


# ---- targeted cases ------------------------------------------------------------------------


def test_refcount_table_growth(tmp_path: Path) -> None:
    size = 3 * MiB
    base, model = _raw_base(tmp_path, size)
    top = tmp_path / "top.qcow2"
    q2.create(str(top), size, backing_name="base.raw", backing_format="raw", cluster_size=512,
              refcount_bits=64)
    img = formats.open_image(str(top), writable=True)
    assert isinstance(img, q2.Qcow2Image)
    first_rt = (img.refcounts.reftable_offset, img.refcounts.reftable_clusters)
    order = list(range(0, size, 8192))
    random.Random(5).shuffle(order)
    for i, off in enumerate(order):
        data = rand_bytes(8192, off)
        img.write(off + 100, data[: min(8192, size - off - 100)])
        model[off + 100 : off + 8292] = data[: min(8192, size - off - 100)]
        if i % 50 == 0:
            img.flush()
    grown = (img.refcounts.reftable_offset, img.refcounts.reftable_clusters)
    img.close_chain()
    assert grown[1] > first_rt[1] and grown[0] != first_rt[0]
    s = Setup(tmp_path, top, model, base)
    s.base_sha = sha256(base)
    verify(s)


def test_snapshot_shared_l2_and_data_cow(tmp_path: Path) -> None:
    s = cfg_qemu("cluster_size=4096", snapshot=True)(tmp_path)
    img = formats.open_image(str(s.top), writable=True)
    try:
        shared = img.resolve(0, 4096)
        assert shared.kind is Kind.DATA and not shared.writable
        img.write(100, b"\xee" * 10)
        s.model[100:110] = b"\xee" * 10
        own = img.resolve(0, 4096)
        assert own.kind is Kind.DATA and own.writable and own.file_offset != shared.file_offset
        img.discard(8192, 8192)
        s.model[8192:16384] = bytes(8192)
    finally:
        img.close_chain()
    verify(s)


def test_compressed_cluster_overwrite(tmp_path: Path) -> None:
    s = cfg_qemu("cluster_size=65536", compress=True)(tmp_path)
    img = formats.open_image(str(s.top), writable=True)
    try:
        assert img.resolve(0, 65536).kind is Kind.COMPRESSED
        img.write(1000, b"abc" * 100)
        s.model[1000:1300] = b"abc" * 100
        assert img.resolve(0, 65536).kind is Kind.DATA
        img.write_zeroes(65536, 65536)
        s.model[65536:131072] = bytes(65536)
    finally:
        img.close_chain()
    verify(s)


def test_v2_zero_writes_unallocate_or_write(tmp_path: Path) -> None:
    s = cfg_overlay(compat="0.10", cluster_size=65536)(tmp_path)
    img = formats.open_image(str(s.top), writable=True)
    try:
        img.write_zeroes(0, 131072)
        s.model[0:131072] = bytes(131072)
        # v2 has no zero flag: over a backing image the zeroes must be real data.
        assert img.resolve(0, 131072).kind is Kind.DATA
    finally:
        img.close_chain()
    verify(s)
    (tmp_path / "nb").mkdir()
    s2 = cfg_plain(compat="0.10")(tmp_path / "nb")
    img = formats.open_image(str(s2.top), writable=True)
    try:
        img.write(0, b"\x01" * 65536)
        img.write_zeroes(0, 65536)
        assert img.resolve(0, 65536).kind is Kind.UNALLOCATED
    finally:
        img.close_chain()
    verify(s2)


def test_writable_extents_allow_in_place_writes(tmp_path: Path) -> None:
    """What the daemon does: allocate, then write DATA extents directly, then flush."""
    s = cfg_overlay(cluster_size=65536)(tmp_path)
    img = formats.open_image(str(s.top), writable=True)
    try:
        img.allocate(70000, 100000)
        pos = 65536
        while pos < 196608:
            ext = img.resolve(pos, 196608 - pos)
            assert ext.kind is Kind.DATA and ext.writable and ext.file is not None
            data = rand_bytes(ext.length, pos)
            ext.file.pwrite(ext.file_offset, data)
            s.model[pos : pos + ext.length] = data
            pos = ext.end
        img.flush()
    finally:
        img.close_chain()
    verify(s)


def test_autoclear_bitmaps_dropped_cleanly(tmp_path: Path) -> None:
    top = tmp_path / "bm.qcow2"
    qemu_img("create", "-f", "qcow2", top, str(4 * MiB))
    qemu_img("bitmap", "--add", top, "b0")
    qemu_io(top, "write -P 1 0 1M", fmt="qcow2")
    img = formats.open_image(str(top), writable=True)
    img.write(0, b"x" * 512)
    img.close()
    raw = top.read_bytes()
    assert struct.unpack_from(">Q", raw, 88)[0] & q2.QCOW2_AUTOCLEAR_BITMAPS == 0
    qemu_check(top)


def test_dirty_image_repaired_on_writable_open(tmp_path: Path) -> None:
    top = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", top,
             str(2 * MiB))
    p = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 300000", "-c",
            "write -P 0x43 1000000 5000", "-c", "sigraise 9", top, check=False)
    assert p.returncode == -9
    before = qemu_img("check", top, check=False)
    assert before.returncode != 0  # lazy refcounts left them too low
    model = bytearray(2 * MiB)
    model[0:300000] = b"\x42" * 300000
    model[1000000:1005000] = b"\x43" * 5000
    img = formats.open_image(str(top), writable=True)
    assert img.writable and not img.info()["dirty"]
    img.write(500000, b"\x44" * 70000)
    model[500000:570000] = b"\x44" * 70000
    img.close()
    verify(Setup(tmp_path, top, model))


def qemu_check_json(path: Path) -> dict[str, Any]:
    p = qemu_img("check", "--output=json", path, check=False)
    return dict(json.loads(p.stdout))


def test_check_finds_and_repairs_leaks_like_qemu(tmp_path: Path) -> None:
    s = cfg_overlay(cluster_size=4096)(tmp_path)
    img = formats.open_image(str(s.top), writable=True)
    img.write(0, rand_bytes(300000, 1))
    img.flush()
    # A crash: reserved but unused clusters stay refcounted.
    assert isinstance(img, q2.Qcow2Image)
    img.file.close()
    if img.backing is not None:
        img.backing.close_chain()
    # qemu-img check only looks at clusters inside the file: make the file cover the batch.
    os.truncate(s.top, s.top.stat().st_size + 2 * MiB)
    qres = qemu_check_json(s.top)
    assert qres.get("leaks", 0) > 0 and qres.get("corruptions", 0) == 0
    ro = formats.open_image(str(s.top))
    res = ro.check()
    ro.close_chain()
    assert len(res.leaks) == qres["leaks"] and not res.corruptions
    rw = formats.open_image(str(s.top), writable=True)
    res = rw.check(repair=True)
    rw.close_chain()
    assert res.leaks_fixed == qres["leaks"] and res.clean
    qemu_check(s.top)


def test_check_finds_refcount_too_low(tmp_path: Path) -> None:
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", top, str(MiB))
    qemu_io(top, "write -P 9 0 8192", fmt="qcow2")
    img = formats.open_image(str(top))
    assert isinstance(img, q2.Qcow2Image)
    assert img.check().clean
    data_off = img.resolve(0, 4096).file_offset
    rb_off = img.refcounts.reftable[0] & q2.REFT_OFFSET_MASK
    img.close()
    raw = bytearray(top.read_bytes())
    struct.pack_into(">H", raw, rb_off + 2 * (data_off // 4096), 0)
    top.write_bytes(bytes(raw))
    assert qemu_img("check", top, check=False).returncode == 2
    img = formats.open_image(str(top))
    res = img.check()
    img.close()
    assert any("too low" in c for c in res.corruptions)
    assert any("COPIED" in c for c in res.corruptions)


@pytest.mark.parametrize("maker", ["snapshot", "snapshot-compressed-extl2", "compressed-zstd",
                                   "data-file", "rc2-lazy"])
def test_check_clean_on_qemu_made_images(tmp_path: Path, maker: str) -> None:
    s = CONFIGS[maker](tmp_path)
    qemu_io(s.top, "write -P 3 0 100000", "write -z 200000 70000", fmt="qcow2")
    img = formats.open_image(str(s.top))
    res = img.check()
    img.close_chain()
    assert res.clean, res
    assert res.total_clusters == -(-img.virtual_size // img.cluster_size)


CREATE_CASES = [
    {},
    {"cluster_size": 512},
    {"cluster_size": 2 << 20},
    {"compat": "0.10"},
    {"refcount_bits": 1},
    {"refcount_bits": 64, "cluster_size": 512},
    {"extended_l2": True, "cluster_size": 32768},
    {"lazy_refcounts": True},
    {"data_file": "x.data"},
]


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # qemu 7.2 opens relative data files from the cwd


@pytest.mark.parametrize("kw", CREATE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in
                                                                      kw.items()) or "default")
def test_create_matches_qemu_info(tmp_path: Path, kw: dict[str, Any]) -> None:
    top = tmp_path / "c.qcow2"
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", base, "5M")
    backing: dict[str, Any] = {} if "data_file" in kw else {
        "backing_name": "b.qcow2", "backing_format": "qcow2"}
    q2.create(str(top), 5 * MiB + 512, **backing, **kw)
    qemu_check(top)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    spec = info["format-specific"]["data"]
    assert info["virtual-size"] == 5 * MiB + 512
    assert info["cluster-size"] == kw.get("cluster_size", 65536)
    assert spec["compat"] == kw.get("compat", "1.1")
    if kw.get("compat") != "0.10":
        assert spec["refcount-bits"] == kw.get("refcount_bits", 16)
        assert spec["lazy-refcounts"] == kw.get("lazy_refcounts", False)
        assert spec["extended-l2"] == kw.get("extended_l2", False)
    if backing:
        assert info["backing-filename"] == "b.qcow2"
        assert info["backing-filename-format"] == "qcow2"
    else:
        assert spec["data-file"] == "x.data"
    assert qemu_raw(top, tmp_path) == bytes(5 * MiB + 512)


def test_create_refuses_bad_options(tmp_path: Path) -> None:
    p = str(tmp_path / "x.qcow2")
    with pytest.raises(ValueError):
        q2.create(p, MiB, cluster_size=1000)
    with pytest.raises(ValueError):
        q2.create(p, MiB, compat="0.10", extended_l2=True)
    with pytest.raises(ValueError):
        q2.create(p, MiB, extended_l2=True, cluster_size=4096)
    with pytest.raises(ValueError):
        q2.create(p, MiB, backing_name="x" * 2000)
    with pytest.raises(ValueError):
        q2.create(p, 1 << 60, cluster_size=512)


# ---- power loss --------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "seed"), [({"cluster_size": 4096}, 1),
                                          ({"cluster_size": 512, "refcount_bits": 64}, 2),
                                          ({"cluster_size": 16384, "extended_l2": True}, 3),
                                          ({"cluster_size": 4096, "compat": "0.10"}, 4)])
def test_power_loss_never_loses_flushed_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             kw: dict[str, Any], seed: int) -> None:
    size = MiB
    _, model = _raw_base(tmp_path, size, seed)
    top = tmp_path / "top.qcow2"
    q2.create(str(top), size, backing_name="base.raw", backing_format="raw", **kw)
    initial = top.read_bytes()
    log = IoLog(monkeypatch, str(top))
    r = random.Random(seed)
    img = formats.open_image(str(top), writable=True)
    assert isinstance(img, q2.Qcow2Image)
    img.l2_cache.max_tables = 1  # exercise dirty-table eviction
    flushed: list[bytes] = [bytes(model)]
    # Each guest op: (index of the last completed flush, sector -> content it may now show)
    writes: list[tuple[int, int, bytes]] = []
    hot = size // 4  # most ops overlap in a small region, so frees and reuse happen
    for _ in range(60):
        k = r.randrange(10)
        off = r.randrange(0, (hot if r.random() < 0.8 else size) // 512) * 512
        n = min(size - off, r.choice([512, 4096, 8192, 40000 // 512 * 512, 70000 // 512 * 512]))
        if k < 5:
            data = r.randbytes(n)
            log.events.append(("op", len(writes)))
            writes.append((len(flushed) - 1, off, data))
            img.write(off, data)
        elif k < 7:
            log.events.append(("op", len(writes)))
            writes.append((len(flushed) - 1, off, bytes(n)))
            if k == 5:
                img.write_zeroes(off, n)
            else:
                img.discard(off, n)
        else:
            img.flush()
            record_flush(flushed, writes)
            log.events.append(("flushed", len(flushed) - 1))
            continue
        model[off : off + n] = writes[-1][2]
    img.flush()
    img.close_chain()
    events = log.events
    monkeypatch.undo()
    assert qemu_raw(top, tmp_path) == model
    check_crash_points(tmp_path, initial, events, writes, flushed, r)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_metadata_then_write(tmp_path: Path, data: st.DataObject) -> None:
    """Writing to an image with corrupted metadata raises FormatError or works; it never
    crashes with another exception."""
    p = corrupted_copy(tmp_path, data, max_flips=6)
    try:
        img = formats.open_image(str(p), writable=True, fmt="qcow2")
    except formats.FormatError:
        return
    try:
        size = img.virtual_size
        for i in range(6):
            off = data.draw(st.integers(0, max(0, size - 1)))
            n = min(size - off, data.draw(st.sampled_from([1, 512, 4096, 10000])))
            if i % 3 == 2:
                img.discard(off, n)
            else:
                img.write(off, bytes([i + 1]) * n)
        img.flush()
        img.check()
    except formats.FormatError:
        pass
    finally:
        try:
            img.close_chain()
        except formats.FormatError:
            pass
