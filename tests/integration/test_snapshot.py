"""cowd snapshot -l/-c/-d/-a against qemu-img as the oracle: snapshots cowd makes are listed by
`qemu-img snapshot -l` and read by `qemu-img convert -l` as the disk was; cowd lists qemu's
as qemu does; delete and apply leave what qemu-img's own delete and apply leave on a copy
(the same guest bytes, the same list); `qemu-img check` is clean after each; and a snapshot
command killed before a random one of its writes leaves the disk, and every snapshot,
reading as before or as after (formats/qcow2/snapshot.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support import killpoints
from tests.support.peers import cowd_cli, qemu_check, qemu_img, qemu_io, qemu_io_holding, qemu_raw

pytestmark = pytest.mark.qemu


cowd = cowd_cli  # the cowd a user types: exit status checked, never a traceback


def names(image: Path) -> list[str]:
    """The snapshot names qemu lists, in order."""
    out = qemu_img("snapshot", "-l", image).stdout.decode().splitlines()
    return [line.split()[1] for line in out[2:]]


def snap_raw(image: Path, tmp: Path, name: str) -> bytes:
    out = tmp / f"snap-{name}.raw"
    qemu_img("convert", "-U", "-l", name, "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


OPTIONS = {"64k": "cluster_size=64k", "4k": "cluster_size=4k",
           "extl2": "cluster_size=32k,extended_l2=on", "compat-0.10": "compat=0.10"}


def _image(d: Path, opts: str) -> Path:
    img = d / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, img, "6M")
    qemu_io(img, "write -P 1 0 2M", "write -c -P 7 4M 64k", "write -z 3M 64k")
    return img


@pytest.mark.parametrize("opts", list(OPTIONS))
def test_snapshots_cowd_makes_qemu_reads(tmp_path: Path, opts: str) -> None:
    img = _image(tmp_path, OPTIONS[opts])
    v1 = qemu_raw(img, tmp_path)
    cowd("snapshot", "-c", "one", img)
    qemu_check(img)
    qemu_io(img, "write -P 2 1M 2M", "write -P 3 5M 4k")  # copy-on-write past the snapshot
    v2 = qemu_raw(img, tmp_path)
    cowd("snapshot", "-c", "two", img)
    qemu_io(img, "write -P 4 0 64k")
    qemu_check(img)
    assert names(img) == ["one", "two"]
    assert snap_raw(img, tmp_path, "one") == v1 and snap_raw(img, tmp_path, "two") == v2
    # cowd lists as qemu lists.
    assert cowd("snapshot", "-l", img).stdout == qemu_img("snapshot", "-l",
                                                          img).stdout.decode()
    doc = json.loads(cowd("snapshot", "-l", "--output=json", img).stdout)
    assert [s["name"] for s in doc] == ["one", "two"]
    # Apply and delete, beside qemu-img's own on a copy.
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(img, theirs)
    cowd("snapshot", "-a", "one", img)
    qemu_img("snapshot", "-a", "one", theirs)
    qemu_check(img)
    assert qemu_raw(img, tmp_path) == qemu_raw(theirs, tmp_path) == v1
    cowd("snapshot", "-d", "one", img)
    qemu_img("snapshot", "-d", "one", theirs)
    qemu_check(img)
    assert names(img) == names(theirs) == ["two"]
    assert snap_raw(img, tmp_path, "two") == v2 and qemu_raw(img, tmp_path) == v1
    qemu_io(img, "write -P 5 0 3M")  # the active layer writes again, in place where alone
    cowd("snapshot", "-d", "2", img)  # by ID
    qemu_check(img)
    assert names(img) == []


def test_snapshot_errors(tmp_path: Path) -> None:
    img = _image(tmp_path, "cluster_size=64k")
    p = cowd("snapshot", "-d", "nothere", img, rc=1)
    assert "no such snapshot" in p.stderr and len(p.stderr.splitlines()) == 1
    raw = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", raw, "1M")
    p = cowd("snapshot", "-c", "x", raw, rc=1)
    assert "snapshot" in p.stderr and len(p.stderr.splitlines()) == 1
    p = cowd("snapshot", img, rc=2)  # no action
    assert len(p.stderr.splitlines()) == 1
    with qemu_io_holding(img):
        p = cowd("snapshot", "-c", "x", img, rc=1)
        assert "in use" in p.stderr
        cowd("snapshot", "-l", "-U", img)


# ---- killed mid-way ----------------------------------------------------------------------

KILLS = 12


@pytest.mark.timeout(900)
@pytest.mark.parametrize("action", ["-c", "-d", "-a"])
def test_sigkill_during_snapshot(tmp_path: Path, action: str) -> None:
    """Killed before a random one of its writes: the disk and every snapshot read as before
    or as after; `qemu-img check -r all` then leaves it clean (the leaks, and the COPIED
    flags the module clears first, are all it may find) without changing what it reads."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", src, "16M")
    qemu_io(src, *[f"write -P {i + 1} {i}M 512k" for i in range(0, 16, 2)])
    qemu_img("snapshot", "-c", "old", src)
    qemu_io(src, "write -P 9 0 4M")
    arg = {"-c": "new", "-d": "old", "-a": "old"}[action]
    after = tmp_path / "after.qcow2"
    shutil.copy(src, after)
    changes = killpoints.count_changes("snapshot", action, arg, str(after))

    def state(image: Path) -> tuple[bytes, dict[str, bytes]]:
        return qemu_raw(image, tmp_path), {n: snap_raw(image, tmp_path, n)
                                           for n in names(image)}

    states = [state(src), state(after)]
    work = tmp_path / "work.qcow2"
    for point in killpoints.kill_points(changes, KILLS):
        shutil.copy(src, work)
        killpoints.run_killed(point, "snapshot", action, arg, str(work))
        got = state(work)
        assert got in states, (point, changes)
        r = qemu_img("check", "-r", "all", work, check=False)
        assert r.returncode == 0, (point, r.stdout, r.stderr)
        qemu_check(work)
        assert state(work) == got, point
