"""Layer: cowd frontends (loop).  Loop devices for the FUSE frontend's files: what a
``/dev/loopN`` is bound to (sysfs and LOOP_GET_STATUS64), whether it is held exclusively, and
``losetup`` to bind and unbind one.

Invariants: it never imports another frontend (the FUSE file is only a path here); nothing
here may be called in the thread that serves the FUSE file a loop device reads (the kernel
stats the backing file); losetup runs with a deadline (:data:`LOSETUP_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import subprocess
from dataclasses import dataclass

import trio

from ..errors import CommandFailed

# losetup attach/detach must finish this soon.
LOSETUP_TIMEOUT_S = 60.0
_LOOP_NAME = re.compile(r"loop[0-9]+")
# linux/loop.h
LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device lo_inode lo_rdevice lo_offset lo_sizelimit lo_number
# lo_encrypt_type lo_encrypt_key_size lo_flags lo_file_name[64] lo_crypt_name[64]
# lo_encrypt_key[32] lo_init[2]
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


@dataclass(frozen=True)
class LoopInfo:
    device: str  # /dev/loopN
    backing_file: str  # as the kernel names it (sysfs); "/NAME" once its mount is detached
    backing_dev: int  # st_dev of the backing file; 0 if the kernel could not stat it
    backing_ino: int
    dio: bool
    read_only: bool


def loop_name(device: str) -> str | None:
    """'loopN' for /dev/loopN (symlinks resolved), else None."""
    name = os.path.basename(os.path.realpath(device))
    return name if _LOOP_NAME.fullmatch(name) else None


def _sysfs(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def loop_info(device: str) -> LoopInfo | None:
    """What ``device`` is bound to, or None if it is no bound loop device.  Blocking, and it
    makes the kernel stat the backing file: never call it in the thread that serves that
    file."""
    name = loop_name(device)
    if name is None:
        return None
    base = f"/sys/block/{name}"
    try:
        backing = _sysfs(f"{base}/loop/backing_file")
        dio = _sysfs(f"{base}/loop/dio").strip() == "1"
        ro = _sysfs(f"{base}/ro").strip() == "1"
    except FileNotFoundError:
        return None
    if backing.endswith("\n"):
        backing = backing[:-1]
    dev = ino = 0
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            buf = bytearray(LOOP_INFO64.size)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
            dev, ino = LOOP_INFO64.unpack(buf)[:2]
        except OSError:
            pass  # ENXIO: unbound in the meantime
        finally:
            os.close(fd)
    return LoopInfo(f"/dev/{name}", backing, dev, ino, dio, ro)


def loops_backed_under(directory: str) -> list[LoopInfo]:
    """Bound loop devices whose backing file the kernel names inside ``directory``."""
    prefix = directory.rstrip("/") + "/"
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            if not _LOOP_NAME.fullmatch(name):
                continue
            try:
                backing = _sysfs(f"/sys/block/{name}/loop/backing_file").rstrip("\n")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if backing.startswith(prefix):
                info = loop_info(f"/dev/{name}")
                if info is not None and info.backing_file.startswith(prefix):
                    found.append(info)
    return found


def is_busy(device: str) -> bool:
    """True if something holds ``device`` exclusively (a mounted file system, a holder such as
    device-mapper, another exclusive opener).  A plain open by some process is not seen."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


async def _losetup(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        with trio.fail_after(LOSETUP_TIMEOUT_S):
            return await trio.run_process(args, capture_stdout=True, capture_stderr=True,
                                          check=False, stdin=subprocess.DEVNULL)
    except trio.TooSlowError:
        raise CommandFailed(f"{' '.join(args)}: did not finish within "
                         f"{LOSETUP_TIMEOUT_S:.0f} s") from None


async def losetup_attach(path: str, readonly: bool) -> str:
    args = ["losetup", "--find", "--show", "--direct-io=on"]
    if readonly:
        args.append("--read-only")
    args.append(path)
    p = await _losetup(args)
    if p.returncode != 0:
        raise CommandFailed(f"losetup: {last_line(p.stderr)} (file={path})")
    dev = p.stdout.decode(errors="replace").strip()
    if loop_name(dev) is None:
        raise CommandFailed(f"losetup: unexpected output (stdout={dev!r})")
    return dev


async def losetup_detach(device: str) -> None:
    p = await _losetup(["losetup", "-d", device])
    if p.returncode != 0:
        raise CommandFailed(f"losetup -d {device}: {last_line(p.stderr)}")


__all__ = [
    "LoopInfo",
    "is_busy",
    "loop_info",
    "loop_name",
    "loops_backed_under",
    "losetup_attach",
    "losetup_detach",
]
