"""Layer: the kernel shim's ABI, mirrored from ``kmod/cowd_uapi.h`` (no I/O here).

The header is the whole ABI; this module restates it for the daemon: ioctl argument structs as
``ctypes`` structures (so ``fcntl.ioctl`` can fill them in place) and channel messages as
``struct.Struct`` codecs (the channel moves many small messages; ``struct`` is the fast way).
``tests/test_kmod_abi.py`` compiles a C program against the header and checks every size,
offset, constant and ioctl number here against what the C compiler says.
"""

from __future__ import annotations

import ctypes
import struct

ABI_VERSION = 1
CTL_PATH = "/dev/cowd-ctl"
DISK_NAME = "cowd"

MAX_FILES = 64
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_ENTRIES = 4
MAX_ENTRIES = 1 << 22
MAX_QUEUE_DEPTH = 1024
MAX_DATA_BYTES = 1 << 20
MAX_TIMEOUT_MS = 24 * 3600 * 1000

FEAT_TAKEOVER = 1 << 0
FEAT_DATA_REPLY = 1 << 1
FEAT_DISCARD = 1 << 2
FEATURES = FEAT_TAKEOVER | FEAT_DATA_REPLY | FEAT_DISCARD

CREATE_READONLY = 1 << 0
FILE_WRITABLE = 1 << 0
REMOVE_FORCE = 1 << 0

OP_READ = 0
OP_WRITE = 1
OP_FLUSH = 2
OP_DISCARD = 3
OP_WRITE_ZEROES = 4
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush", OP_DISCARD: "discard",
            OP_WRITE_ZEROES: "write_zeroes"}

MSG_MISS = 1
MSG_REMAP = 2
MSG_INVALIDATE = 3
MSG_REPLY = 4

REMAP_WRITABLE = 1 << 0
REMAP_ZERO = 1 << 1

REPLY_DONE = 0
REPLY_RETRY = 1
REPLY_DATA = 2

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_s32 = ctypes.c_int32


class Version(ctypes.Structure):
    _fields_ = [("size", _u32), ("version", _u32), ("abi_version", _u32), ("reserved0", _u32),
                ("features", _u64), ("module_version", ctypes.c_char * 32),
                ("reserved", _u64 * 4)]


class Create(ctypes.Structure):
    _fields_ = [("size", _u32), ("version", _u32), ("flags", _u64), ("disk_size", _u64),
                ("logical_block_size", _u32), ("cluster_bits", _u32), ("max_entries", _u32),
                ("queue_depth", _u32), ("daemon_timeout_ms", _u32), ("nr_files", _u32),
                ("fds", _s32 * MAX_FILES), ("file_flags", _u32 * MAX_FILES),
                ("index", _u32), ("channel_fd", _s32), ("reserved", _u64 * 4)]


class Remove(ctypes.Structure):
    _fields_ = [("size", _u32), ("version", _u32), ("index", _u32), ("flags", _u32),
                ("reserved", _u64 * 2)]


class Reopen(ctypes.Structure):
    _fields_ = [("size", _u32), ("version", _u32), ("index", _u32), ("flags", _u32),
                ("channel_fd", _s32), ("reserved0", _u32), ("disk_size", _u64),
                ("cluster_bits", _u32), ("nr_files", _u32), ("reserved", _u64 * 2)]


STATS_FIELDS = ("hits", "misses", "coalesced", "retries", "expiries", "pushes",
                "invalidations", "entries", "max_entries", "data_replies", "mapped_read_bytes",
                "mapped_write_bytes", "errors", "pending", "takeovers")


class Stats(ctypes.Structure):
    _fields_ = ([("size", _u32), ("version", _u32)] + [(n, _u64) for n in STATS_FIELDS]
                + [("reserved", _u64 * 8)])


def _ioc_rw(nr: int, size: int) -> int:
    """Linux _IOWR('C', nr, size) on x86 and arm64 (dir bits 30-31, size 16-29)."""
    return (3 << 30) | (size << 16) | (ord("C") << 8) | nr


CTL_VERSION = _ioc_rw(0x00, ctypes.sizeof(Version))
CTL_CREATE = _ioc_rw(0x01, ctypes.sizeof(Create))
CTL_REMOVE = _ioc_rw(0x02, ctypes.sizeof(Remove))
CTL_REOPEN = _ioc_rw(0x03, ctypes.sizeof(Reopen))
CHAN_STATS = _ioc_rw(0x10, ctypes.sizeof(Stats))

# Channel messages: header (size, type, version), then the body.
HDR = struct.Struct("<IHH")
# cowd_miss: hdr, cookie, op, flags, offset, length
MISS = struct.Struct("<IHHQIIQQ")
# cowd_remap: hdr, file, flags, guest_offset, length, file_offset
REMAP = struct.Struct("<IHHIIQQQ")
# cowd_invalidate: hdr, reserved0, reserved1, guest_offset, length
INVALIDATE = struct.Struct("<IHHIIQQ")
# cowd_reply: hdr, cookie, result, reserved0 (then the payload)
REPLY = struct.Struct("<IHHQiI")


def pack_remap(file: int, flags: int, guest_offset: int, length: int, file_offset: int) -> bytes:
    return REMAP.pack(REMAP.size, MSG_REMAP, ABI_VERSION, file, flags, guest_offset, length,
                      file_offset)


def pack_invalidate(guest_offset: int, length: int) -> bytes:
    return INVALIDATE.pack(INVALIDATE.size, MSG_INVALIDATE, ABI_VERSION, 0, 0, guest_offset,
                           length)


def pack_reply(cookie: int, result: int, payload_bytes: int = 0) -> bytes:
    """The reply header; ``payload_bytes`` of data follow it for REPLY_DATA."""
    return REPLY.pack(REPLY.size + payload_bytes, MSG_REPLY, ABI_VERSION, cookie, result, 0)


def unpack_misses(buf: bytes | memoryview) -> list[tuple[int, int, int, int]]:
    """``(cookie, op, offset, length)`` of each miss read from the channel."""
    out = []
    for size, mtype, version, cookie, op, _flags, offset, length in MISS.iter_unpack(buf):
        if size != MISS.size or mtype != MSG_MISS or version != ABI_VERSION:
            raise ValueError(f"channel: unexpected message (size={size}, type={mtype}, "
                             f"version={version})")
        out.append((cookie, op, offset, length))
    return out
