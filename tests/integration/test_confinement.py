"""What cowd opens: the files an image names stay beneath the top image's folder, against a
local user who races a symlink swap (issue 18), and special files are refused.

The race: an unprivileged user (created here, removed after) owns the folder of images that
root reads.  While root runs cowd, that user swaps a named file — the backing file, a qcow2's
external data file, a VHD's parent — between a real file and a symlink to a root-only
secret, as fast as rename(2) goes.  Whatever cowd does, no output may ever hold the secret's
bytes, and every refusal is one line.  The secret here is a real image (the VHD one even has
the child's parent UUID), so a reader that opened it would read it, not fail on it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import formats
from formats import BackingOutside, FormatError, OpenPolicy
from tests.support.attach import attach_problem
from tests.support.peers import COWD, missing_tool, qemu_img
from tests.support.reliability import start_daemon, wait_listening

MiB = 1 << 20
SIZE = MiB
SWAP_DEADLINE_S = 600  # the attacker stops by itself at the latest after this

pytestmark = [pytest.mark.root, pytest.mark.qemu]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates a user)")

# The attacker: swaps each NAME between the real file (a hard link of .NAME.keep, its own
# file) and a symlink to TARGET, each swap one atomic rename, until the stop file appears.
ATTACKER = r"""
import os, sys, time
folder, stop, count_file, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
pairs = [a.split("=", 1) for a in sys.argv[5:]]
os.chdir(folder)
n = 0
end = time.monotonic() + deadline
while not os.path.exists(stop) and time.monotonic() < end and n < 50_000_000:
    for name, target in pairs:
        tmp = "." + name + ".tmp"
        os.link("." + name + ".keep", tmp)
        os.rename(tmp, name)
        if os.path.lexists(tmp):  # rename of two links to one inode leaves both (POSIX)
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.rename(tmp, name)
        n += 2
with open(count_file, "w") as f:
    f.write(str(n))
"""


@dataclass
class Attack:
    folder: Path  # the attacker's folder of images
    secret_dir: Path  # root-only
    user: str
    uid: int
    gid: int


@pytest.fixture
def attack(tmp_path: Path) -> Iterator[Attack]:
    """A throw-away user and a folder it owns; a root-only folder of secrets."""
    if os.geteuid() != 0:
        pytest.skip("needs root (creates a user)")
    reason = missing_tool("useradd", "userdel", "setpriv", "qemu-img", "qemu-io")
    if reason:
        pytest.skip(reason)
    user = f"cowdrace{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", user], check=True, capture_output=True)
    folder = Path(tempfile.mkdtemp(prefix="cowd-race-"))
    try:
        import pwd

        pw = pwd.getpwnam(user)
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        folder.chmod(0o755)
        secret_dir = tmp_path / "root-only"
        secret_dir.mkdir(mode=0o700)
        yield Attack(folder, secret_dir, user, pw.pw_uid, pw.pw_gid)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(["userdel", user], capture_output=True)


def give(a: Attack, *paths: Path) -> None:
    for p in paths:
        os.chown(p, a.uid, a.gid, follow_symlinks=False)


@contextlib.contextmanager
def swapping(a: Attack, pairs: dict[str, Path]) -> Iterator[Path]:
    """Run the attacker as the throw-away user while the body runs; yields the count file
    (how many swaps it made, written when it stops)."""
    for name in pairs:
        os.link(a.folder / name, a.folder / f".{name}.keep")
    stop = a.folder / ".stop"
    count = a.folder / ".count"
    args = [f"{name}={target}" for name, target in pairs.items()]
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={a.uid}", f"--regid={a.gid}", "--clear-groups", "--",
         sys.executable, "-c", ATTACKER, str(a.folder), str(stop), str(count),
         str(SWAP_DEADLINE_S), *args], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not any(os.path.islink(a.folder / n) for n in pairs):
            assert proc.poll() is None, f"attacker exited {proc.returncode}"
            assert time.monotonic() < deadline, "the attacker never swapped"
            time.sleep(0.01)
        yield count
    finally:
        stop.touch()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Leave the real file in place for whoever looks next.
        for name in pairs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(a.folder / name)
            os.link(a.folder / f".{name}.keep", a.folder / name)


def cowd(*args: str | Path, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*COWD, *map(str, args)], capture_output=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def assert_refusal(p: subprocess.CompletedProcess[bytes], what: str) -> str:
    """A failed command said one line, naming an image, and no traceback."""
    err = p.stderr.decode(errors="replace")
    lines = err.strip().splitlines()
    assert p.returncode in (1, 2), (what, p.returncode, err)
    assert len(lines) == 1 and "Traceback" not in err, (what, err)
    assert lines[0].startswith("cowd: "), (what, lines[0])
    return lines[0]


def never_secret(secret: bytes, *blobs: bytes) -> None:
    """No blob holds any 64-byte run of the secret's first 4 KiB (the secrets are random)."""
    for i in range(0, 4096, 64):
        probe = secret[i : i + 64]
        for blob in blobs:
            assert probe not in blob, "the secret's bytes reached an output"


@dataclass
class Case:
    top: Path  # what root opens
    swapped: str  # the name the attacker swaps (in its folder)
    target: Path  # the root-only file it points the symlink at
    good: bytes  # the virtual disk when the real file is in place
    secret: bytes  # the secret's guest bytes (what a leak would show)
    fmt: str


def backing_case(a: Attack) -> Case:
    rnd = random.Random(1)
    good, secret = rnd.randbytes(SIZE), rnd.randbytes(SIZE)
    (a.folder / "base.raw").write_bytes(good)
    (a.secret_dir / "secret.raw").write_bytes(secret)
    top = a.folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, str(SIZE))
    give(a, a.folder / "base.raw", top)
    return Case(top, "base.raw", a.secret_dir / "secret.raw", good, secret, "qcow2")


def data_file_case(a: Attack) -> Case:
    rnd = random.Random(2)
    good, secret = rnd.randbytes(SIZE), rnd.randbytes(SIZE)
    top = a.folder / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={a.folder / 'df.data'},"
             "data_file_raw=on", top, str(SIZE))
    (a.folder / "good.raw").write_bytes(good)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", a.folder / "good.raw", top)
    (a.folder / "good.raw").unlink()
    # The secret as a raw data file at the same offsets (data_file_raw: guest = file).
    (a.secret_dir / "secret.data").write_bytes(secret)
    give(a, top, a.folder / "df.data")
    return Case(top, "df.data", a.secret_dir / "secret.data", good, secret, "qcow2")


def vhd_case(a: Attack) -> Case:
    rnd = random.Random(3)
    good, secret = rnd.randbytes(SIZE), rnd.randbytes(SIZE)
    raw = a.secret_dir / "good.raw"
    raw.write_bytes(good)
    base = a.folder / "base.vhd"
    qemu_img("convert", "-q", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, base)
    # The secret VHD has the base's unique id, as a clone of a public image would: the
    # parent check cannot tell them apart, only the confinement can.
    shutil.copyfile(base, a.secret_dir / "secret.vhd")
    img = formats.open_one(str(a.secret_dir / "secret.vhd"), True, "vhd")
    try:
        img.write(0, secret)
        img.flush()
    finally:
        img.close()
    raw.unlink()
    child = a.folder / "child.vhd"
    formats.create_overlay(str(child), str(base), "vhd")
    give(a, base, child)
    img = formats.open_one(str(child))
    size = img.virtual_size  # CHS geometry rounds a VHD's size up: zeroes after the data
    img.close()
    good += bytes(size - len(good))
    return Case(child, "base.vhd", a.secret_dir / "secret.vhd", good, secret, "vhd")


CASES = {"backing": backing_case, "data-file": data_file_case, "vhd-parent": vhd_case}


def library_race(c: Case, opens: int, until_both_s: float = 120) -> tuple[int, int]:
    """Open and read the chain ``opens`` times in this process (the tightest race there
    is), and on until both outcomes were seen or ``until_both_s`` passed; (good reads,
    refusals).  A VHD has several parent locators and a refused one falls through to the
    next, so a refusal needs the swap to catch every locator's open: on a loaded machine
    3000 opens once saw none."""
    good = refused = 0
    deadline = time.monotonic() + until_both_s
    n = 0
    while n < opens or (not (good and refused) and time.monotonic() < deadline):
        n += 1
        try:
            img = formats.open_image(str(c.top))
        except FormatError as e:
            assert "\n" not in str(e), str(e)
            refused += 1
            continue
        try:
            data = img.read(0, img.virtual_size)
        finally:
            img.close_chain()
        never_secret(c.secret, data)
        assert data == c.good
        good += 1
    return good, refused


@needs_root
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_swap_race_never_leaks(attack: Attack, tmp_path: Path, name: str) -> None:
    c = CASES[name](attack)
    out = tmp_path / "out.raw"
    outcomes = {"good": 0, "refused": 0}
    with swapping(attack, {c.swapped: c.target}) as count:
        good, refused = library_race(c, 3000)
        outcomes["good"] += good
        outcomes["refused"] += refused
        for i in range(12):
            cmd = ("convert", c.top, out, "-O", "raw") if i % 2 == 0 else ("info", c.top)
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            p = cowd(*cmd)
            never_secret(c.secret, p.stdout, p.stderr)
            if p.returncode == 0:
                outcomes["good"] += 1
                if cmd[0] == "convert":
                    data = out.read_bytes()
                    never_secret(c.secret, data)
                    assert data == c.good
            else:
                line = assert_refusal(p, " ".join(map(str, cmd)))
                assert str(c.top) in line, line
                outcomes["refused"] += 1
    swaps = int(count.read_text())
    assert swaps >= 2000, f"only {swaps} swaps: the race was not run"
    # Both outcomes happened: the attacker really raced the opens.
    assert outcomes["good"] and outcomes["refused"], outcomes


@needs_root
@pytest.mark.timeout(600)
def test_swap_race_serve_and_attach(attack: Attack, tmp_path: Path) -> None:
    """The daemon's paths: `cowd serve` + a client read through qemu-img (libnbd's nbdcopy
    as well), and `cowd attach --via fuse` + a read of the loop device."""
    c = backing_case(attack)
    seen = {"served": 0, "refused": 0, "attached": 0}
    with swapping(attack, {c.swapped: c.target}) as count:
        for i in range(6):
            try:
                d = start_daemon(c.top, tmp_path)
            except AssertionError as e:
                text = str(e)
                never_secret(c.secret, text.encode())
                assert "outside" in text and "Traceback" not in text, text
                seen["refused"] += 1
                continue
            try:
                copy = tmp_path / f"copy{i}.raw"
                if i % 2:
                    subprocess.run(["nbdcopy", d.uri, str(copy)], check=True, timeout=60)
                else:
                    qemu_img("convert", "-f", "raw", "-O", "raw", d.uri, copy)
                data = copy.read_bytes()
                never_secret(c.secret, data)
                assert data == c.good
                seen["served"] += 1
            finally:
                d.stop()
        if attach_problem() is None:
            env = dict(os.environ, COWD_RUN_DIR=str(tmp_path / "run"))
            for _ in range(4):
                p = cowd("attach", "--via", "fuse", c.top, env=env, timeout=120)
                never_secret(c.secret, p.stdout, p.stderr)
                if p.returncode != 0:
                    assert "outside" in assert_refusal(p, "attach")
                    seen["refused"] += 1
                    continue
                dev = p.stdout.decode().strip()
                try:
                    with open(dev, "rb") as f:
                        data = f.read(SIZE)
                    never_secret(c.secret, data)
                    assert data == c.good
                    seen["attached"] += 1
                finally:
                    q = cowd("detach", dev, env=env, timeout=120)
                    assert q.returncode == 0, q.stderr
    assert int(count.read_text()) >= 100, "the race was not run"
    assert seen["served"] + seen["attached"] + seen["refused"] >= 6, seen


# ---- names that are never followed ----------------------------------------------------------


def overlay_on(folder: Path, backing: str, name: str = "top.qcow2") -> Path:
    top = folder / name
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", top, str(SIZE))
    return top


def test_outside_names_refused_in_library(tmp_path: Path) -> None:
    """``..``, absolute names and symlinks out are refused by default, for backing files
    and data files alike; an absolute symlink that stays inside is followed."""
    if missing_tool("qemu-img"):
        pytest.skip(missing_tool("qemu-img") or "")
    (tmp_path / "secret.raw").write_bytes(b"s" * SIZE)
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "inside.raw").write_bytes(b"i" * SIZE)
    os.symlink(vm / "inside.raw", vm / "abs-inside.raw")
    os.symlink(tmp_path / "secret.raw", vm / "out.raw")
    os.mkdir(vm / "sub")
    os.symlink("../inside.raw", vm / "sub" / "rel-inside.raw")
    for backing in ("../secret.raw", str(tmp_path / "secret.raw"), "out.raw",
                    "sub/../../secret.raw"):
        top = overlay_on(vm, backing, "escape.qcow2")
        with pytest.raises(BackingOutside, match="backing file lies outside"):
            formats.open_image(str(top))
        img = formats.open_image(str(top), policy=OpenPolicy(confine=False))
        assert img.read(0, 4) == b"ssss"
        img.close_chain()
        top.unlink()
    for backing in ("abs-inside.raw", "sub/rel-inside.raw", str(vm / "inside.raw"),
                    "sub/../inside.raw"):
        top = overlay_on(vm, backing, "ok.qcow2")
        img = formats.open_image(str(top))
        assert img.read(0, 4) == b"iiii", backing
        img.close_chain()
        top.unlink()
    # An external data file named outside: refused the same way.
    df = vm / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'secret.raw'},"
             "data_file_raw=on", df, str(SIZE))
    (tmp_path / "secret.raw").write_bytes(b"s" * SIZE)  # create truncated it
    with pytest.raises(BackingOutside, match="data file lies outside"):
        formats.open_image(str(df))
    with pytest.raises(BackingOutside, match="data file lies outside"):
        formats.open_one(str(df))


def test_walk_without_openat2_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The component walk (kernels without openat2) decides every case as openat2 does."""
    from formats import opener

    if missing_tool("qemu-img"):
        pytest.skip(missing_tool("qemu-img") or "")
    libc = opener._get_libc()
    monkeypatch.setattr(libc, "available", False)
    (tmp_path / "secret.raw").write_bytes(b"s" * SIZE)
    vm = tmp_path / "vm"
    (vm / "sub").mkdir(parents=True)
    (vm / "inside.raw").write_bytes(b"i" * SIZE)
    os.symlink(vm / "inside.raw", vm / "sub" / "abs.raw")
    os.symlink("../inside.raw", vm / "sub" / "rel.raw")
    os.symlink(tmp_path / "secret.raw", vm / "out.raw")
    os.symlink("sub/../../secret.raw", vm / "out2.raw")
    os.symlink("loop1", vm / "loop2")
    os.symlink("loop2", vm / "loop1")
    for backing, want in (("sub/abs.raw", b"iiii"), ("sub/rel.raw", b"iiii"),
                          ("out.raw", BackingOutside), ("out2.raw", BackingOutside),
                          ("../secret.raw", BackingOutside), ("loop1", FormatError)):
        top = overlay_on(vm, backing, "t.qcow2")
        if isinstance(want, bytes):
            img = formats.open_image(str(top))
            assert img.read(0, 4) == want, backing
            img.close_chain()
        else:
            with pytest.raises(want):
                formats.open_image(str(top))
        top.unlink()


@needs_root
def test_special_files_refused(tmp_path: Path) -> None:
    """A FIFO, a socket, a character device or a directory named as a backing file is
    refused in one line without blocking; a block device only with --allow-backing-device."""
    import socket

    if missing_tool("qemu-img", "losetup"):
        pytest.skip(missing_tool("qemu-img", "losetup") or "")
    vm = tmp_path / "vm"
    vm.mkdir()
    os.mkfifo(vm / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(vm / "sock"))
    os.mknod(vm / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (vm / "dir").mkdir()
    for name, kind in (("fifo", "a FIFO"), ("sock", "a socket"),
                       ("null", "a character device"), ("dir", "a directory")):
        top = overlay_on(vm, name, f"{name}.qcow2")
        p = cowd("info", top, timeout=20)
        line = assert_refusal(p, name)
        assert f"backing file is {kind}" in line or "cannot open" in line, line
    s.close()
    # A block device: a loop device over a file inside, named through a symlink.
    (vm / "disk.raw").write_bytes(b"b" * SIZE)
    dev = subprocess.run(["losetup", "--find", "--show", str(vm / "disk.raw")],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        os.symlink(dev, vm / "blk")
        top = overlay_on(vm, str(vm / "blk"), "blk.qcow2")
        # The device node lives in /dev, outside the folder: refused as outside first.
        assert "outside" in assert_refusal(cowd("info", top), "blk")
        p = cowd("info", top, "--allow-backing-outside")
        assert "block device" in assert_refusal(p, "blk") and "--allow-backing-device" in \
            p.stderr.decode()
        p = cowd("convert", top, tmp_path / "b.raw", "-O", "raw", "--allow-backing-outside",
                 "--allow-backing-device")
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "b.raw").read_bytes() == b"b" * SIZE
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


# ---- where cowd keeps its sockets and state ---------------------------------------------------


def test_run_dir_and_socket_folder_must_be_private(tmp_path: Path) -> None:
    """A run dir that is a symlink, or that other users can write, is refused in one line
    (they could swap the pid file, the state file or a socket between two of cowd's steps);
    so is an NBD socket folder others can write, unless it is sticky like /tmp."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    real = tmp_path / "real-run"
    real.mkdir()
    os.symlink(real, tmp_path / "link-run")
    open_run = tmp_path / "open-run"
    open_run.mkdir()
    open_run.chmod(0o777)
    sock_dir = tmp_path / "socks"
    sock_dir.mkdir()
    for run_dir, needle in ((tmp_path / "link-run", "is a symlink"),
                            (open_run, "other users can write")):
        p = cowd("serve", base, "--nbd", f"unix:{sock_dir / 'a.sock'}", "--run-dir", run_dir,
                 timeout=30)
        assert needle in assert_refusal(p, str(run_dir))
    sock_dir.chmod(0o777)
    p = cowd("serve", base, "--nbd", f"unix:{sock_dir / 'a.sock'}", "--run-dir",
             tmp_path / "run1", timeout=30)
    assert "socket folder" in assert_refusal(p, "open socket folder")
    sock_dir.chmod(0o1777)  # sticky, as /tmp: served
    d = start_daemon(base, sock_dir)
    assert d.alive()
    d.stop()


@needs_root
def test_run_dir_owned_by_another_user_is_refused(attack: Attack, tmp_path: Path) -> None:
    """A run dir someone else owns is refused in one line, and nothing is made in it (its
    owner could replace the pid file, the state file or the control socket under the
    daemon): root's run dir owned by nobody, for ``serve`` and for ``attach``; a user's run
    dir owned by root, for ``serve``.  Each with the folder private (0755), so the owner is
    the only reason."""
    import pwd

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    nobody = pwd.getpwnam("nobody").pw_uid
    theirs = tmp_path / "nobodys-run"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, nobody, nobody)
    p = cowd("serve", base, "--nbd", f"unix:{tmp_path / 'a.sock'}", "--run-dir", theirs,
             timeout=30)
    line = assert_refusal(p, str(theirs))
    assert f"owned by another user (uid={nobody})" in line, line
    p = cowd("attach", base, "--via", "fuse", "--run-dir", theirs, timeout=30)
    line = assert_refusal(p, str(theirs))
    assert f"owned by another user (uid={nobody})" in line, line
    assert os.listdir(theirs) == [] and not (tmp_path / "a.sock").exists()
    # The unprivileged user, in its own folder, with a run dir root made there.
    home = attack.folder
    user_base = home / "base.raw"
    user_base.write_bytes(bytes(SIZE))
    give(attack, user_base)
    roots = home / "run"
    roots.mkdir(mode=0o755)
    as_user = ["setpriv", f"--reuid={attack.uid}", f"--regid={attack.gid}", "--clear-groups",
               "--inh-caps=-all", "--"]
    p = subprocess.run([*as_user, *COWD, "serve", str(user_base), "--nbd",
                        f"unix:{home / 'a.sock'}", "--run-dir", str(roots)],
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL, cwd=home,
                       env={**os.environ, "HOME": str(home)})
    line = assert_refusal(p, str(roots))
    assert "owned by another user (uid=0)" in line, line
    assert os.listdir(roots) == [] and sorted(os.listdir(home)) == ["base.raw", "run"]


def test_missing_socket_folder_is_an_error_not_created(tmp_path: Path) -> None:
    """A unix socket's folder that does not exist is refused in one line (exit 2), and is
    not created: a typo must not become a new directory tree.  A run dir is created, but
    only itself: its parent must exist."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    missing = tmp_path / "no" / "such"
    p = cowd("serve", base, "--nbd", f"unix:{missing / 'a.sock'}", "--run-dir",
             tmp_path / "run", timeout=30)
    assert "does not exist" in assert_refusal(p, str(missing)) and p.returncode == 2
    assert not (tmp_path / "no").exists()
    p = cowd("serve", base, "--nbd", f"unix:{tmp_path / 'a.sock'}", "--run-dir",
             tmp_path / "no" / "run", timeout=30)
    assert "parent folder" in assert_refusal(p, "run dir") and p.returncode == 2
    assert not (tmp_path / "no").exists()
    p = cowd("stats", "--run-dir", tmp_path / "no" / "run", timeout=30)
    assert p.returncode != 0 and not (tmp_path / "no").exists()


# ---- cowd serve as an unprivileged user ------------------------------------------------------


# Where a process of a throw-away user could leave files without asking anyone.
SCRATCH_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def owned_entries(uid: int) -> set[str]:
    """Entries of SCRATCH_FOLDERS (top level) owned by ``uid``."""
    found = set()
    for folder in SCRATCH_FOLDERS:
        with contextlib.suppress(OSError):
            for e in os.scandir(folder):
                with contextlib.suppress(OSError):
                    if e.stat(follow_symlinks=False).st_uid == uid:
                        found.add(e.path)
    return found


@needs_root
def test_serve_as_an_unprivileged_user(attack: Attack, tmp_path: Path) -> None:
    """A user serves images it owns, with its own run dir and socket, touching nothing
    outside them but the boot trace of a base in its own folder (cowd/disk/boottrace.py):
    reads equal qemu-img's, writes land in the user's overlay, SIGTERM exits 0, and the
    daemon says it did not ask for PR_SET_IO_FLUSHER (root's business).  A second image lives
    in a sticky folder anyone may write, as /tmp (its files the user's, the folder root's):
    served the same, but no trace is written there.  Afterwards the user's folder, the
    shared one and the run dir hold exactly what they should (no dotfile, no temporary
    file), and no file of the user's is left in /tmp, /var/tmp, /dev/shm or /run."""
    if missing_tool("qemu-io", "nbdinfo"):
        pytest.skip(str(missing_tool("qemu-io", "nbdinfo")))
    home = attack.folder
    base = home / "base.raw"
    base.write_bytes(os.urandom(SIZE))
    top = Path(cowd("create", "--base", base, "--overlay", "qcow").stdout.decode().strip())
    run_dir = home / "run"
    run_dir.mkdir(mode=0o700)
    shared = Path(tempfile.mkdtemp(prefix="cowd-shared-"))
    shared.chmod(0o1777)
    shared_base = shared / "shared-base.raw"
    shared_base.write_bytes(os.urandom(SIZE))
    shared_top = Path(cowd("create", "--base", shared_base, "--overlay",
                           "qcow").stdout.decode().strip())
    give(attack, base, top, run_dir, shared_base, shared_top)
    sock = home / "nbd.sock"
    before = {p: p.stat().st_mtime_ns for p in (base, shared_base)}
    scratch_before = owned_entries(attack.uid)
    assert scratch_before == {str(home)}, scratch_before
    log = home / "serve.log"
    as_user = ["setpriv", f"--reuid={attack.uid}", f"--regid={attack.gid}", "--clear-groups",
               "--inh-caps=-all", "--"]
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*as_user, *COWD, "serve", str(top), str(shared_top), "--nbd",
                                 f"unix:{sock}", "--run-dir", str(run_dir)], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=home, env={**os.environ, "HOME": str(home)})
    try:
        wait_listening(proc, sock, log)
        st = os.stat(f"/proc/{proc.pid}")
        assert st.st_uid == attack.uid
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and sock.stat().st_uid == attack.uid
        uri = f"nbd+unix:///{top.name}?socket={sock}"
        out = tmp_path / "read.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", uri, out)
        assert out.read_bytes() == base.read_bytes()
        shared_uri = f"nbd+unix:///{shared_top.name}?socket={sock}"
        qemu_img("convert", "-f", "raw", "-O", "raw", shared_uri, out)
        assert out.read_bytes() == shared_base.read_bytes()
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x6b 4096 8192", uri],
                           capture_output=True, timeout=60)
        assert p.returncode == 0 and b"error" not in p.stdout.lower(), p
        stats = subprocess.run([*as_user, *COWD, "stats", "--json", "--run-dir", str(run_dir)],
                               capture_output=True, timeout=30, cwd=home)
        assert stats.returncode == 0, stats.stderr
        assert '"io_flusher": "not set: not root' in stats.stdout.decode(), stats.stdout
        assert '"oom_protection": "not set: not root' in stats.stdout.decode(), stats.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    try:
        text = log.read_text()
        assert rc == 0 and "Traceback" not in text and "WARNING" not in text, text
        # Only its run dir, socket, log and the boot trace of the base in its own folder
        # changed (the socket is gone again); the overlays are the user's, one holds the
        # write.  In the shared folder: nothing new, the trace is not written there.
        assert {p: p.stat().st_mtime_ns for p in (base, shared_base)} == before
        trace = home / "base.raw.cowd-trace"
        assert set(os.listdir(home)) == {"base.raw", top.name, "run", "serve.log",
                                         trace.name}, os.listdir(home)
        assert trace.stat().st_uid == attack.uid
        assert set(os.listdir(shared)) == {shared_base.name, shared_top.name}, \
            os.listdir(shared)
        assert "boot trace not written: the folder is not the daemon user's own" in text, text
        assert set(os.listdir(run_dir)) <= {"cowd.log"}, os.listdir(run_dir)
        assert owned_entries(attack.uid) == scratch_before, owned_entries(attack.uid)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert top.stat().st_uid == attack.uid
    expect = bytearray(base.read_bytes())
    expect[4096:4096 + 8192] = b"\x6b" * 8192
    out = tmp_path / "after.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, out)
    assert out.read_bytes() == expect
