"""cowd rebase against qemu-img rebase as the oracle: the same rebase done by qemu-img on a copy
reads identically (`qemu-img convert`), records the same backing file and format (`qemu-img
info`), and `qemu-img check` is clean after; safe mode keeps the guest view, `-u` rewrites
the name only, `-b ""` flattens; differencing VHDs against libvhdi; the new name is confined
like every backing name; images in use are refused; and a rebase killed before a random one
of its writes leaves the overlay consistent with its guest view unchanged (formats/rebase.py:
copy, flush, then the header switch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support import killpoints, reliability
from tests.support.peers import (
    cowd_cli,
    libvhdi_raw,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_raw,
)
from tests.support.reliability import Daemon, start_daemon

daemons = reliability.daemons  # the fixture: the daemons a test started, killed at teardown

pytestmark = pytest.mark.qemu

MiB = 1 << 20


cowd = cowd_cli  # the cowd a user types: exit status checked, never a traceback


def backing_of(image: Path) -> tuple[str | None, str | None]:
    doc = json.loads(qemu_img("info", "-U", "--output=json", image).stdout)
    return doc.get("backing-filename"), doc.get("backing-filename-format")


# ---- chains: each builds a top.qcow2 and the files a rebase names ------------------------


def two_bases(d: Path, top_opts: str = "cluster_size=64k") -> None:
    qemu_img("create", "-f", "raw", d / "a.raw", "4M")
    qemu_io(d / "a.raw", "write -P 1 0 4M", fmt="raw")
    qemu_img("create", "-f", "qcow2", d / "b.qcow2", "4M")
    qemu_io(d / "b.qcow2", "write -P 2 0 2M", "write -P 1 3M 1M", "write -z 2M 64k")
    qemu_img("create", "-f", "qcow2", "-o", top_opts, "-b", "a.raw", "-F", "raw",
             d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 1536k 4k", "write -z 2560k 64k", "write -P 4 3M 1k")


def three_layers(d: Path) -> None:
    qemu_img("create", "-f", "qcow2", d / "base.qcow2", "4M")
    qemu_io(d / "base.qcow2", "write -P 1 0 4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2")
    qemu_io(d / "mid.qcow2", "write -P 2 1M 1M", "write -z 3M 128k")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 1536k 64k")


def standalone(d: Path) -> None:
    qemu_img("create", "-f", "raw", d / "a.raw", "4M")
    qemu_io(d / "a.raw", "write -P 1 1M 2M", fmt="raw")
    qemu_img("create", "-f", "qcow2", d / "top.qcow2", "4M")
    qemu_io(d / "top.qcow2", "write -P 5 0 1536k")


CASES = {
    # (build, -b, -F): cowd and qemu-img get the same arguments
    "raw-to-qcow2": (two_bases, "b.qcow2", "qcow2"),
    "raw-to-qcow2-probed": (two_bases, "b.qcow2", None),
    "512b-clusters": (lambda d: two_bases(d, "cluster_size=512"), "b.qcow2", "qcow2"),
    "compat-0.10": (lambda d: two_bases(d, "compat=0.10"), "b.qcow2", "qcow2"),
    "extended-l2": (lambda d: two_bases(d, "cluster_size=32k,extended_l2=on"), "b.qcow2",
                    "qcow2"),
    "onto-a-lower-layer": (three_layers, "base.qcow2", "qcow2"),
    "flatten": (two_bases, "", None),
    "flatten-three": (three_layers, "", None),
    "standalone-gets-a-base": (standalone, "a.raw", "raw"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rebase_equals_qemu(tmp_path: Path, case: str) -> None:
    build, new, new_fmt = CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    build(src)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(src, ours)
    shutil.copytree(src, theirs)
    before = qemu_raw(src / "top.qcow2", tmp_path)
    fflag = ["-F", new_fmt] if new_fmt else []
    qemu_fmt = new_fmt or ("qcow2" if new.endswith(".qcow2") else "raw")
    qemu_img("rebase", "-q", "-b", new, *(["-F", qemu_fmt] if new else []),
             theirs / "top.qcow2")
    p = cowd("rebase", "-b", new, *fflag, "top.qcow2", cwd=ours)
    assert p.stdout == "" and p.stderr == ""
    qemu_check(ours / "top.qcow2")
    assert backing_of(ours / "top.qcow2") == backing_of(theirs / "top.qcow2")
    got = qemu_raw(ours / "top.qcow2", tmp_path)
    assert got == qemu_raw(theirs / "top.qcow2", tmp_path)
    assert got == before
    # The backing files are untouched.
    for f in src.iterdir():
        if f.name != "top.qcow2":
            assert (ours / f.name).read_bytes() == f.read_bytes(), f.name


def test_rebase_unsafe_renames_only(tmp_path: Path) -> None:
    two_bases(tmp_path)
    (tmp_path / "a.raw").rename(tmp_path / "moved.raw")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(tmp_path / "top.qcow2", theirs)
    qemu_img("rebase", "-u", "-b", "moved.raw", "-F", "raw", theirs)
    p = cowd("rebase", "-u", "-b", "moved.raw", "--output=json", "top.qcow2", cwd=tmp_path)
    assert json.loads(p.stdout)["backing-format"] == "raw"  # probed: the file is there
    qemu_check(tmp_path / "top.qcow2")
    assert backing_of(tmp_path / "top.qcow2") == ("moved.raw", "raw")
    assert qemu_raw(tmp_path / "top.qcow2", tmp_path) == qemu_raw(theirs, tmp_path)
    # A name whose file is not there yet: only with -F (nothing to probe), as qemu.
    p = cowd("rebase", "-u", "-b", "later.raw", "top.qcow2", rc=2, cwd=tmp_path)
    assert "-F" in p.stderr and len(p.stderr.splitlines()) == 1
    cowd("rebase", "-u", "-b", "later.raw", "-F", "raw", "top.qcow2", cwd=tmp_path)
    assert backing_of(tmp_path / "top.qcow2") == ("later.raw", "raw")
    # Safe mode needs the new file (and the old one).
    qemu_img("create", "-f", "raw", tmp_path / "later.raw", "4M")
    p = cowd("rebase", "-b", "nothere.raw", "-F", "raw", "top.qcow2", rc=1, cwd=tmp_path)
    assert "does not exist" in p.stderr and len(p.stderr.splitlines()) == 1


def test_rebase_confines_the_new_name(tmp_path: Path) -> None:
    outside = tmp_path / "outside.raw"
    qemu_img("create", "-f", "raw", outside, "4M")
    d = tmp_path / "vm"
    d.mkdir()
    two_bases(d)
    before = (d / "top.qcow2").read_bytes()
    for args in (["-b", "../outside.raw"], ["-b", str(outside)],
                 ["-u", "-b", "../outside.raw"], ["-u", "-b", "../nothere.raw", "-F", "raw"]):
        p = cowd("rebase", *args, "top.qcow2", rc=1, cwd=d)
        assert "outside" in p.stderr and "--allow-backing-outside" in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == 1
    assert (d / "top.qcow2").read_bytes() == before
    view = qemu_raw(d / "top.qcow2", tmp_path)
    cowd("rebase", "--allow-backing-outside", "-b", "../outside.raw", "top.qcow2", cwd=d)
    assert backing_of(d / "top.qcow2") == ("../outside.raw", "raw")
    assert qemu_raw(d / "top.qcow2", tmp_path) == view
    qemu_check(d / "top.qcow2")


def test_rebase_refused_while_served(tmp_path: Path, daemons: list[Daemon]) -> None:
    two_bases(tmp_path)
    before = (tmp_path / "top.qcow2").read_bytes()
    daemons.append(start_daemon(tmp_path / "top.qcow2", tmp_path))
    for flags in ([], ["-u"]):
        p = cowd("rebase", *flags, "-b", "b.qcow2", "top.qcow2", rc=1, cwd=tmp_path)
        assert "in use" in p.stderr and len(p.stderr.splitlines()) == 1
    daemons[0].stop()
    assert (tmp_path / "top.qcow2").read_bytes() == before


def test_rebase_differencing_vhd(tmp_path: Path) -> None:
    """Onto another VHD: the parent's unique id, time stamp, name and locators are
    rewritten; libvhdi reads the same disk through the new parent, before and after the old
    one is gone; `cowd check` clean; -u onto a renamed copy of the parent."""
    qemu_img("create", "-f", "vpc", tmp_path / "b1.vhd", "8M")
    qemu_io(tmp_path / "b1.vhd", "write -P 1 0 3M", fmt="vpc")
    qemu_img("create", "-f", "vpc", tmp_path / "b2.vhd", "8M")
    qemu_io(tmp_path / "b2.vhd", "write -P 2 1M 5M", fmt="vpc")
    cowd("create", "--base", tmp_path / "b1.vhd", "--overlay", "vhd", "-o",
         tmp_path / "top.vhd")
    from formats import open_image

    img = open_image(str(tmp_path / "top.vhd"), True)
    try:
        img.write(1 * MiB, b"\x07" * MiB)
        img.write(5 * MiB + 512, b"\x09" * 4096)
    finally:
        img.close_chain()
    before = libvhdi_raw(tmp_path / "top.vhd", tmp_path)
    cowd("rebase", "-b", "b2.vhd", "top.vhd", cwd=tmp_path)
    (tmp_path / "b1.vhd").unlink()
    assert libvhdi_raw(tmp_path / "top.vhd", tmp_path) == before
    cowd("check", "top.vhd", cwd=tmp_path)
    doc = json.loads(cowd("info", "--output=json", "top.vhd", cwd=tmp_path).stdout)
    assert doc["backing-filename"] == "b2.vhd"
    shutil.copy(tmp_path / "b2.vhd", tmp_path / "b3.vhd")
    (tmp_path / "b2.vhd").unlink()
    cowd("rebase", "-u", "-b", "b3.vhd", "top.vhd", cwd=tmp_path)
    assert libvhdi_raw(tmp_path / "top.vhd", tmp_path) == before
    cowd("check", "top.vhd", cwd=tmp_path)
    p = cowd("rebase", "-b", "", "top.vhd", rc=1, cwd=tmp_path)
    assert "convert" in p.stderr and len(p.stderr.splitlines()) == 1


# ---- SIGKILL mid-rebase ------------------------------------------------------------------

# Kills, each just before a change drawn at random from all a whole rebase makes
# (tests/support/killpoints.py), so the copy, the flush and the header switch are all hit.
KILLS = 16


def _kill_chain(d: Path) -> None:
    qemu_img("create", "-f", "raw", d / "a.raw", "40M")
    qemu_io(d / "a.raw", "write -P 1 0 40M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", d / "b.qcow2", "40M")
    qemu_io(d / "b.qcow2", "write -P 2 0 20M", "write -P 1 30M 10M")
    qemu_img("create", "-f", "qcow2", "-b", "a.raw", "-F", "raw", d / "top.qcow2")
    qemu_io(d / "top.qcow2", *[f"write -P 3 {i}M 512k" for i in range(0, 40, 3)])


@pytest.mark.timeout(900)
def test_sigkill_during_rebase(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _kill_chain(src)
    want = qemu_raw(src / "top.qcow2", tmp_path)
    full = tmp_path / "full"
    shutil.copytree(src, full)
    args = ("rebase", "-b", "b.qcow2", "top.qcow2")
    changes = killpoints.count_changes(*args, cwd=full)
    points = killpoints.kill_points(changes, KILLS)
    points[-1] = changes  # the last change: after the header switch
    work = tmp_path / "work"
    switched = 0
    for point in points:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        killpoints.run_killed(point, *args, cwd=work)
        check = qemu_img("check", work / "top.qcow2", check=False)
        assert check.returncode in (0, 3), (point, check.stdout, check.stderr)
        assert backing_of(work / "top.qcow2") in (("a.raw", "raw"), ("b.qcow2", "qcow2"))
        switched += backing_of(work / "top.qcow2")[0] == "b.qcow2"
        assert qemu_raw(work / "top.qcow2", tmp_path) == want, (point, changes)
        cowd("rebase", "-b", "b.qcow2", "top.qcow2", cwd=work)
        assert backing_of(work / "top.qcow2") == ("b.qcow2", "qcow2")
        assert qemu_raw(work / "top.qcow2", tmp_path) == want
    assert 0 < switched < len(points)  # kills before and after the switch
