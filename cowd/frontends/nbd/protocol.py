"""Layer: cowd frontends — the NBD wire protocol, server side, sans-I/O: the connection.

Bytes in, events out; events in, bytes out (python-hyper/h11 style), with no socket, thread
or trio: the adapter feeds what it read to :meth:`ServerConnection.receive_data`, pulls events
with :meth:`~ServerConnection.next_event` until :data:`NEED_DATA`, sends what
:meth:`~ServerConnection.data_to_send` returns (handshake and option replies), and answers
each :class:`Request` with the bytes the reply methods return.  The vocabulary (constants
under the spec's names, struct layouts, limits, errors, :class:`ExportInfo`, the events, the
free reply builders) is :mod:`cowd.frontends.nbd.wire`, imported as ``W``.  The options that
ask about exports (``LIST``, ``INFO``/``GO``, meta contexts) are parsed and answered by
:mod:`cowd.frontends.nbd.options`; this module frames them and owns all negotiated state.

What is supported: the fixed newstyle handshake (``NBD_FLAG_FIXED_NEWSTYLE`` and
``NBD_FLAG_NO_ZEROES``), the options ``NBD_OPT_EXPORT_NAME``, ``ABORT``, ``LIST``, ``STARTTLS``
(by the :class:`~cowd.frontends.nbd.wire.TlsPolicy` given: see "TLS" below), ``INFO``, ``GO``,
``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and ``SET_META_CONTEXT`` (the one context
``base:allocation``); every other option is answered ``NBD_REP_ERR_UNSUP`` and negotiation
goes on.  In transmission: every command of the spec's
base protocol plus ``CACHE``, ``WRITE_ZEROES`` (with ``NO_HOLE``/``FAST_ZERO``) and
``BLOCK_STATUS``; simple and structured replies.  Extended headers are not offered.

Invariants
----------
- Every length the peer controls is checked against a named limit in :mod:`.wire` *before*
  anything is allocated for it (option payloads, strings, meta context query counts, write
  payloads): a 4 GiB length never makes us buffer 4 GiB.
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
- The transmission-phase reply methods are pure functions of their arguments and of the
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
if valid, a buffer of exactly ``length`` bytes is had once (from the adapter's
``payload_buffer``, which may recycle the buffers of writes it finished) and
``receive_data`` copies the incoming bytes straight into it (state ``WRITE_PAYLOAD``), so
the event hands the caller the buffer without a second copy.  If the write is refused,
its payload is counted down without being stored (``WRITE_DISCARD``) and the event carries
the error.  A write longer than the advertised maximum block size (at most
:data:`NBD_MAX_WRITE_BYTES`, 2^25) is refused the same way, with ``NBD_EINVAL``, whatever
its length up to 4 GiB: nbdkit does the same, the spec asks servers to fail such requests
cleanly, and counting bytes down costs no memory, so the client only occupies its own
connection for the time its bytes take.

TLS (the spec's "TLS support" section; the policy is a :class:`TlsPolicy`)
----------------------------------------------------------------------------
- ``off`` (NOTLS): ``NBD_OPT_STARTTLS`` is refused with ``NBD_REP_ERR_POLICY``.
- ``require`` (FORCEDTLS): before TLS, every option but ``STARTTLS`` and ``ABORT`` is
  answered ``NBD_REP_ERR_TLS_REQD``, unknown ones and ``INFO``/``GO`` included, decided from
  the option header alone so that no payload is buffered for an unauthenticated client (it
  is counted down, or the client is dropped past :data:`NBD_MAX_OPTION_DISCARD`);
  ``NBD_OPT_EXPORT_NAME``, which cannot be answered with an error, ends the connection.
- ``on`` (SELECTIVETLS): options are answered as usual before TLS, except that an export
  with an authorization list is TLS-only.  That, and which exports a client may use once TLS
  is on, is "Who may use which export" in :mod:`.options`.
- ``STARTTLS`` with data is ``NBD_REP_ERR_INVALID``, and so is a second one once TLS is on.
  Otherwise the ACK is queued and :class:`StartTls` returned: the adapter sends the ACK, runs
  the handshake and calls :meth:`ServerConnection.tls_established` with the identity the TLS
  layer verified.  Plaintext that arrived after ``STARTTLS`` (the client must wait for the
  ACK) is never parsed: ``tls_established`` makes it a protocol error, so nothing a
  man in the middle slipped in before the handshake is taken as coming over TLS.  All
  negotiated state from before TLS (structured replies, meta contexts) is forgotten, as the
  spec requires; the client flags from the handshake are kept.

Incoming bytes that belong to a pending payload or discard are consumed eagerly by
``receive_data``; all other bytes are appended to the receive buffer and parsed lazily by
``next_event``.  Because a payload is only entered from ``next_event`` after moving what the
buffer already held into it, "payload incomplete" implies "receive buffer empty", which is
what makes the eager copy safe and the result independent of chunking.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from . import wire as W
from .options import (
    IMPLEMENTED_OPTIONS,
    ExportLookup,
    Exports,
    ExportSource,
    OptionError,
    decode_string,
    option_reply,
)


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA
"""Returned by :meth:`ServerConnection.next_event` when more bytes are needed."""


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # greeting queued, waiting for the client flags
    OPTIONS = "options"  # waiting for an option header / option data
    OPTION_DISCARD = "option-discard"  # counting down an option payload we will not store
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS acknowledged; the adapter runs the handshake
    TRANSMISSION = "transmission"  # waiting for a request header
    WRITE_PAYLOAD = "write-payload"  # filling an accepted write's payload buffer
    WRITE_DISCARD = "write-discard"  # counting down a refused write's payload
    DONE = "done"  # after DISC or ABORT: further bytes are ignored
    CLOSED = "closed"  # the peer's EOF was reported
    ERROR = "error"  # a protocol error was raised


# Flags each command may carry besides FUA (which needs NBD_FLAG_SEND_FUA) and the ones that
# need their own advertisement (DF, FAST_ZERO), handled when the table is built.
_KNOWN_COMMANDS = (W.NBD_CMD_READ, W.NBD_CMD_WRITE, W.NBD_CMD_FLUSH, W.NBD_CMD_TRIM,
                   W.NBD_CMD_CACHE, W.NBD_CMD_WRITE_ZEROES, W.NBD_CMD_BLOCK_STATUS)


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
    for the empty name.  ``peer`` is used in error messages.  ``tls`` is the TLS policy
    (default: no TLS); see "TLS" in the module docstring.  A mapping's keys should equal
    the exports' names (LIST shows ``ExportInfo.name``; GO looks the key up).

    Use from an adapter (one reader task owns ``receive_data``/``next_event``; the reply
    builders may be called from any task, under the adapter's send lock)::

        conn = ServerConnection(exports)
        await stream.send_all(conn.data_to_send())          # the greeting
        while True:
            data = await stream.receive_some(W.RECEIVE_CHUNK_BYTES)
            conn.receive_data(data)                         # b"" = EOF
            while (ev := conn.next_event()) is not NEED_DATA:
                await stream.send_all(conn.data_to_send())  # option replies, if any
                ...                                         # dispatch ev
            await stream.send_all(conn.data_to_send())

    On :class:`NbdProtocolError`, send ``data_to_send()`` (best effort) and close.
    """

    def __init__(self, exports: ExportSource, *,
                 list_exports: Callable[[], Iterable[W.ExportInfo]] | None = None,
                 default_export: str | None = None, peer: str = "nbd client",
                 tls: W.TlsPolicy | None = None,
                 payload_buffer: Callable[[int], bytearray | memoryview] = bytearray):
        self._exports = Exports(exports, list_exports=list_exports,
                                default_export=default_export,
                                tls=tls if tls is not None else W.TlsPolicy())
        self.peer = peer
        # Where a write's payload goes: a bytearray of exactly the given length, whose old
        # contents are all overwritten (the adapter may hand back recycled buffers).
        self._payload_buffer = payload_buffer
        #: True once the TLS handshake completed; ``tls_identity`` is the peer's identity as
        #: the TLS layer verified it (None: no client certificate was asked for).
        self.tls_active = False
        self.tls_identity: str | None = None

        self._state = _State.HANDSHAKE
        self._buf = bytearray()
        self._out = bytearray(W.HANDSHAKE_STRUCT.pack(W.NBDMAGIC, W.IHAVEOPT,
                                              W.NBD_FLAG_FIXED_NEWSTYLE | W.NBD_FLAG_NO_ZEROES))
        self._eof = False
        self._error: W.NbdProtocolError | None = None
        self._shutting_down = False
        self._options_seen = 0
        # OPTION_DISCARD / WRITE_DISCARD: bytes still to drop, and what to do afterwards.
        self._discard_remaining = 0
        self._discard_option = 0
        self._discard_reply = 0
        self._discard_message = ""
        # WRITE_PAYLOAD / WRITE_DISCARD: the pending request and its payload buffer.
        self._pending: W.Request | None = None
        self._payload: bytearray | memoryview | None = None
        self._payload_filled = 0

        #: Negotiated state (valid once NegotiationDone was returned).
        self.client_flags = 0
        self.structured = False
        self.export: W.ExportInfo | None = None
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
        if st in (_State.OPTION_DISCARD, _State.TLS_HANDSHAKE):
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
                raise W.NbdUsageError("receive_data after EOF")
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
        if rest and len(self._buf) + rest > W.RECEIVE_BUFFER_LIMIT:
            raise W.NbdUsageError(
                f"receive buffer would exceed {W.RECEIVE_BUFFER_LIMIT} bytes "
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

    def next_event(self) -> W.Event | Literal[_Sentinel.NEED_DATA]:
        """The next event, or :data:`NEED_DATA`.  After each call, send
        :meth:`data_to_send`.  Raises :class:`NbdProtocolError` (then close)."""
        if self._state is _State.ERROR:
            assert self._error is not None
            raise self._error
        try:
            return self._next_event()
        except W.NbdProtocolError as e:
            self._fail(e)
            raise

    def tls_established(self, identity: str | None) -> None:
        """The TLS handshake that :class:`StartTls` asked for completed, with ``identity``
        verified for the peer (a client certificate's subject DN or a PSK username; None if
        none was asked for).  Negotiation starts over under TLS with no state from before
        it.  Raises :class:`NbdProtocolError` (then close) if plaintext arrived after
        ``NBD_OPT_STARTTLS``: it must not be parsed as if it had come over TLS."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise W.NbdUsageError(f"tls_established in phase {self.phase!r}, not after StartTls")
        if self._buf:
            e = self._protocol_error("data after NBD_OPT_STARTTLS before its reply",
                                     "bytes", len(self._buf))
            self._fail(e)
            raise e
        self.tls_active = True
        self.tls_identity = identity
        self.structured = False
        self.meta_contexts = {}
        self._meta_export = None
        self._state = _State.OPTIONS

    def start_shutdown(self) -> None:
        """The server is going down: further options are refused with
        ``NBD_REP_ERR_SHUTDOWN`` and further requests carry ``NBD_ESHUTDOWN``."""
        self._shutting_down = True

    # ---- internals --------------------------------------------------------------------------

    def _fail(self, e: W.NbdProtocolError) -> None:
        self._state = _State.ERROR
        self._error = e
        self._buf.clear()
        self._payload = None
        self._pending = None

    def _protocol_error(self, what: str, field: str | None = None,
                        value: object = None) -> W.NbdProtocolError:
        return W.NbdProtocolError(self.peer, what, field, value)

    def _need_data(self) -> Literal[_Sentinel.NEED_DATA] | W.ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        at_boundary = not self._buf and self._state in (
            _State.HANDSHAKE, _State.OPTIONS, _State.TRANSMISSION)
        if at_boundary:
            self._state = _State.CLOSED
            return W.ConnectionClosed()
        raise self._protocol_error("connection closed in the middle of a message", "phase",
                                   self.phase)

    def _next_event(self) -> W.Event | Literal[_Sentinel.NEED_DATA]:
        while True:
            st = self._state
            if st is _State.TRANSMISSION:
                if len(self._buf) < W.REQUEST_HEADER_SIZE:
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
                if len(self._buf) < W.CLIENT_FLAGS_SIZE:
                    return self._need_data()
                (flags,) = W.U32.unpack_from(self._buf)
                del self._buf[:W.CLIENT_FLAGS_SIZE]
                if flags & ~W.KNOWN_CLIENT_FLAGS:
                    raise self._protocol_error("unknown client flags", "client_flags", flags)
                self.client_flags = flags
                self._state = _State.OPTIONS
                continue
            if st is _State.TLS_HANDSHAKE:
                return NEED_DATA  # the adapter owes tls_established(); plaintext waits there
            # DONE (stays DONE: later bytes are still ignored) or CLOSED
            return W.ConnectionClosed()

    # ---- option haggling --------------------------------------------------------------------

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += option_reply(option, reply, payload)

    def _refuse(self, option: int, reply: int, message: str,
                export_name: str | None = None) -> W.OptionHandled:
        self._reply(option, reply, W.encode_string(message))
        return W.OptionHandled(option, reply, export_name, message)

    def _start_option_discard(self, option: int, length: int, reply: int,
                              message: str) -> None:
        take = min(len(self._buf), length)
        del self._buf[:take]
        self._discard_remaining = length - take
        self._discard_option = option
        self._discard_reply = reply
        self._discard_message = message
        self._state = _State.OPTION_DISCARD

    def _parse_option(self) -> W.Event | _Continue | None:
        """One option, or None when more bytes are needed."""
        if len(self._buf) < W.OPTION_HEADER_SIZE:
            return None
        magic, option, length = W.OPTION_HEADER_STRUCT.unpack_from(self._buf)
        if magic != W.IHAVEOPT:
            raise self._protocol_error("bad option magic", "magic", magic)
        # Decide from the header alone whether the payload is stored, discarded or refused,
        # so that a huge announced length is never waited for in the buffer.
        name = W.OPTION_NAMES.get(option, f"option {option}")
        if option == W.NBD_OPT_ABORT:
            # Any data is to be ignored; nothing after ABORT is read, so nothing is buffered.
            self._count_option()
            self._buf.clear()
            self._reply(option, W.NBD_REP_ACK)
            self._state = _State.DONE
            return W.Aborted()
        if (self._exports.tls.mode == W.TLS_REQUIRE and not self.tls_active
                and option != W.NBD_OPT_STARTTLS):
            # FORCEDTLS: decided from the header, so an unauthenticated client's payload is
            # counted down, never stored.
            if option == W.NBD_OPT_EXPORT_NAME:
                raise self._protocol_error("NBD_OPT_EXPORT_NAME before TLS (TLS is required)")
            reply, msg = W.NBD_REP_ERR_TLS_REQD, f"TLS is required: send NBD_OPT_STARTTLS ({name})"
        elif option == W.NBD_OPT_EXPORT_NAME and length > W.NBD_MAX_STRING:
            # EXPORT_NAME cannot be answered with an error: the spec says terminate.
            raise self._protocol_error("NBD_OPT_EXPORT_NAME name too long", "length", length)
        elif option not in IMPLEMENTED_OPTIONS:
            reply, msg = W.NBD_REP_ERR_UNSUP, f"{name} not supported"
        elif length > W.NBD_MAX_OPTION_LENGTH:
            reply, msg = W.NBD_REP_ERR_TOO_BIG, f"{name} data longer than {W.NBD_MAX_OPTION_LENGTH}"
        else:
            reply = 0
            msg = ""
        if reply:
            self._count_option()
            del self._buf[:W.OPTION_HEADER_SIZE]
            if length > W.NBD_MAX_OPTION_DISCARD:
                if reply != W.NBD_REP_ERR_TLS_REQD:
                    reply = W.NBD_REP_ERR_TOO_BIG
                self._reply(option, reply, W.encode_string(msg))
                raise self._protocol_error(f"{name} data too long to skip", "length", length)
            self._start_option_discard(option, length, reply, msg)
            return _CONTINUE
        if len(self._buf) < W.OPTION_HEADER_SIZE + length:
            return None
        self._count_option()
        data = bytes(self._buf[W.OPTION_HEADER_SIZE:W.OPTION_HEADER_SIZE + length])
        del self._buf[:W.OPTION_HEADER_SIZE + length]
        return self._handle_option(option, data)

    def _count_option(self) -> None:
        self._options_seen += 1
        if self._options_seen > W.NBD_MAX_OPTIONS:
            raise self._protocol_error("too many options", "options", self._options_seen)

    def _handle_option(self, option: int, data: bytes) -> W.Event:
        if option == W.NBD_OPT_EXPORT_NAME:
            return self._export_name(data)
        try:
            if self._shutting_down:
                raise OptionError(W.NBD_REP_ERR_SHUTDOWN, "server is shutting down")
            if option in (W.NBD_OPT_INFO, W.NBD_OPT_GO):
                return self._info_or_go(option, data)
            if option == W.NBD_OPT_LIST:
                self._out += self._exports.answer_list(data, tls_active=self.tls_active,
                                                       identity=self.tls_identity)
                return W.OptionHandled(option, W.NBD_REP_ACK)
            if option == W.NBD_OPT_STRUCTURED_REPLY:
                if data:
                    raise OptionError(W.NBD_REP_ERR_INVALID,
                                      "NBD_OPT_STRUCTURED_REPLY takes no data")
                self.structured = True
                self._reply(option, W.NBD_REP_ACK)
                return W.OptionHandled(option, W.NBD_REP_ACK)
            if option == W.NBD_OPT_STARTTLS:
                return self._starttls(data)
            if option in (W.NBD_OPT_LIST_META_CONTEXT, W.NBD_OPT_SET_META_CONTEXT):
                return self._meta_context(option, data)
            raise AssertionError(f"unhandled implemented option {option}")
        except OptionError as e:
            self._out += e.replies
            return self._refuse(option, e.reply, e.message)

    def _starttls(self, data: bytes) -> W.Event:
        if data:
            raise OptionError(W.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if not self._exports.tls.offered:
            raise OptionError(W.NBD_REP_ERR_POLICY, "TLS is not offered by this server")
        if self.tls_active:
            raise OptionError(W.NBD_REP_ERR_INVALID, "TLS is already on")
        self._reply(W.NBD_OPT_STARTTLS, W.NBD_REP_ACK)
        self._state = _State.TLS_HANDSHAKE
        return W.StartTls()

    def _export_name(self, data: bytes) -> W.NegotiationDone:
        try:
            name = decode_string(data, "export name")
        except OptionError as e:
            raise self._protocol_error(f"NBD_OPT_EXPORT_NAME: {e.message}") from None
        if self._shutting_down:
            raise self._protocol_error("NBD_OPT_EXPORT_NAME while the server shuts down")
        export = self._exports.resolve(name)
        if export is None:
            raise self._protocol_error("NBD_OPT_EXPORT_NAME names no export", "name", name)
        refusal = self._exports.refusal(export, tls_active=self.tls_active,
                                        identity=self.tls_identity)
        if refusal is not None:
            # EXPORT_NAME cannot be answered with an error: the spec says terminate.
            raise self._protocol_error(f"NBD_OPT_EXPORT_NAME refused: {refusal.message}")
        done = self._enter_transmission(export, W.NBD_OPT_EXPORT_NAME, False)
        self._out += W.EXPORT_REPLY_STRUCT.pack(export.size_bytes, done.transmission_flags)
        if not self.client_flags & W.NBD_FLAG_C_NO_ZEROES:
            self._out += bytes(W.EXPORT_NAME_PADDING)
        return done

    def _info_or_go(self, option: int, data: bytes) -> W.Event:
        answer = self._exports.answer_info(option, data, structured=self.structured,
                                           tls_active=self.tls_active, identity=self.tls_identity)
        self._out += answer.replies
        if option == W.NBD_OPT_INFO:
            return W.OptionHandled(option, W.NBD_REP_ACK, answer.export.name)
        return self._enter_transmission(answer.export, W.NBD_OPT_GO,
                                        answer.block_size_requested)

    def _enter_transmission(self, export: W.ExportInfo, via: int,
                            block_size_requested: bool) -> W.NegotiationDone:
        self.export = export
        self.transmission_flags = export.transmission_flags(self.structured)
        if self._meta_export != export.name or not self.structured:
            self.meta_contexts = {}
        self._rules = self._build_rules(export, self.transmission_flags)
        self._state = _State.TRANSMISSION
        return W.NegotiationDone(export, self.structured, dict(self.meta_contexts),
                               self.transmission_flags, via, block_size_requested)

    def _meta_context(self, option: int, data: bytes) -> W.OptionHandled:
        if option == W.NBD_OPT_SET_META_CONTEXT:
            # SET replaces the selection even when it fails.
            self.meta_contexts = {}
            self._meta_export = None
        answer = self._exports.answer_meta_context(option, data, structured=self.structured,
                                                   tls_active=self.tls_active,
                                                   identity=self.tls_identity)
        self._out += answer.replies
        if answer.selected:
            self.meta_contexts = dict(answer.selected)
            self._meta_export = answer.export_name
        return W.OptionHandled(option, W.NBD_REP_ACK, answer.export_name)

    # ---- transmission -----------------------------------------------------------------------

    @staticmethod
    def _build_rules(export: W.ExportInfo, tflags: int) -> dict[int, _CommandRule]:
        fua = W.NBD_CMD_FLAG_FUA if tflags & W.NBD_FLAG_SEND_FUA else 0
        rules = {}
        for cmd in _KNOWN_COMMANDS:
            allowed = fua
            static = 0
            if cmd == W.NBD_CMD_READ and tflags & W.NBD_FLAG_SEND_DF:
                allowed |= W.NBD_CMD_FLAG_DF
            elif cmd == W.NBD_CMD_WRITE_ZEROES:
                allowed |= W.NBD_CMD_FLAG_NO_HOLE
                if tflags & W.NBD_FLAG_SEND_FAST_ZERO:
                    allowed |= W.NBD_CMD_FLAG_FAST_ZERO
            elif cmd == W.NBD_CMD_BLOCK_STATUS:
                allowed |= W.NBD_CMD_FLAG_REQ_ONE
            writes = cmd in (W.NBD_CMD_WRITE, W.NBD_CMD_TRIM, W.NBD_CMD_WRITE_ZEROES)
            if writes and export.read_only:
                static = W.NBD_EPERM
            elif ((cmd == W.NBD_CMD_FLUSH and not tflags & W.NBD_FLAG_SEND_FLUSH)
                  or (cmd == W.NBD_CMD_TRIM and not tflags & W.NBD_FLAG_SEND_TRIM)
                  or (cmd == W.NBD_CMD_WRITE_ZEROES and not tflags & W.NBD_FLAG_SEND_WRITE_ZEROES)
                  or (cmd == W.NBD_CMD_CACHE and not tflags & W.NBD_FLAG_SEND_CACHE)):
                static = W.NBD_EINVAL  # a command the client was not offered
            rules[cmd] = _CommandRule(
                allowed_flags=allowed,
                static_error=static,
                past_end_error=W.NBD_ENOSPC if cmd in (W.NBD_CMD_WRITE, W.NBD_CMD_WRITE_ZEROES)
                else W.NBD_EINVAL,
                checks_range=cmd != W.NBD_CMD_FLUSH,
                max_block_applies=cmd in (W.NBD_CMD_READ, W.NBD_CMD_WRITE, W.NBD_CMD_CACHE,
                                          W.NBD_CMD_WRITE_ZEROES),
            )
        return rules

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The NBD error to refuse a request with, or 0."""
        rule = self._rules.get(cmd)
        if rule is None:
            return W.NBD_EINVAL  # unknown command
        if flags & ~rule.allowed_flags:
            return W.NBD_EINVAL  # unknown flag, or one not valid for / not offered with cmd
        if self._shutting_down:
            return W.NBD_ESHUTDOWN
        if rule.static_error:
            return rule.static_error
        if cmd == W.NBD_CMD_BLOCK_STATUS and (not self.meta_contexts or length == 0):
            return W.NBD_EINVAL
        if not rule.checks_range:
            return 0  # FLUSH: offset and length are reserved; ignored
        export = self.export
        assert export is not None
        # Python ints do not wrap, so an offset + length past 2^64 is simply past the end.
        if offset + length > export.size_bytes:
            return rule.past_end_error
        mn = export.min_block_bytes
        if mn > 1 and (offset % mn or length % mn):
            return W.NBD_EINVAL
        if (length > export.max_block_bytes and rule.max_block_applies
                and not (cmd == W.NBD_CMD_WRITE_ZEROES and flags & W.NBD_CMD_FLAG_FAST_ZERO)):
            return W.NBD_EINVAL
        return 0

    def _parse_request(self) -> W.Event | Literal[_Sentinel.NEED_DATA]:
        magic, flags, cmd, cookie, offset, length = W.REQUEST_STRUCT.unpack_from(self._buf)
        if magic != W.NBD_REQUEST_MAGIC:
            raise self._protocol_error("bad request magic", "magic", magic)
        del self._buf[:W.REQUEST_HEADER_SIZE]
        if cmd == W.NBD_CMD_DISC:
            self._buf.clear()
            self._state = _State.DONE
            return W.Disconnect(cookie)
        error = self._validate(cmd, flags, offset, length)
        if cmd == W.NBD_CMD_WRITE and length > W.NBD_MAX_WRITE_BYTES and not error:
            error = W.NBD_EINVAL  # never stored: counted down below (the max is advertised)
        req = W.Request(cookie, cmd, flags, offset, length, error)
        if cmd != W.NBD_CMD_WRITE:
            return req
        take = min(len(self._buf), length)
        if error:
            del self._buf[:take]
            if take == length:
                return req
            self._discard_remaining = length - take
            self._pending = req
            self._state = _State.WRITE_DISCARD
            return self._need_data()
        payload = self._payload_buffer(length)
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

    def read_reply_header(self, req: W.Request) -> bytes:
        """Header for a successful READ of ``req.length`` bytes; the caller sends exactly
        that many data bytes after it, from its own buffer.  (Structured: one
        ``OFFSET_DATA`` chunk marked done; a zero-length read gets a ``NONE`` chunk and no
        data.)  Call it only once the data is in hand: after this header no error can be
        reported (simple replies) and the chunk is final (structured), so a failure while
        sending the data leaves only a hard disconnect.  Sparse reads can be built from
        :func:`offset_data_header` / :func:`offset_hole_chunk` / :func:`none_chunk`."""
        if not self.structured:
            return W.simple_reply(req.cookie, 0)
        if req.length == 0:
            return W.none_chunk(req.cookie)
        return W.offset_data_header(req.cookie, req.offset, req.length, done=True)

    def ok_reply(self, req: W.Request) -> bytes:
        """Success reply for a request with no reply payload (WRITE, FLUSH, TRIM, ...)."""
        if req.command == W.NBD_CMD_READ:
            raise W.NbdUsageError("a successful READ is answered with read_reply_header")
        if req.command == W.NBD_CMD_BLOCK_STATUS:
            raise W.NbdUsageError("a successful BLOCK_STATUS is answered with "
                                "block_status_reply")
        return W.simple_reply(req.cookie, 0)

    def error_reply(self, req: W.Request, error: int, message: str = "") -> bytes:
        """Refuse ``req`` with an NBD error value (structured, with the message, when
        negotiated: required for READ, preferred by the spec for the rest)."""
        if error == 0:
            raise W.NbdUsageError("error_reply needs a nonzero NBD error")
        if self.structured:
            return W.error_chunk(req.cookie, error, message or req.command_name, done=True)
        return W.simple_reply(req.cookie, error)

    def block_status_reply(self, req: W.Request,
                           descriptors: Iterable[tuple[int, int]]) -> bytes:
        """The ``base:allocation`` answer to a BLOCK_STATUS request from (length_bytes,
        NBD_STATE_* flags) runs starting at ``req.offset``.

        Runs are cut to the spec's rules: zero-length runs dropped, at most one run (no
        longer than the request) under ``NBD_CMD_FLAG_REQ_ONE``, nothing after the run that
        reaches the end of the request, lengths clipped to a u32 and the count to
        :data:`MAX_BLOCK_STATUS_DESCRIPTORS`.
        """
        if W.BASE_ALLOCATION_ID not in self.meta_contexts:
            raise W.NbdUsageError("no metadata context was negotiated")
        req_one = bool(req.flags & W.NBD_CMD_FLAG_REQ_ONE)
        out: list[tuple[int, int]] = []
        covered = 0
        for length, flags in descriptors:
            if length < 0:
                raise ValueError(f"negative block status run ({length})")
            if length == 0:
                continue
            clipped = length > W.MAX_DESCRIPTOR_BYTES
            length = min(length, W.MAX_DESCRIPTOR_BYTES)
            if req_one:
                out.append((min(length, req.length), flags))
                break
            out.append((length, flags))
            covered += length
            if clipped or covered >= req.length or len(out) >= W.MAX_BLOCK_STATUS_DESCRIPTORS:
                break
        if not out:
            raise ValueError("block status needs at least one nonzero run")
        return W.block_status_chunk(req.cookie, W.BASE_ALLOCATION_ID, out, done=True)


class _Continue:
    """Internal marker: an option started a discard; keep looping."""


_CONTINUE = _Continue()


__all__ = [
    "NEED_DATA",
    "ExportLookup",
    "ExportSource",
    "ServerConnection",
]
