"""qcow2 reading: every byte read through formats/ must equal `qemu-img convert -O raw`.

Images are made at test time with qemu-img / qemu-io (compat 0.10 and 1.1, cluster sizes
512 B .. 2 MiB, refcount widths 1..64, zlib and zstd compression, extended L2 entries,
external data files, snapshots, backing chains over a raw base).  Mapping is also compared
cluster by cluster with `qemu-img map`, and malformed headers must raise FormatError.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from formats import CorruptImage, FormatError, ImageReadOnly, Kind, UnsupportedImage
from formats import qcow2 as q2
from tests.support.corruption import corrupted_copy
from tests.support.peers import qemu_img, qemu_io, qemu_raw, read_all, run

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def mixed_content(size: int, seed: int) -> bytes:
    """Compressible and incompressible 4 KiB blocks, zero blocks and repeated bytes."""
    r = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        k = r.randrange(4)
        if k == 0:
            out += bytes(4096)
        elif k == 1:
            out += r.randbytes(4096)
        elif k == 2:
            out += bytes([r.randrange(256)]) * 4096
        else:
            out += (b"cowd qcow2 test %d " % r.randrange(1000)) * 200
            out = out[: len(out) - len(out) % 4096]
    return bytes(out[:size])


def make_base(tmp: Path, size: int, seed: int = 1, name: str = "base.raw") -> Path:
    p = tmp / name
    p.write_bytes(mixed_content(size, seed))
    return p


def scribble(path: Path, size: int, cluster: int, seed: int, zero_ops: bool = True) -> None:
    """Writes, zero writes and discards at cluster-aligned and unaligned places."""
    r = random.Random(seed)
    cmds = []
    for _ in range(12):
        off = r.randrange(0, size - 1) // 512 * 512
        n = min(size - off, r.choice([512, 4096, cluster, 3 * cluster + 1536, 65536]))
        n = max(512, n // 512 * 512)
        k = r.randrange(4) if zero_ops else 0
        if k <= 1:
            cmds.append(f"write -P 0x{r.randrange(1, 256):02x} {off} {n}")
        elif k == 2:
            cmds.append(f"write -z {off} {n}")
        else:
            cmds.append(f"discard {off} {n}")
    qemu_io(path, *cmds, fmt="qcow2")


def assert_same(path: Path, tmp: Path) -> formats.Image:
    img = formats.open_image(str(path))
    try:
        assert read_all(img) == qemu_raw(path, tmp)
        assert_maximal(img)
    finally:
        img.close_chain()
    return img


def assert_maximal(img: formats.Image) -> None:
    """resolve() returns the longest run: no two consecutive extents could be merged."""
    exts = list(img.extents())
    assert sum(e.length for e in exts) == img.virtual_size
    for a, b in itertools.pairwise(exts):
        assert a.end == b.guest_offset
        if a.kind is not b.kind or a.kind is Kind.COMPRESSED or a.writable != b.writable:
            continue
        if a.kind is Kind.DATA:
            assert a.file_offset + a.length != b.file_offset or a.file is not b.file, (a, b)
        else:
            raise AssertionError(f"mergeable extents {a} {b}")


def qemu_map(path: Path) -> list[dict[str, object]]:
    out = qemu_img("map", "--output=json", "-f", "qcow2", path).stdout
    return list(json.loads(out))


def assert_map_matches(path: Path) -> None:
    """This layer's kind and host offset, per 512-byte sector run, equal qemu-img map's."""
    img = formats.open_image(str(path))
    try:
        for m in qemu_map(path):
            start, length = int(m["start"]), int(m["length"])  # type: ignore[call-overload]
            pos = start
            while pos < start + length:
                ext = img.resolve(pos, start + length - pos)
                if m["depth"] != 0 or not m["present"]:
                    assert ext.kind is Kind.UNALLOCATED, (m, ext)
                elif m["zero"] and not m["data"]:
                    assert ext.kind is Kind.ZERO, (m, ext)
                elif "offset" in m:
                    assert ext.kind is Kind.DATA, (m, ext)
                    assert ext.file_offset == int(m["offset"]) + (pos - start), (m, ext)  # type: ignore[call-overload]
                else:
                    assert ext.kind is Kind.COMPRESSED, (m, ext)
                pos = ext.end
    finally:
        img.close_chain()


# ---- the read matrix -----------------------------------------------------------------------

MATRIX = [
    pytest.param(512, "", True, id="c512-zlib"),
    pytest.param(4096, "", True, id="c4k-zlib"),
    pytest.param(65536, "", True, id="c64k-zlib"),
    pytest.param(2 << 20, "", True, id="c2M-zlib"),
    pytest.param(65536, "compression_type=zstd", True, id="c64k-zstd"),
    pytest.param(4096, "compression_type=zstd", True, id="c4k-zstd"),
    pytest.param(65536, "compat=0.10", True, id="v2-zlib"),
    pytest.param(512, "compat=0.10", False, id="v2-c512"),
    pytest.param(65536, "refcount_bits=1", False, id="rc1"),
    pytest.param(65536, "refcount_bits=2", False, id="rc2"),
    pytest.param(4096, "refcount_bits=4", False, id="rc4"),
    pytest.param(65536, "refcount_bits=8", False, id="rc8"),
    pytest.param(65536, "refcount_bits=32", False, id="rc32"),
    pytest.param(512, "refcount_bits=64", False, id="rc64-c512"),
    pytest.param(16384, "extended_l2=on", False, id="extl2-16k"),
    pytest.param(65536, "extended_l2=on", True, id="extl2-64k-zlib"),
    pytest.param(65536, "extended_l2=on,compression_type=zstd", True, id="extl2-zstd"),
    pytest.param(2 << 20, "extended_l2=on", False, id="extl2-2M"),
    pytest.param(65536, "lazy_refcounts=on", False, id="lazy"),
]


@pytest.mark.parametrize(("cluster", "opts", "compress"), MATRIX)
def test_read_matches_qemu(tmp_path: Path, cluster: int, opts: str, compress: bool) -> None:
    size = 8 * MiB if cluster >= 2 << 20 else 4 * MiB
    base = make_base(tmp_path, size, seed=cluster)
    img = tmp_path / "img.qcow2"
    o = f"cluster_size={cluster}" + (f",{opts}" if opts else "")
    args = ["convert", "-f", "raw", "-O", "qcow2", "-o", o]
    if compress:
        args.append("-c")
    qemu_img(*args, base, img)
    assert_same(img, tmp_path)
    scribble(img, size, cluster, seed=cluster + 7, zero_ops=True)
    assert_same(img, tmp_path)
    assert_map_matches(img)


def test_compressed_clusters_really_compressed(tmp_path: Path) -> None:
    for ctype in ("zlib", "zstd"):
        base = make_base(tmp_path, 2 * MiB, seed=5)
        img = tmp_path / f"{ctype}.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", base, img)
        im = formats.open_image(str(img))
        try:
            kinds = {e.kind for e in im.extents()}
            assert Kind.COMPRESSED in kinds
            assert im.info()["compression_type"] == ctype
            assert read_all(im) == base.read_bytes()
        finally:
            im.close_chain()


def test_extl2_subclusters(tmp_path: Path) -> None:
    """Subcluster allocation, zero and unallocated states inside one cluster, over a base."""
    base = make_base(tmp_path, 1 * MiB, seed=11)
    img = tmp_path / "sub.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", "-b", base,
             "-F", "raw", img)
    qemu_io(img, "write -P 0x11 2048 2048", "write -P 0x22 8192 4096", "write -z 20480 2048",
            "write -P 0x33 65536 65536", "write -z 65536 8192", "discard 131072 4096",
            "write -P 0x44 200000 30000", fmt="qcow2")
    assert_same(img, tmp_path)
    assert_map_matches(img)
    im = formats.open_image(str(img))
    try:
        first = im.resolve(0, 65536)
        assert first.kind is Kind.UNALLOCATED and first.length == 2048
        assert im.resolve(2048, 100).kind is Kind.DATA
        assert im.resolve(20480, 4096).kind is Kind.ZERO
    finally:
        im.close_chain()


# ---- chains, data files, snapshots ---------------------------------------------------------


def test_backing_chain_raw_qcow2_qcow2(tmp_path: Path) -> None:
    make_base(tmp_path, 3 * MiB, seed=2)
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o",
             "cluster_size=4096", mid, str(4 * MiB))
    scribble(mid, 4 * MiB, 4096, seed=3)
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, str(5 * MiB))
    scribble(top, 5 * MiB, 65536, seed=4)
    img = assert_same(top, tmp_path)
    assert img.backing_name == "mid.qcow2" and img.backing_format == "qcow2"


def test_backing_without_format_extension(tmp_path: Path) -> None:
    base = make_base(tmp_path, 1 * MiB, seed=12)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", base, "-F", "raw", top)
    qemu_io(top, "write -P 0x5a 1000 70000", fmt="qcow2")
    assert_same(top, tmp_path)


@pytest.mark.parametrize("raw", ["off", "on"])
def test_external_data_file(tmp_path: Path, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # qemu-img creates a relative data file in the cwd
    img = tmp_path / "ext.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file=ext.data,data_file_raw={raw}", img,
             str(4 * MiB))
    scribble(img, 4 * MiB, 65536, seed=9)
    im = assert_same(img, tmp_path)
    info = im.info()
    assert info["data_file"] == "ext.data" and info["data_file_raw"] == (raw == "on")
    im = formats.open_image(str(img))
    try:
        data_exts = [e for e in im.extents() if e.kind is Kind.DATA]
        assert data_exts and all(e.file is not None and e.file.path.endswith("ext.data")
                                 for e in data_exts)
    finally:
        im.close_chain()


def test_data_file_protocol_refused(tmp_path: Path) -> None:
    img = tmp_path / "ext.qcow2"
    q2.create(str(img), MiB, data_file="ext.data")
    raw = bytearray(img.read_bytes())
    i = raw.index(b"ext.data")
    raw[i : i + 8] = b"nbd:data"
    img.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedImage, match="protocol"):
        formats.open_image(str(img))


def test_snapshots_active_l1_serves(tmp_path: Path) -> None:
    base = make_base(tmp_path, 2 * MiB, seed=21)
    img = tmp_path / "snap.qcow2"
    qemu_img("convert", "-O", "qcow2", base, img)
    qemu_img("snapshot", "-c", "s1", img)
    scribble(img, 2 * MiB, 65536, seed=22)
    qemu_img("snapshot", "-c", "s2", img)
    qemu_io(img, "write -P 0x77 0 100000", fmt="qcow2")
    im = assert_same(img, tmp_path)
    assert im.info()["snapshots"] == 2
    im = formats.open_image(str(img), writable=True)
    try:
        # Clusters shared with a snapshot must not be written in place.
        shared = [e for e in im.extents() if e.kind is Kind.DATA and not e.writable]
        own = [e for e in im.extents() if e.kind is Kind.DATA and e.writable]
        assert shared and own
        assert own[0].guest_offset == 0
    finally:
        im.close_chain()


def test_short_backing_reads_zero_past_its_end(tmp_path: Path) -> None:
    base = make_base(tmp_path, 1 * MiB + 4096, seed=31)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top, str(3 * MiB))
    qemu_io(top, "write -P 0x10 1000000 100000", fmt="qcow2")
    assert_same(top, tmp_path)


def test_data_cluster_past_eof_reads_zero(tmp_path: Path) -> None:
    """Like qemu, a data cluster beyond the end of file reads as zeroes."""
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(MiB))
    qemu_io(img, "write -P 0x61 0 65536", "write -P 0x62 65536 65536", fmt="qcow2")
    size = img.stat().st_size
    os.truncate(img, size - 65536)
    im = formats.open_image(str(img))
    try:
        assert read_all(im) == qemu_raw(img, tmp_path)
    finally:
        im.close_chain()


# ---- header facts and states ---------------------------------------------------------------


def test_info_and_probe(tmp_path: Path) -> None:
    img = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", "-o",
             "cluster_size=16384,extended_l2=on,lazy_refcounts=on,refcount_bits=8,"
             "compression_type=zstd", img, str(MiB))
    im = formats.open_image(str(img))
    try:
        assert isinstance(im, q2.Qcow2Image)
        info = im.info()
        assert info["compat"] == "1.1" and info["cluster_size"] == 16384
        assert info["extended_l2"] and info["lazy_refcounts"]
        assert info["refcount_bits"] == 8 and info["compression_type"] == "zstd"
        assert not info["dirty"] and not info["corrupt"] and info["snapshots"] == 0
    finally:
        im.close_chain()
    assert q2.Qcow2Image.probe(img.read_bytes()[:4096], img.stat().st_size)
    assert not q2.Qcow2Image.probe(b"QFI\x00" + bytes(100), 104)


def set_incompat(path: Path, bits: int) -> None:
    raw = bytearray(path.read_bytes())
    cur = struct.unpack_from(">Q", raw, 72)[0]
    struct.pack_into(">Q", raw, 72, cur | bits)
    path.write_bytes(bytes(raw))


def test_corrupt_bit_opens_read_only(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", img, str(MiB))
    set_incompat(img, q2.QCOW2_INCOMPAT_CORRUPT)
    im = formats.open_image(str(img), writable=True)
    try:
        assert not im.writable and im.read_only_reason and "corrupt" in im.read_only_reason
        assert im.info()["corrupt"]
        with pytest.raises(ImageReadOnly, match="corrupt"):
            im.write(0, b"x" * 512)
        assert read_all(im) == bytes(MiB)
    finally:
        im.close_chain()


def test_unknown_incompatible_bit_named_from_feature_table(tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    q2.create(str(img), MiB)
    raw = bytearray(img.read_bytes())
    # Rename the "extended L2 entries" entry of the feature table to bit 9, and set bit 9.
    i = raw.index(b"extended L2 entries")
    raw[i - 1] = 9
    raw[i : i + 19] = b"frobnicated blocks\0"
    img.write_bytes(bytes(raw))
    set_incompat(img, 1 << 9)
    with pytest.raises(UnsupportedImage, match="frobnicated blocks"):
        formats.open_image(str(img))


def make_dirty(img: Path, *cmds: str) -> None:
    """qemu-io with lazy refcounts, killed before it can clean up: the dirty bit stays."""
    p = run("qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], "-c",
            "sigraise 9", img, check=False)
    assert p.returncode == -9, p
    raw = img.read_bytes()
    assert struct.unpack_from(">Q", raw, 72)[0] & q2.QCOW2_INCOMPAT_DIRTY


def test_dirty_image_readable(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, str(2 * MiB))
    make_dirty(img, "write -P 0x42 0 300000")
    im = formats.open_image(str(img))
    try:
        assert im.info()["dirty"]
        assert read_all(im) == qemu_raw(img, tmp_path)
    finally:
        im.close_chain()


# ---- malformed images ----------------------------------------------------------------------


def fresh(tmp_path: Path, opts: str = "cluster_size=4096") -> bytearray:
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, img, str(MiB))
    qemu_io(img, "write -P 0x31 0 20000", fmt="qcow2")
    return bytearray(img.read_bytes())


def open_bytes(tmp_path: Path, raw: bytes | bytearray) -> formats.Image:
    p = tmp_path / "bad.qcow2"
    p.write_bytes(bytes(raw))
    return formats.open_image(str(p), fmt="qcow2")


def patch(raw: bytearray, fmt: str, off: int, value: int) -> bytearray:
    out = bytearray(raw)
    struct.pack_into(fmt, out, off, value)
    return out


BAD_HEADERS = [
    (">I", 4, 4, UnsupportedImage, "version"),
    (">I", 20, 8, CorruptImage, "cluster_bits"),
    (">I", 20, 22, UnsupportedImage, "cluster_bits"),
    (">I", 36, 0x1000001, CorruptImage, "L1 table too large"),
    (">I", 36, 0, CorruptImage, "L1 table too small"),
    (">Q", 40, 0x1200, CorruptImage, "L1 table offset not cluster aligned"),
    (">Q", 40, 0x7FFF0000, CorruptImage, "L1 table past end of file"),
    (">Q", 48, 0x7FFF0000, CorruptImage, "refcount table past end of file"),
    (">I", 56, 100000, CorruptImage, "refcount table too large"),
    (">I", 60, 70000, CorruptImage, "too many snapshots"),
    (">I", 32, 1, UnsupportedImage, "encrypted"),
    (">I", 100, 100, CorruptImage, "header_length"),
    (">I", 100, 106, CorruptImage, "header_length"),
    (">I", 96, 7, CorruptImage, "refcount_order"),
    (">Q", 72, 1 << 20, UnsupportedImage, "incompatible"),
    (">Q", 72, q2.QCOW2_INCOMPAT_COMPRESSION, CorruptImage, "compression"),
    (">Q", 88, q2.QCOW2_AUTOCLEAR_DATA_FILE_RAW, CorruptImage, "data_file_raw"),
    (">Q", 72, q2.QCOW2_INCOMPAT_DATA_FILE, UnsupportedImage, "data file"),
    (">Q", 8, 8192, CorruptImage, "backing file name offset"),
]


@pytest.mark.parametrize(("fmt", "off", "value", "exc", "msg"), BAD_HEADERS)
def test_bad_header(tmp_path: Path, fmt: str, off: int, value: int, exc: type[Exception],
                    msg: str) -> None:
    raw = patch(fresh(tmp_path), fmt, off, value)
    with pytest.raises(exc, match=msg) as ei:
        open_bytes(tmp_path, raw)
    assert str(ei.value).startswith(str(tmp_path / "bad.qcow2"))


def test_overlapping_tables(tmp_path: Path) -> None:
    raw = fresh(tmp_path)
    rt_off = struct.unpack_from(">Q", raw, 48)[0]
    with pytest.raises(CorruptImage, match="overlaps"):
        open_bytes(tmp_path, patch(raw, ">Q", 40, rt_off))


def test_extension_too_large(tmp_path: Path) -> None:
    raw = fresh(tmp_path)
    hl = struct.unpack_from(">I", raw, 100)[0]
    with pytest.raises(CorruptImage, match="header extension too large"):
        open_bytes(tmp_path, patch(patch(raw, ">I", hl, 0x12345678), ">I", hl + 4, 0x7FFFFFFF))


def test_backing_name_too_long(tmp_path: Path) -> None:
    raw = fresh(tmp_path)
    raw = patch(raw, ">Q", 8, 1024)
    with pytest.raises(CorruptImage, match="backing file name too long"):
        open_bytes(tmp_path, patch(raw, ">I", 16, 2000))


def l1_entry_offset(raw: bytearray) -> tuple[int, int]:
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    return l1_off, struct.unpack_from(">Q", raw, l1_off)[0]


def test_l2_table_unaligned_or_past_eof(tmp_path: Path) -> None:
    raw = fresh(tmp_path)
    l1_off, e = l1_entry_offset(raw)
    im = open_bytes(tmp_path, patch(raw, ">Q", l1_off, e | 0x200))
    with pytest.raises(CorruptImage, match=r"L2 table offset not cluster aligned \(l1\[0\]="):
        im.read(0, 512)
    im.close()
    im = open_bytes(tmp_path, patch(raw, ">Q", l1_off, (1 << 63) | (1 << 40)))
    with pytest.raises(CorruptImage, match="L2 table past end of file"):
        im.read(0, 512)
    im.close()


def test_data_cluster_unaligned(tmp_path: Path) -> None:
    raw = fresh(tmp_path)
    _, e = l1_entry_offset(raw)
    l2 = e & q2.L1E_OFFSET_MASK
    d = struct.unpack_from(">Q", raw, l2)[0]
    im = open_bytes(tmp_path, patch(raw, ">Q", l2, d | 0x200))
    with pytest.raises(CorruptImage, match="not cluster aligned"):
        im.read(0, 512)
    im.close()


def test_bad_compressed_stream(tmp_path: Path) -> None:
    base = make_base(tmp_path, 256 * 1024, seed=3)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", base, img)
    im = formats.open_image(str(img))
    ext = next(e for e in im.extents() if e.kind is Kind.COMPRESSED)
    im.close()
    raw = bytearray(img.read_bytes())
    raw[ext.file_offset : ext.file_offset + 64] = b"\xff" * 64
    im = open_bytes(tmp_path, raw)
    with pytest.raises(CorruptImage, match="compressed cluster"):
        im.read(ext.guest_offset, ext.length)
    im.close()


def test_subcluster_bitmap_invalid(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", img, str(MiB))
    qemu_io(img, "write -P 1 0 4096", fmt="qcow2")
    raw = bytearray(img.read_bytes())
    _, e = l1_entry_offset(raw)
    l2 = e & q2.L1E_OFFSET_MASK
    bm = struct.unpack_from(">Q", raw, l2 + 8)[0]
    im = open_bytes(tmp_path, patch(raw, ">Q", l2 + 8, bm | (1 << 32)))
    with pytest.raises(CorruptImage, match="both allocated and zero"):
        im.read(0, 512)
    im.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_metadata(tmp_path: Path, data: st.DataObject) -> None:
    """Random corruption of header and metadata clusters: FormatError or success, never a
    crash, hang or unbounded allocation."""
    p = corrupted_copy(tmp_path, data, max_flips=8)
    try:
        im = formats.open_image(str(p), fmt="qcow2")
    except FormatError:
        return
    try:
        pos = 0
        while pos < min(im.virtual_size, 4 * MiB):
            n = min(65536, im.virtual_size - pos)
            im.read(pos, n)
            pos += n
        im.info()
        im.check()
    except FormatError:
        pass
    finally:
        im.close_chain()
