"""Layer: cowd (bottom: no cowd imports).  What the daemon asks of the kernel so that memory
pressure cannot deadlock it while it backs block devices: PR_SET_IO_FLUSHER, and I/O buffers
that are resident before they are needed.

Theory of operation: a loop device on cowd's FUSE file (or /dev/nbdN on its NBD server) is
written back through this process.  When memory runs short the kernel reclaims by writing
dirty pages back, possibly through that very device; if the daemon, serving that write,
itself needs a page and the allocation waits for the same reclaim, nothing moves.
``PR_SET_IO_FLUSHER`` marks the daemon's threads ``PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE``: its
allocations never recurse into I/O reclaim, and it is not throttled for dirty pages of a
device it is itself cleaning (the flag loop's own kernel worker and user-space block servers
such as nbd-client use).  The flag is a thread's and is inherited by threads created after
it, so the daemon sets it first thing, before trio starts any worker thread.  It needs
CAP_SYS_RESOURCE: it is asked for only as root (attach needs root anyway), and a root without
that capability (some containers) is told once, in the log and in ``cowd stats``; the daemon
then works as before, with the deadlock possible under heavy memory pressure.

The OOM killer is the other way memory pressure ends a device's I/O: a cgroup or a machine
out of memory kills its largest process, and a daemon (or worker) killed with requests in
hand fails them (EIO in the guest's file system).  Reclaim that needs this process cannot
succeed without it, so, as iscsid and multipathd do for theirs, the daemon sets its
``oom_score_adj`` to :data:`OOM_SCORE_ADJ_MIN` (never chosen), inherited by its workers:
:func:`protect_from_oom_killer`.  Lowering it needs CAP_SYS_RESOURCE too (asked as root only,
said in ``cowd stats``).  In the guest's memory-pressure test the limit may end in an
OOM kill (of the test's memory hog, which asks for it: the kernel's log), and after the hog
the largest processes left in that cgroup are cowd's.

The buffers the FUSE frontend reads requests into and builds replies in are allocated once,
for every worker it may run, when it mounts: :func:`resident_buffer` touches each page and
asks ``mlock`` to keep it (best effort: without CAP_IPC_LOCK the memlock limit may refuse),
so serving a request under pressure does not first have to fault in a megabyte.
"""

from __future__ import annotations

import ctypes
import errno
import os

PR_SET_IO_FLUSHER = 57  # <linux/prctl.h>, Linux 5.6
PR_GET_IO_FLUSHER = 58
CAP_SYS_RESOURCE = 24  # <linux/capability.h>
OOM_SCORE_ADJ_MIN = -1000  # <uapi/linux/oom.h>: the OOM killer never picks the process
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.restype = ctypes.c_int


def set_io_flusher() -> str:
    """Set PR_SET_IO_FLUSHER on the calling thread (and so on every thread it starts later);
    return what happened, for the log and ``cowd stats``: ``"set"``, or why not."""
    if os.geteuid() != 0:
        return "not set: not root (the kernel wants CAP_SYS_RESOURCE)"
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return "set"
    err = ctypes.get_errno()
    why = " (this root lacks CAP_SYS_RESOURCE)" if err == errno.EPERM else ""
    return f"not set: {os.strerror(err)}{why}"


def protect_from_oom_killer() -> str:
    """Set this process's oom_score_adj to OOM_SCORE_ADJ_MIN (inherited by the processes it
    starts later); return what happened: ``"set"``, or why not."""
    if os.geteuid() != 0:
        return "not set: not root (the kernel wants CAP_SYS_RESOURCE)"
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(f"{OOM_SCORE_ADJ_MIN}\n")
    except OSError as e:
        why = " (this root lacks CAP_SYS_RESOURCE)" if e.errno in (errno.EACCES,
                                                                    errno.EPERM) else ""
        return f"not set: {e.strerror}{why}"
    return "set"


def io_flusher_state() -> bool | None:
    """PR_GET_IO_FLUSHER for the calling thread (None: the kernel will not say)."""
    r = _libc.prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0)
    return None if r < 0 else bool(r)


def resident_buffer(size: int) -> tuple[bytearray, bool]:
    """A zeroed buffer of ``size`` bytes whose pages are touched now (so a request under
    memory pressure does not fault them in) and, if the kernel allows, locked in memory.
    Returns the buffer and whether ``mlock`` kept it.  The buffer must never be resized."""
    buf = bytearray(size)
    for off in range(0, size, PAGE_BYTES):
        buf[off] = 0  # fault the page in (a fresh large bytearray is untouched mmap memory)
    if not size:
        return buf, True
    addr = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
    return buf, _libc.mlock(addr, size) == 0


__all__ = ["OOM_SCORE_ADJ_MIN", "io_flusher_state", "protect_from_oom_killer",
           "resident_buffer", "set_io_flusher"]
