"""Layer: cowd disk support (used by cowd/disk.py and the image commands; imports nothing
from cowd).  Image locking that qemu honours, so qemu-img cannot write an overlay cowd
serves, and cowd does not serve an image a qemu process is writing.

Theory of operation (the byte layout qemu's file-posix driver uses, learnt from its
``raw_apply_lock_bytes``/``raw_check_lock_bytes`` and checked against qemu-io 7.2 in
/proc/locks): permissions are bits — CONSISTENT_READ 0, WRITE 1, WRITE_UNCHANGED 2, RESIZE 3.
A user of an image holds a *shared* Linux open-file-description (OFD) lock on byte
``100 + bit`` for every permission it uses, and on byte ``200 + bit`` for every permission
it does not let others use.  Before taking its locks a user tests (F_OFD_GETLK with an
exclusive lock): byte ``200 + bit`` for each permission it wants (someone forbids it) and
byte ``100 + bit`` for each permission it forbids (someone uses it).  No lock is ever
exclusive, so readers that share everything (``qemu-img info -U``) never conflict.

cowd takes what qemu takes for the same role: a writable top uses read, write and resize
and forbids write and resize (bytes 100, 101, 103, 201, 203); a read-only layer (a parent, a
``--readonly`` top) uses read and forbids write and resize (100, 201, 203).  OFD locks
belong to the open file description, so they live exactly as long as the image's fd (a
killed daemon's locks go with it) and conflict with another ``open()`` of the same file in
this very process too: callers lock each file once, on the fd they keep.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

WRITER_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
READER_PERMS = (PERM_CONSISTENT_READ,)
UNSHARED = (PERM_WRITE, PERM_RESIZE)

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on Linux x86-64/aarch64: l_type, l_whence (short), l_start, l_len (off_t),
# l_pid (pid_t), padding.
_FLOCK = struct.Struct("hhqqi4x")


class ImageLocked(Exception):
    """Another process uses the image in a way that conflicts; str() is one line."""


def _flock(fd: int, cmd: int, ltype: int, offset: int) -> int:
    packed = _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0)
    out = fcntl.fcntl(fd, cmd, packed)
    return int(_FLOCK.unpack(out)[0])


def conflicts(fd: int, writable: bool) -> list[str]:
    """What another holder forbids or uses that conflicts with our role (empty: none)."""
    perms = WRITER_PERMS if writable else READER_PERMS
    found = []
    for bit in perms:
        if _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + bit) != fcntl.F_UNLCK:
            found.append(f"another process does not share the {PERM_NAMES[bit]} permission")
    for bit in UNSHARED:
        if _flock(fd, F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:
            found.append(f"another process has it open for {PERM_NAMES[bit]}")
    return found


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Test, then take qemu's lock bytes for our role on ``fd``; ImageLocked on a conflict.
    A file system without OFD locks (EINVAL/ENOLCK/EOPNOTSUPP) is served unlocked, as
    qemu does with ``locking=auto``."""
    try:
        found = conflicts(fd, writable)
        if found:
            raise ImageLocked(f"{path}: image is in use by another process, e.g. qemu "
                              f"({found[0]}); stop it first")
        perms = WRITER_PERMS if writable else READER_PERMS
        for bit in perms:
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + bit)
        for bit in UNSHARED:
            _flock(fd, F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return
        if e.errno in (errno.EAGAIN, errno.EACCES):  # lost a race with another locker
            raise ImageLocked(f"{path}: image is in use by another process "
                              "(a lock byte was taken meanwhile)") from None
        raise


def unlock_image(fd: int) -> None:
    """Drop every lock byte (closing the fd does the same)."""
    for base in (LOCK_PERM_BASE, LOCK_SHARED_BASE):
        packed = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, base, 4, 0)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, packed)
        except OSError:
            pass
