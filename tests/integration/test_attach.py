"""`cowd attach` / `detach` / `list` end to end, as a user runs them: the real console script,
the background daemon it starts, the kernel's loop driver on the daemon's FUSE file, and ext4
on the loop device.

Oracles that share no code with cowd: qemu-img (check, convert of a qcow2 overlay), libvhdi
(vhdimount of a differencing VHD), e2fsck and debugfs (the file tree inside the raw bytes), the
kernel (sysfs loop attributes, /proc mounts, the daemon's open files).  The base's sha256 must
never change.

Every test uses a run dir of its own under tmp_path, so it never meets a user's daemon in
/run/cowd.  Teardown (in a finally block, whatever failed) works by name and pid only: unmount
the file systems this test mounted, SIGTERM the daemon whose pid file lock is held in this
run dir, detach the loop devices whose backing file lies in this run dir's FUSE mount,
lazily unmount that mount.  Needs root, /dev/fuse and loop devices; skips with the reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowd import rundir
from cowd.attach import probes
from cowd.errors import CommandFailed, UsageError
from cowd.frontends import loop
from tests.support.attach import LOOP_DEV, Env, attach_problem
from tests.support.host import alive, evict_pages, loops_under, mounted_at, read_concurrently
from tests.support.peers import (
    COWD,
    libvhdi_raw,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_raw,
    run,
    sha256,
)
from tests.support.trees import make_tree, same_tree

MiB = 1 << 20

needs_attach = pytest.mark.skipif(attach_problem() is not None, reason=attach_problem() or "")


# ---- helpers -----------------------------------------------------------------------------------

def backing_file(dev: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text()[:-1]
    except FileNotFoundError:
        return None


def make_base(tmp: Path, size: int = 32 * MiB) -> Path:
    """A raw ext4 image built from a seed tree (mkfs.ext4 -d)."""
    seed = tmp / "seed"
    (seed / "etc").mkdir(parents=True)
    (seed / "etc" / "motd").write_text("hello from the base image\n")
    (seed / "numbers.txt").write_text("".join(f"{i}\n" for i in range(20000)))
    base = tmp / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", seed, base)
    return base


def tree_from_raw(raw: Path, dest: Path, path: str = "/tree") -> Path:
    """e2fsck the raw file system image, then copy ``path`` out of it with debugfs."""
    run("e2fsck", "-f", "-n", raw)
    dest.mkdir()
    run("debugfs", "-R", f"rdump {path} {dest}", raw)
    return dest / os.path.basename(path)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Env.under(tmp_path) as e:
        yield e


def check_device(env: Env, dev: str, name: str) -> None:
    """The kernel's view: the loop device reads the daemon's FUSE file with direct I/O."""
    sys_loop = Path(f"/sys/block/{os.path.basename(dev)}/loop")
    assert backing_file(dev) == f"{env.fuse_dir}/{name}"
    assert (sys_loop / "dio").read_text().strip() == "1"
    assert mounted_at(env.fuse_dir)[-1:] == ["fuse.cowd"]


def write_tree_through(env: Env, dev: str, tree: Path) -> None:
    fs = env.mount(dev, "fs")
    assert (fs / "etc" / "motd").read_text() == "hello from the base image\n"
    shutil.copytree(tree, fs / "tree")
    env.umount(fs)


def read_back(env: Env, image: Path, tree: Path) -> None:
    """A second attach (read-only) sees the tree; detach by the image's path."""
    dev = env.attach(image, "--via", "fuse", "--readonly")
    assert Path(f"/sys/block/{os.path.basename(dev)}/ro").read_text().strip() == "1"
    fs = env.mount(dev, "fs-ro", "-o", "ro")
    try:
        assert same_tree(tree, fs / "tree")
        assert (fs / "numbers.txt").read_text().splitlines()[-1] == "19999"
    finally:
        env.umount(fs)
    env.detach(image)
    env.assert_daemon_gone()


# ---- the main job ------------------------------------------------------------------------------

@pytest.mark.root
@needs_attach
@pytest.mark.parametrize("create_args", [(), ("--extended-l2",)], ids=["qcow2", "extended-l2"])
def test_qcow2_overlay_attach_write_detach(env: Env, tmp_path: Path,
                                           create_args: tuple[str, ...]) -> None:
    """The main job; also on an --extended-l2 overlay (ext4's 4 KiB block writes through the
    FUSE file are first writes of whole subclusters)."""
    base = make_base(tmp_path)
    base_sha = sha256(base)
    tree = tmp_path / "tree"
    make_tree(tree, seed=1)
    ov = Path(env.cowd("create", "--base", base, "--overlay", "qcow", *create_args,
                       run_dir=False).stdout.strip())

    dev = env.attach(ov, "--via", "fuse")
    check_device(env, dev, ov.name)
    [entry] = env.list()
    assert (entry["device"], entry["image"], entry["frontend"]) == (dev, str(ov), "fuse")
    assert entry["size"] == base.stat().st_size
    write_tree_through(env, dev, tree)
    listed = env.cowd("list").stdout
    assert dev in listed and str(ov) in listed
    ops = env.list()[0]["ops"]
    assert isinstance(ops, dict) and ops["flushes"] > 0 and ops["bytes_written"] > 0

    out = env.detach(dev).stdout
    assert dev in out and str(ov) in out
    assert backing_file(dev) != f"{env.fuse_dir}/{ov.name}"
    env.assert_daemon_gone()

    qemu_check(ov)
    assert sha256(base) == base_sha
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, raw)
    assert same_tree(tree, tree_from_raw(raw, tmp_path / "dump"))
    read_back(env, ov, tree)
    assert sha256(base) == base_sha


@pytest.mark.root
@needs_attach
def test_differencing_vhd_over_vhd_base(env: Env, tmp_path: Path) -> None:
    raw_base = make_base(tmp_path)
    base = tmp_path / "base.vhd"
    env.cowd("convert", raw_base, base, "-O", "vhd", run_dir=False)
    base_sha = sha256(base)
    tree = tmp_path / "tree"
    make_tree(tree, seed=2)
    ov = tmp_path / "vm.vhd"
    env.cowd("create", "--base", base, "--overlay", "vhd", "-o", ov, run_dir=False)

    dev = env.attach(ov, "--via", "fuse")
    check_device(env, dev, ov.name)
    write_tree_through(env, dev, tree)
    env.detach(ov)  # by the image's path this time
    env.assert_daemon_gone()

    assert sha256(base) == base_sha
    env.cowd("check", ov, run_dir=False)
    flat = tmp_path / "libvhdi.raw"
    flat.write_bytes(libvhdi_raw(ov, tmp_path))  # libvhdi follows the chain on its own
    assert same_tree(tree, tree_from_raw(flat, tmp_path / "dump"))
    read_back(env, ov, tree)
    assert sha256(base) == base_sha


@pytest.mark.root
@needs_attach
def test_two_overlays_of_one_base_share_it(env: Env, tmp_path: Path) -> None:
    base = make_base(tmp_path)
    base_sha = sha256(base)
    ovs = [Path(env.cowd("create", "--base", base, "--overlay", "qcow", run_dir=False)
                .stdout.strip()) for _ in range(2)]
    devs = [env.attach(ov, "--via", "fuse") for ov in ovs]
    assert devs[0] != devs[1]
    pid = env.daemon_pid()
    assert pid is not None
    listed = env.list()
    assert sorted((d["device"], d["image"]) for d in listed) == \
        sorted(zip(devs, map(str, ovs), strict=True))

    # One daemon; the base is open once in it, and both disks use the same layer.
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert fds.count(str(base)) == 1, fds
    disks = env.stats()["disks"]
    assert isinstance(disks, dict) and len(disks) == 2
    base_layers = [d["layers"][1] for d in disks.values()]
    assert {lay["path"] for lay in base_layers} == {str(base)}
    assert base_layers[0]["layer_id"] == base_layers[1]["layer_id"]
    assert all(lay["shared_by"] == 2 for lay in base_layers)
    assert "shared by 2 disks" in env.cowd("stats").stdout

    # Both mounted at once, each written with its own file.
    mnts = [env.mount(dev, f"fs{i}") for i, dev in enumerate(devs)]
    for i, m in enumerate(mnts):
        (m / f"only-in-{i}.txt").write_text(f"disk {i}\n")
    for m in mnts:
        env.umount(m)

    env.detach(devs[0])
    assert env.daemon_pid() == pid  # still serving the other one
    assert [d["device"] for d in env.list()] == [devs[1]]
    env.detach(devs[1])
    env.assert_daemon_gone()

    assert sha256(base) == base_sha
    for i, ov in enumerate(ovs):
        qemu_check(ov)
        raw = tmp_path / f"flat{i}.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, raw)
        mine = run("debugfs", "-R", f"cat /only-in-{i}.txt", raw).stdout
        assert mine == f"disk {i}\n".encode()
        other = run("debugfs", "-R", f"stat /only-in-{1 - i}.txt", raw, check=False)
        assert b"File not found" in other.stderr + other.stdout


@pytest.mark.root
@needs_attach
def test_cold_random_reads_through_the_workers(env: Env, tmp_path: Path) -> None:
    """Small reads that miss the page cache, queued together on the loop device, are put
    aside and answered in batches by whichever process reads them (the daemon's session or
    a worker's: cowd/frontends/fuse/session.py); every byte is the base's, read back in
    eight threads at once with O_DIRECT."""
    base = tmp_path / "rand.raw"
    rng = random.Random(29)
    data = rng.randbytes(16 * MiB)
    base.write_bytes(data)
    ov = Path(env.cowd("create", "--base", base, "--overlay", "qcow", run_dir=False)
              .stdout.strip())
    dev = env.attach(ov, "--via", "fuse")
    try:
        evict_pages(base)
        offsets = [rng.randrange(16 * MiB // 4096) * 4096 for _ in range(2000)]
        bad = read_concurrently(dev, [(off, 4096) for off in offsets], data, 8, direct=True)
        assert not bad, bad[:5]
        doc = env.stats()
        fuse = doc["fuse"]
        links = doc.get("workers") or []
        assert isinstance(fuse, dict) and isinstance(links, list)
        workers = [link["worker"]["fuse"] for link in links]
        sessions = [fuse, *workers]
        # The workers' sessions put reads aside (the daemon's alone on a one-core machine).
        assert sum(int(f.get("reads_put_aside", 0)) for f in workers or [fuse]) > 0, sessions
        assert sum(int(f.get("errors", 0)) for f in sessions) == 0, sessions
        assert sum(int(f.get("reads", 0)) for f in sessions) >= len(offsets)
    finally:
        env.detach(dev)
    qemu_check(ov)


@pytest.mark.root
@needs_attach
def test_sigkilled_daemon_is_cleaned_up(env: Env, tmp_path: Path) -> None:
    base = make_base(tmp_path)
    base_sha = sha256(base)
    tree = tmp_path / "tree"
    make_tree(tree, seed=3)
    ov = Path(env.cowd("create", "--base", base, "--overlay", "qcow", run_dir=False)
              .stdout.strip())
    dev = env.attach(ov, "--via", "fuse")
    write_tree_through(env, dev, tree)  # umount flushed it

    # Killed while attached: the loop device, the dead mount, the socket and the pid file
    # stay behind.
    pid = env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while env.daemon_pid() is not None:
        time.sleep(0.02)
    assert loops_under(env.fuse_dir) == [dev]
    assert env.socket.exists() and env.pid_file.exists()
    with pytest.raises(OSError) as e:
        os.statvfs(env.fuse_dir)
    # A dead mount: not connected, or aborted when the daemon's workers (which held clones
    # of its descriptor) died after it with the request pending.
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    # No daemon answers: only what the dead one left, marked stale, with how to clean it.
    left = env.list()  # (an empty list would say nothing: the device must be there)
    assert [d["device"] for d in left] == [dev] and all(d.get("stale") for d in left), left
    text = env.cowd("list").stdout
    assert f"no cowd daemon runs in {env.run_dir}; a dead one left these devices:" in text
    assert f"\n  {dev}  " in text and str(ov) in text, text
    assert f"clean them up with `cowd detach DEVICE --run-dir {env.run_dir}`" in text, text

    # A fresh attach cleans up first, then works.
    p = env.cowd("attach", ov, "--via", "fuse")
    assert f"detached {dev}" in p.stderr and "unmounted the dead FUSE mount" in p.stderr
    dev2 = p.stdout.strip()
    check_device(env, dev2, ov.name)
    assert loops_under(env.fuse_dir) == [dev2]
    fs = env.mount(dev2, "fs")
    assert same_tree(tree, fs / "tree")
    (fs / "after-restart.txt").write_text("again\n")
    env.umount(fs)

    # Killed again: `cowd detach DEVICE` cleans up after it.
    pid = env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while env.daemon_pid() is not None:
        time.sleep(0.02)
    p = env.detach(dev2)
    assert f"detached {dev2}" in p.stderr
    env.assert_daemon_gone()
    assert not mounted_at(env.fuse_dir)
    # Nothing left to clean: detaching again is an error, and changes nothing.
    assert "not attached" in env.cowd("detach", dev2, rc=1).stderr

    qemu_check(ov)
    assert sha256(base) == base_sha
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, raw)
    assert same_tree(tree, tree_from_raw(raw, tmp_path / "dump"))
    assert run("debugfs", "-R", "cat /after-restart.txt", raw).stdout == b"again\n"


def cowd_json(env: Env, *args: str | os.PathLike[str]) -> Any:
    """A cowd command's stdout, which must be exactly one JSON document (json.loads refuses
    anything before or after it)."""
    return json.loads(env.cowd(*args).stdout)


def bytes_read(env: Env, name: str) -> int:
    """The disk's bytes read: the daemon's own reads and its FUSE workers' (the workers
    answer most reads in processes of their own and count them apart)."""
    disk = cowd_json(env, "stats", "--output=json")["disks"][name]
    n = disk["ops"]["bytes_read"] + disk.get("workers", {}).get("bytes_read", 0)
    assert isinstance(n, int)
    return n


@pytest.mark.root
@needs_attach
def test_json_of_attach_list_stats_detach(env: Env, tmp_path: Path) -> None:
    """--output=json (and its alias --json) of attach, list, stats and detach, held against
    the kernel (the block device, its size) and qemu-img (the image's size and bytes)."""
    base = make_base(tmp_path, 8 * MiB)
    ovs = [Path(env.cowd("create", "--base", base, "--overlay", "qcow", "--size", "12M",
                         run_dir=False).stdout.strip()) for _ in range(2)]
    for i, ov in enumerate(ovs):  # each overlay differs from the base and from the other
        qemu_io(ov, f"write -P 0x{0x5a + i:x} 1M 64k", f"write -P 0x{0xa5 - i:x} 11M 4k",
                fmt="qcow2")

    atts = [cowd_json(env, "attach", ovs[0], "--via", "fuse", "--output=json"),
            cowd_json(env, "attach", ovs[1], "--via", "fuse", "--json")]
    for att, ov in zip(atts, ovs, strict=True):
        dev = att["device"]
        assert LOOP_DEV.fullmatch(dev) and stat.S_ISBLK(os.stat(dev).st_mode), att
        virtual = json.loads(qemu_img("info", "-U", "--output=json", ov).stdout)
        kernel_size = int(run("blockdev", "--getsize64", dev).stdout)
        assert att["size"] == kernel_size == virtual["virtual-size"] == 12 * MiB, att
        assert (att["image"], att["frontend"], att["readonly"]) == (str(ov), "fuse", False)
        check_device(env, dev, ov.name)
    assert atts[0]["device"] != atts[1]["device"]

    listed = cowd_json(env, "list", "--output=json")
    assert sorted((d["device"], d["image"], d["frontend"], d["size"]) for d in listed) == \
        sorted((a["device"], a["image"], "fuse", 12 * MiB) for a in atts)

    # stats names each disk; a read through the device moves its counter by at least the
    # bytes the page cache did not already hold (none: the buffers are dropped first), and
    # the bytes read are qemu-img's.
    disks = cowd_json(env, "stats", "--json")["disks"]
    assert set(disks) == {a["name"] for a in atts}
    for att, ov in zip(atts, ovs, strict=True):
        d = disks[att["name"]]
        assert (d["path"], d["device"], d["frontend"], d["size"]) == \
            (str(ov), att["device"], "fuse", 12 * MiB), d
        before = bytes_read(env, att["name"])
        run("blockdev", "--flushbufs", att["device"])
        device_sha = sha256(att["device"])
        assert bytes_read(env, att["name"]) - before >= 12 * MiB
        assert device_sha == hashlib.sha256(qemu_raw(ov, tmp_path, fmt="qcow2")).hexdigest()

    gone = cowd_json(env, "detach", atts[0]["device"], "--output=json")
    assert (gone["device"], gone["image"], gone["size"]) == \
        (atts[0]["device"], str(ovs[0]), 12 * MiB), gone
    assert [d["device"] for d in cowd_json(env, "list", "--json")] == [atts[1]["device"]]
    assert set(cowd_json(env, "stats", "--json")["disks"]) == {atts[1]["name"]}
    gone = cowd_json(env, "detach", ovs[1], "--json")
    assert (gone["device"], gone["image"]) == (atts[1]["device"], str(ovs[1])), gone
    env.assert_daemon_gone()
    assert cowd_json(env, "list", "--output=json") == []
    for ov in ovs:
        qemu_check(ov)


# ---- refusals: one line, and nothing that is not cowd's is touched ----------------------------

def one_line(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.root
@needs_attach
def test_frontend_choice(env: Env, tmp_path: Path) -> None:
    base = make_base(tmp_path, 4 * MiB)
    if not os.path.exists("/dev/cowd-ctl"):  # a host kernel that cannot load the shim
        one_line(env.cowd("attach", base, "--via", "kmod", rc=1), "--via kmod", "kernel")
    if not os.path.exists("/dev/nbd0"):
        one_line(env.cowd("attach", base, "--via", "nbd", rc=1), "--via nbd", "nbd")
    # The kernel shim's options: checked, and refused for another frontend.
    one_line(env.cowd("attach", base, "--via", "fuse", "--kmod-entries", "16", rc=2),
             "--kmod-entries/--kmod-timeout", "via fuse")
    one_line(env.cowd("attach", base, "--kmod-entries", "0", rc=2), "--kmod-entries", "got 0")
    one_line(env.cowd("attach", base, "--kmod-timeout=-1", rc=2), "--kmod-timeout", "got -1")
    assert not env.run_dir.exists()  # refused before any daemon was started
    # auto says what it took and why the others were not available.
    p = env.cowd("attach", base)
    one_line(p, "--via auto: using fuse", "kmod:", "nbd:")
    dev = p.stdout.strip()
    check_device(env, dev, base.name)
    # COWD_RUN_DIR names the run dir as well as --run-dir does.
    q = subprocess.run([*COWD, "list"], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, COWD_RUN_DIR=str(env.run_dir)))
    assert dev in q.stdout
    env.detach(dev)
    env.assert_daemon_gone()


@pytest.mark.root
@needs_attach
def test_refusals_leave_others_alone(env: Env, tmp_path: Path) -> None:
    base = make_base(tmp_path, 8 * MiB)
    ov = Path(env.cowd("create", "--base", base, "--overlay", "qcow", run_dir=False)
              .stdout.strip())
    one_line(env.cowd("attach", tmp_path / "missing.qcow2", "--via", "fuse", rc=1),
             "missing.qcow2")
    one_line(env.cowd("detach", "/dev/loop9999", rc=1), "not attached")

    # A broken image: the daemon that was started for it says why and exits again.
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", bad, "1M")
    with open(bad, "r+b") as f:
        f.seek(20)  # cluster_bits (qcow2 header, big-endian u32)
        f.write((99).to_bytes(4, "big"))
    one_line(env.cowd("attach", bad, "--via", "fuse", rc=1), "bad.qcow2", "cluster_bits")
    deadline = time.monotonic() + 30
    while env.daemon_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    env.assert_daemon_gone()

    # Somebody else's loop device, on a plain file: cowd refuses it and leaves it bound.
    other_file = tmp_path / "other.img"
    other_file.write_bytes(bytes(MiB))
    other = run("losetup", "--find", "--show", other_file).stdout.decode().strip()
    try:
        one_line(env.cowd("detach", other, rc=1), "not attached")  # no daemon
        dev = env.attach(ov, "--via", "fuse")
        one_line(env.cowd("detach", other, rc=1), "not attached")  # a daemon, not its device
        assert backing_file(other) == str(other_file)
        one_line(env.cowd("attach", ov, "--via", "fuse", rc=1), "already attached", dev)

        # In use (a mounted file system): refused, still attached and mounted.
        fs = env.mount(dev, "fs")
        one_line(env.cowd("detach", dev, rc=1), "in use")
        assert backing_file(dev) == f"{env.fuse_dir}/{ov.name}"
        (fs / "still-works.txt").write_text("yes\n")
        env.umount(fs)
        env.detach(dev)
        env.assert_daemon_gone()
        assert backing_file(other) == str(other_file)
    finally:
        run("losetup", "-d", other, check=False)
    qemu_check(ov)
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, raw)
    assert run("debugfs", "-R", "cat /still-works.txt", raw).stdout == b"yes\n"


# ---- lifecycle -----------------------------------------------------------------------------------

def wait_gone(env: Env, pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, f"daemon {pid} still alive\n{env.log()}"
        time.sleep(0.05)


@pytest.mark.root
@needs_attach
def test_concurrent_attaches_start_one_daemon_and_sigterm_stops_it(env: Env,
                                                                    tmp_path: Path) -> None:
    base = make_base(tmp_path, 8 * MiB)
    ovs = [Path(env.cowd("create", "--base", base, "--overlay", "qcow", run_dir=False)
                .stdout.strip()) for _ in range(3)]
    procs = [subprocess.Popen([*COWD, "attach", str(ov), "--via", "fuse", "--run-dir",
                               str(env.run_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
             for ov in ovs]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    devs = [out.strip() for out, _err in outs]
    assert len(set(devs)) == 3 and all(LOOP_DEV.fullmatch(d) for d in devs)
    log = env.log()
    assert log.count("serving no disks yet") == 1, log  # one daemon was started
    assert sorted(d["device"] for d in env.list()) == sorted(devs)

    # SIGTERM: the daemon detaches its loop devices, unmounts, closes the disks, exits.
    pid = env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_gone(env, pid)
    env.assert_daemon_gone()
    assert not any((backing_file(d) or "").startswith(str(env.run_dir)) for d in devs)
    for ov in ovs:
        qemu_check(ov)


@pytest.mark.root
@needs_attach
def test_attach_to_a_running_serve_daemon(env: Env, tmp_path: Path) -> None:
    """`cowd serve` answers attach too (and keeps serving NBD); it does not exit when its
    attached disks are gone."""
    base = make_base(tmp_path, 8 * MiB)
    served, attached = (Path(env.cowd("create", "--base", base, "--overlay", "qcow",
                                      run_dir=False).stdout.strip()) for _ in range(2))
    sock = tmp_path / "nbd.sock"
    with open(tmp_path / "serve.log", "wb") as logf:
        proc = subprocess.Popen([*COWD, "serve", str(served), "--nbd", f"unix:{sock}",
                                 "--run-dir", str(env.run_dir)], stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not env.socket.exists():
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()
            time.sleep(0.02)
        dev = env.attach(attached, "--via", "fuse")
        kinds = {d["image"]: (d["frontend"], d["device"]) for d in env.list()}
        assert kinds == {str(served): ("nbd-export", None), str(attached): ("fuse", dev)}
        env.detach(dev)
        assert proc.poll() is None and env.socket.exists()
        assert [d["image"] for d in env.list()] == [str(served)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    env.assert_daemon_gone()
    qemu_check(attached)


# ---- no root needed: the pieces ----------------------------------------------------------------

def test_frontend_choice_order(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = {"kmod": "no shim", "nbd": "no nbd", "fuse": None}
    for name in problems:
        monkeypatch.setitem(probes._PROBLEMS, name, lambda n=name: problems[n])
    assert probes.choose_frontend("auto") == ("fuse", "--via auto: using fuse (kmod: no shim; "
                                                 "nbd: no nbd)")
    assert probes.choose_frontend("fuse") == ("fuse", None)
    with pytest.raises((UsageError, CommandFailed), match=r"^--via nbd: no nbd$"):
        probes.choose_frontend("nbd")
    problems["nbd"] = None
    assert probes.choose_frontend("auto") == ("nbd", "--via auto: using nbd (kmod: no shim)")
    problems["kmod"] = None
    assert probes.choose_frontend("auto") == ("kmod", "--via auto: using kmod")
    problems.update(kmod="a", nbd="b", fuse="c")
    with pytest.raises(CommandFailed, match=r"no way to attach.*kmod: a; nbd: b; fuse: c"):
        probes.choose_frontend("auto")
    with pytest.raises((UsageError, CommandFailed), match="--via"):
        probes.choose_frontend("ublk")


def test_pid_file_lock_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "cowd.pid"
    first, second = rundir.PidFile(str(path)), rundir.PidFile(str(path))
    assert first.try_acquire()
    try:
        assert rundir.pid_file_held(str(path)) and rundir.holder_pid(str(path)) == os.getpid()
        assert not second.try_acquire()  # another open file: flock refuses it
    finally:
        first.release()
    assert not path.exists() and not rundir.pid_file_held(str(path))

    # A holder killed by SIGKILL leaves its pid file behind, but not its lock.
    code = ("import sys, time; from cowd.rundir import PidFile; "
            "p = PidFile(sys.argv[1]); assert p.try_acquire(); print(flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"\n"
        assert rundir.pid_file_held(str(path)) and rundir.holder_pid(str(path)) == holder.pid
        assert not second.try_acquire()
    finally:
        holder.kill()
        holder.communicate()
    assert path.exists() and not rundir.pid_file_held(str(path))
    assert second.try_acquire()
    try:
        assert rundir.holder_pid(str(path)) == os.getpid()
    finally:
        second.release()


def test_loop_names() -> None:
    assert loop.loop_name("/dev/loop12") == "loop12"
    assert loop.loop_name("/dev/sda") is None and loop.loop_name("/dev/loop") is None
    assert loop.loop_info("/dev/null") is None
    assert loop.loop_info("/dev/loop999999") is None  # not bound (and no such device)
