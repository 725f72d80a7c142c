"""Layer: cowd frontends (fuse), the mount helpers: ``mount(2)`` as root or ``fusermount3``
otherwise, /proc/self/mountinfo, the lazy unmount of a dead cowd mount, and the probe for
``--via fuse``.

Invariants: a mount is touched only if it is a ``fuse.cowd`` mount at the given directory and
the kernel answers ENOTCONN for it (its daemon is dead); :func:`unmount_stale` must never be
called on a mount this process serves (the check would wait for this thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import socket
import struct
from typing import Any

import trio

from ...errors import CommandFailed
from .protocol import INIT_TIMEOUT_S

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
# linux/fuse.h: _IOR(229, 0, uint32_t): attach a new /dev/fuse descriptor to the connection of
# the one whose number it is given.
FUSE_DEV_IOC_CLONE = 0x8004E500


# ---- mounting ------------------------------------------------------------------------------

_libc: Any = None


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def clone_fuse_fd(session_fd: int) -> int:
    """A new descriptor of ``session_fd``'s FUSE connection (``FUSE_DEV_IOC_CLONE``): the
    kernel hands each request to whichever descriptor reads first, and takes the reply on
    the one it was read from.  Non-blocking, close-on-exec."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", session_fd))
    except OSError as e:
        os.close(fd)
        raise CommandFailed(f"/dev/fuse: cannot clone the mount's descriptor: "
                            f"{e.strerror}") from None
    return fd


def _unescape_mountinfo(field: str) -> str:
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at(mountpoint: str) -> list[tuple[str, str]]:
    """(fstype, source) of every mount at ``mountpoint``, bottom first (/proc/self/mountinfo)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2 and \
                    _unescape_mountinfo(fields[4]) == mountpoint:
                found.append((rfields[0], _unescape_mountinfo(rfields[1])))
    return found


async def unmount_stale(mountpoint: str) -> bool:
    """Lazily unmount a dead cowd FUSE mount at ``mountpoint`` (its daemon was killed: the
    kernel answers ENOTCONN).  A live mount, or anything that is not a cowd FUSE mount, is
    left alone.  Returns True if it unmounted one.  Never call it on a mount this process
    serves (the check would wait for this thread)."""
    mountpoint = str(await trio.Path(mountpoint).absolute())
    mounts = mounts_at(mountpoint)
    if not mounts or mounts[-1][0] != "fuse.cowd":
        await trio.lowlevel.checkpoint()
        return False
    if not await mount_is_dead(mountpoint, INIT_TIMEOUT_S):
        return False
    if libc().umount2(os.fsencode(mountpoint), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        e = ctypes.get_errno()
        raise CommandFailed(f"{mountpoint}: cannot unmount a dead cowd mount: {os.strerror(e)}")
    return True


async def mount_is_dead(mountpoint: str, answer_within_s: float) -> bool:
    """Whether the FUSE mount at ``mountpoint`` has lost its daemon: a statfs (always a
    request; stat may be answered from cached attributes for ATTR_TIMEOUT_S after the daemon
    died) fails with ENOTCONN (every descriptor of the connection is closed) or ECONNABORTED
    (they were closed while this very request waited: a dead daemon's workers outlive it by a
    moment).  A mount that does not answer within ``answer_within_s`` is live: not ours to judge."""

    def probe() -> int:
        try:
            os.statvfs(mountpoint)
        except OSError as e:
            return e.errno or 0
        return 0

    with trio.move_on_after(answer_within_s):
        return await trio.to_thread.run_sync(probe, abandon_on_cancel=True) in (
            errno.ENOTCONN, errno.ECONNABORTED)
    return False


async def mount_syscall(fd: int, mountpoint: str, source: str, opts: str) -> None:
    await trio.lowlevel.checkpoint()
    data = f"fd={fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()},{opts}"
    if libc().mount(source.encode(), os.fsencode(mountpoint), b"fuse.cowd",
                  MS_NOSUID | MS_NODEV, data.encode()) != 0:
        e = ctypes.get_errno()
        raise CommandFailed(f"{mountpoint}: cannot mount FUSE: {os.strerror(e)}")


async def mount_fusermount(mountpoint: str, source: str, opts: str) -> int:
    """fusermount3 mounts for us and passes the /dev/fuse fd back over a socket."""
    exe = shutil.which("fusermount3")
    if exe is None:
        raise CommandFailed("fusermount3 not found (package fuse3); it mounts FUSE without root")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        p = await trio.run_process(
            [exe, "-o", f"nosuid,nodev,fsname={source},subtype=cowd,{opts}", "--", mountpoint],
            env=env, pass_fds=(theirs.fileno(),), check=False, capture_stderr=True)
        if p.returncode != 0:
            msg = p.stderr.decode(errors="replace").strip()
            raise CommandFailed(f"{mountpoint}: fusermount3 failed: {msg}")
        ours.setblocking(False)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        except BlockingIOError:
            fds = []
        if not fds:
            raise CommandFailed(f"{mountpoint}: fusermount3 passed no file descriptor")
        return fds[0]
    finally:
        ours.close()
        theirs.close()



def fuse_problem() -> str | None:
    """Why `--via fuse` cannot work here, or None."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return "no /dev/fuse (the fuse module is missing)"
    except OSError as e:
        return f"/dev/fuse unusable: {e.strerror}"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (the loop driver is missing)"
    if not os.access("/dev/loop-control", os.W_OK):
        return "loop devices need root (no write access to /dev/loop-control)"
    if shutil.which("losetup") is None:
        return "losetup not installed (util-linux)"
    return None


__all__ = [
    "fuse_problem",
    "mounts_at",
    "unmount_stale",
]
