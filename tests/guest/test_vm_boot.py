"""A VM boots from a cowd disk: qemu-system-x86_64 (TCG) with Debian's kernel, its root disk a
qcow2 overlay (or a differencing VHD) over the base that tools/mkbase builds, served by cowd
through NBD (qemu's own NBD client) or the FUSE file under a loop device, as the user runs it:
``tools/vm-boot OVERLAY --via nbd|fuse|qemu --json``.

The guest's /sbin/init (tools/vm/guest/rootfs-init.sh) makes a machine id and host keys from
random data on its first boot, writes a 1 MiB random blob per boot, logs, syncs and prints
``COWD-BOOT-OK boot=N machine-id=ID sha256=SUM verified=K`` before powering off; boot N checks
the blobs of boots 1..N-1 against their recorded sums.  Oracles that share no code with cowd:
qemu-img (check; convert -O raw of the qcow2 chain), libvhdi (vhdimount of the VHD chain),
e2fsck -fn (the file system the guest left is clean) and debugfs (the files inside it: the
machine id, the keys, the blob whose sha256 the guest printed), sha256 of the base before and
after, and qemu itself booting the overlay as a plain qcow2.

TCG boots are slow (~8 s each on the project machine, more when two share 2 cores), so each
test boots as few times as it can.  Teardown (finally, whatever failed) works by name and pid:
the qemu pids in the run dir's pid files, then test_attach's run-dir teardown (the daemon by
its pid-file lock, loop devices backed by this run dir's FUSE mount, that mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowd.frontends.fuse.mount import fuse_problem
from tests.support import ROOT
from tests.support.attach import Env
from tests.support.peers import libvhdi_raw, missing_tool, qemu_check, qemu_img, run, sha256
from tools.vm import image

VM_BOOT = [str(ROOT / "tools" / "vm-boot")]  # the commands as a user types them
MKBASE = [str(ROOT / "tools" / "mkbase")]
KERNEL = image.DEFAULT_KERNEL  # the newest Debian kernel installed: no version written here
BOOT_DEADLINE_S = 150  # one boot; ~8 s alone, ~2x with two at a time, more on a loaded host
KEY_TYPES = ("rsa", "ecdsa", "ed25519")
KEY_BYTES = 2048
BLOB_BYTES = 1 << 20


def vm_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (cowd attach, loop devices)"
    if not KERNEL.is_file():
        return f"{KERNEL} missing (linux-image-amd64; make check installs it)"
    if not Path("/bin/busybox").is_file():
        return "/bin/busybox missing (busybox-static; make check installs it)"
    return (missing_tool("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs", "e2fsck",
                         "modprobe", "vhdimount") or fuse_problem())


pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(vm_problem() is not None, reason=vm_problem() or "")]


# ---- helpers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/mkbase --vhd, once for the module: base.img, base.vhd, initramfs.img."""
    out = tmp_path_factory.mktemp("vmbase")
    run(*MKBASE, "-o", out, "--vhd", timeout=120)
    return out


class VM(Env):
    """`cowd attach`'s run-dir environment (tests/support/attach.py) plus the VM tools."""

    def boot(self, *images: Path, via: str, parallel: int = 1,
             rc: int = 0) -> list[dict[str, Any]]:
        cmd = [*VM_BOOT, *map(str, images), "--via", via, "--json", "--parallel",
               str(parallel), "--run-dir", str(self.run_dir), "--deadline",
               str(BOOT_DEADLINE_S), "--console-dir", str(self.tmp / "console")]
        p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=BOOT_DEADLINE_S * (len(images) // parallel + 2))
        assert "Traceback" not in p.stderr, p.stderr
        assert p.returncode == rc, (f"vm-boot {via} rc={p.returncode}\n{p.stderr}\n"
                                    f"{self.consoles()}\n{self.log()}")
        if rc != 0:
            return []
        results: list[dict[str, Any]] = json.loads(p.stdout)
        assert [r["image"] for r in results] == [str(i.resolve()) for i in images]
        for r in results:
            assert r["ok"] and r["returncode"] == 0, r
            assert 0 < r["seconds"] <= r["total_seconds"], r
        return results

    def consoles(self, tail: int = 30) -> str:
        out = []
        for log in sorted((self.tmp / "console").glob("*.txt")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def create(self, base: Path, kind: str, out: Path) -> Path:
        self.cowd("create", "--base", base, "--overlay", kind, "-o", out, run_dir=False)
        return out

    def teardown(self) -> None:
        for pidfile in self.run_dir.glob("qemu-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        super().teardown()


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VM]:
    with VM.under(tmp_path) as e:
        yield e


def copy_base(built: Path, tmp: Path, name: str = "base.img") -> Path:
    """The module's base (and its initramfs, found beside it by vm-boot) in this test's dir."""
    shutil.copyfile(built / name, tmp / name)
    shutil.copyfile(built / "initramfs.img", tmp / "initramfs.img")
    return tmp / name


class Disk:
    """The file system inside a flat raw copy of a virtual disk, read with debugfs."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        fsck = run("e2fsck", "-f", "-n", raw, check=False)
        assert fsck.returncode == 0, f"e2fsck -fn {raw}: {fsck.stdout.decode()}"

    def cat(self, path: str) -> bytes:
        p = run("debugfs", "-R", f"cat {path}", self.raw)
        return p.stdout

    def exists(self, path: str) -> bool:
        p = run("debugfs", "-R", f"stat {path}", self.raw, check=False)
        return b"File not found" not in p.stdout + p.stderr

    def text(self, path: str) -> str:
        return self.cat(path).decode()


def qcow2_disk(image: Path, tmp: Path) -> Disk:
    raw = tmp / f"{image.name}.flat"
    qemu_img("convert", "-O", "raw", image, raw)
    return Disk(raw)


def vhd_disk(image: Path, tmp: Path) -> Disk:
    raw = tmp / f"{image.name}.flat"
    raw.write_bytes(libvhdi_raw(image, tmp))
    return Disk(raw)


def check_boots(disk: Disk, markers: list[dict[str, Any]]) -> None:
    """The disk holds what boots 1..N said on their consoles: the same machine id, host keys
    of random bytes, every boot's blob with the sum it printed, a log line per boot."""
    n = len(markers)
    fields = [m["fields"] for m in markers]
    assert [int(f["boot"]) for f in fields] == list(range(1, n + 1))
    assert [int(f["verified"]) for f in fields] == list(range(n))
    mid = fields[0]["machine-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", mid), mid
    assert {f["machine-id"] for f in fields} == {mid}
    assert disk.text("/etc/machine-id") == f"{mid}\n"
    keys = [disk.cat(f"/etc/ssh/ssh_host_{t}_key") for t in KEY_TYPES]
    assert [len(k) for k in keys] == [KEY_BYTES] * len(KEY_TYPES)
    assert len(set(keys)) == len(keys) and b"\0" * 64 not in b"".join(keys)
    for t, key in zip(KEY_TYPES, keys, strict=True):
        assert disk.text(f"/etc/ssh/ssh_host_{t}_key.pub") == \
            hashlib.sha256(key).hexdigest() + "\n"
    for k, f in enumerate(fields, start=1):
        blob = disk.cat(f"/var/lib/cowd/blob-{k}")
        assert len(blob) == BLOB_BYTES
        assert hashlib.sha256(blob).hexdigest() == f["sha256"]
    assert disk.text("/var/lib/cowd/boots") == f"{n}\n"
    log = disk.text("/var/log/cowd-boot.log").splitlines()
    assert [line.split()[:4] for line in log] == [["boot", str(k), "machine-id", mid]
                                                   for k in range(1, n + 1)]


def check_untouched_base(disk: Disk) -> None:
    """The base as mkbase built it: an init, no boot's writes."""
    assert disk.exists("/sbin/init")
    for path in ("/etc/machine-id", "/var/lib/cowd/boots", "/var/log/cowd-boot.log"):
        assert not disk.exists(path), path


# ---- the main job ------------------------------------------------------------------------------

@pytest.mark.timeout(400)
def test_qcow2_overlay_boots_through_nbd_then_qemu(vm: VM, built: Path, tmp_path: Path) -> None:
    """First boot through cowd serve + qemu's NBD client; the overlay holds its writes, the
    base does not; a second boot through cowd sees the first's files; a third boot by qemu
    alone, with the overlay as a plain qcow2 file, sees both."""
    base = copy_base(built, tmp_path)
    base_sha = sha256(base)
    ov = vm.create(base, "qcow", tmp_path / "vm.qcow2")

    first = vm.boot(ov, via="nbd")
    assert sha256(base) == base_sha
    qemu_check(ov)
    check_boots(qcow2_disk(ov, tmp_path), first)
    check_untouched_base(Disk(base))

    second = vm.boot(ov, via="nbd")
    third = vm.boot(ov, via="qemu")
    assert sha256(base) == base_sha
    qemu_check(ov)
    check_boots(qcow2_disk(ov, tmp_path), first + second + third)
    # the serve daemons stopped on SIGTERM and exited 0 (vm-boot checks); nothing left running
    vm.assert_daemon_gone()


@pytest.mark.timeout(300)
def test_qcow2_overlay_boots_through_fuse_loop(vm: VM, built: Path, tmp_path: Path) -> None:
    """cowd attach --via fuse: qemu's root disk is /dev/loopN on the daemon's FUSE file.  (A
    second boot through FUSE, reading the first boot's clusters back, is in the VHD test.)"""
    base = copy_base(built, tmp_path)
    base_sha = sha256(base)
    ov = vm.create(base, "qcow", tmp_path / "vm.qcow2")

    first = vm.boot(ov, via="fuse")
    vm.assert_daemon_gone()  # detached, the idle daemon exited, no loop device left
    assert sha256(base) == base_sha
    qemu_check(ov)
    check_boots(qcow2_disk(ov, tmp_path), first)
    check_untouched_base(Disk(base))


@pytest.mark.timeout(300)
def test_differencing_vhd_over_vhd_base(vm: VM, built: Path, tmp_path: Path) -> None:
    """The same with a differencing VHD over the dynamic VHD base (mkbase --vhd): a first boot
    through NBD, a second through FUSE; libvhdi reads the chain.  qemu cannot boot the
    overlay itself (its vpc driver has no differencing VHDs): vm-boot says so in one line."""
    base = copy_base(built, tmp_path, "base.vhd")
    base_sha = sha256(base)
    ov = vm.create(base, "vhd", tmp_path / "vm.vhd")

    first = vm.boot(ov, via="nbd")
    assert sha256(base) == base_sha
    vm.cowd("check", ov, run_dir=False)
    check_boots(vhd_disk(ov, tmp_path), first)

    second = vm.boot(ov, via="fuse")
    vm.assert_daemon_gone()
    assert sha256(base) == base_sha
    vm.cowd("check", ov, run_dir=False)
    check_boots(vhd_disk(ov, tmp_path), first + second)
    check_untouched_base(vhd_disk(base, tmp_path))

    p = subprocess.run([*VM_BOOT, str(ov), "--via", "qemu"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "differencing" in p.stderr, p.stderr


@pytest.mark.timeout(600)
def test_ten_overlays_one_daemon_two_at_a_time(vm: VM, built: Path, tmp_path: Path) -> None:
    """Ten qcow2 overlays of one base, one `cowd serve` exporting all ten, two VMs at a time;
    every VM made its own machine, every overlay holds only its own VM's writes."""
    base = copy_base(built, tmp_path)
    base_sha = sha256(base)
    ovs = [vm.create(base, "qcow", tmp_path / f"vm{i}.qcow2") for i in range(10)]

    results = vm.boot(*ovs, via="nbd", parallel=2)
    assert sha256(base) == base_sha
    # one daemon: every line of the serve log comes from one pid
    pids = set(re.findall(r"cowd\[(\d+)\]", (vm.run_dir / "serve.log").read_text()))
    assert len(pids) == 1, pids
    # two at a time: never three qemus at once, and the pairs did overlap
    spans = [(r["started_at"], r["started_at"] + r["total_seconds"]) for r in results]
    overlaps = [sum(1 for s, e in spans if s <= t < e) for t, _ in spans]
    assert max(overlaps) == 2, spans
    assert len({r["fields"]["machine-id"] for r in results}) == 10
    for ov, r in zip(ovs, results, strict=True):
        qemu_check(ov)
        check_boots(qcow2_disk(ov, tmp_path), [r])
        (tmp_path / f"{ov.name}.flat").unlink()
    vm.assert_daemon_gone()


# ---- the tools' errors -------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_boot_without_marker_fails(vm: VM, built: Path, tmp_path: Path) -> None:
    """vm-boot exits 1 when the marker never shows: a disk with no /sbin/init (the initramfs
    says so and powers off), and a boot cut by the deadline (qemu killed, no pid left)."""
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as f:
        f.truncate(16 << 20)
    run("mkfs.ext4", "-q", "-F", empty)
    shutil.copyfile(built / "initramfs.img", tmp_path / "initramfs.img")
    p = subprocess.run([*VM_BOOT, str(empty), "--via", "qemu", "--run-dir", str(vm.run_dir)],
                       capture_output=True, text=True, timeout=BOOT_DEADLINE_S)
    assert p.returncode == 1, p
    assert "COWD-BOOT-FAIL initramfs: /dev/vda has no executable /sbin/init" in p.stderr

    base = copy_base(built, tmp_path)
    p = subprocess.run([*VM_BOOT, str(base), "--via", "qemu", "--deadline", "1",
                        "--run-dir", str(vm.run_dir)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1, p
    assert "no COWD-BOOT-OK line within 1 s" in p.stderr
    assert list(vm.run_dir.glob("qemu-*.pid")) == []


def test_usage_errors(tmp_path: Path) -> None:
    """One line naming the file or the option, never a traceback; --via kmod is the hook for
    /dev/cowdN and reports cowd attach's own reason until the kernel shim exists."""
    cases = [
        ([*VM_BOOT, str(tmp_path / "nope.qcow2")], "nope.qcow2: no such image"),
        ([*MKBASE, "-o", str(tmp_path / "b"), "--size", "1"], "--size"),
        ([*MKBASE, "-o", str(tmp_path / "b"), "--kernel", str(tmp_path / "vmlinuz-x")],
         "vmlinuz-x: no such kernel"),
    ]
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 4096)
    (tmp_path / "initramfs.img").write_bytes(b"")
    cases.append(([*VM_BOOT, str(img), "--via", "kmod", "--run-dir", str(tmp_path / "run")],
                  "cowd attach: cowd: --via kmod"))
    for cmd, want in cases:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, (cmd, p)
        assert p.stderr.count("\n") == 1 and want in p.stderr, (cmd, p.stderr)
