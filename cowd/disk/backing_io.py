"""Layer: cowd disk, bottom: the backing I/O — preadv/pwrite on image files, nothing else.

The one place where guest data meets a host file descriptor: every DATA read of a plan and
every in-place write goes through these functions (move data reads to a thread, io_uring or
batched preadv here, and nowhere else).  No trio, no cache, no format knowledge.
"""

from __future__ import annotations

import errno
import os


class WouldBlock(Exception):
    """A RWF_NOWAIT read found data that is not in the page cache."""


def pread_into(fd: int, view: memoryview, file_offset: int, nowait: bool = False) -> int:
    """Fill ``view`` from ``fd`` at ``file_offset``; returns the bytes read (fewer only at end
    of file).  With ``nowait`` the read must be served from the page cache (preadv2's
    RWF_NOWAIT) or it raises _WouldBlock without waiting for the disk: page-cache hits are
    read inline (a thread costs more than the read, DESIGN.md); a frontend advises the misses
    of a batch (Disk.advise) so that the disk works on them in parallel, then reads them."""
    total = len(view)
    if nowait:
        try:
            n = os.preadv(fd, [view], file_offset, RWF_NOWAIT)
        except BlockingIOError:
            raise WouldBlock from None
        except OSError as e:
            # FUSE (a base in an nbdfuse or sshfs mount) and some other file systems refuse
            # RWF_NOWAIT (EOPNOTSUPP): take the blocking path, never fail the read.
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise WouldBlock from None
            raise
        if n < total:  # partly cached, or end of file: let the blocking path sort it out
            raise WouldBlock
        return n
    got = 0
    while got < total:
        n = os.preadv(fd, [view[got:]], file_offset + got)
        if n <= 0:
            break
        got += n
    return got


RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)


def pwrite_from(fd: int, view: memoryview, file_offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, file_offset)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]
        file_offset += n


_ZEROS = bytes(1 << 20)


def zero_fill(view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos:pos + n] = _ZEROS[:n]
        pos += n


def read_run(fd: int, view: memoryview, file_offset: int, zeroed: bool,
              nowait: bool = False, cluster_bytes: int = 0) -> int:
    """Read one run of DATA; returns -1, or the file offset where a cluster lying wholly
    past the end of the file begins (the file was truncated: the caller raises).  Like
    qemu, only the last cluster of a file may be short (it reads as zeroes past the end)."""
    got = pread_into(fd, view, file_offset, nowait)
    if got < len(view):
        end = file_offset + got  # the end of the file
        if cluster_bytes > 0:
            last_cluster_end = -(-end // cluster_bytes) * cluster_bytes
            if file_offset + len(view) > last_cluster_end:
                return max(end, last_cluster_end)
        if not zeroed:
            zero_fill(view[got:])
    return -1



__all__ = ["RWF_NOWAIT", "WouldBlock", "pread_into", "pwrite_from", "read_run", "zero_fill"]
