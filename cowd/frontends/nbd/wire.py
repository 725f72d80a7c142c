"""Layer: cowd frontends — the NBD wire vocabulary, sans-I/O: what the bytes are.

The NBD protocol's numbers under the spec's names (NetworkBlockDevice/nbd, ``doc/proto.md``),
the struct layouts of its fixed headers, the limits that bound every length a peer controls,
the two error classes, :class:`ExportInfo` (what a server tells a client about an export),
:class:`TlsPolicy` (what TLS the server offers and which client identity may open which
export: names only, no credentials), the events that
:class:`~cowd.frontends.nbd.protocol.ServerConnection` returns, and the builders of
transmission-phase replies and structured reply chunks.  The state machine that turns a byte
stream into these events is :mod:`cowd.frontends.nbd.protocol`; the kernel client's handshake
in :mod:`cowd.frontends.nbd.attach` speaks with the same constants.

Invariants
----------
- No I/O and no connection state: constants, dataclasses and pure functions, importing only
  the standard library.  Every event is frozen except :class:`Request`, whose ``data`` the
  state machine sets once, before it returns the event.
- Wire constants keep the spec's names and numbers.  A bound this server chooses (rather than
  one the spec fixes) is a named, commented constant here, and the state machine checks each
  peer-controlled length against one of them before it allocates anything for it.
- The reply builders are pure functions of their arguments, safe to call from any task.  A
  length outside its field's range raises :class:`ValueError` (the caller's bug); a message
  is cut to :data:`NBD_MAX_STRING` bytes at a character boundary.
- An :class:`ExportInfo` is valid once built: name and description within
  :data:`NBD_MAX_STRING` and free of NUL, block sizes by the spec's ``NBD_INFO_BLOCK_SIZE``
  rules and the maximum within :data:`NBD_MAX_WRITE_BYTES`.
- :class:`NbdProtocolError` means "drop the connection" (the peer's fault);
  :class:`NbdUsageError` means the adapter misused the codec (a bug here, not in the peer).
"""

from __future__ import annotations

import errno as errno_mod
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
# Largest write payload we store (2^25: the spec says a length below this SHOULD NOT be
# deemed a denial of service, and it is the maximum block size we advertise by default).
# A longer write is refused with NBD_EINVAL for that request only: its payload is read and
# dropped as it arrives, never buffered (see "Theory of operation" in protocol.py).
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
# on top of the largest incomplete message it must hold.  The chunk stays under the
# allocator's mmap threshold (cowd/process.py) so that each receive's fresh bytes come from
# the heap (at a 128 KiB threshold every receive was an mmap, an mremap and a munmap), and
# is large enough that a 1 MiB write takes few trips through the event loop (at 64 KiB,
# 1 MiB writes ran at 0.8x of their speed at 256 KiB).
RECEIVE_CHUNK_BYTES = 256 << 10
RECEIVE_SLACK_BYTES = 1 << 20
RECEIVE_BUFFER_LIMIT = OPTION_HEADER_SIZE + NBD_MAX_OPTION_LENGTH + RECEIVE_SLACK_BYTES
# The whole bound: one pending write payload plus the receive buffer.
MAX_BUFFERED_BYTES = NBD_MAX_WRITE_BYTES + RECEIVE_BUFFER_LIMIT

_U32_MAX = 0xFFFFFFFF

# Layouts of the fixed headers and payload fields (network byte order, as on the wire)
HANDSHAKE_STRUCT = struct.Struct(">QQH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
OPTION_HEADER_STRUCT = struct.Struct(">QII")
OPTION_REPLY_HEADER_STRUCT = struct.Struct(">QIII")
EXPORT_REPLY_STRUCT = struct.Struct(">QH")
INFO_EXPORT_STRUCT = struct.Struct(">HQH")
INFO_BLOCK_SIZE_STRUCT = struct.Struct(">HIII")
REQUEST_STRUCT = struct.Struct(">IHHQQI")
SIMPLE_REPLY_STRUCT = struct.Struct(">IIQ")
STRUCTURED_HEADER_STRUCT = struct.Struct(">IHHQI")
OFFSET_DATA_HEADER_STRUCT = struct.Struct(">IHHQIQ")
OFFSET_HOLE_STRUCT = struct.Struct(">IHHQIQI")
ERROR_HEAD_STRUCT = struct.Struct(">IH")
DESCRIPTOR_STRUCT = struct.Struct(">II")

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


# The three TLS modes, under nbdkit's names for its --tls flag.  "off" is the spec's NOTLS
# mode; "on" its SELECTIVETLS mode (TLS at the client's choice, except on exports that have
# an authorization list: those are TLS-only); "require" its FORCEDTLS mode.
TLS_OFF = "off"
TLS_ON = "on"
TLS_REQUIRE = "require"
TLS_MODES = (TLS_OFF, TLS_ON, TLS_REQUIRE)


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """What TLS a server offers and which client may open which export (names only: the
    credentials are the adapter's business, cowd/frontends/nbd/tls.py).

    ``authz`` holds (export name, client identity) pairs.  An export named in it is
    TLS-only and may be opened only by the identities paired with it; an export not named in
    it may be opened by any client (any TLS client, under ``require``).  An identity is what
    the TLS layer reports for the peer: the subject DN of a verified client certificate
    (RFC 4514, as qemu's authz objects compare it) or a PSK username.
    """

    mode: str = TLS_OFF
    authz: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        if self.mode not in TLS_MODES:
            raise ValueError(f"TLS mode must be one of {', '.join(TLS_MODES)} ({self.mode!r})")
        if self.authz and self.mode == TLS_OFF:
            raise ValueError("an authorization list needs TLS (mode='off')")

    @property
    def offered(self) -> bool:
        return self.mode != TLS_OFF

    def tls_only(self, export_name: str) -> bool:
        """True if ``export_name`` may be opened only over TLS."""
        return self.mode == TLS_REQUIRE or any(e == export_name for e, _ in self.authz)

    def allows(self, export_name: str, identity: str | None) -> bool:
        """May a TLS client with ``identity`` (None: no verified identity) open the export?"""
        if not any(e == export_name for e, _ in self.authz):
            return True
        return identity is not None and (export_name, identity) in self.authz


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class StartTls:
    """``NBD_OPT_STARTTLS`` was acknowledged (the ACK is queued).  Send it, then run the TLS
    handshake as the server on the transport and call
    :meth:`~cowd.frontends.nbd.protocol.ServerConnection.tls_established`; until then the
    codec takes no event from plaintext (every further byte must arrive over TLS)."""


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
    data: bytearray | memoryview | None = None

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


Event = (OptionHandled | NegotiationDone | Aborted | StartTls | Request | Disconnect
         | ConnectionClosed)


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
    return SIMPLE_REPLY_STRUCT.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def structured_chunk(cookie: int, reply_type: int, payload: bytes = b"", *,
                     done: bool) -> bytes:
    """A complete structured reply chunk (header and payload)."""
    if len(payload) > _U32_MAX:
        raise ValueError(f"structured chunk payload too long ({len(payload)})")
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return STRUCTURED_HEADER_STRUCT.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie,
                                   len(payload)) + payload


def offset_data_header(cookie: int, offset: int, data_length: int, *, done: bool) -> bytes:
    """Header (28 bytes) of an ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk: the caller sends the
    ``data_length`` bytes of data right after it, from its own buffer (no copy here)."""
    if not 1 <= data_length <= _U32_MAX - 8:
        raise ValueError(f"OFFSET_DATA length must be 1..2^32-9 ({data_length})")
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return OFFSET_DATA_HEADER_STRUCT.pack(NBD_STRUCTURED_REPLY_MAGIC, flags,
                                    NBD_REPLY_TYPE_OFFSET_DATA, cookie, data_length + 8, offset)


def offset_hole_chunk(cookie: int, offset: int, hole_length: int, *, done: bool) -> bytes:
    """An ``NBD_REPLY_TYPE_OFFSET_HOLE`` chunk: ``hole_length`` bytes at ``offset`` read as
    zeroes."""
    if not 1 <= hole_length <= _U32_MAX:
        raise ValueError(f"OFFSET_HOLE length must be 1..2^32-1 ({hole_length})")
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return OFFSET_HOLE_STRUCT.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_OFFSET_HOLE,
                             cookie, 12, offset, hole_length)


def none_chunk(cookie: int) -> bytes:
    """The final ``NBD_REPLY_TYPE_NONE`` chunk (always with ``NBD_REPLY_FLAG_DONE``)."""
    return structured_chunk(cookie, NBD_REPLY_TYPE_NONE, done=True)


def error_chunk(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    """An ``NBD_REPLY_TYPE_ERROR`` chunk with an optional human-readable message."""
    if not 0 < error <= _U32_MAX:
        raise ValueError(f"error chunk needs a nonzero error ({error})")
    msg = encode_string(message)
    return structured_chunk(cookie, NBD_REPLY_TYPE_ERROR,
                            ERROR_HEAD_STRUCT.pack(error, len(msg)) + msg, done=done)


def error_offset_chunk(cookie: int, error: int, offset: int, message: str = "", *,
                       done: bool) -> bytes:
    """An ``NBD_REPLY_TYPE_ERROR_OFFSET`` chunk: the error happened at ``offset``."""
    if not 0 < error <= _U32_MAX:
        raise ValueError(f"error chunk needs a nonzero error ({error})")
    msg = encode_string(message)
    payload = ERROR_HEAD_STRUCT.pack(error, len(msg)) + msg + struct.pack(">Q", offset)
    return structured_chunk(cookie, NBD_REPLY_TYPE_ERROR_OFFSET, payload, done=done)


def block_status_chunk(cookie: int, context_id: int,
                       descriptors: Sequence[tuple[int, int]], *, done: bool = True) -> bytes:
    """An ``NBD_REPLY_TYPE_BLOCK_STATUS`` chunk of (length_bytes, status_flags) pairs."""
    if not descriptors:
        raise ValueError("block status needs at least one descriptor")
    parts = [U32.pack(context_id)]
    for length, flags in descriptors:
        if not 1 <= length <= _U32_MAX:
            raise ValueError(f"block status descriptor length must be 1..2^32-1 ({length})")
        parts.append(DESCRIPTOR_STRUCT.pack(length, flags & _U32_MAX))
    return structured_chunk(cookie, NBD_REPLY_TYPE_BLOCK_STATUS, b"".join(parts), done=done)


__all__ = [
    "BASE_ALLOCATION",
    "MAX_BUFFERED_BYTES",
    "NBD_MAX_OPTION_LENGTH",
    "NBD_MAX_STRING",
    "NBD_MAX_WRITE_BYTES",
    "RECEIVE_BUFFER_LIMIT",
    "RECEIVE_CHUNK_BYTES",
    "TLS_MODES",
    "TLS_OFF",
    "TLS_ON",
    "TLS_REQUIRE",
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
    "StartTls",
    "TlsPolicy",
    "block_status_chunk",
    "encode_string",
    "error_chunk",
    "error_offset_chunk",
    "nbd_error",
    "none_chunk",
    "offset_data_header",
    "offset_hole_chunk",
    "simple_reply",
    "structured_chunk",
]
