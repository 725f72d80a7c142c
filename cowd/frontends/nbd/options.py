"""Layer: cowd frontends — the NBD option phase, sans-I/O: what an option's data says and
what the server answers.

:class:`~cowd.frontends.nbd.protocol.ServerConnection` frames each option (its header, the
length checks, the discards), owns every piece of negotiated state and makes every state
change.  For the options that ask about exports (``LIST``, ``INFO``/``GO`` and the meta
context options) it hands the option data to :class:`Exports`, which parses it, decides which
export this client may use and returns the framed replies to queue, with what the connection
must take from them in a small frozen answer.  ``EXPORT_NAME``, which the connection answers
itself because it cannot be refused, uses :func:`decode_string`, :meth:`Exports.resolve` and
:meth:`Exports.refusal` from here; ``STARTTLS``, ``STRUCTURED_REPLY`` and ``ABORT`` only
change the connection's state and stay there.

Invariants
----------
- Every length inside option data is checked against what is left of the data and against a
  named limit in :mod:`.wire` before it is used: strings against :data:`NBD_MAX_STRING`,
  meta context query counts against :data:`NBD_MAX_META_QUERIES`.  The data itself is at
  most :data:`NBD_MAX_OPTION_LENGTH` bytes: the connection checked that before buffering it.
- A problem with an option raises :class:`OptionError`: the connection sends the replies it
  carries, then the error reply, and negotiation goes on.  Nothing here ends a connection.
- No state between options and no I/O: the answers are functions of the option data, the
  exports and TLS policy fixed at construction, and the negotiated state the caller passes
  in (the export source is consulted afresh for each option).

Who may use which export (the spec's "TLS support"; the policy is a :class:`TlsPolicy`)
---------------------------------------------------------------------------------------
- ``on`` (SELECTIVETLS): before TLS, an export with an authorization list is TLS-only:
  ``INFO``/``GO`` on it get ``NBD_REP_ERR_TLS_REQD`` (and no ``NBD_REP_INFO``), ``LIST``
  omits it and the meta context options get ``NBD_REP_ERR_POLICY`` (the spec keeps
  ``TLS_REQD`` for the three options that choose an export); ``EXPORT_NAME`` on it ends the
  connection (in the connection: that option cannot be refused).
- After TLS, an export whose authorization list does not hold the client's identity is
  refused like any forbidden export: ``NBD_REP_ERR_POLICY`` for ``INFO``/``GO`` and the meta
  context options, omitted from ``LIST``, a hard disconnect for ``EXPORT_NAME``.
  ``NBD_REP_ERR_TLS_REQD`` is never sent once TLS is on.
- ``off`` (NOTLS): no export is refused.  ``require`` (FORCEDTLS): before TLS the connection
  refuses every option from its header alone, so only the rule after TLS applies here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from . import wire as W

ExportLookup = Callable[[str], W.ExportInfo | None]
ExportSource = Mapping[str, W.ExportInfo] | ExportLookup

# Options this server implements; anything else is NBD_REP_ERR_UNSUP.
IMPLEMENTED_OPTIONS = frozenset({
    W.NBD_OPT_EXPORT_NAME, W.NBD_OPT_ABORT, W.NBD_OPT_LIST, W.NBD_OPT_STARTTLS, W.NBD_OPT_INFO,
    W.NBD_OPT_GO, W.NBD_OPT_STRUCTURED_REPLY, W.NBD_OPT_LIST_META_CONTEXT,
    W.NBD_OPT_SET_META_CONTEXT,
})


class OptionError(Exception):
    """Refuse the current option with the error ``reply`` and go on negotiating; the
    option's ``replies`` so far (framed) go out before the refusal."""

    def __init__(self, reply: int, message: str, replies: bytes = b""):
        super().__init__(message)
        self.reply = reply
        self.message = message
        self.replies = replies


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    """One framed option reply: the reply header, then ``payload``."""
    return W.OPTION_REPLY_HEADER_STRUCT.pack(W.NBD_REP_MAGIC, option, reply,
                                             len(payload)) + payload


def decode_string(raw: bytes, what: str) -> str:
    """An export name or query from option data: UTF-8, no NUL, at most NBD_MAX_STRING
    bytes."""
    if len(raw) > W.NBD_MAX_STRING:
        raise OptionError(W.NBD_REP_ERR_INVALID, f"{what} longer than {W.NBD_MAX_STRING}")
    if b"\0" in raw:
        raise OptionError(W.NBD_REP_ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(W.NBD_REP_ERR_INVALID, f"{what} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class InfoAnswer:
    """``INFO``/``GO`` acknowledged: ``replies`` are the ``NBD_REP_INFO``s and the ACK."""

    replies: bytes
    export: W.ExportInfo
    block_size_requested: bool  # the client asked for NBD_INFO_BLOCK_SIZE (it will honour it)


@dataclass(frozen=True, slots=True)
class MetaContextAnswer:
    """A meta context option acknowledged: ``replies`` are its ``NBD_REP_META_CONTEXT``s
    and the ACK; ``selected`` the contexts ``SET`` chose (id to name; empty for ``LIST``,
    and for a ``SET`` that matched nothing)."""

    replies: bytes
    export_name: str
    selected: Mapping[int, str]


class Exports:
    """The exports one connection offers and the options that ask about them.

    Built from what :class:`~cowd.frontends.nbd.protocol.ServerConnection` was given (see
    there): a mapping from name to :class:`ExportInfo` or a lookup callable (with
    ``list_exports`` for ``LIST``), the default export's name and the TLS policy, all fixed
    for the connection.  The methods read the client's TLS state and negotiated state from
    their arguments and keep nothing.
    """

    def __init__(self, exports: ExportSource, *,
                 list_exports: Callable[[], Iterable[W.ExportInfo]] | None,
                 default_export: str | None, tls: W.TlsPolicy):
        if isinstance(exports, Mapping):
            mapping = exports
            self._lookup: ExportLookup = mapping.get
            self._list: Callable[[], Iterable[W.ExportInfo]] | None = lambda: mapping.values()
        else:
            self._lookup = exports
            self._list = list_exports
        self._default_export = default_export
        self.tls = tls

    def resolve(self, name: str) -> W.ExportInfo | None:
        """The export ``name`` names (the empty name: the default export, if any), or None."""
        if not name and self._default_export is not None:
            name = self._default_export
        return self._lookup(name)

    def refusal(self, export: W.ExportInfo, *, tls_active: bool,
                identity: str | None) -> OptionError | None:
        """Why this client may not use ``export`` (TLS-only before TLS, or not on its
        authorization list after), or None."""
        if not self.tls.offered:
            return None
        if not tls_active:
            if self.tls.tls_only(export.name):
                return OptionError(W.NBD_REP_ERR_TLS_REQD,
                                   f"export {export.name!r} needs TLS: send NBD_OPT_STARTTLS")
            return None
        if self.tls.allows(export.name, identity):
            return None
        who = identity if identity is not None else "a client with no identity"
        return OptionError(W.NBD_REP_ERR_POLICY,
                           f"{who} is not authorized for export {export.name!r}")

    def answer_list(self, data: bytes, *, tls_active: bool, identity: str | None) -> bytes:
        """``NBD_OPT_LIST``: an ``NBD_REP_SERVER`` per export this client may use, an ACK."""
        if data:
            raise OptionError(W.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        if self._list is None:
            raise OptionError(W.NBD_REP_ERR_POLICY, "export listing is disabled")
        out = bytearray()
        for export in self._list():
            if self.refusal(export, tls_active=tls_active, identity=identity) is not None:
                continue  # the spec lets LIST omit TLS-only exports; and forbidden ones
            raw_name = export.name.encode("utf-8")
            out += option_reply(W.NBD_OPT_LIST, W.NBD_REP_SERVER,
                                W.U32.pack(len(raw_name)) + raw_name
                                + export.description.encode("utf-8"))
        out += option_reply(W.NBD_OPT_LIST, W.NBD_REP_ACK)
        return bytes(out)

    def answer_info(self, option: int, data: bytes, *, structured: bool, tls_active: bool,
                    identity: str | None) -> InfoAnswer:
        """``NBD_OPT_INFO`` or ``NBD_OPT_GO``: describe the export the data names (``GO``
        then enters transmission: the caller's move)."""
        # 32-bit name length, name, 16-bit count, count x 16-bit information requests.
        if len(data) < 6:
            raise OptionError(W.NBD_REP_ERR_INVALID, "option data shorter than 6 bytes")
        (name_len,) = W.U32.unpack_from(data)
        if name_len > len(data) - 6:
            raise OptionError(W.NBD_REP_ERR_INVALID, "export name runs past the option data")
        name = decode_string(data[4:4 + name_len], "export name")
        (count,) = W.U16.unpack_from(data, 4 + name_len)
        if 4 + name_len + 2 + 2 * count != len(data):
            raise OptionError(W.NBD_REP_ERR_INVALID,
                              "information request count does not match the option length")
        requests = set(struct.unpack_from(f">{count}H", data, 6 + name_len))
        export = self.resolve(name)
        if export is None:
            raise OptionError(W.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
        refusal = self.refusal(export, tls_active=tls_active, identity=identity)
        if refusal is not None:
            raise refusal
        block_size_requested = W.NBD_INFO_BLOCK_SIZE in requests
        block_size_info = option_reply(option, W.NBD_REP_INFO, W.INFO_BLOCK_SIZE_STRUCT.pack(
            W.NBD_INFO_BLOCK_SIZE, export.min_block_bytes, export.preferred_block_bytes,
            export.max_block_bytes))
        if option == W.NBD_OPT_GO and not block_size_requested and export.min_block_bytes > 1:
            # Non-default alignment: the client must promise to honour it (the spec suggests
            # sending the constraints first, to save a round trip).
            raise OptionError(W.NBD_REP_ERR_BLOCK_SIZE_REQD,
                              f"export {export.name!r} needs NBD_INFO_BLOCK_SIZE",
                              block_size_info)
        flags = export.transmission_flags(structured)
        out = bytearray(option_reply(option, W.NBD_REP_INFO, W.INFO_EXPORT_STRUCT.pack(
            W.NBD_INFO_EXPORT, export.size_bytes, flags)))
        if W.NBD_INFO_NAME in requests:
            out += option_reply(option, W.NBD_REP_INFO,
                                W.U16.pack(W.NBD_INFO_NAME) + export.name.encode("utf-8"))
        if W.NBD_INFO_DESCRIPTION in requests and export.description:
            out += option_reply(option, W.NBD_REP_INFO, W.U16.pack(W.NBD_INFO_DESCRIPTION)
                                + export.description.encode("utf-8"))
        # Sent whether asked for or not (the spec allows unrequested information).
        out += block_size_info + option_reply(option, W.NBD_REP_ACK)
        return InfoAnswer(bytes(out), export, block_size_requested)

    def answer_meta_context(self, option: int, data: bytes, *, structured: bool,
                            tls_active: bool, identity: str | None) -> MetaContextAnswer:
        """``NBD_OPT_LIST_META_CONTEXT`` or ``NBD_OPT_SET_META_CONTEXT``: the contexts the
        queries match on the export the data names (only ``base:allocation`` exists)."""
        setting = option == W.NBD_OPT_SET_META_CONTEXT
        if not structured:
            raise OptionError(W.NBD_REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
        request = _MetaRequest.parse(data)
        export = self.resolve(request.export_name)
        if export is None:
            raise OptionError(W.NBD_REP_ERR_UNKNOWN, f"no export named {request.export_name!r}")
        refusal = self.refusal(export, tls_active=tls_active, identity=identity)
        if refusal is not None:
            # TLS_REQD is kept for the options that choose an export (the spec's SELECTIVETLS).
            raise OptionError(W.NBD_REP_ERR_POLICY, refusal.message)
        found = not request.queries and not setting  # LIST with no query lists everything
        for q in request.queries:
            namespace, colon, leaf = q.partition(":")
            if not colon or not namespace:
                raise OptionError(W.NBD_REP_ERR_INVALID, f"query lacks a namespace: {q!r}")
            if namespace == "base":
                # "base:" is a wildcard for LIST and ignored by SET; unknown leaves ignored.
                found |= leaf == "allocation" or (leaf == "" and not setting)
        out = b""
        if found:
            out = option_reply(option, W.NBD_REP_META_CONTEXT,
                               W.U32.pack(W.BASE_ALLOCATION_ID if setting else 0)
                               + W.BASE_ALLOCATION.encode("ascii"))
        selected = {W.BASE_ALLOCATION_ID: W.BASE_ALLOCATION} if found and setting else {}
        return MetaContextAnswer(out + option_reply(option, W.NBD_REP_ACK), export.name,
                                 selected)


@dataclass(frozen=True, slots=True)
class _MetaRequest:
    export_name: str
    queries: list[str]

    @classmethod
    def parse(cls, data: bytes) -> _MetaRequest:
        # 32-bit name length, name, 32-bit query count, queries (32-bit length, string).
        pos = 0
        end = len(data)

        def u32() -> int:
            nonlocal pos
            if end - pos < 4:
                raise OptionError(W.NBD_REP_ERR_INVALID, "meta context request truncated")
            (v,) = W.U32.unpack_from(data, pos)
            pos += 4
            return int(v)

        def string(n: int, what: str) -> str:
            nonlocal pos
            if n > end - pos:
                raise OptionError(W.NBD_REP_ERR_INVALID, f"{what} runs past the option data")
            s = decode_string(data[pos:pos + n], what)
            pos += n
            return s

        name = string(u32(), "export name")
        count = u32()
        if count > (end - pos) // 4:
            raise OptionError(W.NBD_REP_ERR_INVALID, "query count runs past the option data")
        if count > W.NBD_MAX_META_QUERIES:
            raise OptionError(W.NBD_REP_ERR_TOO_BIG,
                              f"more than {W.NBD_MAX_META_QUERIES} meta context queries")
        queries = [string(u32(), "meta context query") for _ in range(count)]
        if pos != end:
            raise OptionError(W.NBD_REP_ERR_INVALID, "trailing bytes after the queries")
        return cls(name, queries)


__all__ = [
    "IMPLEMENTED_OPTIONS",
    "ExportLookup",
    "ExportSource",
    "Exports",
    "InfoAnswer",
    "MetaContextAnswer",
    "OptionError",
    "decode_string",
    "option_reply",
]
