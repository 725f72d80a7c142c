"""Image locking against real qemu (qemu-img, qemu-io, qemu-nbd 7.2): while `cowd serve`
serves an overlay, qemu refuses to open it (or its base) for writing and `qemu-img info`
needs -U, as against another qemu; `cowd serve` refuses an image a qemu process has open
for writing, in one line; a killed daemon's locks go with it.  The lock bytes themselves
are compared with what qemu-io takes (read from /proc/locks), not with cowd's constants.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support import reliability
from tests.support.peers import (
    COWD,
    QemuHolder,
    lock_bytes,
    need,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_io_holding,
)
from tests.support.reliability import Daemon, start_daemon

daemons = reliability.daemons  # the fixture: the daemons a test started, killed at teardown

pytestmark = pytest.mark.qemu


def expand(locks: list[tuple[str, int, int]]) -> set[int]:
    return {b for _, a, e in locks for b in range(a, e + 1)}


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    need("qemu-img")
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(4 << 20))
    ov = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", ov)
    return base, ov


@pytest.mark.timeout(60)
def test_served_overlay_is_locked_like_qemu(images: tuple[Path, Path], tmp_path: Path,
                                            daemons: list[Daemon]) -> None:
    base, ov = images
    # The bytes qemu-io takes as a writer of a qcow2 and as its base's reader.
    need("qemu-io")
    q = QemuHolder(ov)
    qemu_top, qemu_base = expand(q.wait_locked(ov)), expand(lock_bytes(base))
    q.close()
    assert not lock_bytes(ov)
    d = start_daemon(ov, tmp_path)
    daemons.append(d)
    assert expand(lock_bytes(ov)) == qemu_top
    # A base: what qemu takes (read) and, stricter than qemu, write and resize forbidden:
    # a base that changes under its overlays corrupts every one of them.
    assert expand(lock_bytes(base)) == qemu_base | {201, 203}
    assert all(mode == "READ" for mode, _, _ in lock_bytes(ov))  # shared locks only
    p = qemu_img("info", ov, check=False)
    assert p.returncode != 0 and b'Failed to get shared "write" lock' in p.stderr, p.stderr
    assert qemu_img("info", "-U", ov).returncode == 0
    for target in (ov, base):
        p = subprocess.run(["qemu-io", "-c", "write 0 512", str(target)], capture_output=True,
                           timeout=30)
        assert b'Failed to get "write" lock' in p.stdout + p.stderr, (target, p)
    p = subprocess.run(["qemu-nbd", "--fork", "-k", str(tmp_path / "q.sock"), str(ov)],
                       capture_output=True, timeout=30)
    assert p.returncode != 0 and b"lock" in p.stderr, p
    # cowd's own repair refuses too, exiting 1 (it could not check: not a check status), and
    # so do the read commands unless -U, as qemu-img's do.
    p = subprocess.run([*COWD, "check", "--repair", str(ov)], capture_output=True, timeout=30)
    assert p.returncode == 1 and b"in use by another process" in p.stderr, p
    for cmd in (("info",), ("map",), ("check",)):
        p = subprocess.run([*COWD, *cmd, str(ov)], capture_output=True, timeout=30)
        assert p.returncode == 1 and b"--force-share" in p.stderr, (cmd, p)
        p = subprocess.run([*COWD, *cmd, "-U", str(ov)], capture_output=True, timeout=30)
        assert p.returncode == 0, (cmd, p)
    d.stop()
    assert not lock_bytes(ov) and not lock_bytes(base)
    qemu_check(ov)


@pytest.mark.timeout(60)
def test_killed_daemon_releases_its_locks(images: tuple[Path, Path], tmp_path: Path,
                                          daemons: list[Daemon]) -> None:
    _, ov = images
    d = start_daemon(ov, tmp_path)
    daemons.append(d)
    assert lock_bytes(ov)
    d.kill()
    assert not lock_bytes(ov)
    p = subprocess.run(["qemu-io", "-c", "write -P 7 0 512", str(ov)], capture_output=True,
                       timeout=30)
    assert p.returncode == 0 and b"wrote 512" in p.stdout, p


def _serve_refused(ov: Path, tmp_path: Path) -> str:
    p = subprocess.run([*COWD, "serve", str(ov), "--nbd", f"unix:{tmp_path / 'x.sock'}",
                        "--run-dir", str(tmp_path / "runx")], capture_output=True, timeout=30)
    err = p.stderr.decode()
    assert p.returncode == 1, (p.returncode, err)  # in use: not a usage error
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.timeout(60)
def test_serve_refuses_an_image_qemu_writes(images: tuple[Path, Path], tmp_path: Path) -> None:
    base, ov = images
    need("qemu-io")
    q = QemuHolder(ov)
    q.wait_locked(ov)
    try:
        err = _serve_refused(ov, tmp_path)
        assert f"{ov}: image is in use by another process" in err, err
    finally:
        q.close()
    # qemu writing the base: an overlay on it cannot be served either (it would read a base
    # that changes under it).
    q = QemuHolder(base, "-f", "raw")
    q.wait_locked(base)
    try:
        err = _serve_refused(ov, tmp_path)
        assert f"{base}: image is in use by another process" in err, err
    finally:
        q.close()
    # A qemu that only reads (and shares everything, -U) is no conflict.
    q = QemuHolder("-r", "-U", ov)
    time.sleep(0.3)
    try:
        d = start_daemon(ov, tmp_path)
        d.stop()
    finally:
        q.close()


def test_convert_refuses_an_image_qemu_writes(tmp_path: Path) -> None:
    """As qemu-img convert: the source another process has open for writing is refused in
    one line (exit 1, no output file left) unless -U, which reads what qemu-img -U reads."""
    img = tmp_path / "held.qcow2"
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 5 0 64k", "write -P 6 3M 4k")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    with qemu_io_holding(img):
        q = qemu_img("convert", "-O", "raw", img, theirs, check=False)
        assert q.returncode != 0 and b"lock" in q.stderr, q
        p = subprocess.run([*COWD, "convert", "-O", "raw", str(img), str(ours)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, p
        assert "--force-share" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
        assert not ours.exists()
        p = subprocess.run([*COWD, "convert", "-U", "-O", "raw", str(img), str(ours)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        qemu_img("convert", "-U", "-O", "raw", img, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
