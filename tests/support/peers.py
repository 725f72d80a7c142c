"""Real peers as oracles (qemu-img, qemu-io; libvhdi's vhdimount for the differencing VHDs
qemu cannot follow), the skip reasons when one is missing, and the command a user types
(:data:`COWD`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The console script a user types (installed editable into the venv by `make check`), or the
# module where no script is installed beside this interpreter.
_SCRIPT = Path(sys.executable).parent / "cowd"
COWD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cowd.cli"]


def cowd_cli(*args: str | os.PathLike[str], rc: int = 0,
             cwd: str | os.PathLike[str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``cowd`` a user types; it must exit ``rc`` and never print a traceback."""
    p = subprocess.run([*COWD, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == rc, (args, p.returncode, p.stdout, p.stderr)
    return p


def need(tool: str) -> None:
    """Skip with the concrete reason when a peer tool is missing (make check installs it)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (make check installs it from packages.txt)")


def missing_tool(*tools: str) -> str | None:
    """The skip reason for the first tool not on PATH, or None."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (make check installs it from packages.txt)"
    return None


def run(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run([os.fspath(a) for a in args], capture_output=True, timeout=timeout,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {p.returncode}:\n"
            f"{p.stdout.decode(errors='replace')}\n{p.stderr.decode(errors='replace')}"
        )
    return p


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    """Signal ``proc`` (if it still runs) and wait up to ``timeout_s``; then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qemu_img(*args: str | os.PathLike[str],
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
    need("qemu-img")
    return run("qemu-img", *args, check=check)


def qemu_io(image: str | os.PathLike[str], *cmds: str, fmt: str | None = None) -> None:
    need("qemu-io")
    args: list[str | os.PathLike[str]] = ["qemu-io"]
    if fmt:
        args += ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(image)
    p = run(*args)
    out = p.stdout.decode(errors="replace")
    if "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io {cmds}: {out}")


def qemu_raw(image: str | os.PathLike[str], tmp: Path, fmt: str | None = None) -> bytes:
    """The oracle: the virtual disk as qemu-img convert -O raw reads it."""
    out = tmp / f"oracle-{hashlib.sha1(os.fsencode(image)).hexdigest()[:8]}.raw"
    # -U: also while a daemon serves it (cowd holds qemu's image locks, cowd/imagelock.py).
    args: list[str | os.PathLike[str]] = ["convert", "-U"]
    if fmt:
        args += ["-f", fmt]
    args += ["-O", "raw", image, out]
    qemu_img(*args)
    data = out.read_bytes()
    out.unlink()
    return data


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_all(img: object) -> bytes:
    """Every guest byte through formats/, in chunks that straddle clusters."""
    from formats import Image

    assert isinstance(img, Image)
    out = bytearray()
    step = 3 * 65536 + 4096  # deliberately unaligned to cluster boundaries
    pos = 0
    while pos < img.virtual_size:
        n = min(step, img.virtual_size - pos)
        out += img.read(pos, n)
        pos += n
    return bytes(out)


def qemu_check(image: str | os.PathLike[str],
               fmt: str = "qcow2") -> subprocess.CompletedProcess[bytes]:
    """qemu-img check must report no errors and no leaks."""
    p = qemu_img("check", "-f", fmt, image, check=False)
    assert p.returncode == 0, (
        f"qemu-img check {image}: rc={p.returncode}\n{p.stdout.decode()}{p.stderr.decode()}")
    return p


_vhdimount_problem: list[str | None] = []  # probed once per process


def vhdimount_problem(tmp: Path) -> str | None:
    """Why vhdimount cannot run here (None when it can): probed once, on a VHD qemu-img makes
    in ``tmp``."""
    if _vhdimount_problem:
        return _vhdimount_problem[0]
    reason: str | None = None
    if shutil.which("vhdimount") is None:
        reason = "vhdimount not installed (package libvhdi-utils; make check installs it)"
    elif shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        reason = "fusermount3 not installed (package fuse3)"
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        reason = "/dev/fuse missing or not accessible"
    else:
        probe = tmp / "vhdimount-probe.vhd"
        qemu_img("create", "-f", "vpc", probe, "1M")
        try:
            _vhdimount_read(probe, tmp)
        except AssertionError as e:
            reason = f"vhdimount cannot mount here: {e}"
        probe.unlink()
    _vhdimount_problem.append(reason)
    return reason


def libvhdi_raw(image: Path, tmp: Path) -> bytes:
    """The virtual disk as libvhdi reads it: vhdimount exposes the chain as vhdi1 (the
    deepest parent) .. vhdiN (the image itself).  Skips where vhdimount cannot run."""
    reason = vhdimount_problem(tmp)
    if reason:
        pytest.skip(reason)
    return _vhdimount_read(image, tmp)


def _vhdimount_read(image: Path, tmp: Path) -> bytes:
    mnt = Path(tempfile.mkdtemp(prefix="vhdimnt-", dir=tmp))
    p = subprocess.run(["vhdimount", str(image), str(mnt)], capture_output=True, timeout=60)
    try:
        if p.returncode != 0:
            msg = (p.stdout + p.stderr).decode(errors="replace").strip()
            raise AssertionError(f"vhdimount {image} exited {p.returncode}: {msg}")
        names = sorted((n for n in os.listdir(mnt) if n.startswith("vhdi")),
                       key=lambda n: int(n[4:]))
        assert names, f"vhdimount {image}: nothing in the mount point"
        return (mnt / names[-1]).read_bytes()
    finally:
        if p.returncode == 0:
            _unmount(mnt)
        os.rmdir(mnt)


def _unmount(mnt: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool and subprocess.run([tool, "-u", str(mnt)], capture_output=True,
                               timeout=30).returncode == 0:
        return
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)



def lock_bytes(path: Path) -> list[tuple[str, int, int]]:
    """(mode, start, end) of the OFD locks (qemu's image locks) on ``path`` from
    /proc/locks."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    with open("/proc/locks") as f:
        for line in f:
            p = line.split()
            if "OFDLCK" in p and ident in p:
                i = p.index(ident)
                out.append((p[i - 2], int(p[i + 1]), int(p[i + 2])))
    return sorted(out)


class QemuHolder:
    """qemu-io keeping an image open until its stdin closes."""

    def __init__(self, *args: str | Path):
        self.p = subprocess.Popen(["qemu-io", *map(str, args)], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_locked(self, path: Path, within_s: float = 10.0) -> list[tuple[str, int, int]]:
        """The locks on ``path`` once qemu-io holds some (watched in /proc/locks: probing
        with qemu-img would take a lock itself)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            locks = lock_bytes(path)
            if locks:
                return locks
            assert self.p.poll() is None, f"qemu-io exited {self.p.returncode}"
            time.sleep(0.02)
        raise AssertionError("qemu-io took no locks")

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@contextlib.contextmanager
def qemu_io_holding(image: Path, fmt: str | None = None) -> Iterator[None]:
    """qemu-io holding ``image`` open for writing, its locks taken, until the block ends."""
    holder = QemuHolder(*(["-f", fmt] if fmt else []), image)
    try:
        holder.wait_locked(image, within_s=60)
        yield
    finally:
        holder.close()
