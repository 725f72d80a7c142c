"""cowd resize against qemu-img resize as the oracle: the same operation on a copy reads the
same through `qemu-img convert`, and `qemu-img check` is clean after each; images another
process has open are refused.  VHD growth (which qemu-img cannot do) read back by qemu and
libvhdi, and killed before each of its writes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.peers import COWD, cowd_cli, qemu_check, qemu_img, qemu_io, qemu_raw

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


def test_raw_resize_and_shrink_rule(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(b"\x07" * (4 * MiB))
    cowd("resize", img, "+4M")
    assert img.stat().st_size == 8 * MiB
    p = cowd("resize", img, "-6M", rc=2)
    assert "--shrink" in p.stderr and len(p.stderr.splitlines()) == 1
    cowd("resize", "--shrink", img, "-6M")
    assert img.read_bytes() == b"\x07" * (2 * MiB)


def test_resize_refused_while_qemu_holds_the_image(tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    before = img.read_bytes()
    # qemu-io reading commands from a pipe we keep open: it holds the image until we close it.
    holder = subprocess.Popen(["qemu-io", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Until qemu-io holds its locks, watched in /proc/locks: probing with qemu-img info
        # would take a lock itself, and a qemu-io starting at that instant fails to open.
        ino = img.stat().st_ino
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _ofd_locked(ino):
            assert holder.poll() is None, "qemu-io exited before it held the image"
            time.sleep(0.05)
        assert _ofd_locked(ino), "qemu-io never took the image's lock"
        p = cowd("resize", img, "+1M", rc=1)
        assert "in use" in p.stderr and len(p.stderr.splitlines()) == 1
        for cmd in ("info", "map", "check"):
            p = cowd(cmd, img, rc=1)
            assert "--force-share" in p.stderr
            cowd(cmd, "-U", img)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.kill()
        holder.wait(timeout=10)
    assert img.read_bytes() == before


def _ofd_locked(ino: int) -> bool:
    """Whether an OFD lock (qemu's image locks) is held on a file of inode ``ino``."""
    # /proc/locks: "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 100" (major:minor:inode)
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "OFDLCK" and \
                    fields[5].rsplit(":", 1)[-1] == str(ino):
                return True
    return False


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
