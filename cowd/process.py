"""Layer: cowd (process set-up, no trio).  What the daemon and its workers set once for their
whole process, through libc: the allocator's behaviour for large buffers.

Why the allocator: glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) after
the first large buffer is freed, and from then on serves large buffers from its heap, where a
few small live objects pin the freed space: a daemon passing 256 KiB replies to its workers
grew from 34 to 83 MB over a burst of hostile clients and stayed there, and stayed at 34 MB
with the threshold fixed (tests/integration/test_nbd_server.py's hostile tests bound it).

Fixing the mmap threshold fixes the trim threshold too (at 128 KiB, glibc's default), and
both have a cost on the hot paths: every buffer at the mmap threshold or above is an mmap,
its page faults and a munmap, and a heap whose top is trimmed at every free of 128 KiB is a
brk each time.  At a 128 KiB threshold the NBD server's 256 KiB receives and 1 MiB write
payloads made 1 MiB writes run at a quarter of their speed.  So: buffers of
LARGE_BUFFER_BYTES (512 KiB) and more get mmaps of their own, returned when freed — the hot
paths reuse theirs (the NBD server's pool of read replies and write payloads) — receives of
256 KiB come from the heap, and the heap keeps up to TRIM_BYTES of free space at its top.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# Buffers at least this large get mmaps of their own (and give them back when freed).
LARGE_BUFFER_BYTES = 512 << 10
# Free space the heap keeps at its top before giving it back (brk): above a receive buffer
# or two, well under what the memory tests allow a process to grow by.
TRIM_BYTES = 8 << 20

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def settle_allocator() -> bool:
    """Fix malloc's mmap threshold at LARGE_BUFFER_BYTES and its trim threshold at
    TRIM_BYTES (see the module docstring); False where the C library has no mallopt (not
    glibc)."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))


__all__ = ["LARGE_BUFFER_BYTES", "settle_allocator"]
