"""cowd commit against qemu-img commit as the oracle: the same commit done by qemu-img on a
copy of the same chain reads identically, image by image (`qemu-img convert`), and `qemu-img
check` is clean after; differencing VHDs (which qemu cannot follow) against libvhdi and the
parent as qemu reads it; images another process uses are refused; and a commit killed with
SIGKILL at random moments, again and again, leaves every image consistent and the top's guest
view as it was (formats/commit.py's order: copy, flush, then empty)."""

from __future__ import annotations

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
    qemu_io_holding,
    qemu_raw,
)
from tests.support.reliability import Daemon, start_daemon

daemons = reliability.daemons  # the fixture: the daemons a test started, killed at teardown

pytestmark = pytest.mark.qemu

MiB = 1 << 20


cowd = cowd_cli  # the cowd a user types: exit status checked, never a traceback


def check_clean_or_leaks(image: Path, fmt: str = "qcow2") -> None:
    """qemu-img check: no corruption (leaked clusters allowed: exit 3)."""
    p = qemu_img("check", "-f", fmt, image, check=False)
    assert p.returncode in (0, 3), (image, p.returncode, p.stdout, p.stderr)


def twin(tmp_path: Path, build) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """The same chain built once, copied into ours/ and theirs/ (byte-identical files)."""
    src = tmp_path / "src"
    src.mkdir()
    build(src)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(src, ours)
    shutil.copytree(src, theirs)
    return ours, theirs


def views(folder: Path, tmp: Path, names: list[str]) -> dict[str, bytes]:
    return {n: qemu_raw(folder / n, tmp) for n in names}


# ---- chains ------------------------------------------------------------------------------


def raw_under_qcow2(d: Path) -> None:
    qemu_img("create", "-f", "raw", d / "base.raw", "6M")
    qemu_io(d / "base.raw", "write -P 1 0 4M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 1536k 1M", "write -z 3M 64k", "write -P 4 5M 4k",
            "write -c -P 5 128k 64k")


def qcow2_under_qcow2_4k(d: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", d / "base.qcow2", "8M")
    qemu_io(d / "base.qcow2", "write -P 1 0 6M", "write -z 1M 256k")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k", "-b", "base.qcow2", "-F",
             "qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 1000k 900k", "write -z 4M 128k", "write -P 6 7M 1k",
            "discard 2M 64k")


def three_layers(d: Path) -> None:
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", d / "base.qcow2", "4M")
    qemu_io(d / "base.qcow2", "write -P 1 0 4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2")
    qemu_io(d / "mid.qcow2", "write -P 2 1M 1M")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 1536k 1M", "write -z 3M 64k")


def top_larger(d: Path) -> None:
    qemu_img("create", "-f", "raw", d / "base.raw", "2M")
    qemu_io(d / "base.raw", "write -P 1 0 2M", fmt="raw")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", d / "top.qcow2", "5M")
    qemu_io(d / "top.qcow2", "write -P 3 1M 2M", "write -P 7 4M 4k")


def top_with_snapshot(d: Path) -> None:
    qemu_img("create", "-f", "qcow2", d / "base.qcow2", "2M")
    qemu_io(d / "base.qcow2", "write -P 1 0 2M")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", "-b",
             "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 3 0 512k", "write -P 8 1M 3k")
    qemu_img("snapshot", "-c", "snap1", d / "top.qcow2")
    qemu_io(d / "top.qcow2", "write -P 4 256k 64k")


CHAINS = {
    "raw-base": (raw_under_qcow2, ["top.qcow2", "base.raw"], []),
    "qcow2-base-4k": (qcow2_under_qcow2_4k, ["top.qcow2", "base.qcow2"], []),
    "three-layers": (three_layers, ["top.qcow2", "mid.qcow2", "base.qcow2"], []),
    "three-layers-b-base": (three_layers, ["top.qcow2", "mid.qcow2", "base.qcow2"],
                            ["-b", "base.qcow2"]),
    "three-layers-d": (three_layers, ["top.qcow2", "mid.qcow2", "base.qcow2"], ["-d"]),
    "top-larger": (top_larger, ["top.qcow2", "base.raw"], []),
    "snapshot-extl2": (top_with_snapshot, ["top.qcow2", "base.qcow2"], []),
}


@pytest.mark.parametrize("case", list(CHAINS))
def test_commit_equals_qemu(tmp_path: Path, case: str) -> None:
    build, names, flags = CHAINS[case]
    ours, theirs = twin(tmp_path, build)
    before = qemu_raw(ours / "top.qcow2", tmp_path)
    qemu_img("commit", "-q", *flags, theirs / "top.qcow2")
    p = cowd("commit", *flags, "top.qcow2", cwd=ours)
    assert p.stdout == "Image committed.\n"
    for name in names:
        if name.endswith(".qcow2"):
            qemu_check(ours / name)
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        assert (ours / name).stat().st_size > 0
        if name == "mid.qcow2" and "-b" in flags:
            continue  # garbage by design in both (its backing file changed under it)
        got, want = qemu_raw(ours / name, tmp_path, fmt), qemu_raw(theirs / name, tmp_path, fmt)
        assert got == want, name
    # The top reads as before, and (unless kept) is empty: everything reads from the base.
    assert qemu_raw(ours / "top.qcow2", tmp_path) == before
    emptied = not flags
    theirs_map = qemu_img("map", "--output=json", theirs / "top.qcow2").stdout
    ours_map = qemu_img("map", "--output=json", ours / "top.qcow2").stdout
    assert (b'"depth": 0' in ours_map) == (b'"depth": 0' in theirs_map) == (not emptied)
    if case == "snapshot-extl2":  # the snapshot still reads as it was
        for d in (ours, theirs):
            qemu_img("convert", "-l", "snap1", "-O", "raw", d / "top.qcow2", d / "snap.raw")
        assert (ours / "snap.raw").read_bytes() == (theirs / "snap.raw").read_bytes()


def test_commit_json_and_errors(tmp_path: Path) -> None:
    three_layers(tmp_path)
    p = cowd("commit", "-b", "base.qcow2", "-q", "--output=json", "top.qcow2", cwd=tmp_path)
    import json

    doc = json.loads(p.stdout)
    assert doc["depth"] == 2 and doc["emptied"] is False and doc["bytes-copied"] > 0
    p = cowd("commit", "base.qcow2", rc=1, cwd=tmp_path)
    assert "no backing file" in p.stderr and len(p.stderr.splitlines()) == 1
    qemu_img("create", "-f", "raw", tmp_path / "other.raw", "1M")
    for bad in ("other.raw", "top.qcow2", "missing.raw"):
        p = cowd("commit", "-b", bad, "top.qcow2", rc=2, cwd=tmp_path)
        assert len(p.stderr.splitlines()) == 1, p.stderr


def _vhd_chain(d: Path, kind: str) -> None:
    opts = ["-o", "subformat=fixed"] if kind == "fixed" else []
    qemu_img("create", "-f", "vpc", *opts, d / "base.vhd", "8M")
    qemu_io(d / "base.vhd", "write -P 1 0 3M", fmt="vpc")
    fmt = ["--base-format", "vhd"] if kind == "fixed" else []
    cowd("create", "--base", d / "base.vhd", *fmt, "--overlay", "vhd", "-o", d / "top.vhd")
    from formats import open_image

    img = open_image(str(d / "top.vhd"), True)
    try:
        img.write(1 * MiB, b"\x07" * (2 * MiB))
        img.write(5 * MiB + 512, b"\x09" * 4096)
        img.write_zeroes(2 * MiB + 4096, 8192)
    finally:
        img.close_chain()


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_commit_differencing_vhd(tmp_path: Path, kind: str) -> None:
    """Into a dynamic or fixed VHD parent: qemu reads the parent as the child read before;
    libvhdi reads the emptied child the same; both check clean."""
    _vhd_chain(tmp_path, kind)
    before = libvhdi_raw(tmp_path / "top.vhd", tmp_path)
    size = (tmp_path / "top.vhd").stat().st_size
    cowd("commit", "top.vhd", cwd=tmp_path)
    assert (tmp_path / "top.vhd").stat().st_size < size  # its blocks are gone
    assert qemu_raw(tmp_path / "base.vhd", tmp_path, "vpc")[:len(before)] == before
    assert libvhdi_raw(tmp_path / "top.vhd", tmp_path) == before
    for name in ("top.vhd", "base.vhd"):
        cowd("check", name, *(["-f", "vhd"] if kind == "fixed" and name == "base.vhd"
                              else []), cwd=tmp_path)


def test_commit_refused_while_served_or_held(tmp_path: Path, daemons: list[Daemon]) -> None:
    raw_under_qcow2(tmp_path)
    snapshot = {n: (tmp_path / n).read_bytes() for n in ("top.qcow2", "base.raw")}
    d = start_daemon(tmp_path / "top.qcow2", tmp_path)
    daemons.append(d)
    for flags in ([], ["-d"]):
        p = cowd("commit", *flags, "top.qcow2", rc=1, cwd=tmp_path)
        assert "in use" in p.stderr and len(p.stderr.splitlines()) == 1
    d.stop()
    with qemu_io_holding(tmp_path / "base.raw", fmt="raw"):
        p = cowd("commit", "top.qcow2", rc=1, cwd=tmp_path)
        assert "in use" in p.stderr and "base.raw" in p.stderr
    for n, data in snapshot.items():
        assert (tmp_path / n).read_bytes() == data, n


# ---- SIGKILL mid-commit ------------------------------------------------------------------

# Kills per target format.  Each lands just before a change (pwrite, sync, truncate,
# fallocate) drawn at random from all those a whole commit makes (tests/support/killpoints:
# a kill at a wall-clock moment would mostly land in Python's start-up), so every phase is
# hit: the copy, the flush, the top's L1 switch, the frees.
KILLS = 24
KILL_DATA_MIB = 48


def _big_chain(d: Path, base_fmt: str) -> None:
    base = d / f"base.{base_fmt}"
    qemu_img("create", "-f", base_fmt, base, f"{KILL_DATA_MIB + 64}M")
    qemu_io(base, f"write -P 1 0 {KILL_DATA_MIB // 2}M", fmt=base_fmt)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=64k", "-b", base.name, "-F",
             base_fmt, d / "top.qcow2")
    cmds = [f"write -P {i % 200 + 2} {i * 4}M 3M" for i in range(KILL_DATA_MIB // 4)]
    qemu_io(d / "top.qcow2", *cmds, "write -z 8M 8M", "write -c -P 9 19M 64k")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_sigkill_during_commit(tmp_path: Path, base_fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _big_chain(src, base_fmt)
    want = qemu_raw(src / "top.qcow2", tmp_path)
    full = tmp_path / "full"
    shutil.copytree(src, full)
    changes = killpoints.count_changes("commit", "-q", "top.qcow2", cwd=full)
    work = tmp_path / "work"
    for point in killpoints.kill_points(changes, KILLS):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        killpoints.run_killed(point, "commit", "-q", "top.qcow2", cwd=work)
        # Consistent, and the top reads as before: never a mix of old and new.
        check_clean_or_leaks(work / "top.qcow2")
        if base_fmt == "qcow2":
            check_clean_or_leaks(work / "base.qcow2")
        assert qemu_raw(work / "top.qcow2", tmp_path) == want, (point, changes)
        # Committing again finishes the job (what the kill leaked stays leaked).
        cowd("commit", "-q", "top.qcow2", cwd=work)
        check_clean_or_leaks(work / "top.qcow2")
        assert qemu_raw(work / "top.qcow2", tmp_path) == want
        assert qemu_raw(work / f"base.{base_fmt}", tmp_path, base_fmt)[:len(want)] == want
