"""Layer: cowd workers — the channel between the control plane and a worker, sans-I/O.

One stream socketpair per worker carries length-prefixed messages both ways; file descriptors
(a client connection, the files of a disk's chain) travel beside the bytes as SCM_RIGHTS, and
a message says how many it carries.  :func:`encode` turns a message into bytes and the fds
to send with them; a :class:`Decoder` turns received bytes and fds back into messages.  No
I/O and no trio here (the adapters are :mod:`cowd.workers.worker` and :mod:`cowd.workers.host`).

Framing: every message starts with :data:`HEADER` — total length in bytes (header included),
type, the number of fds it carries, and a cookie (a request's id; 0 where none is needed) —
followed by a body whose layout the type fixes.  The data path's messages (remaps, misses,
requests, replies) are packed structs; the rare control messages (a disk's description,
stats) carry a small JSON object.

Invariants: the channel is trusted (both ends are this daemon's own processes), but a length
is still checked against :data:`MAX_MESSAGE_BYTES` before anything is allocated for it, and a
message that does not parse is a :class:`ChannelError` (the adapter drops the worker).  The
fds that arrive are handed out in order; a message whose fds have not arrived is an error
(SCM_RIGHTS delivers them with the first byte of the message that carries them).
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# Every message: total length (u32, header included), type (u16), fds carried (u16), cookie.
HEADER = struct.Struct("<IHHQ")

# The longest message: a request's or a reply's data of the largest NBD request (32 MiB, the
# disk's MAX_REQUEST_BYTES) plus its fixed fields.
MAX_MESSAGE_BYTES = (32 << 20) + 4096
# Remap runs in one REMAPS message (32 B each): priming sends a disk in pieces of this many.
MAX_RUNS_PER_MESSAGE = 16384
# File descriptors one message may carry (a chain's files; kmod's bound is 16).
MAX_FDS = 64

# Remap flags
REMAP_WRITABLE = 1  # DATA the top layer owns: the worker may pwrite it in place

# File index of a ZERO run (reads as zeroes; never writable)
ZERO_FILE = -1

# Who may reach a disk in a worker: the exports of `cowd serve` (its NBD listeners' clients),
# or a device's own channel (a --via nbd socketpair, a file of the FUSE mount).  A connection
# is handed over with its scope and sees the disks of that scope only, as the daemon's own
# two NBD servers do.
SCOPE_SERVE = "serve"
SCOPE_DEVICE = "device"
SCOPES = (SCOPE_SERVE, SCOPE_DEVICE)


class MsgType(enum.IntEnum):
    # control plane -> worker
    DISK = 1  # a disk the worker may serve (+ the chain's fds)
    DISK_GONE = 2  # forget a disk
    CONNECTION = 3  # serve this client (+ its socket)
    REMAPS = 4  # install runs
    INVALIDATE = 5  # drop a range (acknowledge if asked)
    REPLY = 6  # the answer to a MISS or a REQUEST
    STOP = 7  # drain and exit
    STATS_QUERY = 8
    DISK_STATE = 9  # a disk turned read-only (marked corrupt): no more writes in place
    FUSE_SESSION = 10  # serve this clone of the FUSE mount's descriptor (+ the fd)
    RECLAIM = 11  # give back the disk's lent clusters not written yet (before a flush)
    ADOPTED = 12  # another worker's subclusters were adopted: patch the table (ack if asked)
    # worker -> control plane
    MISS = 20
    REQUEST = 21
    INVALIDATED = 22
    RELEASE = 23  # the worker dropped every remap of a disk
    STATS = 24
    FUSE_FORWARD = 25  # a FUSE namespace request for the daemon to answer (REPLY: the reply)
    RECLAIMED = 26  # the answer to RECLAIM: the lent clusters given up (LENT_RUNs)


class Op(enum.IntEnum):
    """What a REQUEST asks the control plane to do with its disk."""

    READ = 1  # ranges the worker could not map (compressed clusters)
    WRITE = 2  # carries the data; allocates, copies up, writes
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 5
    CACHE = 6  # prefetch
    BLOCK_STATUS = 7  # the reply's data: STATUS_RUN records
    PRIME = 8  # send this worker the disk's remaps, as many as its table takes
    LEND = 9  # lend the worker ``length`` free clusters of the top file (reply: LENT_RUNs)
    ADOPT = 10  # the worker wrote lent clusters whole (data: ADOPTIONs): map them
    # The worker wrote whole subclusters (extended L2) at their place in a cluster, the guest
    # cluster's own or a lent one (data: ADOPTIONs, one per guest cluster, each from one or
    # more writes): allocate them there.  The reply's data: a byte per ADOPTION, 1 adopted,
    # 0 refused (the image no longer looks as the worker saw it: it forwards the write).
    ADOPT_UNITS = 11


# REQUEST flags
FLAG_FUA = 1
FLAG_MAY_UNMAP = 2  # WRITE_ZEROES may deallocate

# Bodies of the data path's messages (after the header).
REMAPS_HEAD = struct.Struct("<II")  # disk id, run count
REMAP_RUN = struct.Struct("<QQiIQ")  # guest offset, length, file index, flags, file offset
INVALIDATE_BODY = struct.Struct("<IBxxxQQ")  # disk id, ack wanted, guest offset, length
REPLY_HEAD = struct.Struct("<i")  # errno (0: success); the rest is data or a message
MISS_BODY = struct.Struct("<IQQ")  # disk id, guest offset, length
REQUEST_HEAD = struct.Struct("<IHHQQ")  # disk id, op, flags, guest offset, length; then data
DISK_ID = struct.Struct("<I")
DISK_STATE_HEAD = struct.Struct("<IB")  # disk id, read-only; then the reason (UTF-8)
STATUS_RUN = struct.Struct("<QBxxxxxxx")  # length, 1 if a hole (reads as zeroes)
LENT_RUN = struct.Struct("<QQ")  # file offset, length: lent clusters of the disk's lend_file
ADOPTED_HEAD = struct.Struct("<IBxxx")  # disk id, ack wanted; then ADOPTIONs
ADOPTION = struct.Struct("<QQQ")  # guest offset, length, file offset: written there whole


class ChannelError(Exception):
    """The peer sent something that is not a message of this channel: drop it."""


# ---- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemapRun:
    """``length`` guest bytes from ``guest_offset`` live at ``file_offset`` of the disk's file
    number ``file_index`` (ZERO_FILE: they read as zeroes)."""

    guest_offset: int
    length: int
    file_index: int
    flags: int
    file_offset: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & REMAP_WRITABLE)


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A disk a worker may serve: its export name, geometry, and one writable flag per file of
    the chain (whose fds travel with the message, in the same order)."""

    type: ClassVar[MsgType] = MsgType.DISK
    disk_id: int
    name: str
    path: str
    size: int
    cluster_size: int
    granule: int
    readonly: bool
    files_writable: tuple[bool, ...]
    scope: str = SCOPE_SERVE
    fuse_ino: int = 0  # its inode in the FUSE mount (0: not a FUSE file)
    # The file whose free clusters the control plane lends for first writes (the top
    # layer's, by index), or -1: the disk lends none (not a qcow2 top, read-only, a data
    # file, or a remap granule other than the cluster).
    lend_file: int = -1
    # One flag per file: it is a remote base's cache file (formats/remote/), whose reads the
    # worker counts as cache hits for ``cowd stats`` (empty: none is).
    files_remote: tuple[bool, ...] = ()
    # The subcluster (extended L2) a worker may write itself at its place and have adopted
    # with ADOPT_UNITS, or 0: none (needs lend_file too).
    unit: int = 0
    fds: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class DiskGone:
    type: ClassVar[MsgType] = MsgType.DISK_GONE
    disk_id: int


@dataclass(frozen=True, slots=True)
class DiskState:
    """The disk is now read-only (``reason`` says why, e.g. marked corrupt): the worker
    drops its writable remaps and forwards every write, which the control plane refuses."""

    type: ClassVar[MsgType] = MsgType.DISK_STATE
    disk_id: int
    readonly: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Connection:
    """A client to serve: ``fd`` is its connected socket (the worker owns it from now)."""

    type: ClassVar[MsgType] = MsgType.CONNECTION
    peer: str
    scope: str = SCOPE_SERVE
    fds: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class FuseSession:
    """Serve this clone of the FUSE mount's descriptor (``fds``: the clone) with the mount's
    options (``options``: FuseOptions' fields)."""

    type: ClassVar[MsgType] = MsgType.FUSE_SESSION
    options: dict[str, Any]
    fds: tuple[int, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class FuseForward:
    """A FUSE request that touches no disk data, as read from the device: the daemon, which
    owns the mount's namespace, answers with REPLY(cookie) carrying the reply's bytes (none
    for a request the kernel wants no reply to)."""

    type: ClassVar[MsgType] = MsgType.FUSE_FORWARD
    cookie: int
    request: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Remaps:
    type: ClassVar[MsgType] = MsgType.REMAPS
    disk_id: int
    runs: tuple[RemapRun, ...]


@dataclass(frozen=True, slots=True)
class Invalidate:
    """Drop the remaps of [guest_offset, guest_offset + length); with ``ack``, answer
    INVALIDATED(cookie) once done."""

    type: ClassVar[MsgType] = MsgType.INVALIDATE
    cookie: int
    disk_id: int
    guest_offset: int
    length: int
    ack: bool


@dataclass(frozen=True, slots=True)
class Reply:
    """``errno`` 0: ``data`` is the result (read bytes, STATUS_RUN records, or nothing);
    otherwise ``data`` is the error's message (UTF-8)."""

    type: ClassVar[MsgType] = MsgType.REPLY
    cookie: int
    errno: int
    data: bytes | bytearray | memoryview = b""

    @property
    def message(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Stop:
    type: ClassVar[MsgType] = MsgType.STOP


@dataclass(frozen=True, slots=True)
class StatsQuery:
    type: ClassVar[MsgType] = MsgType.STATS_QUERY
    cookie: int


@dataclass(frozen=True, slots=True)
class Miss:
    """Remaps wanted for [guest_offset, guest_offset + length) of a disk."""

    type: ClassVar[MsgType] = MsgType.MISS
    cookie: int
    disk_id: int
    guest_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Request:
    type: ClassVar[MsgType] = MsgType.REQUEST
    cookie: int
    disk_id: int
    op: Op
    flags: int
    guest_offset: int
    length: int
    data: bytes | bytearray | memoryview = b""


@dataclass(frozen=True, slots=True)
class Adopted:
    """Another worker's ADOPT_UNITS allocated ``runs`` (guest range, file offset of the
    disk's lend_file): where the table holds their granules, they now read and write there
    in place (MappedDisk.apply_adopted); with ``ack``, answer INVALIDATED(cookie) once
    done."""

    type: ClassVar[MsgType] = MsgType.ADOPTED
    cookie: int
    disk_id: int
    runs: tuple[Adoption, ...]
    ack: bool


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Give up the disk's lent clusters not written yet; answer RECLAIMED(cookie) with
    them (the control plane frees them before it flushes: a daemon killed after the flush
    leaves them free, not leaked)."""

    type: ClassVar[MsgType] = MsgType.RECLAIM
    cookie: int
    disk_id: int


@dataclass(frozen=True, slots=True)
class Reclaimed:
    type: ClassVar[MsgType] = MsgType.RECLAIMED
    cookie: int
    runs: tuple[LentRun, ...]


@dataclass(frozen=True, slots=True)
class Invalidated:
    type: ClassVar[MsgType] = MsgType.INVALIDATED
    cookie: int


@dataclass(frozen=True, slots=True)
class Release:
    type: ClassVar[MsgType] = MsgType.RELEASE
    disk_id: int


@dataclass(frozen=True, slots=True)
class Stats:
    type: ClassVar[MsgType] = MsgType.STATS
    cookie: int
    stats: dict[str, Any]


Message = (DiskSpec | DiskGone | DiskState | Connection | FuseSession | Remaps | Invalidate
           | Reply | Stop | StatsQuery | Miss | Request | Invalidated | Release | Stats
           | FuseForward | Reclaim | Reclaimed | Adopted)


# ---- encoding ----------------------------------------------------------------------------------


def _framed(mtype: MsgType, cookie: int, body: bytes | bytearray | memoryview,
            nfds: int = 0, payload: bytes | bytearray | memoryview = b"") -> bytearray:
    """The message: header, ``body``, then ``payload`` (a request's or reply's data), each
    copied once into one buffer (a 1 MiB write forwarded by a worker was copied four times,
    each copy a fresh mapping: cowd/process.py)."""
    start = HEADER.size + len(body)
    total = start + len(payload)
    if total > MAX_MESSAGE_BYTES:
        raise ValueError(f"worker channel: message too long (type={mtype.name}, "
                         f"length={total}, max={MAX_MESSAGE_BYTES})")
    out = bytearray(total)
    HEADER.pack_into(out, 0, total, mtype, nfds, cookie)
    out[HEADER.size:start] = body
    if payload:
        out[start:] = payload
    return out


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode(msg: Message) -> tuple[bytearray, tuple[int, ...]]:
    """The bytes of ``msg`` and the fds to send with its first byte."""
    if isinstance(msg, Remaps):
        if len(msg.runs) > MAX_RUNS_PER_MESSAGE:
            raise ValueError(f"worker channel: too many runs in one message "
                             f"(runs={len(msg.runs)}, max={MAX_RUNS_PER_MESSAGE})")
        packed = bytearray(REMAPS_HEAD.pack(msg.disk_id, len(msg.runs)))
        pack = REMAP_RUN.pack
        for r in msg.runs:
            packed += pack(r.guest_offset, r.length, r.file_index, r.flags, r.file_offset)
        return _framed(MsgType.REMAPS, 0, packed), ()
    if isinstance(msg, Reply):
        return _framed(MsgType.REPLY, msg.cookie, REPLY_HEAD.pack(msg.errno),
                       payload=msg.data), ()
    if isinstance(msg, Miss):
        return _framed(MsgType.MISS, msg.cookie,
                       MISS_BODY.pack(msg.disk_id, msg.guest_offset, msg.length)), ()
    if isinstance(msg, Request):
        head = REQUEST_HEAD.pack(msg.disk_id, msg.op, msg.flags, msg.guest_offset, msg.length)
        return _framed(MsgType.REQUEST, msg.cookie, head, payload=msg.data), ()
    if isinstance(msg, Invalidate):
        body = INVALIDATE_BODY.pack(msg.disk_id, msg.ack, msg.guest_offset, msg.length)
        return _framed(MsgType.INVALIDATE, msg.cookie, body), ()
    if isinstance(msg, Invalidated):
        return _framed(MsgType.INVALIDATED, msg.cookie, b""), ()
    if isinstance(msg, Reclaim):
        return _framed(MsgType.RECLAIM, msg.cookie, DISK_ID.pack(msg.disk_id)), ()
    if isinstance(msg, Adopted):
        body = ADOPTED_HEAD.pack(msg.disk_id, msg.ack) + adoptions(list(msg.runs))
        return _framed(MsgType.ADOPTED, msg.cookie, body), ()
    if isinstance(msg, Reclaimed):
        return _framed(MsgType.RECLAIMED, msg.cookie, lent_runs(list(msg.runs))), ()
    if isinstance(msg, DiskSpec):
        if len(msg.fds) != len(msg.files_writable) or len(msg.fds) > MAX_FDS:
            raise ValueError(f"worker channel: a disk needs one fd per file, at most "
                             f"{MAX_FDS} (fds={len(msg.fds)}, "
                             f"files={len(msg.files_writable)})")
        body = _json({"disk_id": msg.disk_id, "name": msg.name, "path": msg.path,
                      "size": msg.size, "cluster_size": msg.cluster_size,
                      "granule": msg.granule, "readonly": msg.readonly,
                      "files_writable": list(msg.files_writable), "scope": msg.scope,
                      "fuse_ino": msg.fuse_ino, "lend_file": msg.lend_file,
                      "files_remote": list(msg.files_remote), "unit": msg.unit})
        return _framed(MsgType.DISK, 0, body, len(msg.fds)), msg.fds
    if isinstance(msg, DiskGone):
        return _framed(MsgType.DISK_GONE, 0, DISK_ID.pack(msg.disk_id)), ()
    if isinstance(msg, DiskState):
        body = DISK_STATE_HEAD.pack(msg.disk_id, msg.readonly) + msg.reason.encode()
        return _framed(MsgType.DISK_STATE, 0, body), ()
    if isinstance(msg, Release):
        return _framed(MsgType.RELEASE, 0, DISK_ID.pack(msg.disk_id)), ()
    if isinstance(msg, Connection):
        if len(msg.fds) != 1:
            raise ValueError(f"worker channel: a connection carries one fd "
                             f"(fds={len(msg.fds)})")
        return _framed(MsgType.CONNECTION, 0, _json({"peer": msg.peer, "scope": msg.scope}),
                       1), msg.fds
    if isinstance(msg, FuseSession):
        if len(msg.fds) != 1:
            raise ValueError(f"worker channel: a FUSE session carries one fd "
                             f"(fds={len(msg.fds)})")
        return _framed(MsgType.FUSE_SESSION, 0, _json(msg.options), 1), msg.fds
    if isinstance(msg, FuseForward):
        return _framed(MsgType.FUSE_FORWARD, msg.cookie, bytes(msg.request)), ()
    if isinstance(msg, Stats):
        return _framed(MsgType.STATS, msg.cookie, _json(msg.stats)), ()
    if isinstance(msg, StatsQuery):
        return _framed(MsgType.STATS_QUERY, msg.cookie, b""), ()
    if isinstance(msg, Stop):
        return _framed(MsgType.STOP, 0, b""), ()
    raise TypeError(f"not a worker channel message: {msg!r}")


def encode_remaps(disk_id: int, runs: list[RemapRun]) -> list[bytearray]:
    """REMAPS messages for ``runs``, split at MAX_RUNS_PER_MESSAGE."""
    return [encode(Remaps(disk_id, tuple(runs[i:i + MAX_RUNS_PER_MESSAGE])))[0]
            for i in range(0, len(runs), MAX_RUNS_PER_MESSAGE)]


def status_runs(runs: list[tuple[int, bool]]) -> bytes:
    """A BLOCK_STATUS reply's data from (length, is_hole) runs."""
    return b"".join(STATUS_RUN.pack(n, hole) for n, hole in runs)


def parse_status_runs(data: bytes | bytearray | memoryview) -> list[tuple[int, bool]]:
    if len(data) % STATUS_RUN.size:
        raise ChannelError(f"worker channel: block status data is not whole runs "
                           f"(length={len(data)})")
    return [(n, bool(hole)) for n, hole in STATUS_RUN.iter_unpack(data)]


@dataclass(frozen=True, slots=True)
class LentRun:
    """``length`` bytes of free clusters from ``file_offset`` of the disk's lend_file, lent
    to one worker (a LEND reply is a list of them, in file order)."""

    file_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Adoption:
    """Guest bytes [guest_offset, guest_offset + length) were written from ``file_offset``
    of the lend_file onwards: whole clusters into lent clusters (an ADOPT's data), or whole
    subclusters of one cluster at their place (ADOPT_UNITS, ADOPTED)."""

    guest_offset: int
    length: int
    file_offset: int


def lent_runs(runs: list[LentRun]) -> bytes:
    return b"".join(LENT_RUN.pack(r.file_offset, r.length) for r in runs)


def parse_lent_runs(data: bytes | bytearray | memoryview) -> list[LentRun]:
    if len(data) % LENT_RUN.size:
        raise ChannelError(f"worker channel: a LEND reply is not whole runs "
                           f"(length={len(data)})")
    return [LentRun(off, n) for off, n in LENT_RUN.iter_unpack(data)]


def adoptions(runs: list[Adoption]) -> bytes:
    return b"".join(ADOPTION.pack(a.guest_offset, a.length, a.file_offset) for a in runs)


def parse_adoptions(data: bytes | bytearray | memoryview) -> list[Adoption]:
    if len(data) % ADOPTION.size:
        raise ChannelError(f"worker channel: an ADOPT is not whole adoptions "
                           f"(length={len(data)})")
    return [Adoption(g, n, off) for g, n, off in ADOPTION.iter_unpack(data)]


# ---- decoding ----------------------------------------------------------------------------------

NEED_DATA: Literal["NEED_DATA"] = "NEED_DATA"


class Decoder:
    """Bytes and fds in (:meth:`feed`), messages out (:meth:`next_message`)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes | bytearray | memoryview, fds: list[int] | tuple[int, ...] = ()
             ) -> None:
        self._buf += data
        self._fds.extend(fds)

    def pending_fds(self) -> list[int]:
        """The fds received and not yet handed out (the adapter closes them at the end)."""
        out = list(self._fds)
        self._fds.clear()
        return out

    def next_message(self) -> Message | Literal["NEED_DATA"]:
        buf = self._buf
        if len(buf) < HEADER.size:
            return NEED_DATA
        total, mtype, nfds, cookie = HEADER.unpack_from(buf)
        if total < HEADER.size or total > MAX_MESSAGE_BYTES:
            raise ChannelError(f"worker channel: bad message length (length={total})")
        if nfds > MAX_FDS:
            raise ChannelError(f"worker channel: too many fds (fds={nfds})")
        if len(buf) < total:
            return NEED_DATA
        if len(self._fds) < nfds:
            raise ChannelError(f"worker channel: message arrived without its fds "
                               f"(type={mtype}, fds={nfds}, arrived={len(self._fds)})")
        body = memoryview(buf)[HEADER.size:total]
        fds = tuple(self._fds.popleft() for _ in range(nfds))
        try:
            msg = _decode(mtype, cookie, body, fds)
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ChannelError(f"worker channel: malformed message (type={mtype}): {e}") \
                from None
        finally:
            body.release()
        del buf[:total]
        return msg


def _scope(value: object) -> str:
    if value not in SCOPES:
        raise ValueError(f"unknown scope {value!r}")
    return str(value)


def _decode(mtype: int, cookie: int, body: memoryview, fds: tuple[int, ...]) -> Message:
    if mtype == MsgType.REMAPS:
        disk_id, count = REMAPS_HEAD.unpack_from(body)
        if count > MAX_RUNS_PER_MESSAGE or len(body) != REMAPS_HEAD.size + count * REMAP_RUN.size:
            raise ValueError(f"run count does not match the length (runs={count})")
        runs = tuple(RemapRun(*r) for r in REMAP_RUN.iter_unpack(body[REMAPS_HEAD.size:]))
        return Remaps(disk_id, runs)
    if mtype == MsgType.REPLY:
        (err,) = REPLY_HEAD.unpack_from(body)
        return Reply(cookie, err, bytes(body[REPLY_HEAD.size:]))
    if mtype == MsgType.MISS:
        return Miss(cookie, *MISS_BODY.unpack(body))
    if mtype == MsgType.REQUEST:
        disk_id, op, flags, offset, length = REQUEST_HEAD.unpack_from(body)
        return Request(cookie, disk_id, Op(op), flags, offset, length,
                       bytearray(body[REQUEST_HEAD.size:]))
    if mtype == MsgType.INVALIDATE:
        disk_id, ack, offset, length = INVALIDATE_BODY.unpack(body)
        return Invalidate(cookie, disk_id, offset, length, bool(ack))
    if mtype == MsgType.INVALIDATED:
        return Invalidated(cookie)
    if mtype == MsgType.RECLAIM:
        return Reclaim(cookie, *DISK_ID.unpack(body))
    if mtype == MsgType.ADOPTED:
        disk_id, ack = ADOPTED_HEAD.unpack_from(body)
        return Adopted(cookie, disk_id, tuple(parse_adoptions(body[ADOPTED_HEAD.size:])),
                       bool(ack))
    if mtype == MsgType.RECLAIMED:
        return Reclaimed(cookie, tuple(parse_lent_runs(body)))
    if mtype == MsgType.DISK:
        d = json.loads(bytes(body))
        spec = DiskSpec(int(d["disk_id"]), str(d["name"]), str(d["path"]), int(d["size"]),
                        int(d["cluster_size"]), int(d["granule"]), bool(d["readonly"]),
                        tuple(bool(w) for w in d["files_writable"]), _scope(d["scope"]),
                        int(d["fuse_ino"]), int(d["lend_file"]),
                        tuple(bool(r) for r in d.get("files_remote", ())),
                        int(d.get("unit", 0)), fds)
        if len(fds) != len(spec.files_writable):
            raise ValueError(f"a disk needs one fd per file (fds={len(fds)})")
        if spec.files_remote and len(spec.files_remote) != len(fds):
            raise ValueError(f"a disk's remote flags are not one per file "
                             f"(files_remote={len(spec.files_remote)}, fds={len(fds)})")
        if not -1 <= spec.lend_file < len(fds) or \
                (spec.lend_file >= 0 and not spec.files_writable[spec.lend_file]):
            raise ValueError(f"the lending file is not a writable file of the disk "
                             f"(lend_file={spec.lend_file})")
        if spec.unit < 0 or spec.unit & (spec.unit - 1) or \
                (spec.unit and (spec.lend_file < 0 or spec.cluster_size % spec.unit)):
            raise ValueError(f"a disk's subcluster is not a power of two dividing its lent "
                             f"clusters (unit={spec.unit})")
        return spec
    if mtype == MsgType.DISK_GONE:
        return DiskGone(*DISK_ID.unpack(body))
    if mtype == MsgType.DISK_STATE:
        disk_id, readonly = DISK_STATE_HEAD.unpack_from(body)
        return DiskState(disk_id, bool(readonly),
                         bytes(body[DISK_STATE_HEAD.size:]).decode("utf-8", "replace"))
    if mtype == MsgType.RELEASE:
        return Release(*DISK_ID.unpack(body))
    if mtype == MsgType.CONNECTION:
        if len(fds) != 1:
            raise ValueError(f"a connection carries one fd (fds={len(fds)})")
        d = json.loads(bytes(body))
        return Connection(str(d["peer"]), _scope(d["scope"]), fds)
    if mtype == MsgType.FUSE_SESSION:
        if len(fds) != 1:
            raise ValueError(f"a FUSE session carries one fd (fds={len(fds)})")
        options = json.loads(bytes(body))
        if not isinstance(options, dict):
            raise ValueError("FUSE options are not an object")
        return FuseSession(options, fds)
    if mtype == MsgType.FUSE_FORWARD:
        return FuseForward(cookie, bytes(body))
    if mtype == MsgType.STATS:
        stats = json.loads(bytes(body))
        if not isinstance(stats, dict):
            raise ValueError("stats are not an object")
        return Stats(cookie, stats)
    if mtype == MsgType.STATS_QUERY:
        return StatsQuery(cookie)
    if mtype == MsgType.STOP:
        return Stop()
    raise ValueError(f"unknown message type {mtype}")


__all__ = [
    "FLAG_FUA", "FLAG_MAY_UNMAP", "MAX_MESSAGE_BYTES", "MAX_RUNS_PER_MESSAGE", "NEED_DATA",
    "REMAP_WRITABLE", "SCOPES", "SCOPE_DEVICE", "SCOPE_SERVE", "ZERO_FILE", "Adopted", "Adoption",
    "ChannelError", "Connection", "Decoder", "DiskGone", "DiskSpec", "DiskState",
    "FuseForward", "FuseSession", "Invalidate", "Invalidated", "LentRun", "Message", "Miss",
    "MsgType", "Op", "Reclaim", "Reclaimed", "Release", "RemapRun", "Remaps", "Reply",
    "Request", "Stats", "StatsQuery", "Stop", "adoptions", "encode", "encode_remaps",
    "lent_runs", "parse_adoptions", "parse_lent_runs", "parse_status_runs", "status_runs",
]
