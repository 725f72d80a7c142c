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
from typing import NamedTuple

ABI_VERSION = 2
ABI_MIN_VERSION = 1
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
MAX_POOL_CLUSTERS = 1 << 16
MAX_POOL_RUNS = 4096
MIN_TOUCH_BITS = 12
MAX_TOUCH_BITS = 26
MAX_TOUCH_GRANULES = 1 << 24
MAX_TOUCHES = 1 << 15
TOUCH_QUEUE = 4096

FEAT_TAKEOVER = 1 << 0
FEAT_DATA_REPLY = 1 << 1
FEAT_DISCARD = 1 << 2
FEAT_POOL = 1 << 3
FEAT_TOUCH = 1 << 4
FEATURES_V1 = FEAT_TAKEOVER | FEAT_DATA_REPLY | FEAT_DISCARD
FEATURES = FEATURES_V1 | FEAT_POOL | FEAT_TOUCH

CREATE_READONLY = 1 << 0
CREATE_TOUCH = 1 << 1
REOPEN_TOUCH = 1 << 0
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
MSG_GRANT = 5
MSG_ALLOC = 6
MSG_ACK = 7
MSG_REVOKE = 8
MSG_REVOKED = 9
MSG_TOUCH = 10
MSG_TOUCH_STOP = 11

REMAP_WRITABLE = 1 << 0
REMAP_ZERO = 1 << 1

REPLY_DONE = 0
REPLY_RETRY = 1
REPLY_DATA = 2

TOUCH_END = 1 << 0

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
                ("index", _u32), ("channel_fd", _s32), ("touch_file", _u32),
                ("touch_bits", _u32), ("reserved", _u64 * 3)]


class Remove(ctypes.Structure):
    _fields_ = [("size", _u32), ("version", _u32), ("index", _u32), ("flags", _u32),
                ("reserved", _u64 * 2)]


class Reopen(ctypes.Structure):
    _fields_ = [("size", _u32), ("version", _u32), ("index", _u32), ("flags", _u32),
                ("channel_fd", _s32), ("reserved0", _u32), ("disk_size", _u64),
                ("cluster_bits", _u32), ("nr_files", _u32), ("touch_file", _u32),
                ("touch_bits", _u32), ("reserved", _u64 * 1)]


STATS_FIELDS = ("hits", "misses", "coalesced", "retries", "expiries", "pushes",
                "invalidations", "entries", "max_entries", "data_replies", "mapped_read_bytes",
                "mapped_write_bytes", "errors", "pending", "takeovers",
                # v2: the allocation pool
                "pool_clusters", "pool_grants", "pool_allocs", "pool_fallbacks", "alloc_msgs",
                "unacked", "held")


class Stats(ctypes.Structure):
    _fields_ = ([("size", _u32), ("version", _u32)] + [(n, _u64) for n in STATS_FIELDS]
                + [("reserved", _u64 * 1)])


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
# v2, the allocation pool.  cowd_grant: hdr, file, flags, file_offset, length
GRANT = struct.Struct("<IHHIIQQ")
# cowd_alloc: hdr, seq, file, pool_left, guest_offset, length, file_offset
ALLOC = struct.Struct("<IHHQIIQQQ")
# cowd_ack: hdr, seq, reserved0
ACK = struct.Struct("<IHHQQ")
# cowd_revoke: hdr, cookie, reserved0
REVOKE = struct.Struct("<IHHQQ")
# cowd_revoked: hdr, cookie, dropped, seq
REVOKED = struct.Struct("<IHHQQQ")
# v2, boot-trace recording.  cowd_touch: hdr, count, flags, deferred (then count records)
TOUCH = struct.Struct("<IHHIIQ")
# cowd_touch_rec: t_ns, file_offset, length, reserved0
TOUCH_REC = struct.Struct("<QQII")
# cowd_touch_stop: hdr, reserved0
TOUCH_STOP = struct.Struct("<IHHQ")
# The most bytes of TOUCH one read() returns (the kernel's COWD_TOUCH_BATCH records).
TOUCH_BATCH = 256
TOUCH_READ_BYTES = TOUCH.size + TOUCH_BATCH * TOUCH_REC.size

# Every pack_* takes the version the channel speaks (its CREATE's or REOPEN's).


def pack_remap(file: int, flags: int, guest_offset: int, length: int, file_offset: int,
               version: int = ABI_VERSION) -> bytes:
    return REMAP.pack(REMAP.size, MSG_REMAP, version, file, flags, guest_offset, length,
                      file_offset)


def pack_invalidate(guest_offset: int, length: int, version: int = ABI_VERSION) -> bytes:
    return INVALIDATE.pack(INVALIDATE.size, MSG_INVALIDATE, version, 0, 0, guest_offset,
                           length)


def pack_reply(cookie: int, result: int, payload_bytes: int = 0,
               version: int = ABI_VERSION) -> bytes:
    """The reply header; ``payload_bytes`` of data follow it for REPLY_DATA."""
    return REPLY.pack(REPLY.size + payload_bytes, MSG_REPLY, version, cookie, result, 0)


def pack_grant(file: int, file_offset: int, length: int) -> bytes:
    return GRANT.pack(GRANT.size, MSG_GRANT, 2, file, 0, file_offset, length)


def pack_ack(seq: int) -> bytes:
    return ACK.pack(ACK.size, MSG_ACK, 2, seq, 0)


def pack_revoke(cookie: int) -> bytes:
    return REVOKE.pack(REVOKE.size, MSG_REVOKE, 2, cookie, 0)


def pack_touch_stop() -> bytes:
    return TOUCH_STOP.pack(TOUCH_STOP.size, MSG_TOUCH_STOP, 2, 0)


class Miss(NamedTuple):
    cookie: int
    op: int
    offset: int
    length: int


class Alloc(NamedTuple):
    """Guest clusters [guest_offset, +length) now live at file_offset of file ``file``."""

    seq: int
    file: int
    pool_left: int
    guest_offset: int
    length: int
    file_offset: int


class Revoked(NamedTuple):
    cookie: int
    dropped: int
    seq: int


class Touch(NamedTuple):
    """First mapped reads of the traced file: ``[t_ns, file_offset, length]`` each, in
    first-touch order (the shape ``BootTrace.note_worker`` takes)."""

    records: list[list[int]]
    deferred: int  # first reads the kernel's full queue left for their next read
    end: bool  # the kernel stopped recording (its bound): nothing follows


Message = Miss | Alloc | Revoked | Touch


def _unpack_touch(view: memoryview, pos: int, size: int) -> Touch:
    _size, _type, _version, count, flags, deferred = TOUCH.unpack_from(view, pos)
    if size != TOUCH.size + count * TOUCH_REC.size or flags & ~TOUCH_END:
        raise ValueError(f"channel: malformed TOUCH (size={size}, count={count}, "
                         f"flags={flags:#x})")
    records = []
    for t_ns, file_offset, length, reserved in TOUCH_REC.iter_unpack(
            view[pos + TOUCH.size:pos + size]):
        if reserved:
            raise ValueError(f"channel: TOUCH record with a reserved field set "
                             f"(reserved0={reserved})")
        records.append([t_ns, file_offset, length])
    return Touch(records, deferred, bool(flags & TOUCH_END))


def unpack_messages(buf: bytes | memoryview, version: int = ABI_VERSION) -> list[Message]:
    """The messages of one read() of the channel, in order (whole messages only)."""
    out: list[Message] = []
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        if len(view) - pos < HDR.size:
            raise ValueError(f"channel: truncated message header (bytes={len(view) - pos})")
        size, mtype, mversion = HDR.unpack_from(view, pos)
        codec = {MSG_MISS: MISS, MSG_ALLOC: ALLOC, MSG_REVOKED: REVOKED,
                 MSG_TOUCH: TOUCH}.get(mtype)
        if codec is None or (size != codec.size and mtype != MSG_TOUCH) or \
                size < codec.size or mversion != version or \
                pos + size > len(view) or (mtype != MSG_MISS and version < 2):
            raise ValueError(f"channel: unexpected message (size={size}, type={mtype}, "
                             f"version={mversion})")
        if mtype == MSG_TOUCH:
            out.append(_unpack_touch(view, pos, size))
            pos += size
            continue
        fields = codec.unpack_from(view, pos)[3:]
        if mtype == MSG_MISS:
            cookie, op, _flags, offset, length = fields
            out.append(Miss(cookie, op, offset, length))
        elif mtype == MSG_ALLOC:
            out.append(Alloc(*fields))
        else:
            out.append(Revoked(*fields))
        pos += size
    return out


def unpack_misses(buf: bytes | memoryview, version: int = ABI_VERSION
                  ) -> list[tuple[int, int, int, int]]:
    """``(cookie, op, offset, length)`` of each miss read from a channel that sends nothing
    else (a version-1 channel, or one never granted a pool)."""
    out = []
    for m in unpack_messages(buf, version):
        if not isinstance(m, Miss):
            raise ValueError(f"channel: unexpected message ({type(m).__name__})")
        out.append((m.cookie, m.op, m.offset, m.length))
    return out
