"""cowd resize against qemu-img resize as the oracle: the same operation on a copy reads the
same through `qemu-img convert`, and `qemu-img check` is clean after each; images another
process has open are refused.  qcow2 shrinks (grown back after: the dropped range reads as
qemu reads it), and killed before sampled writes of a large shrink; qcow2 growth that moves
the L1 table killed before each of its writes.  VHD growth (which qemu-img cannot do) read
back by qemu and libvhdi, and killed before each of its writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import (
    COWD,
    cowd_cli,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_io_holding,
    qemu_raw,
    sha256,
)

MiB = 1 << 20


cowd = cowd_cli  # the cowd a user types: exit status checked, never a traceback


@pytest.mark.parametrize("cluster_size,grow", [("512", "+30M"), ("4k", "+70M"),
                                               ("64k", "3M")])
def test_qcow2_grow_equals_qemu(tmp_path: Path, cluster_size: str, grow: str) -> None:
    """512-byte clusters: the L1 table grows from 1 cluster to 16 (written crash-safely,
    formats/qcow2/resize.py); 4k: a larger table in one cluster; 64k: within the table."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", ours, "2M")
    qemu_io(ours, "write -P 3 0 1M", "write -P 4 1536k 4k")
    shutil.copy(ours, theirs)
    cowd("resize", ours, grow)
    qemu_img("resize", theirs, grow)
    qemu_check(ours)
    assert qemu_raw(ours, tmp_path) == qemu_raw(theirs, tmp_path)
    # Writable after growing: a write past the old end reads back through qemu.
    qemu_io(ours, "write -P 9 2M 64k")
    qemu_io(theirs, "write -P 9 2M 64k")
    qemu_check(ours)
    assert qemu_raw(ours, tmp_path) == qemu_raw(theirs, tmp_path)


# ---- qcow2 shrink (formats/qcow2/resize.py) ------------------------------------------------

# id: (qemu-img create -o options, old size, qemu-io commands, new size, cluster size);
# every image has data past the new end, and in the cluster that holds it where it is not
# cluster-aligned.
SHRINK_CASES = {
    "v2-64k-aligned": ("compat=0.10", "8M", ["write -P 1 0 1M", "write -P 2 2M 3M",
                                              "write -P 3 7M 64k"], 3 * MiB, 64 << 10),
    "v3-512-unaligned": ("cluster_size=512", "2M", ["write -P 1 0 300k", "write -P 2 700k 900k",
                                                    "write -P 3 1900k 8k"],
                         1 * MiB + 3 * 512 + 512, 512),
    "v3-2M-unaligned": ("cluster_size=2M", "16M", ["write -P 1 0 3M", "write -P 2 5M 6M",
                                                   "write -P 3 15M 1M"],
                        5 * MiB + 2048, 2 * MiB),
    "extended-l2": ("extended_l2=on,cluster_size=64k", "8M",
                    ["write -P 1 0 1M", "write -P 2 3M 4k", "write -P 5 3080k 10k",
                     "write -z 3200k 64k", "write -P 4 6M 2M"], 3 * MiB + 2560, 64 << 10),
    "zero-clusters": ("cluster_size=64k", "8M",
                      ["write -P 1 0 4M", "write -z 1M 1M", "write -z 3M 1M",
                       "write -P 4 6M 2M", "write -z 7M 64k"], 3 * MiB + 512, 64 << 10),
}


def _make(tmp: Path, name: str, opts: str, size: str, cmds: list[str],
          backing: Path | None = None) -> Path:
    img = tmp / name
    args = ["create", "-f", "qcow2", "-o", opts]
    if backing is not None:
        args += ["-b", backing.name, "-F", "raw"]
    qemu_img(*args, img, size)
    qemu_io(img, *cmds)
    return img


def _compressed(tmp: Path) -> Path:
    """A qcow2 image of compressed clusters (qemu-img convert -c), some stream crossing the
    host cluster where the next one starts, plus a plain write and a zero range."""
    src = tmp / "src.raw"
    pattern = bytearray()
    for i in range(8 * 16):  # 8 MiB in 64 KiB pieces, compressible to different lengths
        pattern += bytes([i % 251]) * (1024 * (i % 7 + 1)) + bytes(range(256)) * 4 * (
            64 - (i % 7 + 1) * 4) + bytes(1024 * (i % 7 + 1) * 3)
    src.write_bytes(bytes(pattern))
    img = tmp / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, img)
    qemu_io(img, "write -P 9 5M 128k", "write -z 6M 64k")
    return img


def _shrink_both(tmp: Path, src: Path, new: int, old: int, cs: int,
                 backing_shows: bool = False) -> None:
    """qemu-img resize --shrink one copy, cowd resize --shrink the other: the same disk,
    size and a clean check; grown back to ``old``, the same disk again, except that the bytes
    of the partial last cluster past the new end read as zeroes through cowd's where qemu
    (without a larger backing file) shows them again."""
    ours, theirs = tmp / f"ours-{src.name}", tmp / f"theirs-{src.name}"
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    qemu_img("resize", "--shrink", theirs, str(new))
    cowd("resize", "--shrink", ours, str(new))
    qemu_check(ours)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs)
    assert qemu_raw(ours, tmp) == qemu_raw(theirs, tmp)
    sizes = [json.loads(qemu_img("info", "--output=json", p).stdout)["virtual-size"]
             for p in (ours, theirs)]
    assert sizes == [new, new]
    # qemu also frees refcount blocks that count nothing any more, and so can cut more of
    # the file (512-byte clusters); cowd cuts only after the last cluster in use.
    assert ours.stat().st_size <= src.stat().st_size
    qemu_img("resize", theirs, str(old))
    cowd("resize", ours, str(old))
    qemu_check(ours)
    grown, expected = qemu_raw(ours, tmp), bytearray(qemu_raw(theirs, tmp))
    tail_end = min(-(-new // cs) * cs, old)
    if not backing_shows:
        expected[new:tail_end] = bytes(tail_end - new)
    assert grown == bytes(expected)
    # Writable after: a write past the new end reads back through qemu.
    qemu_io(ours, f"write -P 6 {old - 4096} 4k")
    qemu_check(ours)
    assert qemu_raw(ours, tmp)[old - 4096:] == b"\x06" * 4096


@pytest.mark.parametrize("case", list(SHRINK_CASES))
def test_qcow2_shrink_equals_qemu(tmp_path: Path, case: str) -> None:
    opts, size, cmds, new, cs = SHRINK_CASES[case]
    src = _make(tmp_path, "src.qcow2", opts, size, cmds)
    old = json.loads(qemu_img("info", "--output=json", src).stdout)["virtual-size"]
    _shrink_both(tmp_path, src, new, old, cs)


def test_qcow2_shrink_compressed_equals_qemu(tmp_path: Path) -> None:
    src = _compressed(tmp_path)
    # Inside a compressed cluster, and then on a cluster boundary.
    _shrink_both(tmp_path, src, 5 * MiB + 20 * 1024 + 512, 8 * MiB, 64 << 10)
    _shrink_both(tmp_path, src, 2 * MiB, 8 * MiB, 64 << 10)


@pytest.mark.parametrize("new", [3 * MiB, 3 * MiB + 512], ids=["aligned", "unaligned"])
def test_qcow2_overlay_shrink_equals_qemu(tmp_path: Path, new: int) -> None:
    """Over a backing file as large as the overlay: grown back, qemu and cowd both hide the
    backing file past the new end behind zero clusters."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x07" * (8 * MiB))
    src = _make(tmp_path, "ov.qcow2", "cluster_size=64k", "8M",
                ["write -P 1 1M 1M", "write -P 2 3M 64k", "write -P 3 6M 512k"], base)
    _shrink_both(tmp_path, src, new, 8 * MiB, 64 << 10, backing_shows=True)


def test_qcow2_shrink_refusals(tmp_path: Path) -> None:
    """Without --shrink: usage (exit 2); with internal snapshots (qemu 7.2 shrinks a v3
    image that has some; cowd refuses, as qemu's documentation says) and for VHD (qemu
    cannot resize it): exit 1; one line each, the image unchanged."""
    img = _make(tmp_path, "s.qcow2", "cluster_size=64k", "4M", ["write -P 1 0 4M"])
    before = sha256(img)
    p = cowd("resize", img, "-1M", rc=2)
    assert "--shrink" in p.stderr and len(p.stderr.splitlines()) == 1
    qemu_img("snapshot", "-c", "snap", img)
    before = sha256(img)
    p = cowd("resize", "--shrink", img, "1M", rc=1)
    assert "snapshots" in p.stderr and len(p.stderr.splitlines()) == 1
    assert sha256(img) == before
    vhd = tmp_path / "d.vhd"
    qemu_img("create", "-f", "vpc", vhd, "8M")
    before = sha256(vhd)
    p = cowd("resize", "--shrink", vhd, "-1M", rc=1)
    assert "shrinking a vhd image is not supported" in p.stderr
    assert len(p.stderr.splitlines()) == 1 and sha256(vhd) == before


@pytest.mark.timeout(900)
def test_sigkill_during_qcow2_shrink(tmp_path: Path) -> None:
    """Killed before one of its writes (a sample of them: tests/support/killpoints.py), a
    shrink of a large image with 4k clusters (many L2 tables dropped, compressed clusters
    and a partial last cluster) leaves an image qemu-img check accepts, leaks at worst,
    whose bytes within the new size are unchanged; its size is the old one or the new."""
    from tests.support import killpoints

    src = _make(tmp_path, "src.qcow2", "cluster_size=4k", "64M",
                ["write -P 1 0 2M", "write -P 2 9M 20M", "write -z 30M 1M",
                 "write -P 3 40M 24M"])
    new = 9 * MiB + 5 * 512
    keep = qemu_raw(src, tmp_path)[:new]
    work = tmp_path / "work.qcow2"
    shutil.copy(src, work)
    changes = killpoints.count_changes("resize", "--shrink", str(work), str(new))
    assert changes > 10
    for point in killpoints.kill_points(changes, 25):
        shutil.copy(src, work)
        killpoints.run_killed(point, "resize", "--shrink", str(work), str(new))
        p = qemu_img("check", work, check=False)
        assert p.returncode in (0, 3), (point, p.stdout, p.stderr)  # 3: leaks only
        assert b"ERROR" not in p.stdout + p.stderr, (point, p.stdout, p.stderr)
        data = qemu_raw(work, tmp_path)
        assert len(data) in (new, 64 * MiB) and data[:new] == keep, point
        cowd("resize", "--shrink", work, str(new))  # finishing it afterwards works
        qemu_img("check", "-r", "leaks", work)
        qemu_check(work)
        assert qemu_raw(work, tmp_path) == keep, point


@pytest.mark.parametrize("cluster_size,grow", [("512", "+300M"), ("4k", "+70M")])
def test_sigkill_during_qcow2_grow(tmp_path: Path, cluster_size: str, grow: str) -> None:
    """Killed before each of its writes (tests/support/killpoints.py; a grow makes few), a
    grow whose L1 table must move (512-byte clusters: 1 cluster to 151; 4k clusters: 1
    entry to 36) leaves an image qemu-img check
    accepts, leaks at worst, with the old size or the new, the old bytes unchanged and the
    grown range zeroes; both sizes are seen, and finishing the grow afterwards works."""
    from tests.support import killpoints

    src = _make(tmp_path, "src.qcow2", f"cluster_size={cluster_size}", "2M",
                ["write -P 3 0 1M", "write -P 4 1536k 4k"])
    old = 2 * MiB
    new = old + int(grow[1:-1]) * MiB
    keep = qemu_raw(src, tmp_path)
    work = tmp_path / "work.qcow2"
    shutil.copy(src, work)
    changes = killpoints.count_changes("resize", str(work), grow)
    assert changes >= 5  # new refcounts, the new table, the header, the frees, their syncs
    sizes_seen = set()
    for point in killpoints.kill_points(changes, 25):
        shutil.copy(src, work)
        killpoints.run_killed(point, "resize", str(work), grow)
        p = qemu_img("check", work, check=False)
        assert p.returncode in (0, 3), (point, p.stdout, p.stderr)  # 3: leaks only
        assert b"ERROR" not in p.stdout + p.stderr, (point, p.stdout, p.stderr)
        data = qemu_raw(work, tmp_path)
        assert len(data) in (old, new), (point, len(data))
        assert data[:old] == keep and data[old:] == bytes(len(data) - old), point
        sizes_seen.add(len(data))
        cowd("resize", work, str(new))  # finishing it afterwards works
        qemu_img("check", "-r", "leaks", work)
        qemu_check(work)
        assert qemu_raw(work, tmp_path) == keep + bytes(new - old), point
    assert sizes_seen == {old, new}, sizes_seen


def test_raw_resize_and_shrink_rule(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\x07" * (4 * MiB))
    cowd("resize", img, "+4M")
    assert img.stat().st_size == 8 * MiB
    p = cowd("resize", img, "-6M", rc=2)
    assert "--shrink" in p.stderr and len(p.stderr.splitlines()) == 1
    cowd("resize", "--shrink", img, "-6M")
    assert img.read_bytes() == b"\x07" * (2 * MiB)


# qemu-img -p's plain progress, which it writes to stdout even when that is no terminal:
# "    (12.00/100%)\r" from 0.00 to 100.00, then a newline.
QEMU_PROGRESS = re.compile(r"    \(0\.00/100%\)\r(    \(\d{1,3}\.\d\d/100%\)\r)*"
                           r"    \(100\.00/100%\)\r\n")


def cowd_raw(*args: str | os.PathLike[str]) -> tuple[str, str]:
    """stdout and stderr with their carriage returns (text mode would make them newlines)."""
    p = subprocess.run([*COWD, *map(str, args)], capture_output=True, timeout=120, check=True)
    return p.stdout.decode(), p.stderr.decode()


def test_resize_quiet_and_progress_as_qemu(tmp_path: Path) -> None:
    """-q prints nothing, as qemu-img resize -q; without it the line qemu-img prints; -p
    on a pipe (no terminal) prints qemu-img's plain progress before that line."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-f", "qcow2", ours, "1M")
    shutil.copy(ours, theirs)
    p, q = cowd("resize", "-q", ours, "+1M"), qemu_img("resize", "-q", theirs, "+1M")
    assert (p.stdout, p.stderr) == ("", "") and (q.stdout, q.stderr) == (b"", b"")
    p, q = cowd("resize", ours, "+1M"), qemu_img("resize", theirs, "+1M")
    assert p.stdout == q.stdout.decode() == "Image resized.\n" and p.stderr == ""
    out, err = cowd_raw("resize", "-p", ours, "+1M")
    progress, line = out[:-len("Image resized.\n")], out[-len("Image resized.\n"):]
    assert QEMU_PROGRESS.fullmatch(progress), repr(out)
    assert line == "Image resized.\n" and err == ""
    q = qemu_img("convert", "-p", "-O", "raw", theirs, tmp_path / "theirs.raw")
    assert QEMU_PROGRESS.fullmatch(q.stdout.decode()), q.stdout  # the shape is qemu's
    qemu_check(ours)
    assert json.loads(qemu_img("info", "--output=json", ours).stdout)["virtual-size"] == 4 * MiB


def test_resize_refused_while_qemu_holds_the_image(tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    before = img.read_bytes()
    with qemu_io_holding(img):
        p = cowd("resize", img, "+1M", rc=1)
        assert "in use" in p.stderr and len(p.stderr.splitlines()) == 1
        p = cowd("resize", "--shrink", img, "512k", rc=1)
        assert "in use" in p.stderr and len(p.stderr.splitlines()) == 1
        for cmd in ("info", "map", "check"):
            p = cowd(cmd, img, rc=1)
            assert "--force-share" in p.stderr
            cowd(cmd, "-U", img)
    assert img.read_bytes() == before


# ---- VHD growth (qemu's vpc driver cannot resize: qemu and libvhdi read the result) -------


def _vhd_view_ok(img: Path, tmp: Path, size: int, prefix: bytes) -> None:
    """qemu and libvhdi both read ``size`` bytes: ``prefix``, then zeroes."""
    from tests.support.peers import libvhdi_raw

    for data in (qemu_raw(img, tmp, "vpc"), libvhdi_raw(img, tmp)):
        assert len(data) == size
        assert data[:len(prefix)] == prefix
        assert not data[len(prefix):].strip(b"\0")


@pytest.mark.parametrize("grow", ["+1M", "64M"], ids=["within-the-bat", "larger-bat"])
def test_vhd_dynamic_grow(tmp_path: Path, grow: str) -> None:
    img = tmp_path / "d.vhd"
    qemu_img("create", "-f", "vpc", img, "8M")
    qemu_io(img, "write -P 1 0 3M", "write -P 2 7M 1M", fmt="vpc")
    old = qemu_raw(img, tmp_path, "vpc")
    cowd("resize", img, grow)
    size = len(old) + MiB if grow == "+1M" else 64 * MiB
    _vhd_view_ok(img, tmp_path, size, old)
    cowd("check", img)
    qemu_io(img, f"write -P 3 {size - MiB} 64k", fmt="vpc")  # a new block past the old end
    cowd("check", img)
    data = qemu_raw(img, tmp_path, "vpc")
    assert data[size - MiB:size - MiB + 65536] == b"\x03" * 65536 and data[:len(old)] == old


def test_vhd_fixed_grow_and_differencing_refused(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", img, "8M")
    qemu_io(img, "write -P 1 0 8M", fmt="vpc")
    old = qemu_raw(img, tmp_path, "vpc")
    cowd("resize", "-f", "vhd", img, "20M")
    assert img.stat().st_size == 20 * MiB + 512
    _vhd_view_ok(img, tmp_path, 20 * MiB, old)
    cowd("check", "-f", "vhd", img)
    child = tmp_path / "c.vhd"
    cowd("create", "--base", img, "--base-format", "vhd", "--overlay", "vhd", "-o", child)
    p = cowd("resize", child, "+1M", rc=1)
    assert "differencing" in p.stderr and len(p.stderr.splitlines()) == 1


@pytest.mark.timeout(600)
def test_sigkill_during_vhd_grow(tmp_path: Path) -> None:
    """Killed before each one of its writes in turn (tests/support/killpoints.py: a growth
    makes only a handful), a growth that needs a larger BAT leaves the old disk or the new
    one, as qemu reads it; the footer copies may differ only in the switch's last window,
    which check --repair finishes."""
    from tests.support import killpoints

    src = tmp_path / "src.vhd"
    qemu_img("create", "-f", "vpc", src, "8M")
    qemu_io(src, "write -P 1 0 3M", "write -P 2 7M 1M", fmt="vpc")
    old = qemu_raw(src, tmp_path, "vpc")
    work = tmp_path / "work.vhd"
    shutil.copy(src, work)
    changes = killpoints.count_changes("resize", str(work), "64M")
    for point in range(1, changes + 1):
        shutil.copy(src, work)
        killpoints.run_killed(point, "resize", str(work), "64M")
        data = qemu_raw(work, tmp_path, "vpc")
        assert len(data) in (len(old), 64 * MiB), point
        assert data[:len(old)] == old and not data[len(old):].strip(b"\0"), point
        check = subprocess.run([*COWD, "check", "--repair", str(work)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, (point, check.stdout, check.stderr)
        cowd("check", work)
