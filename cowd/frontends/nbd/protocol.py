"""Layer: cowd frontends — the NBD wire protocol, server side, sans-I/O.

Bytes in, events out; events in, bytes out (python-hyper/h11 style).  This module never
touches a socket, a thread or trio: the adapter around it feeds what it read with
:meth:`ServerConnection.receive_data`, pulls events with :meth:`ServerConnection.next_event`
until :data:`NEED_DATA`, sends whatever :meth:`ServerConnection.data_to_send` returns (the
handshake and option replies), and answers each :class:`Request` with the bytes that the reply
builders return.  Numbers and names follow the NBD protocol document (NetworkBlockDevice/nbd,
``doc/proto.md``); wire constants keep the spec's names.

What is supported: the fixed newstyle handshake (``NBD_FLAG_FIXED_NEWSTYLE`` and
``NBD_FLAG_NO_ZEROES``), the options ``NBD_OPT_EXPORT_NAME``, ``ABORT``, ``LIST``, ``STARTTLS``
(always refused: NOTLS mode), ``INFO``, ``GO``, ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT``
and ``SET_META_CONTEXT`` (the one context ``base:allocation``); every other option is answered
``NBD_REP_ERR_UNSUP`` and negotiation goes on.  In transmission: every command of the spec's
base protocol plus ``CACHE``, ``WRITE_ZEROES`` (with ``NO_HOLE``/``FAST_ZERO``) and
``BLOCK_STATUS``; simple and structured replies.  Extended headers are not offered.

Invariants
----------
- Every length the peer controls is checked against a named limit *before* anything is
  allocated for it: option payloads (:data:`NBD_MAX_OPTION_LENGTH`), strings
  (:data:`NBD_MAX_STRING`), meta context query counts (:data:`NBD_MAX_META_QUERIES`), write
  payloads (:data:`NBD_MAX_WRITE_BYTES`).  A 4 GiB length never makes us buffer 4 GiB.
- The receive buffer never holds more than :data:`RECEIVE_BUFFER_LIMIT` bytes, and the one
  pending write payload is at most :data:`NBD_MAX_WRITE_BYTES`: one maximal message plus a
  small slack.  :attr:`ServerConnection.buffered_bytes` tells the current figure.  A caller
  that feeds more than that without draining events gets :class:`NbdUsageError` (its bug),
  so the adapter should read at most :data:`RECEIVE_CHUNK_BYTES` per call and drain events
  between reads.
- Events depend only on the byte stream, never on how it was chunked: the same bytes fed
  whole or one byte at a time produce the same events and the same output bytes.
- A :class:`Request` is always complete: a ``WRITE`` event carries its whole payload, or, if
  the request was refused, its payload was read and discarded without being stored.
- The transmission-phase reply builders are pure functions of their arguments and of the
  negotiated state; they never mutate the connection, so concurrent tasks may call them.

Error policy (what the caller must do)
--------------------------------------
- :class:`NbdProtocolError` from :meth:`~ServerConnection.next_event`: the peer broke a MUST
  that leaves the stream unparseable (bad magic, unknown client flags, an export name that
  ``NBD_OPT_EXPORT_NAME`` cannot refuse, a write payload too large to read).  Send what
  :meth:`~ServerConnection.data_to_send` still holds (a best-effort error reply), then close.
- A :class:`Request` whose ``error`` is nonzero: answer it with :meth:`error_reply` and go
  on.  Unknown commands and flags, ranges past the end (``NBD_EINVAL``, or ``NBD_ENOSPC`` for
  writes), writes to a read-only export (``NBD_EPERM``), unnegotiated commands, misaligned or
  oversized lengths all land here.
- Option problems never end negotiation (the spec requires the server to keep answering):
  they become error replies and an :class:`OptionHandled` event.

Theory of operation
-------------------
The connection is a small state machine.  ``HANDSHAKE`` waits for the 4-byte client flags;
``OPTIONS`` parses one option header (16 bytes) and, if its length is within
:data:`NBD_MAX_OPTION_LENGTH`, waits for and parses the whole option.  Options whose payload
we would ignore anyway (unknown options) or refuse (too long) are not buffered: the state
``OPTION_DISCARD`` counts their bytes down as they arrive and only then replies, which keeps
the stream in step with the client.  An option longer than :data:`NBD_MAX_OPTION_DISCARD`
is not worth reading at all (the spec lets a server hard-disconnect a client it deems a
denial of service): we queue ``NBD_REP_ERR_TOO_BIG`` and raise :class:`NbdProtocolError`.

``TRANSMISSION`` parses 28-byte request headers.  A ``WRITE`` header is validated first;
if valid, exactly ``length`` bytes are allocated once and ``receive_data`` copies the
incoming bytes straight into that buffer (state ``WRITE_PAYLOAD``), so the event hands the
caller the buffer without a second copy.  If the write is refused, its payload is counted
down without being stored (``WRITE_DISCARD``) and the event carries the error.  A write
longer than :data:`NBD_MAX_WRITE_BYTES` (2^25, the size the spec says a server must not
treat as a denial of service) is a protocol error: we advertise a maximum block size no
larger than that, and reading and discarding up to 4 GiB per request would let one client
occupy the connection for as long as it likes; the spec allows a hard disconnect here.

Incoming bytes that belong to a pending payload or discard are consumed eagerly by
``receive_data``; all other bytes are appended to the receive buffer and parsed lazily by
``next_event``.  Because a payload is only entered from ``next_event`` after moving what the
buffer already held into it, "payload incomplete" implies "receive buffer empty", which is
what makes the eager copy safe and the result independent of chunking.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

# --------------------------------------------------------------------------------------------
# Wire constants (names as in the NBD protocol document)
# --------------------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", also INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9  # magic of every option reply
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server, 16 bits)
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
# Client flags (32 bits)
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# Transmission flags (16 bits)
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11  # not offered: answered NBD_REP_ERR_UNSUP

# Option reply types
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9

# NBD_REP_INFO information types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# Command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Structured replies
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values (the spec fixes them; they happen to equal Linux errno numbers)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# base:allocation status flags
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"
# The metadata context id we hand out for base:allocation (ids are ours to choose and
# transient; 0 is avoided so a client that wrongly treats 0 as "none" still works).
BASE_ALLOCATION_ID = 1

# --------------------------------------------------------------------------------------------
# Limits: every peer-controlled length is checked against one of these before allocation
# --------------------------------------------------------------------------------------------

# The spec: strings (export names, descriptions, error messages, context names) MUST be no
# longer than 4096 bytes.
NBD_MAX_STRING = 4096
# Largest option payload we buffer and parse.  The biggest legitimate option is a meta
# context request: a name and a few queries, each <= NBD_MAX_STRING; 64 KiB leaves room for
# NBD_MAX_META_QUERIES short queries.
NBD_MAX_OPTION_LENGTH = 64 << 10
# An option longer than NBD_MAX_OPTION_LENGTH (or unknown) is read and discarded, without
# storing it, up to this many bytes, then refused and negotiation goes on.  Past this we
# reply NBD_REP_ERR_TOO_BIG and drop the client: reading 4 GiB to stay in step is a denial
# of service the spec lets a server refuse.
NBD_MAX_OPTION_DISCARD = 1 << 20
# Options per connection before negotiation is deemed a denial of service (a real client
# sends fewer than ten; `nbdinfo --list` sends a few per export).
NBD_MAX_OPTIONS = 4096
# Meta context queries per LIST/SET_META_CONTEXT; more is answered NBD_REP_ERR_TOO_BIG.
NBD_MAX_META_QUERIES = 128
# Largest write payload we read (2^25: the spec says a length below this SHOULD NOT be
# deemed a denial of service, and it is the maximum block size we advertise by default).
# A longer write is a protocol error (see "Theory of operation").
NBD_MAX_WRITE_BYTES = 32 << 20
# Default block size constraints (the spec's defaults for min and preferred).
DEFAULT_MIN_BLOCK_BYTES = 1
DEFAULT_PREFERRED_BLOCK_BYTES = 4096
# Largest length one block status descriptor may carry: a u32 that stays a multiple of any
# legal minimum block size (<= 2^16).
MAX_DESCRIPTOR_BYTES = (1 << 32) - (1 << 16)
# Descriptors in one block status chunk (8 bytes each: at most 512 KiB per reply); the
# spec lets the server return fewer than would cover the request.
MAX_BLOCK_STATUS_DESCRIPTORS = 1 << 16

# Sizes of the fixed headers
HANDSHAKE_SIZE = 18  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
REQUEST_HEADER_SIZE = 28
SIMPLE_REPLY_SIZE = 16
STRUCTURED_HEADER_SIZE = 20
EXPORT_NAME_PADDING = 124  # zeroes after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES

# How much an adapter should read per receive call, and the slack the receive buffer allows
# on top of the largest incomplete message it must hold.
RECEIVE_CHUNK_BYTES = 256 << 10
RECEIVE_SLACK_BYTES = 1 << 20
RECEIVE_BUFFER_LIMIT = OPTION_HEADER_SIZE + NBD_MAX_OPTION_LENGTH + RECEIVE_SLACK_BYTES
# The whole bound: one pending write payload plus the receive buffer.
MAX_BUFFERED_BYTES = NBD_MAX_WRITE_BYTES + RECEIVE_BUFFER_LIMIT

_U32_MAX = 0xFFFFFFFF

_HANDSHAKE = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_HEADER = struct.Struct(">IHHQI")
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
_OFFSET_HOLE = struct.Struct(">IHHQIQI")
_ERROR_HEAD = struct.Struct(">IH")
_DESCRIPTOR = struct.Struct(">II")

OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}
COMMAND_NAMES = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
    NBD_CMD_CACHE: "NBD_CMD_CACHE",
    NBD_CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
}

# Options this server implements; anything else is NBD_REP_ERR_UNSUP.
_IMPLEMENTED_OPTIONS = frozenset({
    NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_INFO,
    NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT,
})


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class NbdProtocolError(Exception):
    """The peer broke the protocol so that the stream cannot go on: drop the connection.

    The message reads ``<subject>: <what is wrong> (<field>=<value>)``.
    """

    def __init__(self, subject: str, what: str, field: str | None = None,
                 value: object = None):
        self.subject = subject
        self.what = what
        self.field = field
        self.value = value
        msg = f"{subject}: {what}"
        if field is not None:
            if isinstance(value, int) and not isinstance(value, bool) and value > 4096:
                shown = hex(value)
            elif isinstance(value, str | bytes):
                shown = repr(value if len(value) <= 64 else value[:64])
            else:
                shown = str(value)
            msg += f" ({field}={shown})"
        super().__init__(msg)


class NbdUsageError(RuntimeError):
    """The caller misused the connection object (a bug in the adapter, not the peer)."""


def nbd_error(os_errno: int) -> int:
    """Map an OS errno to the NBD error value to put on the wire.

    The spec fixes eight values; the rest are folded where it says so (``EDQUOT``/``EFBIG``
    are ``NBD_ENOSPC``) or where the meaning is the same (``EACCES``/``EROFS`` forbid the
    operation), and anything else is reported as ``NBD_EIO``.
    """
    return _ERRNO_MAP.get(os_errno, NBD_EIO)


_ERRNO_MAP = {
    errno_mod.EPERM: NBD_EPERM,
    errno_mod.EACCES: NBD_EPERM,
    errno_mod.EROFS: NBD_EPERM,
    errno_mod.EIO: NBD_EIO,
    errno_mod.ENOMEM: NBD_ENOMEM,
    errno_mod.EINVAL: NBD_EINVAL,
    errno_mod.ENOSPC: NBD_ENOSPC,
    errno_mod.EDQUOT: NBD_ENOSPC,
    errno_mod.EFBIG: NBD_ENOSPC,
    errno_mod.EOVERFLOW: NBD_EOVERFLOW,
    errno_mod.ENOTSUP: NBD_ENOTSUP,
    errno_mod.EOPNOTSUPP: NBD_ENOTSUP,
    errno_mod.ESHUTDOWN: NBD_ESHUTDOWN,
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server tells a client about one export, and what it lets the client do."""

    name: str
    size_bytes: int
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_write_zeroes: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    rotational: bool = False
    description: str = ""
    min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES
    preferred_block_bytes: int = DEFAULT_PREFERRED_BLOCK_BYTES
    max_block_bytes: int = NBD_MAX_WRITE_BYTES

    def __post_init__(self) -> None:
        def bad(what: str, value: object) -> ValueError:
            return ValueError(f"export {self.name!r}: {what} ({value})")

        for label, text in (("name", self.name), ("description", self.description)):
            raw = text.encode("utf-8")
            if len(raw) > NBD_MAX_STRING or "\0" in text:
                raise bad(f"{label} longer than {NBD_MAX_STRING} bytes or contains NUL",
                          len(raw))
        if not 0 <= self.size_bytes < 1 << 63:
            raise bad("size out of range", self.size_bytes)
        mn, pref, mx = self.min_block_bytes, self.preferred_block_bytes, self.max_block_bytes
        # The spec's rules for NBD_INFO_BLOCK_SIZE, plus our own cap on write payloads.
        if not _is_pow2(mn) or mn > 1 << 16:
            raise bad("minimum block size must be a power of 2 <= 65536", mn)
        if not _is_pow2(pref) or pref < max(mn, 512):
            raise bad("preferred block size must be a power of 2 >= max(min, 512)", pref)
        if mx % mn or mx < min(pref, self.size_bytes) or mx > NBD_MAX_WRITE_BYTES:
            raise bad(f"maximum block size must be a multiple of the minimum, >= "
                      f"min(preferred, size) and <= {NBD_MAX_WRITE_BYTES}", mx)

    def transmission_flags(self, structured: bool) -> int:
        """The 16-bit transmission flags for a client that did (not) negotiate structured
        replies.  Write-like features are not advertised on a read-only export."""
        flags = NBD_FLAG_HAS_FLAGS
        if self.read_only:
            flags |= NBD_FLAG_READ_ONLY
        else:
            if self.can_trim:
                flags |= NBD_FLAG_SEND_TRIM
            if self.can_write_zeroes:
                flags |= NBD_FLAG_SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= NBD_FLAG_SEND_FAST_ZERO
        if self.can_flush:
            flags |= NBD_FLAG_SEND_FLUSH
        if self.can_fua:
            flags |= NBD_FLAG_SEND_FUA
        if self.rotational:
            flags |= NBD_FLAG_ROTATIONAL
        if structured:
            flags |= NBD_FLAG_SEND_DF
        if self.can_multi_conn:
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if self.can_cache:
            flags |= NBD_FLAG_SEND_CACHE
        return flags


ExportLookup = Callable[[str], ExportInfo | None]
ExportSource = Mapping[str, ExportInfo] | ExportLookup


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA
"""Returned by :meth:`ServerConnection.next_event` when more bytes are needed."""


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered and negotiation goes on (``reply`` is the final reply type)."""

    option: int
    reply: int
    export_name: str | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class NegotiationDone:
    """Option haggling ended (``NBD_OPT_GO`` acknowledged, or ``NBD_OPT_EXPORT_NAME``).

    ``meta_contexts`` maps the metadata context ids valid for ``NBD_CMD_BLOCK_STATUS`` to
    their names (empty unless ``base:allocation`` was selected for this very export).
    """

    export: ExportInfo
    structured: bool
    meta_contexts: Mapping[int, str]
    transmission_flags: int
    via: int  # NBD_OPT_GO or NBD_OPT_EXPORT_NAME
    block_size_requested: bool  # the client promised to honour NBD_INFO_BLOCK_SIZE


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent ``NBD_OPT_ABORT``; the ACK is queued.  Send it, then close."""


@dataclass(slots=True)
class Request:
    """One transmission request.  ``error`` nonzero: refuse it with that NBD error value.

    ``data`` is the whole payload of an accepted ``NBD_CMD_WRITE`` (a buffer handed over to
    the caller, not copied again) and ``None`` otherwise.
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    error: int = 0
    data: bytearray | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)

    @property
    def command_name(self) -> str:
        return COMMAND_NAMES.get(self.command, f"NBD_CMD_{self.command}")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """``NBD_CMD_DISC``: finish the requests in flight, then close.  No reply is sent."""

    cookie: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side at a message boundary (or after DISC/ABORT)."""


Event = OptionHandled | NegotiationDone | Aborted | Request | Disconnect | ConnectionClosed


# --------------------------------------------------------------------------------------------
# Reply builders (pure functions; the connection's methods pick among them)
# --------------------------------------------------------------------------------------------


def encode_string(text: str, limit: int = NBD_MAX_STRING) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``limit`` bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header.  For a successful simple READ the data follows it."""
    return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def structured_chunk(cookie: int, reply_type: int, payload: bytes = b"", *,
                     done: bool) -> bytes:
    """A complete structured reply chunk (header and payload)."""
    if len(payload) > _U32_MAX:
        raise ValueError(f"structured chunk payload too long ({len(payload)})")
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _STRUCTURED_HEADER.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie,
                                   len(payload)) + payload


def offset_data_header(cookie: int, offset: int, data_length: int, *, done: bool) -> bytes:
    """Header (28 bytes) of an ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk: the caller sends the
    ``data_length`` bytes of data right after it, from its own buffer (no copy here)."""
    if not 1 <= data_length <= _U32_MAX - 8:
        raise ValueError(f"OFFSET_DATA length must be 1..2^32-9 ({data_length})")
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _OFFSET_DATA_HEADER.pack(NBD_STRUCTURED_REPLY_MAGIC, flags,
                                    NBD_REPLY_TYPE_OFFSET_DATA, cookie, data_length + 8, offset)


def offset_hole_chunk(cookie: int, offset: int, hole_length: int, *, done: bool) -> bytes:
    """An ``NBD_REPLY_TYPE_OFFSET_HOLE`` chunk: ``hole_length`` bytes at ``offset`` read as
    zeroes."""
    if not 1 <= hole_length <= _U32_MAX:
        raise ValueError(f"OFFSET_HOLE length must be 1..2^32-1 ({hole_length})")
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _OFFSET_HOLE.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_OFFSET_HOLE,
                             cookie, 12, offset, hole_length)


def none_chunk(cookie: int) -> bytes:
    """The final ``NBD_REPLY_TYPE_NONE`` chunk (always with ``NBD_REPLY_FLAG_DONE``)."""
    return structured_chunk(cookie, NBD_REPLY_TYPE_NONE, done=True)


def error_chunk(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    """An ``NBD_REPLY_TYPE_ERROR`` chunk with an optional human-readable message."""
    if not 0 < error <= _U32_MAX:
        raise ValueError(f"error chunk needs a nonzero error ({error})")
    msg = encode_string(message)
    return structured_chunk(cookie, NBD_REPLY_TYPE_ERROR, _ERROR_HEAD.pack(error, len(msg)) + msg,
                            done=done)


def error_offset_chunk(cookie: int, error: int, offset: int, message: str = "", *,
                       done: bool) -> bytes:
    """An ``NBD_REPLY_TYPE_ERROR_OFFSET`` chunk: the error happened at ``offset``."""
    if not 0 < error <= _U32_MAX:
        raise ValueError(f"error chunk needs a nonzero error ({error})")
    msg = encode_string(message)
    payload = _ERROR_HEAD.pack(error, len(msg)) + msg + struct.pack(">Q", offset)
    return structured_chunk(cookie, NBD_REPLY_TYPE_ERROR_OFFSET, payload, done=done)


def block_status_chunk(cookie: int, context_id: int,
                       descriptors: Sequence[tuple[int, int]], *, done: bool = True) -> bytes:
    """An ``NBD_REPLY_TYPE_BLOCK_STATUS`` chunk of (length_bytes, status_flags) pairs."""
    if not descriptors:
        raise ValueError("block status needs at least one descriptor")
    parts = [_U32.pack(context_id)]
    for length, flags in descriptors:
        if not 1 <= length <= _U32_MAX:
            raise ValueError(f"block status descriptor length must be 1..2^32-1 ({length})")
        parts.append(_DESCRIPTOR.pack(length, flags & _U32_MAX))
    return structured_chunk(cookie, NBD_REPLY_TYPE_BLOCK_STATUS, b"".join(parts), done=done)


# --------------------------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------------------------


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # greeting queued, waiting for the client flags
    OPTIONS = "options"  # waiting for an option header / option data
    OPTION_DISCARD = "option-discard"  # counting down an option payload we will not store
    TRANSMISSION = "transmission"  # waiting for a request header
    WRITE_PAYLOAD = "write-payload"  # filling an accepted write's payload buffer
    WRITE_DISCARD = "write-discard"  # counting down a refused write's payload
    DONE = "done"  # after DISC or ABORT: further bytes are ignored
    CLOSED = "closed"  # the peer's EOF was reported
    ERROR = "error"  # a protocol error was raised


class _OptionError(Exception):
    """Internal: refuse the current option with ``reply`` and go on negotiating."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply
        self.message = message


# Flags each command may carry besides FUA (which needs NBD_FLAG_SEND_FUA) and the ones that
# need their own advertisement (DF, FAST_ZERO), handled when the table is built.
_KNOWN_COMMANDS = (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_CACHE,
                   NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS)


@dataclass(frozen=True, slots=True)
class _CommandRule:
    allowed_flags: int
    static_error: int  # refused whatever the range (read-only, not advertised)
    past_end_error: int  # NBD_ENOSPC for writes, NBD_EINVAL otherwise
    checks_range: bool  # offset/length address the export (not FLUSH)
    max_block_applies: bool


class ServerConnection:
    """The server side of one NBD connection (sans-I/O).

    ``exports`` is a mapping from export name to :class:`ExportInfo` (``NBD_OPT_LIST`` lists
    its values), or a lookup callable returning ``None`` for unknown names (then
    ``list_exports``, if given, answers ``NBD_OPT_LIST``; without it LIST is refused with
    ``NBD_REP_ERR_POLICY``).  ``default_export`` names the export a client gets when it asks
    for the empty name.  ``peer`` is used in error messages.  A mapping's keys should equal
    the exports' names (LIST shows ``ExportInfo.name``; GO looks the key up).

    Use from an adapter (one reader task owns ``receive_data``/``next_event``; the reply
    builders may be called from any task, under the adapter's send lock)::

        conn = ServerConnection(exports)
        await stream.send_all(conn.data_to_send())          # the greeting
        while True:
            data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
            conn.receive_data(data)                         # b"" = EOF
            while (ev := conn.next_event()) is not NEED_DATA:
                await stream.send_all(conn.data_to_send())  # option replies, if any
                ...                                         # dispatch ev
            await stream.send_all(conn.data_to_send())

    On :class:`NbdProtocolError`, send ``data_to_send()`` (best effort) and close.
    """

    def __init__(self, exports: ExportSource, *,
                 list_exports: Callable[[], Iterable[ExportInfo]] | None = None,
                 default_export: str | None = None, peer: str = "nbd client"):
        if isinstance(exports, Mapping):
            mapping = exports
            self._lookup: ExportLookup = mapping.get
            self._list: Callable[[], Iterable[ExportInfo]] | None = lambda: mapping.values()
        else:
            self._lookup = exports
            self._list = list_exports
        self._default_export = default_export
        self.peer = peer

        self._state = _State.HANDSHAKE
        self._buf = bytearray()
        self._out = bytearray(_HANDSHAKE.pack(NBDMAGIC, IHAVEOPT,
                                              NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        self._eof = False
        self._error: NbdProtocolError | None = None
        self._shutting_down = False
        self._options_seen = 0
        # OPTION_DISCARD / WRITE_DISCARD: bytes still to drop, and what to do afterwards.
        self._discard_remaining = 0
        self._discard_option = 0
        self._discard_reply = 0
        self._discard_message = ""
        # WRITE_PAYLOAD / WRITE_DISCARD: the pending request and its payload buffer.
        self._pending: Request | None = None
        self._payload: bytearray | None = None
        self._payload_filled = 0

        #: Negotiated state (valid once NegotiationDone was returned).
        self.client_flags = 0
        self.structured = False
        self.export: ExportInfo | None = None
        self.transmission_flags = 0
        self.meta_contexts: dict[int, str] = {}
        self._meta_export: str | None = None  # export the last SET_META_CONTEXT was for
        self._rules: dict[int, _CommandRule] = {}

    # ---- feeding and draining ---------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for messages not yet returned as events (bounded by MAX_BUFFERED_BYTES)."""
        return len(self._buf) + (self._payload_filled if self._payload is not None else 0)

    @property
    def phase(self) -> str:
        """``handshake``, ``options``, ``transmission``, ``done``, ``closed`` or ``error``."""
        st = self._state
        if st is _State.OPTION_DISCARD:
            return "options"
        if st in (_State.WRITE_PAYLOAD, _State.WRITE_DISCARD):
            return "transmission"
        return st.value

    def data_to_send(self) -> bytes:
        """The handshake and option-reply bytes queued so far (and forget them)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""
        st = self._state
        if st in (_State.DONE, _State.ERROR):
            return  # the client must not send more; we do not keep it
        if self._eof:
            if data:
                raise NbdUsageError("receive_data after EOF")
            return
        if not data:
            self._eof = True
            return
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        eager = 0
        if st is _State.WRITE_PAYLOAD:
            assert self._payload is not None
            eager = min(n, len(self._payload) - self._payload_filled)
        elif st in (_State.WRITE_DISCARD, _State.OPTION_DISCARD):
            eager = min(n, self._discard_remaining)
        rest = n - eager
        if rest and len(self._buf) + rest > RECEIVE_BUFFER_LIMIT:
            raise NbdUsageError(
                f"receive buffer would exceed {RECEIVE_BUFFER_LIMIT} bytes "
                f"(buffered={len(self._buf)}, incoming={rest}): drain next_event() "
                f"before feeding more")
        if eager:
            if st is _State.WRITE_PAYLOAD:
                assert self._payload is not None
                f = self._payload_filled
                self._payload[f:f + eager] = mv[:eager]
                self._payload_filled = f + eager
            else:
                self._discard_remaining -= eager
        if rest:
            self._buf += mv[eager:]

    def next_event(self) -> Event | Literal[_Sentinel.NEED_DATA]:
        """The next event, or :data:`NEED_DATA`.  After each call, send
        :meth:`data_to_send`.  Raises :class:`NbdProtocolError` (then close)."""
        if self._state is _State.ERROR:
            assert self._error is not None
            raise self._error
        try:
            return self._next_event()
        except NbdProtocolError as e:
            self._fail(e)
            raise

    def start_shutdown(self) -> None:
        """The server is going down: further options are refused with
        ``NBD_REP_ERR_SHUTDOWN`` and further requests carry ``NBD_ESHUTDOWN``."""
        self._shutting_down = True

    # ---- internals --------------------------------------------------------------------------

    def _fail(self, e: NbdProtocolError) -> None:
        self._state = _State.ERROR
        self._error = e
        self._buf.clear()
        self._payload = None
        self._pending = None

    def _protocol_error(self, what: str, field: str | None = None,
                        value: object = None) -> NbdProtocolError:
        return NbdProtocolError(self.peer, what, field, value)

    def _need_data(self) -> Literal[_Sentinel.NEED_DATA] | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        at_boundary = not self._buf and self._state in (
            _State.HANDSHAKE, _State.OPTIONS, _State.TRANSMISSION)
        if at_boundary:
            self._state = _State.CLOSED
            return ConnectionClosed()
        raise self._protocol_error("connection closed in the middle of a message", "phase",
                                   self.phase)

    def _next_event(self) -> Event | Literal[_Sentinel.NEED_DATA]:
        while True:
            st = self._state
            if st is _State.TRANSMISSION:
                if len(self._buf) < REQUEST_HEADER_SIZE:
                    return self._need_data()
                return self._parse_request()
            if st is _State.WRITE_PAYLOAD:
                assert self._payload is not None and self._pending is not None
                if self._payload_filled < len(self._payload):
                    return self._need_data()
                req = self._pending
                req.data = self._payload
                self._pending = self._payload = None
                self._payload_filled = 0
                self._state = _State.TRANSMISSION
                return req
            if st is _State.WRITE_DISCARD:
                if self._discard_remaining:
                    return self._need_data()
                assert self._pending is not None
                req = self._pending
                self._pending = None
                self._state = _State.TRANSMISSION
                return req
            if st is _State.OPTIONS:
                ev = self._parse_option()
                if ev is None:
                    return self._need_data()
                if ev is _CONTINUE:
                    continue
                assert not isinstance(ev, _Continue)
                return ev
            if st is _State.OPTION_DISCARD:
                if self._discard_remaining:
                    return self._need_data()
                self._state = _State.OPTIONS
                return self._refuse(self._discard_option, self._discard_reply,
                                    self._discard_message)
            if st is _State.HANDSHAKE:
                if len(self._buf) < CLIENT_FLAGS_SIZE:
                    return self._need_data()
                (flags,) = _U32.unpack_from(self._buf)
                del self._buf[:CLIENT_FLAGS_SIZE]
                if flags & ~KNOWN_CLIENT_FLAGS:
                    raise self._protocol_error("unknown client flags", "client_flags", flags)
                self.client_flags = flags
                self._state = _State.OPTIONS
                continue
            # DONE (stays DONE: later bytes are still ignored) or CLOSED
            return ConnectionClosed()

    # ---- option haggling --------------------------------------------------------------------

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += _OPTION_REPLY_HEADER.pack(NBD_REP_MAGIC, option, reply, len(payload))
        self._out += payload

    def _refuse(self, option: int, reply: int, message: str,
                export_name: str | None = None) -> OptionHandled:
        self._reply(option, reply, encode_string(message))
        return OptionHandled(option, reply, export_name, message)

    def _start_option_discard(self, option: int, length: int, reply: int,
                              message: str) -> None:
        take = min(len(self._buf), length)
        del self._buf[:take]
        self._discard_remaining = length - take
        self._discard_option = option
        self._discard_reply = reply
        self._discard_message = message
        self._state = _State.OPTION_DISCARD

    def _parse_option(self) -> Event | _Continue | None:
        """One option, or None when more bytes are needed."""
        if len(self._buf) < OPTION_HEADER_SIZE:
            return None
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise self._protocol_error("bad option magic", "magic", magic)
        # Decide from the header alone whether the payload is stored, discarded or refused,
        # so that a huge announced length is never waited for in the buffer.
        name = OPTION_NAMES.get(option, f"option {option}")
        if option == NBD_OPT_EXPORT_NAME and length > NBD_MAX_STRING:
            # EXPORT_NAME cannot be answered with an error: the spec says terminate.
            raise self._protocol_error("NBD_OPT_EXPORT_NAME name too long", "length", length)
        if option == NBD_OPT_ABORT:
            # Any data is to be ignored; nothing after ABORT is read, so nothing is buffered.
            self._count_option()
            self._buf.clear()
            self._reply(option, NBD_REP_ACK)
            self._state = _State.DONE
            return Aborted()
        if option not in _IMPLEMENTED_OPTIONS:
            reply, msg = NBD_REP_ERR_UNSUP, f"{name} not supported"
        elif length > NBD_MAX_OPTION_LENGTH:
            reply, msg = NBD_REP_ERR_TOO_BIG, f"{name} data longer than {NBD_MAX_OPTION_LENGTH}"
        else:
            reply = 0
            msg = ""
        if reply:
            self._count_option()
            del self._buf[:OPTION_HEADER_SIZE]
            if length > NBD_MAX_OPTION_DISCARD:
                self._reply(option, NBD_REP_ERR_TOO_BIG, encode_string(msg))
                raise self._protocol_error(f"{name} data too long to skip", "length", length)
            self._start_option_discard(option, length, reply, msg)
            return _CONTINUE
        if len(self._buf) < OPTION_HEADER_SIZE + length:
            return None
        self._count_option()
        data = bytes(self._buf[OPTION_HEADER_SIZE:OPTION_HEADER_SIZE + length])
        del self._buf[:OPTION_HEADER_SIZE + length]
        return self._handle_option(option, data)

    def _count_option(self) -> None:
        self._options_seen += 1
        if self._options_seen > NBD_MAX_OPTIONS:
            raise self._protocol_error("too many options", "options", self._options_seen)

    def _handle_option(self, option: int, data: bytes) -> Event:
        if option == NBD_OPT_EXPORT_NAME:
            return self._export_name(data)
        try:
            if self._shutting_down:
                raise _OptionError(NBD_REP_ERR_SHUTDOWN, "server is shutting down")
            if option in (NBD_OPT_INFO, NBD_OPT_GO):
                return self._info_or_go(option, data)
            if option == NBD_OPT_LIST:
                return self._list_option(data)
            if option == NBD_OPT_STRUCTURED_REPLY:
                if data:
                    raise _OptionError(NBD_REP_ERR_INVALID,
                                       "NBD_OPT_STRUCTURED_REPLY takes no data")
                self.structured = True
                self._reply(option, NBD_REP_ACK)
                return OptionHandled(option, NBD_REP_ACK)
            if option == NBD_OPT_STARTTLS:
                if data:
                    raise _OptionError(NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                raise _OptionError(NBD_REP_ERR_POLICY, "TLS is not offered by this server")
            if option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                return self._meta_context(option, data)
            raise AssertionError(f"unhandled implemented option {option}")
        except _OptionError as e:
            return self._refuse(option, e.reply, e.message)

    def _resolve(self, name: str) -> ExportInfo | None:
        if not name and self._default_export is not None:
            name = self._default_export
        return self._lookup(name)

    @staticmethod
    def _decode(raw: bytes, what: str) -> str:
        if len(raw) > NBD_MAX_STRING:
            raise _OptionError(NBD_REP_ERR_INVALID, f"{what} longer than {NBD_MAX_STRING}")
        if b"\0" in raw:
            raise _OptionError(NBD_REP_ERR_INVALID, f"{what} contains NUL")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _OptionError(NBD_REP_ERR_INVALID, f"{what} is not UTF-8") from None

    def _export_name(self, data: bytes) -> NegotiationDone:
        try:
            name = self._decode(data, "export name")
        except _OptionError as e:
            raise self._protocol_error(f"NBD_OPT_EXPORT_NAME: {e.message}") from None
        if self._shutting_down:
            raise self._protocol_error("NBD_OPT_EXPORT_NAME while the server shuts down")
        export = self._resolve(name)
        if export is None:
            raise self._protocol_error("NBD_OPT_EXPORT_NAME names no export", "name", name)
        done = self._enter_transmission(export, NBD_OPT_EXPORT_NAME, False)
        self._out += _EXPORT_REPLY.pack(export.size_bytes, done.transmission_flags)
        if not self.client_flags & NBD_FLAG_C_NO_ZEROES:
            self._out += bytes(EXPORT_NAME_PADDING)
        return done

    def _info_or_go(self, option: int, data: bytes) -> Event:
        # 32-bit name length, name, 16-bit count, count x 16-bit information requests.
        if len(data) < 6:
            raise _OptionError(NBD_REP_ERR_INVALID, "option data shorter than 6 bytes")
        (name_len,) = _U32.unpack_from(data)
        if name_len > len(data) - 6:
            raise _OptionError(NBD_REP_ERR_INVALID, "export name runs past the option data")
        name = self._decode(data[4:4 + name_len], "export name")
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if 4 + name_len + 2 + 2 * count != len(data):
            raise _OptionError(NBD_REP_ERR_INVALID,
                               "information request count does not match the option length")
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        export = self._resolve(name)
        if export is None:
            raise _OptionError(NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        block_size_requested = NBD_INFO_BLOCK_SIZE in requests
        block_size_info = _INFO_BLOCK_SIZE.pack(
            NBD_INFO_BLOCK_SIZE, export.min_block_bytes, export.preferred_block_bytes,
            export.max_block_bytes)
        if option == NBD_OPT_GO and not block_size_requested and export.min_block_bytes > 1:
            # Non-default alignment: the client must promise to honour it (the spec suggests
            # sending the constraints first, to save a round trip).
            self._reply(option, NBD_REP_INFO, block_size_info)
            raise _OptionError(NBD_REP_ERR_BLOCK_SIZE_REQD,
                               f"export {export.name!r} needs NBD_INFO_BLOCK_SIZE")
        flags = export.transmission_flags(self.structured)
        self._reply(option, NBD_REP_INFO,
                    _INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size_bytes, flags))
        if NBD_INFO_NAME in requests:
            self._reply(option, NBD_REP_INFO,
                        _U16.pack(NBD_INFO_NAME) + export.name.encode("utf-8"))
        if NBD_INFO_DESCRIPTION in requests and export.description:
            self._reply(option, NBD_REP_INFO,
                        _U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode("utf-8"))
        # Sent whether asked for or not (the spec allows unrequested information).
        self._reply(option, NBD_REP_INFO, block_size_info)
        self._reply(option, NBD_REP_ACK)
        if option == NBD_OPT_INFO:
            return OptionHandled(option, NBD_REP_ACK, export.name)
        return self._enter_transmission(export, NBD_OPT_GO, block_size_requested)

    def _enter_transmission(self, export: ExportInfo, via: int,
                            block_size_requested: bool) -> NegotiationDone:
        self.export = export
        self.transmission_flags = export.transmission_flags(self.structured)
        if self._meta_export != export.name or not self.structured:
            self.meta_contexts = {}
        self._rules = self._build_rules(export, self.transmission_flags)
        self._state = _State.TRANSMISSION
        return NegotiationDone(export, self.structured, dict(self.meta_contexts),
                               self.transmission_flags, via, block_size_requested)

    def _list_option(self, data: bytes) -> OptionHandled:
        if data:
            raise _OptionError(NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        if self._list is None:
            raise _OptionError(NBD_REP_ERR_POLICY, "export listing is disabled")
        for export in self._list():
            raw_name = export.name.encode("utf-8")
            self._reply(NBD_OPT_LIST, NBD_REP_SERVER,
                        _U32.pack(len(raw_name)) + raw_name + export.description.encode("utf-8"))
        self._reply(NBD_OPT_LIST, NBD_REP_ACK)
        return OptionHandled(NBD_OPT_LIST, NBD_REP_ACK)

    def _parse_meta_request(self, data: bytes) -> tuple[str, list[str]]:
        # 32-bit name length, name, 32-bit query count, queries (32-bit length, string).
        pos = 0
        end = len(data)

        def u32() -> int:
            nonlocal pos
            if end - pos < 4:
                raise _OptionError(NBD_REP_ERR_INVALID, "meta context request truncated")
            (v,) = _U32.unpack_from(data, pos)
            pos += 4
            return int(v)

        def string(n: int, what: str) -> str:
            nonlocal pos
            if n > end - pos:
                raise _OptionError(NBD_REP_ERR_INVALID, f"{what} runs past the option data")
            s = self._decode(data[pos:pos + n], what)
            pos += n
            return s

        name = string(u32(), "export name")
        count = u32()
        if count > (end - pos) // 4:
            raise _OptionError(NBD_REP_ERR_INVALID, "query count runs past the option data")
        if count > NBD_MAX_META_QUERIES:
            raise _OptionError(NBD_REP_ERR_TOO_BIG,
                               f"more than {NBD_MAX_META_QUERIES} meta context queries")
        queries = [string(u32(), "meta context query") for _ in range(count)]
        if pos != end:
            raise _OptionError(NBD_REP_ERR_INVALID, "trailing bytes after the queries")
        return name, queries

    def _meta_context(self, option: int, data: bytes) -> OptionHandled:
        setting = option == NBD_OPT_SET_META_CONTEXT
        if setting:
            # SET replaces the selection even when it fails.
            self.meta_contexts = {}
            self._meta_export = None
        if not self.structured:
            raise _OptionError(NBD_REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
        name, queries = self._parse_meta_request(data)
        export = self._resolve(name)
        if export is None:
            raise _OptionError(NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        found = not queries and not setting  # LIST with no query lists everything
        for q in queries:
            namespace, colon, leaf = q.partition(":")
            if not colon or not namespace:
                raise _OptionError(NBD_REP_ERR_INVALID, f"query lacks a namespace: {q!r}")
            if namespace == "base":
                # "base:" is a wildcard for LIST and ignored by SET; unknown leaves ignored.
                found |= leaf == "allocation" or (leaf == "" and not setting)
        if found:
            if setting:
                self.meta_contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
                self._meta_export = export.name
            self._reply(option, NBD_REP_META_CONTEXT,
                        _U32.pack(BASE_ALLOCATION_ID if setting else 0)
                        + BASE_ALLOCATION.encode("ascii"))
        self._reply(option, NBD_REP_ACK)
        return OptionHandled(option, NBD_REP_ACK, export.name)

    # ---- transmission -----------------------------------------------------------------------

    @staticmethod
    def _build_rules(export: ExportInfo, tflags: int) -> dict[int, _CommandRule]:
        fua = NBD_CMD_FLAG_FUA if tflags & NBD_FLAG_SEND_FUA else 0
        rules = {}
        for cmd in _KNOWN_COMMANDS:
            allowed = fua
            static = 0
            if cmd == NBD_CMD_READ and tflags & NBD_FLAG_SEND_DF:
                allowed |= NBD_CMD_FLAG_DF
            elif cmd == NBD_CMD_WRITE_ZEROES:
                allowed |= NBD_CMD_FLAG_NO_HOLE
                if tflags & NBD_FLAG_SEND_FAST_ZERO:
                    allowed |= NBD_CMD_FLAG_FAST_ZERO
            elif cmd == NBD_CMD_BLOCK_STATUS:
                allowed |= NBD_CMD_FLAG_REQ_ONE
            writes = cmd in (NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES)
            if writes and export.read_only:
                static = NBD_EPERM
            elif ((cmd == NBD_CMD_FLUSH and not tflags & NBD_FLAG_SEND_FLUSH)
                  or (cmd == NBD_CMD_TRIM and not tflags & NBD_FLAG_SEND_TRIM)
                  or (cmd == NBD_CMD_WRITE_ZEROES and not tflags & NBD_FLAG_SEND_WRITE_ZEROES)
                  or (cmd == NBD_CMD_CACHE and not tflags & NBD_FLAG_SEND_CACHE)):
                static = NBD_EINVAL  # a command the client was not offered
            rules[cmd] = _CommandRule(
                allowed_flags=allowed,
                static_error=static,
                past_end_error=NBD_ENOSPC if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES)
                else NBD_EINVAL,
                checks_range=cmd != NBD_CMD_FLUSH,
                max_block_applies=cmd in (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_CACHE,
                                          NBD_CMD_WRITE_ZEROES),
            )
        return rules

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The NBD error to refuse a request with, or 0."""
        rule = self._rules.get(cmd)
        if rule is None:
            return NBD_EINVAL  # unknown command
        if flags & ~rule.allowed_flags:
            return NBD_EINVAL  # unknown flag, or one not valid for / not offered with cmd
        if self._shutting_down:
            return NBD_ESHUTDOWN
        if rule.static_error:
            return rule.static_error
        if cmd == NBD_CMD_BLOCK_STATUS and (not self.meta_contexts or length == 0):
            return NBD_EINVAL
        if not rule.checks_range:
            return 0  # FLUSH: offset and length are reserved; ignored
        export = self.export
        assert export is not None
        # Python ints do not wrap, so an offset + length past 2^64 is simply past the end.
        if offset + length > export.size_bytes:
            return rule.past_end_error
        mn = export.min_block_bytes
        if mn > 1 and (offset % mn or length % mn):
            return NBD_EINVAL
        if (length > export.max_block_bytes and rule.max_block_applies
                and not (cmd == NBD_CMD_WRITE_ZEROES and flags & NBD_CMD_FLAG_FAST_ZERO)):
            return NBD_EINVAL
        return 0

    def _parse_request(self) -> Event | Literal[_Sentinel.NEED_DATA]:
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._buf)
        if magic != NBD_REQUEST_MAGIC:
            raise self._protocol_error("bad request magic", "magic", magic)
        del self._buf[:REQUEST_HEADER_SIZE]
        if cmd == NBD_CMD_DISC:
            self._buf.clear()
            self._state = _State.DONE
            return Disconnect(cookie)
        error = self._validate(cmd, flags, offset, length)
        req = Request(cookie, cmd, flags, offset, length, error)
        if cmd != NBD_CMD_WRITE:
            return req
        if length > NBD_MAX_WRITE_BYTES:
            raise self._protocol_error("NBD_CMD_WRITE payload too long", "length", length)
        take = min(len(self._buf), length)
        if error:
            del self._buf[:take]
            if take == length:
                return req
            self._discard_remaining = length - take
            self._pending = req
            self._state = _State.WRITE_DISCARD
            return self._need_data()
        payload = bytearray(length)
        if take:
            with memoryview(self._buf) as mv:
                payload[:take] = mv[:take]
            del self._buf[:take]
        if take == length:
            req.data = payload
            return req
        self._payload = payload
        self._payload_filled = take
        self._pending = req
        self._state = _State.WRITE_PAYLOAD
        return self._need_data()

    # ---- replies (pure: they read the negotiated state, never change it) ---------------------

    def read_reply_header(self, req: Request) -> bytes:
        """Header for a successful READ of ``req.length`` bytes; the caller sends exactly
        that many data bytes after it, from its own buffer.  (Structured: one
        ``OFFSET_DATA`` chunk marked done; a zero-length read gets a ``NONE`` chunk and no
        data.)  Call it only once the data is in hand: after this header no error can be
        reported (simple replies) and the chunk is final (structured), so a failure while
        sending the data leaves only a hard disconnect.  Sparse reads can be built from
        :func:`offset_data_header` / :func:`offset_hole_chunk` / :func:`none_chunk`."""
        if not self.structured:
            return simple_reply(req.cookie, 0)
        if req.length == 0:
            return none_chunk(req.cookie)
        return offset_data_header(req.cookie, req.offset, req.length, done=True)

    def ok_reply(self, req: Request) -> bytes:
        """Success reply for a request with no reply payload (WRITE, FLUSH, TRIM, ...)."""
        if req.command == NBD_CMD_READ:
            raise NbdUsageError("a successful READ is answered with read_reply_header")
        if req.command == NBD_CMD_BLOCK_STATUS:
            raise NbdUsageError("a successful BLOCK_STATUS is answered with "
                                "block_status_reply")
        return simple_reply(req.cookie, 0)

    def error_reply(self, req: Request, error: int, message: str = "") -> bytes:
        """Refuse ``req`` with an NBD error value (structured, with the message, when
        negotiated: required for READ, preferred by the spec for the rest)."""
        if error == 0:
            raise NbdUsageError("error_reply needs a nonzero NBD error")
        if self.structured:
            return error_chunk(req.cookie, error, message or req.command_name, done=True)
        return simple_reply(req.cookie, error)

    def block_status_reply(self, req: Request,
                           descriptors: Iterable[tuple[int, int]]) -> bytes:
        """The ``base:allocation`` answer to a BLOCK_STATUS request from (length_bytes,
        NBD_STATE_* flags) runs starting at ``req.offset``.

        Runs are cut to the spec's rules: zero-length runs dropped, at most one run (no
        longer than the request) under ``NBD_CMD_FLAG_REQ_ONE``, nothing after the run that
        reaches the end of the request, lengths clipped to a u32 and the count to
        :data:`MAX_BLOCK_STATUS_DESCRIPTORS`.
        """
        if BASE_ALLOCATION_ID not in self.meta_contexts:
            raise NbdUsageError("no metadata context was negotiated")
        req_one = bool(req.flags & NBD_CMD_FLAG_REQ_ONE)
        out: list[tuple[int, int]] = []
        covered = 0
        for length, flags in descriptors:
            if length < 0:
                raise ValueError(f"negative block status run ({length})")
            if length == 0:
                continue
            clipped = length > MAX_DESCRIPTOR_BYTES
            length = min(length, MAX_DESCRIPTOR_BYTES)
            if req_one:
                out.append((min(length, req.length), flags))
                break
            out.append((length, flags))
            covered += length
            if clipped or covered >= req.length or len(out) >= MAX_BLOCK_STATUS_DESCRIPTORS:
                break
        if not out:
            raise ValueError("block status needs at least one nonzero run")
        return block_status_chunk(req.cookie, BASE_ALLOCATION_ID, out, done=True)


class _Continue:
    """Internal marker: an option started a discard; keep looping."""


_CONTINUE = _Continue()


__all__ = [
    "BASE_ALLOCATION",
    "MAX_BUFFERED_BYTES",
    "NBD_MAX_OPTION_LENGTH",
    "NBD_MAX_STRING",
    "NBD_MAX_WRITE_BYTES",
    "NEED_DATA",
    "Aborted",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "NbdProtocolError",
    "NbdUsageError",
    "NegotiationDone",
    "OptionHandled",
    "Request",
    "ServerConnection",
    "block_status_chunk",
    "error_chunk",
    "error_offset_chunk",
    "nbd_error",
    "none_chunk",
    "offset_data_header",
    "offset_hole_chunk",
    "simple_reply",
    "structured_chunk",
]
