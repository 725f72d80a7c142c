"""Layer: cowd frontends (fuse), a minimal io_uring through raw system calls (ctypes): just
what FUSE-over-io_uring needs, which is 128-byte submission entries carrying
``IORING_OP_URING_CMD`` to ``/dev/fuse`` and a completion queue to reap.  No trio here: the
caller waits for the ring's descriptor to become readable (it is pollable: readable while a
completion is queued) and calls :meth:`Ring.reap`.

Structures and numbers are those of ``linux/io_uring.h`` (Linux 5.19+ for SQE128 and
URING_CMD).  Threading: a ring is used by one thread only, the one that made it (the kernel
runs a uring command's completion work in the submitter's context), so nothing is locked.

Memory ordering: the kernel reads the submission tail inside ``io_uring_enter``, which this
module always calls after moving the tail (no SQPOLL), so a plain store suffices; the
completion tail is read before the entries it covers, which on x86 (TSO) and with the
interpreter's own work in between on arm64 is what the kernel's release store pairs with.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

# System call numbers: the same on x86_64 and arm64 (the generic table).
_SYSCALLS = {"x86_64": (425, 426), "aarch64": (425, 426), "arm64": (425, 426)}
SYS_IO_URING_SETUP, SYS_IO_URING_ENTER = _SYSCALLS.get(platform.machine(), (425, 426))

IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_SQE128 = 1 << 10
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OP_URING_CMD = 46

SQE128_BYTES = 128
CQE_BYTES = 16
# The 80 bytes of command data start here in a 128-byte SQE (struct io_uring_sqe's cmd[]).
SQE_CMD_OFFSET = 48
SQE_CMD_BYTES = 80
# A ring never has more entries than this (the kernel's own cap is 32768).
MAX_RING_ENTRIES = 4096

# opcode flags ioprio fd | cmd_op pad1 | addr | len uring_cmd_flags | user_data
_SQE_HEAD = struct.Struct("<BBHiIIQIIQ")
_CQE = struct.Struct("<QiI")  # user_data res flags
_ZERO_TAIL = bytes(SQE128_BYTES - _SQE_HEAD.size)
_ZERO_GAP = bytes(SQE_CMD_OFFSET - _SQE_HEAD.size)
_ZERO_CMD = bytes(SQE_CMD_BYTES)


class _SqOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SqOffsets), ("cq_off", _CqOffsets)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UringError(OSError):
    """io_uring_setup or io_uring_enter failed."""


def _check(r: int, what: str) -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise UringError(e, f"{what}: {os.strerror(e)}")
    return r


class Ring:
    """One io_uring with 128-byte SQEs and ``entries`` submission slots; see the module
    docstring.  Queue commands with :meth:`uring_cmd`, hand them to the kernel with
    :meth:`submit`, collect completions with :meth:`reap`; :meth:`close` when done."""

    def __init__(self, entries: int):
        if not 1 <= entries <= MAX_RING_ENTRIES:
            raise ValueError(f"io_uring: entries out of range (entries={entries})")
        # COOP_TASKRUN (5.19+): a completion's task work does not interrupt this thread
        # while it runs (an IPI: a VM exit in a guest) but waits for its next entry to the
        # kernel, which the serving loop makes all the time; a sleeping thread is still woken.
        for flags in (IORING_SETUP_SQE128 | IORING_SETUP_COOP_TASKRUN, IORING_SETUP_SQE128):
            p = _Params()
            p.flags = flags
            r = _libc.syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(p))
            if r >= 0 or ctypes.get_errno() != errno.EINVAL:
                break
        self.fd = _check(r, "io_uring_setup")
        try:
            self._map(p)
        except BaseException:
            os.close(self.fd)
            raise
        self._unsubmitted = 0

    def _map(self, p: _Params) -> None:
        sq, cq = p.sq_off, p.cq_off
        sq_bytes = sq.array + p.sq_entries * 4
        cq_bytes = cq.cqes + p.cq_entries * CQE_BYTES
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if p.features & IORING_FEAT_SINGLE_MMAP:
            sq_bytes = cq_bytes = max(sq_bytes, cq_bytes)
        self._sq_map = mmap.mmap(self.fd, sq_bytes, flags, prot, offset=IORING_OFF_SQ_RING)
        self._cq_map = self._sq_map if p.features & IORING_FEAT_SINGLE_MMAP else \
            mmap.mmap(self.fd, cq_bytes, flags, prot, offset=IORING_OFF_CQ_RING)
        self._sqe_map = mmap.mmap(self.fd, p.sq_entries * SQE128_BYTES, flags, prot,
                                  offset=IORING_OFF_SQES)
        self.sq_entries = p.sq_entries
        self.cq_entries = p.cq_entries
        sqm = memoryview(self._sq_map)
        cqm = memoryview(self._cq_map)
        self._sq_head = sqm[sq.head:sq.head + 4].cast("I")
        self._sq_tail = sqm[sq.tail:sq.tail + 4].cast("I")
        self._sq_mask = sqm[sq.ring_mask:sq.ring_mask + 4].cast("I")[0]
        self._sq_array = sqm[sq.array:sq.array + p.sq_entries * 4].cast("I")
        self._cq_head = cqm[cq.head:cq.head + 4].cast("I")
        self._cq_tail = cqm[cq.tail:cq.tail + 4].cast("I")
        self._cq_mask = cqm[cq.ring_mask:cq.ring_mask + 4].cast("I")[0]
        self._cqes = cqm[cq.cqes:cq.cqes + p.cq_entries * CQE_BYTES]
        self._sqes = memoryview(self._sqe_map)
        self._views = [self._sq_head, self._sq_tail, self._sq_array, self._cq_head,
                       self._cq_tail, self._cqes, self._sqes, sqm, cqm]

    # -- submission ---------------------------------------------------------------------------

    def free_slots(self) -> int:
        return self.sq_entries - ((self._sq_tail[0] - self._sq_head[0]) & 0xFFFFFFFF)

    def uring_cmd(self, fd: int, cmd_op: int, cmd: bytes, user_data: int, *, addr: int = 0,
                  length: int = 0) -> None:
        """Queue an IORING_OP_URING_CMD on ``fd`` with ``cmd`` (at most 80 bytes) in the SQE's
        command area; it reaches the kernel with the next :meth:`submit`."""
        if len(cmd) > SQE_CMD_BYTES:
            raise ValueError(f"io_uring: command too long (length={len(cmd)})")
        if not self.free_slots():
            self.submit()  # the kernel consumes what was queued, freeing the slots
            if not self.free_slots():
                raise UringError(errno.EBUSY, "io_uring: submission queue full")
        tail = self._sq_tail[0]
        index = tail & self._sq_mask
        off = index * SQE128_BYTES
        sqes = self._sqes
        _SQE_HEAD.pack_into(sqes, off, IORING_OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr, length,
                            0, user_data)
        # The rest of the SQE (personality, file index, the command area) is zero but for
        # the command: one slice assignment of a prebuilt tail.
        n = len(cmd)
        sqes[off + _SQE_HEAD.size:off + SQE128_BYTES] = \
            _ZERO_TAIL if not n else _ZERO_GAP + cmd + _ZERO_CMD[n:]
        self._sq_array[index] = index
        self._sq_tail[0] = (tail + 1) & 0xFFFFFFFF
        self._unsubmitted += 1

    def submit(self) -> int:
        """Hand every queued SQE to the kernel (it runs uring commands during this call);
        returns how many it took."""
        n = self._unsubmitted
        if not n:
            return 0
        while True:
            r = _libc.syscall(SYS_IO_URING_ENTER, ctypes.c_uint(self.fd), ctypes.c_uint(n),
                              ctypes.c_uint(0), ctypes.c_uint(0), None, ctypes.c_size_t(0))
            if r < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            _check(r, "io_uring_enter")
            self._unsubmitted -= r
            return r

    def wait(self) -> None:
        """Block until one completion is queued (tests and the probe only)."""
        while True:
            r = _libc.syscall(SYS_IO_URING_ENTER, ctypes.c_uint(self.fd), ctypes.c_uint(0),
                              ctypes.c_uint(1), ctypes.c_uint(IORING_ENTER_GETEVENTS), None,
                              ctypes.c_size_t(0))
            if r < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            _check(r, "io_uring_enter")
            return

    # -- completion ---------------------------------------------------------------------------

    def reap(self) -> list[tuple[int, int]]:
        """Every queued completion as (user_data, res), oldest first."""
        head = self._cq_head[0]
        tail = self._cq_tail[0]
        out = []
        while head != tail:
            off = (head & self._cq_mask) * CQE_BYTES
            user_data, res, _flags = _CQE.unpack_from(self._cqes, off)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head[0] = head
        return out

    def close(self) -> None:
        if self.fd < 0:
            return
        for v in self._views:
            v.release()
        self._views = []
        for m in {id(m): m for m in (self._sqe_map, self._cq_map, self._sq_map)}.values():
            m.close()
        os.close(self.fd)
        self.fd = -1


__all__ = ["IORING_OP_URING_CMD", "Ring", "UringError"]
