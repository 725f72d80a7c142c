"""VHD codec (formats/vhd/) against real peers: qemu-img/qemu-io (fixed and dynamic images,
``qemu-img convert -f vpc`` is the oracle) and libvhdi (vhdiinfo, vhdimount: the only peer
that reads differencing VHDs)."""

from __future__ import annotations

import itertools
import os
import random
import struct
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats import (
    CorruptImage,
    FormatError,
    ImageReadOnly,
    Kind,
    OpenPolicy,
    create_overlay,
    open_image,
    open_one,
    vhd,
)
from formats.vhd import VhdImage
from formats.vhd import image as vhd_image
from formats.vhd.structures import bit_runs, set_bits
from tests.support.peers import (
    libvhdi_raw,
    need,
    qemu_img,
    qemu_io,
    qemu_raw,
    read_all,
    run,
    sha256,
)

MiB = 1 << 20


# ---- peers -----------------------------------------------------------------------------------


def qemu_size(path: Path) -> int:
    out = qemu_img("info", "-f", "vpc", "--output=json", path).stdout.decode()
    import json

    return int(json.loads(out)["virtual-size"])


def vhdiinfo(image: Path) -> str:
    need("vhdiinfo")
    return run("vhdiinfo", image).stdout.decode(errors="replace")


# ---- helpers ----------------------------------------------------------------------------------


def check_extents(img: VhdImage) -> None:
    """Extents tile the disk and each is the longest run: neighbours differ in kind, in
    writability, or (DATA) in file contiguity."""
    exts = list(img.extents())
    pos = 0
    for e in exts:
        assert e.guest_offset == pos and e.length > 0
        pos = e.end
    assert pos == img.virtual_size
    for a, b in itertools.pairwise(exts):
        same = a.kind is b.kind and a.writable == b.writable
        if same and a.kind is Kind.DATA:
            same = a.file_offset + a.length == b.file_offset
        assert not same, f"resolve did not return the longest run: {a} then {b}"


def corrupt_image_path(tmp: Path, name: str = "img.vhd") -> Path:
    p = tmp / name
    qemu_img("create", "-f", "vpc", p, "4M")
    qemu_io(p, "write -P 0x5a 0 64k", "write -P 0xa5 3M 4k", fmt="vpc")
    return p


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def refresh_footer(path: Path, offset: int) -> None:
    """Recompute the checksum of the footer at ``offset`` after a patch."""
    with open(path, "r+b") as f:
        f.seek(offset)
        buf = bytearray(f.read(512))
        struct.pack_into(">I", buf, 64, vhd.vhd_checksum(buf, 64))
        f.seek(offset)
        f.write(buf)


def refresh_header(path: Path, offset: int = 512) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        buf = bytearray(f.read(1024))
        struct.pack_into(">I", buf, 36, vhd.vhd_checksum(buf, 36))
        f.seek(offset)
        f.write(buf)


def patch_both_footers(path: Path, field_offset: int, data: bytes) -> None:
    size = path.stat().st_size
    for at in (0, size - 512):
        patch(path, at + field_offset, data)
        refresh_footer(path, at)


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


# ---- pure structures --------------------------------------------------------------------------


def test_checksum_and_footer_roundtrip() -> None:
    f = vhd.Footer(current_size=10 * MiB, original_size=10 * MiB, cylinders=301, heads=4,
                   sectors_per_track=17, unique_id=uuid.uuid4().bytes, data_offset=512)
    buf = f.pack()
    assert len(buf) == 512
    g, what, _, _ = vhd.check_footer(buf)
    assert g is not None and g == f, what
    bad = bytearray(buf)
    bad[100] ^= 1
    g, what, field, _ = vhd.check_footer(bytes(bad))
    assert g is None and field == "checksum"


def test_bitmap_runs() -> None:
    bm = bytearray(512)
    set_bits(bm, 3, 21)
    assert bm[:3] == bytes([0b00011111, 0xFF, 0b11111000])
    assert bit_runs(bm, 0, 4096) == (False, 3)
    assert bit_runs(bm, 3, 4096) == (True, 18)
    assert bit_runs(bm, 10, 15) == (True, 5)
    assert bit_runs(bm, 21, 4096) == (False, 4096 - 21)
    assert bit_runs(bytes([0xFF] * 512), 0, 4) == (True, 4)


@pytest.mark.parametrize("mib", [1, 3, 10, 33, 127, 512, 4095])
def test_geometry_matches_qemu_create(tmp: Path, mib: int) -> None:
    """round_to_geometry gives the size and geometry qemu-img create gives (the spec's CHS
    algorithm); by default the size is exact and qemu reads exactly that too."""
    p = tmp / "q.vhd"
    qemu_img("create", "-f", "vpc", p, f"{mib}M")
    current, geometry = vhd.size_for_create(mib * MiB, round_to_geometry=True)
    assert current == qemu_size(p)
    img = open_one(str(p), fmt="vhd")
    assert isinstance(img, VhdImage)
    f = img.footer
    assert (f.cylinders, f.heads, f.sectors_per_track) == geometry
    img.close()
    ours = tmp / "ours.vhd"
    vhd.create(str(ours), mib * MiB + 512)
    img = open_one(str(ours))
    assert img.virtual_size == qemu_size(ours) == mib * MiB + 512
    img.close()
    rounded = tmp / "rounded.vhd"
    vhd.create(str(rounded), mib * MiB, round_to_geometry=True, kind="fixed")
    assert qemu_size(rounded) == current
    assert f"({current} bytes)" in vhdiinfo(rounded)


def test_exact_size_uses_spec_geometry_when_it_fits(tmp: Path) -> None:
    sectors = 17 * 4 * 100  # a CHS size: the spec's geometry, not the maximal one
    p = tmp / "chs.vhd"
    vhd.create(str(p), sectors * 512)
    img = open_one(str(p))
    assert isinstance(img, VhdImage)
    f = img.footer
    assert (f.cylinders, f.heads, f.sectors_per_track) == (100, 4, 17)
    assert img.virtual_size == qemu_size(p) == sectors * 512
    img.close()


# ---- reading qemu's images --------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
@pytest.mark.parametrize("force_size", ["off", "on"])
def test_read_qemu_images(tmp: Path, subformat: str, force_size: str) -> None:
    p = tmp / "q.vhd"
    size = 6 * MiB + 3 * 512  # not a CHS size: force_size decides what qemu records
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat},force_size={force_size}",
             p, str(size))
    qemu_io(p, "write -P 0x11 0 4k", "write -P 0x22 1000k 2000k", "write -P 0x33 4097k 5",
            "write -P 0x44 5M 1M", "write -z 5200k 8k", fmt="vpc")
    img = open_one(str(p), fmt="vhd")
    assert isinstance(img, VhdImage)
    assert img.virtual_size == qemu_size(p)
    assert read_all(img) == qemu_raw(p, tmp, fmt="vpc")
    check_extents(img)
    assert img.check().clean
    assert img.backing_candidates() == []
    info = img.info()
    assert info["disk_type"] == subformat
    assert info["creator_application"] == ("qem2" if force_size == "on" else "qemu")
    img.close()
    if subformat == "dynamic":  # probing finds dynamic disks; fixed ones need the format
        img2 = open_image(str(p))
        assert img2.format_name == "vhd"
        img2.close()


def test_unallocated_dynamic_reads_zero(tmp: Path) -> None:
    p = tmp / "q.vhd"
    qemu_img("create", "-f", "vpc", p, "8M")
    img = open_one(str(p))
    ext = img.resolve(0, img.virtual_size)
    assert ext.kind is Kind.ZERO and ext.length == img.virtual_size
    assert img.read(12345, 5000) == bytes(5000)
    img.close()


# ---- creating ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_create_read_by_qemu_and_libvhdi(tmp: Path, kind: str) -> None:
    p = tmp / "ours.vhd"
    vhd.create(str(p), 5 * MiB + 100, kind=kind, block_size=256 << 10)
    img = open_one(str(p), fmt="vhd")
    assert img.virtual_size == qemu_size(p) == 5 * MiB + 512
    assert img.check().clean
    img.close()
    assert qemu_raw(p, tmp, fmt="vpc") == bytes(img.virtual_size)
    out = vhdiinfo(p)
    assert ("Dynamic" if kind == "dynamic" else "Fixed") in out
    assert f"({img.virtual_size} bytes)" in out
    with pytest.raises(FileExistsError):
        vhd.create(str(p), MiB)


def test_create_refuses_bad_arguments(tmp: Path) -> None:
    with pytest.raises(ValueError, match="2040 GiB"):
        vhd.create(str(tmp / "a.vhd"), 2041 << 30)
    with pytest.raises(ValueError, match="power of two"):
        vhd.create(str(tmp / "b.vhd"), MiB, block_size=3 << 10)
    with pytest.raises(ValueError, match="kind"):
        vhd.create(str(tmp / "c.vhd"), MiB, kind="sparse")
    assert not list(tmp.iterdir())


def make_base(tmp: Path, kind: str, rng: random.Random) -> tuple[Path, bytes]:
    """A VHD base with random content and its bytes as qemu reads them."""
    raw = tmp / "base.raw"
    data = bytearray(3 * MiB)
    for _ in range(12):  # random islands, the rest zero (stays sparse in a dynamic disk)
        at = rng.randrange(0, len(data) - 70000)
        n = rng.randrange(1, 70000)
        data[at : at + n] = rng.randbytes(n)
    raw.write_bytes(bytes(data))
    base = tmp / f"base-{kind}.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={kind}", raw, base)
    raw.unlink()
    return base, qemu_raw(base, tmp, fmt="vpc")


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_create_differencing_read_by_libvhdi(tmp: Path, kind: str, rng: random.Random) -> None:
    base, base_bytes = make_base(tmp, kind, rng)
    (tmp / "kids").mkdir()
    child = tmp / "kids" / "child.vhd"
    # A fixed VHD is not probed (its footer is at the end, as for qemu): name the format.
    create_overlay(str(child), str(base), "vhd", base_format="vpc")
    img = open_image(str(child), policy=OpenPolicy(confine=False))  # ../ by design
    assert isinstance(img, VhdImage) and img.backing is not None
    assert img.virtual_size == len(base_bytes)
    assert img.backing_candidates()[:2] == ["../" + base.name, str(base)]
    assert img.backing_format == "vhd"
    ext = img.resolve(0, img.virtual_size)
    assert ext.kind is Kind.UNALLOCATED and ext.length == img.virtual_size
    assert read_all(img) == base_bytes
    info = img.info()
    assert [loc["platform_code"] for loc in info["parent_locators"]] == ["W2ru", "W2ku", "MacX"]
    assert info["parent_locators"][0]["path"] == "..\\" + base.name
    parent = img.backing
    assert isinstance(parent, VhdImage)
    assert info["parent_unique_id"] == str(uuid.UUID(bytes=parent.footer.unique_id))
    img.close_chain()
    out = vhdiinfo(child)
    assert "Differential" in out and info["parent_unique_id"] in out
    assert libvhdi_raw(child, tmp) == base_bytes


def test_backing_candidates_order(tmp: Path) -> None:
    img = VhdImage.__new__(VhdImage)
    img.disk_type = vhd.DISK_TYPE_DIFFERENCING
    img.locators = [(b"MacX", "file://localhost/srv/a%20b.vhd"), (b"W2ku", "C:\\vm\\p.vhd"),
                    (b"W2ku", "\\srv\\p.vhd"), (b"W2ru", ".\\p.vhd")]
    img.parent_name = "C:\\vm\\p.vhd"
    assert img.backing_candidates() == ["p.vhd", "/srv/p.vhd", "/srv/a b.vhd"]
    img.locators = [(b"MacX", "file://./sub/q.vhd")]
    img.parent_name = ""
    assert img.backing_candidates() == ["sub/q.vhd"]


# ---- malformed images -------------------------------------------------------------------------


def expect_corrupt(path: Path, field: str | None = None, *, writable: bool = False) -> str:
    with pytest.raises(CorruptImage) as ei:
        img = open_one(str(path), writable=writable, fmt="vhd")
        img.close()
    msg = str(ei.value)
    assert msg.startswith(str(path) + ": ")
    if field is not None:
        assert ei.value.field == field, msg
    return msg


def test_bad_tail_footer_falls_back_to_copy(tmp: Path) -> None:
    p = corrupt_image_path(tmp)
    want = qemu_raw(p, tmp, fmt="vpc")
    size = p.stat().st_size
    patch(p, size - 512 + 40, b"\x99")  # checksum now wrong
    img = open_one(str(p), writable=True, fmt="vhd")
    assert isinstance(img, VhdImage) and img.footer_source == "copy at offset 0"
    assert read_all(img) == want
    res = img.check()
    assert any("end of the file" in c for c in res.corruptions)
    res = img.check(repair=True)
    assert res.corruptions_fixed == 1 and not res.corruptions
    img.close()
    assert open_one(str(p), fmt="vhd").check().clean
    vhdiinfo(p)  # libvhdi needs the footer at the end: the repair put it back


def test_both_footers_bad(tmp: Path) -> None:
    p = corrupt_image_path(tmp)
    size = p.stat().st_size
    patch(p, size - 512 + 40, b"\x99")
    patch(p, 40, b"\x99")
    assert "checksum" in expect_corrupt(p, "checksum")


def test_not_a_vhd(tmp: Path) -> None:
    p = tmp / "x.vhd"
    p.write_bytes(b"hello" * 300)
    expect_corrupt(p, "cookie")
    p.write_bytes(b"x" * 100)
    expect_corrupt(p, "file_size")


@pytest.mark.parametrize(
    "what,field",
    [
        ("max_table_entries_small", "max_table_entries"),
        ("max_table_entries_huge", "max_table_entries"),
        ("block_size", "block_size"),
        ("header_checksum", "checksum"),
        ("bat_past_eof", "bat[1]"),
        ("bat_over_header", "bat[0]"),
        ("table_offset", "table_offset"),
        ("data_offset", "data_offset"),
        ("truncated", "bat[1]"),
    ],
)
def test_malformed_dynamic(tmp: Path, what: str, field: str) -> None:
    p = corrupt_image_path(tmp)
    size = p.stat().st_size
    if what == "max_table_entries_small":
        patch(p, 512 + 28, struct.pack(">I", 1))
        refresh_header(p)
    elif what == "max_table_entries_huge":
        patch(p, 512 + 28, struct.pack(">I", 0x7FFFFFFF))
        refresh_header(p)
    elif what == "block_size":
        patch(p, 512 + 32, struct.pack(">I", 3 << 20))
        refresh_header(p)
    elif what == "header_checksum":
        patch(p, 512 + 100, b"\x01")
    elif what == "bat_past_eof":
        patch(p, 1536 + 4, struct.pack(">I", (size // 512) + 10))
    elif what == "bat_over_header":
        patch(p, 1536, struct.pack(">I", 1))
    elif what == "table_offset":
        patch(p, 512 + 16, struct.pack(">Q", size - 100))
        refresh_header(p)
    elif what == "data_offset":
        patch_both_footers(p, 16, struct.pack(">Q", 1 << 40))
    elif what == "truncated":
        os.truncate(p, size - 600 * 1024)
    expect_corrupt(p, field)


def test_size_limit(tmp: Path) -> None:
    p = corrupt_image_path(tmp)
    # A Hyper-V style image (sized by Current Size) claiming 3 TiB.
    patch_both_footers(p, 28, b"win ")
    patch_both_footers(p, 48, struct.pack(">Q", 3 << 40))
    with pytest.raises(FormatError, match="2040 GiB"):
        open_one(str(p), fmt="vhd")


def test_creator_app_decides_size_rule(tmp: Path) -> None:
    """qemu's rule: geometry for most creators, Current Size for Hyper-V & co."""
    p = corrupt_image_path(tmp)
    patch_both_footers(p, 48, struct.pack(">Q", 4 * MiB + 7 * 512))  # current > geometry
    img = open_one(str(p), fmt="vhd")
    assert isinstance(img, VhdImage)
    geometry_size = img.footer.geometry_sectors * 512
    assert img.virtual_size == qemu_size(p) == geometry_size != 4 * MiB + 7 * 512
    img.close()
    patch_both_footers(p, 28, b"win ")
    img = open_one(str(p), fmt="vhd")
    assert isinstance(img, VhdImage)
    assert img.virtual_size == qemu_size(p) == 4 * MiB + 7 * 512
    assert read_all(img) == qemu_raw(p, tmp, fmt="vpc")
    img.close()


def test_parent_uuid_mismatch(tmp: Path, rng: random.Random) -> None:
    base, _ = make_base(tmp, "dynamic", rng)
    child = tmp / "child.vhd"
    create_overlay(str(child), str(base), "vhd")
    other = tmp / "other.vhd"
    qemu_img("create", "-f", "vpc", other, "3M")
    os.replace(other, base)
    with pytest.raises(CorruptImage) as ei:
        open_image(str(child))
    assert ei.value.field == "parent_unique_id"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_metadata_never_crashes(flips: list[tuple[int, int]]) -> None:
    """Corrupting footer, header or BAT bytes gives a FormatError or a readable image."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.vhd"
        if not _FUZZ_TEMPLATE:
            qemu_img("create", "-f", "vpc", p, "3M")
            qemu_io(p, "write -P 0x5a 0 64k", "write -P 0x6b 2M 4k", fmt="vpc")
            _FUZZ_TEMPLATE.append(p.read_bytes())
        blob = bytearray(_FUZZ_TEMPLATE[0])
        for at, value in flips:
            blob[at if at < 2048 else len(blob) - 4096 + at] = value
        p.write_bytes(bytes(blob))
        try:
            img = open_one(str(p), fmt="vhd")
        except FormatError:
            return
        try:
            for e in img.extents(0, min(img.virtual_size, 8 * MiB)):
                if e.kind is Kind.DATA:
                    img.read(e.guest_offset, min(e.length, 4096))
        except FormatError:
            pass
        finally:
            img.close()


_FUZZ_TEMPLATE: list[bytes] = []


# ---- writing ---------------------------------------------------------------------------------

Op = tuple[str, int, int, int]


def ops_strategy(size: int, max_len: int) -> st.SearchStrategy[list[Op]]:
    """Writes, write-zeroes, discards and allocates; offsets near sector and 4 KiB boundaries
    as often as anywhere."""
    aligned = st.builds(lambda k, d: min(size - 1, max(0, k * 4096 + d)),
                        st.integers(0, size // 4096), st.sampled_from([-512, -1, 0, 1, 511, 512]))
    offset = st.one_of(st.integers(0, size - 1), aligned)
    op = st.tuples(st.sampled_from(["write", "write", "write", "zero", "discard", "allocate"]),
                   offset, st.integers(1, max_len), st.integers(0, 255))
    return st.lists(op, min_size=1, max_size=12)


def apply_ops(img: VhdImage, model: bytearray, ops: list[Op]) -> None:
    for name, off, n, seed in ops:
        n = min(n, img.virtual_size - off)
        if name == "write":
            data = random.Random(seed * 7919 + off).randbytes(n)
            img.write(off, data)
            model[off : off + n] = data
        elif name == "zero":
            img.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        elif name == "discard":
            img.discard(off, n)
            model[off : off + n] = bytes(n)
        else:
            img.allocate(off, n)
            ext = img.resolve(off, 1)
            assert ext.kind is Kind.DATA and ext.writable, ext
        lo, hi = max(0, off - 700), min(img.virtual_size, off + n + 700)
        assert img.read(lo, hi - lo) == bytes(model[lo:hi])


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(maker=st.sampled_from(["ours-64k", "qemu"]), ops=ops_strategy(3 * MiB, 300_000))
def test_dynamic_writes_match_qemu(tmp: Path, maker: str, ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        p = Path(d) / "dyn.vhd"
        if maker == "qemu":
            qemu_img("create", "-f", "vpc", p, "3M")
            qemu_io(p, "write -P 0x77 100k 9k", fmt="vpc")
        else:
            vhd.create(str(p), 3 * MiB, block_size=64 << 10)
        model = bytearray(qemu_raw(p, Path(d), fmt="vpc"))
        img = open_one(str(p), writable=True, fmt="vhd")
        assert isinstance(img, VhdImage)
        apply_ops(img, model, ops)
        check_extents(img)
        img.close()
        assert qemu_raw(p, Path(d), fmt="vpc") == model
        img = open_one(str(p), fmt="vhd")
        assert isinstance(img, VhdImage)
        assert read_all(img) == model
        assert img.check().clean, img.check()
        img.close()
        vhdiinfo(p)
        assert libvhdi_raw(p, Path(d)) == model


@pytest.mark.parametrize("base_kind", ["dynamic", "fixed"])
def test_differencing_writes(tmp: Path, base_kind: str, rng: random.Random) -> None:
    base, base_bytes = make_base(tmp, base_kind, rng)
    base_sha = sha256(base)
    counter = [0]

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=ops_strategy(len(base_bytes), 200_000))
    def run_ops(ops: list[Op]) -> None:
        counter[0] += 1
        child = tmp / f"child{counter[0]}.vhd"
        create_overlay(str(child), str(base), "vhd", base_format="vpc")
        img = open_image(str(child), writable=True)
        assert isinstance(img, VhdImage) and img.differencing
        model = bytearray(base_bytes)
        try:
            apply_ops(img, model, ops)
            check_extents(img)
        finally:
            img.close_chain()
        img = open_image(str(child))
        assert isinstance(img, VhdImage)
        assert read_all(img) == model
        check_extents(img)
        assert img.check().clean
        img.close_chain()
        vhdiinfo(child)
        assert libvhdi_raw(child, tmp) == model
        assert sha256(base) == base_sha
        child.unlink()

    run_ops()


def test_differencing_zero_hides_parent(tmp: Path, rng: random.Random) -> None:
    base, base_bytes = make_base(tmp, "dynamic", rng)
    nonzero = next(i for i in range(0, len(base_bytes), 512) if any(base_bytes[i : i + 512]))
    child = tmp / "child.vhd"
    create_overlay(str(child), str(base), "vhd")
    img = open_image(str(child), writable=True)
    img.discard(nonzero, 512)
    img.write_zeroes(nonzero + 512, 100)  # a partial sector: the rest stays the parent's
    model = bytearray(base_bytes)
    model[nonzero : nonzero + 612] = bytes(612)
    ext = img.resolve(nonzero, 4096)
    assert ext.kind is Kind.DATA and ext.writable
    img.close_chain()
    assert libvhdi_raw(child, tmp) == model
    img = open_image(str(child))
    assert read_all(img) == model
    img.close_chain()


def test_allocate_then_write_in_place(tmp: Path, rng: random.Random) -> None:
    """The daemon's path: allocate, resolve to a writable extent, write the file directly."""
    base, base_bytes = make_base(tmp, "dynamic", rng)
    child = tmp / "child.vhd"
    create_overlay(str(child), str(base), "vhd")
    img = open_image(str(child), writable=True)
    assert img.cluster_size == 4096
    img.allocate(5000, 4000)  # granules [4096, 12288)
    ext = img.resolve(4096, 1 << 20)
    assert (ext.kind, ext.guest_offset, ext.length, ext.writable) == (Kind.DATA, 4096, 8192, True)
    assert img.resolve(0, 4096).kind is Kind.UNALLOCATED
    assert ext.file is not None
    os.pwrite(ext.file.fd, b"\xee" * 100, ext.file_offset + 1000)
    img.flush()
    model = bytearray(base_bytes)
    model[5096:5196] = b"\xee" * 100
    img.close_chain()
    assert libvhdi_raw(child, tmp) == model

    dyn = tmp / "dyn.vhd"
    vhd.create(str(dyn), 2 * MiB, block_size=64 << 10)
    img = open_one(str(dyn), writable=True)
    assert img.resolve(70000, 10).kind is Kind.ZERO
    img.allocate(70000, 10)
    ext = img.resolve(0, 1 << 20)
    assert ext.kind is Kind.ZERO and ext.length == 65536  # the block, not more
    ext = img.resolve(65536, 1 << 20)
    assert (ext.kind, ext.length, ext.writable) == (Kind.DATA, 65536, True)
    assert ext.file is not None
    os.pwrite(ext.file.fd, b"\x42" * 10, ext.file_offset + 4464)
    img.close()
    model = bytearray(img.virtual_size)
    model[70000:70010] = b"\x42" * 10
    assert qemu_raw(dyn, tmp, fmt="vpc") == model
    assert libvhdi_raw(dyn, tmp) == model


def test_fixed_writes(tmp: Path) -> None:
    p = tmp / "fixed.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", p, "2M")
    img = open_one(str(p), writable=True, fmt="vpc")
    model = bytearray(img.virtual_size)
    img.write(1234, b"abc" * 1000)
    model[1234:4234] = b"abc" * 1000
    img.write_zeroes(2000, 100)
    model[2000:2100] = bytes(100)
    img.discard(4000, 1000)
    model[4000:5000] = bytes(1000)
    img.close()
    assert qemu_raw(p, tmp, fmt="vpc") == model
    vhdiinfo(p)


def test_crash_states(tmp: Path) -> None:
    """Metadata reaches the file only at flush, and the old footer is never overwritten: the
    file as it was before the writes (a lost size extension) and the file with data but no
    metadata both open everywhere and read the flushed content."""
    p = tmp / "d.vhd"
    vhd.create(str(p), 2 * MiB, block_size=64 << 10)
    img = open_one(str(p), writable=True)
    img.write(0, b"\x11" * 70000)
    img.flush()
    flushed = bytearray(img.virtual_size)
    flushed[:70000] = b"\x11" * 70000
    old_size = p.stat().st_size
    img.write(500_000, b"\x22" * 200_000)  # new blocks, not flushed
    img.write(100, b"\x33" * 10)  # an existing block: data in place
    unflushed = p.read_bytes()
    img.close()
    after = bytearray(flushed)
    after[500_000:700_000] = b"\x22" * 200_000
    after[100:110] = b"\x33" * 10
    assert qemu_raw(p, tmp, fmt="vpc") == after

    lost_extension = tmp / "lost.vhd"
    lost_extension.write_bytes(unflushed[:old_size])
    no_metadata = tmp / "nometa.vhd"
    no_metadata.write_bytes(unflushed)
    for q in (lost_extension, no_metadata):
        want = bytearray(flushed)
        want[100:110] = b"\x33" * 10  # written in place into a block the BAT already had
        assert qemu_raw(q, tmp, fmt="vpc") == want
        vhdiinfo(q)
        assert libvhdi_raw(q, tmp) == want
        img = open_one(str(q))
        assert read_all(img) == want
        assert img.check().clean
        img.close()


def test_saved_state_is_read_only(tmp: Path) -> None:
    p = corrupt_image_path(tmp)
    patch_both_footers(p, 84, b"\x01")
    img = open_one(str(p), writable=True, fmt="vhd")
    assert not img.writable and "saved state" in (img.read_only_reason or "")
    with pytest.raises(ImageReadOnly, match="saved state"):
        img.write(0, b"x")
    img.close()


def test_dirty_metadata_bound_flushes(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vhd_image, "VHD_MAX_DIRTY_BITMAP_BYTES", 2048)
    p = tmp / "d.vhd"
    vhd.create(str(p), 2 * MiB, block_size=64 << 10)
    img = open_one(str(p), writable=True)
    img.write(0, b"\x5a" * (6 * 65536))  # 6 new blocks: over the bound, flushed by itself
    assert isinstance(img, VhdImage) and not img._dirty_bat
    on_disk = qemu_raw(p, tmp, fmt="vpc")  # before close: what the file says right now
    assert on_disk[: 6 * 65536] == b"\x5a" * (6 * 65536)
    img.close()


def test_check_reports_bat_and_footer_problems(tmp: Path) -> None:
    p = corrupt_image_path(tmp)  # blocks 0 and 1 allocated by qemu-io
    img = open_one(str(p), writable=True, fmt="vhd")
    assert isinstance(img, VhdImage)
    res = img.check()
    assert res.clean and res.allocated_clusters == 2 and res.total_clusters == 3
    size = p.stat().st_size
    bat = struct.unpack(">2I", p.read_bytes()[1536:1544])
    patch(p, 1536 + 8, struct.pack(">I", size // 512 + 1))  # bat[2] past EOF
    patch(p, 1536 + 4, struct.pack(">I", bat[0] + 1))  # bat[1] overlaps bat[0]
    patch(p, 30, b"\x00")  # the footer copy no longer matches
    res = img.check()
    text = "\n".join(res.corruptions)
    assert "bat[2]: data block past end of file" in text
    assert "overlaps another block" in text
    assert "footer copy at offset 0" in text
    res = img.check(repair=True)
    assert res.corruptions_fixed == 1
    assert not any("footer" in c for c in res.corruptions) and len(res.corruptions) == 2
    img.close()
    assert p.read_bytes()[:512] == p.read_bytes()[-512:]
    # Overlapping blocks: readable, but never written.
    patch(p, 1536 + 8, struct.pack(">I", 0xFFFFFFFF))
    open_one(str(p), fmt="vhd").close()
    assert "overlap" in expect_corrupt(p, "bat[1]", writable=True)


def test_differencing_chain(tmp: Path, rng: random.Random) -> None:
    """child2 -> child1 -> fixed base: each level writes; libvhdi reads the whole chain."""
    base, base_bytes = make_base(tmp, "fixed", rng)
    model = bytearray(base_bytes)
    c1, c2 = tmp / "c1.vhd", tmp / "c2.vhd"
    create_overlay(str(c1), str(base), "vhd", base_format="vpc")
    img = open_image(str(c1), writable=True)
    img.write(10_000, b"\x01" * 100_000)
    model[10_000:110_000] = b"\x01" * 100_000
    img.close_chain()
    create_overlay(str(c2), str(c1), "vhd")
    img = open_image(str(c2), writable=True)
    assert img.backing is not None and img.backing.backing is not None
    img.write(50_001, b"\x02" * 7)
    img.write_zeroes(100_000, 20_000)
    model[50_001:50_008] = b"\x02" * 7
    model[100_000:120_000] = bytes(20_000)
    img.close_chain()
    img = open_image(str(c2))
    assert read_all(img) == model
    img.close_chain()
    assert libvhdi_raw(c2, tmp) == model
    # Without its parent open, a differencing disk cannot copy up: writing is refused.
    lone = open_one(str(c2), writable=True)
    with pytest.raises(FormatError, match="parent is not open"):
        lone.write(1, b"x")
    lone.close()
