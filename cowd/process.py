"""Layer: cowd (process set-up, no trio).  What the daemon and its workers set once for their
whole process, through libc: the allocator's behaviour for large buffers.

Why the allocator: glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) after
the first large buffer is freed, and from then on serves large buffers from its heap, where a
few small live objects pin the freed space: a daemon passing 256 KiB replies to its workers
grew from 34 to 83 MB over a burst of hostile clients and stayed there, and stayed at 34 MB
with the threshold fixed (tests/integration/test_nbd_server.py's hang-up test, 2026-12-06).
A fixed threshold keeps buffers of LARGE_BUFFER_BYTES and more in
mmaps of their own, returned to the kernel when freed; the hot paths reuse their large
buffers (the NBD server's reply pool), so the page faults of fresh mappings are rare.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# Buffers at least this large get mmaps of their own (and give them back when freed).
LARGE_BUFFER_BYTES = 128 << 10

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def settle_allocator() -> bool:
    """Fix malloc's mmap threshold at LARGE_BUFFER_BYTES (see the module docstring); False
    where the C library has no mallopt (not glibc)."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))


__all__ = ["LARGE_BUFFER_BYTES", "settle_allocator"]
