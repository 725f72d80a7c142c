"""Tests of cowd.frontends.nbd.protocol, .options and .wire, the sans-I/O NBD server
protocol.

The client side of every exchange is built here from the numbers in the NBD protocol
document (NetworkBlockDevice/nbd doc/proto.md), not from the module's encoder, and the
server's replies are parsed here with a parser of our own.  The real-peer tests at the end
drive the codec from a throwaway blocking socket server against nbdinfo, nbdcopy, qemu-io
and qemu-img.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import itertools
import json
import os
import random
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowd.frontends.nbd import options as nbd_options
from cowd.frontends.nbd import protocol as nbd_proto
from cowd.frontends.nbd import wire as nbd_wire
from cowd.frontends.nbd.protocol import NEED_DATA, ServerConnection
from cowd.frontends.nbd.wire import (
    Aborted,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    NbdProtocolError,
    NbdUsageError,
    NegotiationDone,
    OptionHandled,
    Request,
)
from tests.support.nbdspec import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EIO,
    ENOMEM,
    ENOSPC,
    ENOTSUP,
    EOVERFLOW,
    EPERM,
    ESHUTDOWN,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META,
    OPT_PEEK,
    OPT_SET_META,
    OPT_STARTTLS,
    OPT_STRUCTURED,
    REP_ACK,
    REP_ERR_BLOCK_SIZE_REQD,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META,
    REP_SERVER,
    SIMPLE_MAGIC,
    STRUCT_MAGIC,
    TF,
    KiB,
    MiB,
    client_flags,
    info_data,
    meta_data,
    opt,
    opt_header,
    parse_option_replies,
    parse_structured,
    req,
    tflags,
)
from tests.support.peers import need, run

# ---- fixtures and drivers --------------------------------------------------------------------

DISK = ExportInfo("disk", 1 * MiB, can_trim=True, can_write_zeroes=True, can_fast_zero=True,
                  can_cache=True, can_multi_conn=True, description="a test disk")
RO = ExportInfo("ro", 64 * KiB, read_only=True, can_trim=True, can_write_zeroes=True)
ALIGNED = ExportInfo("aligned", 1 * MiB, min_block_bytes=512, preferred_block_bytes=4096,
                     max_block_bytes=64 * KiB, can_fua=False, can_flush=False)
EXPORTS = {e.name: e for e in (DISK, RO, ALIGNED)}


def new_conn(**kw: Any) -> ServerConnection:
    return ServerConnection(EXPORTS, **kw)


def drain(conn: ServerConnection) -> tuple[list[Any], bytes]:
    events: list[Any] = []
    out = bytearray()
    while True:
        ev = conn.next_event()
        out += conn.data_to_send()
        if ev is NEED_DATA:
            return events, bytes(out)
        events.append(ev)
        if isinstance(ev, ConnectionClosed):
            return events, bytes(out)


def feed(conn: ServerConnection, data: bytes) -> tuple[list[Any], bytes]:
    conn.receive_data(data)
    return drain(conn)


def handshake(**kw: Any) -> ServerConnection:
    conn = new_conn(**kw)
    greeting = conn.data_to_send()
    assert greeting == NBDMAGIC + IHAVEOPT + b"\x00\x03"
    events, out = feed(conn, client_flags())
    assert events == [] and out == b""
    return conn


def negotiate(export: str = "disk", structured: bool = True, meta: bool = True,
              infos: Sequence[int] = (INFO_BLOCK_SIZE,), **kw: Any) -> ServerConnection:
    conn = handshake(**kw)
    data = b""
    if structured:
        data += opt(OPT_STRUCTURED)
        if meta:
            data += opt(OPT_SET_META, meta_data(export, ["base:allocation"]))
    data += opt(OPT_GO, info_data(export, infos))
    events, _ = feed(conn, data)
    assert isinstance(events[-1], NegotiationDone), events
    return conn


def one_request(conn: ServerConnection, data: bytes) -> Request:
    events, out = feed(conn, data)
    assert out == b""
    assert len(events) == 1 and isinstance(events[0], Request), events
    return events[0]


# ==== handshake ==============================================================================


def test_greeting_bytes() -> None:
    conn = new_conn()
    # NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE (bit 0) | NO_ZEROES (bit 1).
    assert conn.data_to_send() == bytes.fromhex("4e42444d41474943" "49484156454f5054" "0003")
    assert conn.data_to_send() == b""
    assert conn.phase == "handshake"


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_accepted(flags: int) -> None:
    conn = new_conn()
    events, _ = feed(conn, struct.pack(">I", flags))
    assert events == [] and conn.phase == "options" and conn.client_flags == flags


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF, 7])
def test_unknown_client_flags_drop(flags: int) -> None:
    conn = new_conn()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", flags))
    with pytest.raises(NbdProtocolError, match="unknown client flags"):
        conn.next_event()
    # It stays failed, and further bytes are not kept.
    conn.receive_data(b"x" * 1000)
    assert conn.buffered_bytes == 0
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_bad_option_magic_drops() -> None:
    conn = handshake()
    conn.receive_data(b"IHAVEOPX" + struct.pack(">II", OPT_LIST, 0))
    with pytest.raises(NbdProtocolError, match="bad option magic"):
        conn.next_event()


def test_eof_at_boundary_and_mid_message() -> None:
    conn = handshake()
    conn.receive_data(b"")
    assert drain(conn)[0] == [ConnectionClosed()]
    assert conn.phase == "closed"
    with pytest.raises(NbdUsageError):
        conn.receive_data(b"more")

    conn = handshake()
    conn.receive_data(opt(OPT_LIST)[:10])
    conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="middle of a message"):
        conn.next_event()


# ==== options ================================================================================


def test_list_exports() -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_LIST))
    assert events == [OptionHandled(OPT_LIST, REP_ACK)]
    replies = parse_option_replies(out)
    assert [r[:2] for r in replies] == [(OPT_LIST, REP_SERVER)] * 3 + [(OPT_LIST, REP_ACK)]
    names = []
    for _, _, payload in replies[:3]:
        (n,) = struct.unpack_from(">I", payload)
        names.append(payload[4:4 + n].decode())
        assert len(payload) - 4 - n >= 0
    assert names == ["disk", "ro", "aligned"]
    assert replies[0][2][4 + 4:] == b"a test disk"  # the description follows the name


def test_list_with_data_is_invalid_and_negotiation_goes_on() -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_LIST, b"junk") + opt(OPT_STRUCTURED))
    assert [(e.option, e.reply) for e in events] == [(OPT_LIST, REP_ERR_INVALID),
                                                     (OPT_STRUCTURED, REP_ACK)]
    replies = parse_option_replies(out)
    assert [(o, r) for o, r, _ in replies] == [(OPT_LIST, REP_ERR_INVALID),
                                               (OPT_STRUCTURED, REP_ACK)]


def test_list_refused_for_callback_without_lister() -> None:
    conn = ServerConnection(lambda name: DISK if name == "disk" else None)
    conn.data_to_send()
    events, out = feed(conn, client_flags() + opt(OPT_LIST))
    assert parse_option_replies(out)[0][:2] == (OPT_LIST, REP_ERR_POLICY)
    events, out = feed(conn, opt(OPT_GO, info_data("disk")))
    assert isinstance(events[0], NegotiationDone) and events[0].export is DISK


def _info_replies(out: bytes, option: int) -> dict[int, bytes]:
    replies = parse_option_replies(out)
    assert replies[-1][:2] == (option, REP_ACK), replies
    infos: dict[int, bytes] = {}
    for o, r, payload in replies[:-1]:
        assert (o, r) == (option, REP_INFO)
        (itype,) = struct.unpack_from(">H", payload)
        assert itype not in infos, "an information type is sent once"
        infos[itype] = payload[2:]
    return infos


def test_info_then_go_with_all_information() -> None:
    conn = handshake()
    want = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x7777]  # plus an unknown one
    events, out = feed(conn, opt(OPT_INFO, info_data("disk", want)))
    assert events == [OptionHandled(OPT_INFO, REP_ACK, "disk")]
    infos = _info_replies(out, OPT_INFO)
    size, flags = struct.unpack(">QH", infos[INFO_EXPORT])
    assert size == 1 * MiB
    # Not structured yet: no DF.  Trim, write zeroes, fast zero, flush, fua, cache, multi.
    assert flags == tflags("has_flags", "flush", "fua", "trim", "write_zeroes", "fast_zero",
                           "multi_conn", "cache")
    assert infos[INFO_NAME] == b"disk"
    assert infos[INFO_DESCRIPTION] == b"a test disk"
    assert struct.unpack(">III", infos[INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
    assert 0x7777 not in infos
    assert conn.phase == "options"

    events, out = feed(conn, opt(OPT_GO, info_data("disk", want)))
    assert _info_replies(out, OPT_GO) == infos  # same parameters, same information
    (done,) = events
    assert isinstance(done, NegotiationDone)
    assert done.export is DISK and not done.structured and done.meta_contexts == {}
    assert done.via == OPT_GO and done.block_size_requested
    assert conn.phase == "transmission"


def test_go_default_export_and_structured_flags() -> None:
    conn = new_conn(default_export="disk")
    conn.data_to_send()
    events, out = feed(conn, client_flags() + opt(OPT_STRUCTURED)
                       + opt(OPT_GO, info_data("", [INFO_NAME])))
    assert isinstance(events[-1], NegotiationDone) and events[-1].export is DISK
    assert parse_option_replies(out)[0] == (OPT_STRUCTURED, REP_ACK, b"")
    infos = _info_replies(out[20:], OPT_GO)
    assert infos[INFO_NAME] == b"disk"  # the canonical name of the default export
    (_, flags) = struct.unpack(">QH", infos[INFO_EXPORT])
    assert flags & (1 << TF["df"])
    assert not events[-1].block_size_requested


def test_go_read_only_export_flags() -> None:
    conn = handshake()
    _, out = feed(conn, opt(OPT_GO, info_data("ro")))
    infos = _info_replies(out, OPT_GO)
    _, flags = struct.unpack(">QH", infos[INFO_EXPORT])
    # Read-only: READ_ONLY set, and no trim / write zeroes advertised.
    assert flags == tflags("has_flags", "read_only", "flush", "fua")


def test_go_unknown_export_then_retry() -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_GO, info_data("nosuch")))
    assert events[0].reply == REP_ERR_UNKNOWN and conn.phase == "options"
    ((o, r, msg),) = parse_option_replies(out)
    assert (o, r) == (OPT_GO, REP_ERR_UNKNOWN) and b"nosuch" in msg
    events, _ = feed(conn, opt(OPT_GO, info_data("disk")))
    assert isinstance(events[0], NegotiationDone)


@pytest.mark.parametrize("data", [
    b"",  # shorter than 6 bytes
    b"\x00\x00\x00",
    struct.pack(">I", 100) + b"disk" + b"\x00\x00",  # name length past the data
    struct.pack(">I", 0xFFFFFFFF) + b"\x00\x00",  # name length near 2^32
    info_data("disk") + b"\x00",  # trailing byte
    info_data("disk", [1, 2])[:-2],  # count says 2, one given
    info_data(b"di\x00sk"),  # NUL in the name
    info_data(b"\xff\xfe"),  # not UTF-8
    info_data("x" * 5000),  # longer than the spec's 4096-byte string limit
])
def test_go_malformed_is_invalid(data: bytes) -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_GO, data))
    assert events == [OptionHandled(OPT_GO, REP_ERR_INVALID, None, events[0].message)]
    assert parse_option_replies(out)[0][:2] == (OPT_GO, REP_ERR_INVALID)
    assert conn.phase == "options"


def test_go_without_block_size_on_aligned_export() -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_GO, info_data("aligned")))
    replies = parse_option_replies(out)
    assert [r[:2] for r in replies] == [(OPT_GO, REP_INFO), (OPT_GO, REP_ERR_BLOCK_SIZE_REQD)]
    assert struct.unpack(">HIII", replies[0][2]) == (INFO_BLOCK_SIZE, 512, 4096, 64 * KiB)
    # INFO without the request is fine (it does not commit the client).
    events, out = feed(conn, opt(OPT_INFO, info_data("aligned")))
    assert events[0].reply == REP_ACK
    events, out = feed(conn, opt(OPT_GO, info_data("aligned", [INFO_BLOCK_SIZE])))
    assert isinstance(events[0], NegotiationDone)


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name(no_zeroes: bool) -> None:
    conn = new_conn()
    conn.data_to_send()
    events, out = feed(conn, client_flags(no_zeroes=no_zeroes) + opt(OPT_EXPORT_NAME, b"ro"))
    (done,) = events
    assert isinstance(done, NegotiationDone) and done.via == OPT_EXPORT_NAME
    expect = struct.pack(">QH", 64 * KiB, tflags("has_flags", "read_only", "flush", "fua"))
    assert out == expect + (b"" if no_zeroes else bytes(124))
    assert conn.phase == "transmission"


def test_export_name_unknown_drops() -> None:
    conn = handshake()
    conn.receive_data(opt(OPT_EXPORT_NAME, b"nosuch"))
    with pytest.raises(NbdProtocolError, match="names no export"):
        conn.next_event()


def test_export_name_5000_bytes_refused_from_header_alone() -> None:
    conn = handshake()
    conn.receive_data(opt_header(OPT_EXPORT_NAME, 5000))  # the name itself never arrives
    with pytest.raises(NbdProtocolError, match="too long"):
        conn.next_event()
    assert conn.buffered_bytes == 0


def test_abort() -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_ABORT, b"ignored"))
    assert events[0] == Aborted()
    assert parse_option_replies(out) == [(OPT_ABORT, REP_ACK, b"")]
    # Nothing after ABORT is kept; the connection reports closed.
    conn.receive_data(b"garbage" * 100)
    assert conn.buffered_bytes == 0
    assert conn.next_event() == ConnectionClosed()


def test_abort_with_4gib_length_is_not_waited_for() -> None:
    conn = handshake()
    events, out = feed(conn, opt_header(OPT_ABORT, 0xFFFFFFFF))
    assert events[0] == Aborted() and parse_option_replies(out)[0][:2] == (OPT_ABORT, REP_ACK)


def test_structured_reply_and_starttls() -> None:
    conn = handshake()
    events, _ = feed(conn, opt(OPT_STRUCTURED, b"x") + opt(OPT_STRUCTURED)
                       + opt(OPT_STARTTLS) + opt(OPT_STARTTLS, b"x"))
    assert [(e.option, e.reply) for e in events] == [
        (OPT_STRUCTURED, REP_ERR_INVALID), (OPT_STRUCTURED, REP_ACK),
        (OPT_STARTTLS, REP_ERR_POLICY), (OPT_STARTTLS, REP_ERR_INVALID)]
    assert conn.structured


@pytest.mark.parametrize("option", [OPT_PEEK, 11, 12, 0, 0x12345678, 0xFFFFFFFF])
def test_unknown_option_unsup_and_negotiation_continues(option: int) -> None:
    conn = handshake()
    events, out = feed(conn, opt(option, os.urandom(300)) + opt(OPT_GO, info_data("disk")))
    assert events[0] == OptionHandled(option, REP_ERR_UNSUP, None, events[0].message)
    assert parse_option_replies(out)[0][:2] == (option, REP_ERR_UNSUP)
    assert isinstance(events[1], NegotiationDone)


def test_unknown_option_discarded_not_buffered() -> None:
    conn = handshake()
    events, _ = feed(conn, opt_header(0x4242, 500 * KiB))
    assert events == []
    for _ in range(10):
        events, _ = feed(conn, bytes(50 * KiB))
        assert events == [] or events[0].reply == REP_ERR_UNSUP
        assert conn.buffered_bytes == 0  # discarded as it arrives
    assert events[0].reply == REP_ERR_UNSUP


def test_oversized_known_option_skipped_then_too_big() -> None:
    conn = handshake()
    length = nbd_wire.NBD_MAX_OPTION_LENGTH + 1
    events, _ = feed(conn, opt_header(OPT_LIST_META, length) + bytes(length)
                       + opt(OPT_LIST))
    assert [(e.option, e.reply) for e in events] == [(OPT_LIST_META, REP_ERR_TOO_BIG),
                                                     (OPT_LIST, REP_ACK)]
    assert conn.buffered_bytes == 0


@pytest.mark.parametrize("option", [OPT_GO, OPT_SET_META, 0x999])
def test_4gib_option_length_refused_and_dropped(option: int) -> None:
    conn = handshake()
    conn.receive_data(opt_header(option, 0xFFFFFFFF) + b"abc")
    with pytest.raises(NbdProtocolError, match="too long to skip"):
        conn.next_event()
    # A best-effort TOO_BIG reply is queued before the drop; nothing was buffered.
    assert parse_option_replies(conn.data_to_send())[0][:2] == (option, REP_ERR_TOO_BIG)
    assert conn.buffered_bytes == 0


def test_too_many_options_drop() -> None:
    conn = handshake()
    conn.receive_data(opt(OPT_STRUCTURED) * 200)
    drain(conn)
    with pytest.raises(NbdProtocolError, match="too many options"):
        for _ in range(nbd_wire.NBD_MAX_OPTIONS):
            feed(conn, opt(OPT_STRUCTURED))


def test_shutdown_refuses_options_and_requests() -> None:
    conn = handshake()
    conn.start_shutdown()
    events, _ = feed(conn, opt(OPT_GO, info_data("disk")) + opt(OPT_ABORT))
    assert events[0].reply == REP_ERR_SHUTDOWN and events[1] == Aborted()

    conn = negotiate()
    conn.start_shutdown()
    assert one_request(conn, req(CMD_READ, 0, 512)).error == ESHUTDOWN


# ---- meta contexts ------------------------------------------------------------------------


def _meta_replies(out: bytes, option: int) -> list[tuple[int, bytes]]:
    replies = parse_option_replies(out)
    assert replies[-1][:2] == (option, REP_ACK), replies
    ctx = []
    for o, r, payload in replies[:-1]:
        assert (o, r) == (option, REP_META)
        (cid,) = struct.unpack_from(">I", payload)
        ctx.append((cid, payload[4:]))
    return ctx


def test_meta_context_needs_structured_replies() -> None:
    conn = handshake()
    events, _ = feed(conn, opt(OPT_LIST_META, meta_data("disk", []))
                       + opt(OPT_SET_META, meta_data("disk", ["base:allocation"])))
    assert [e.reply for e in events] == [REP_ERR_INVALID, REP_ERR_INVALID]


@pytest.mark.parametrize("queries, expect", [
    ([], [b"base:allocation"]),  # no query: everything
    (["base:"], [b"base:allocation"]),  # the base: wildcard
    (["base:allocation"], [b"base:allocation"]),
    (["base:nosuch", "qemu:dirty-bitmap:x", "x-foo:"], []),  # unknown leaf / namespace
    (["base:allocation", "base:"], [b"base:allocation"]),  # reported once
])
def test_list_meta_context(queries: list[str], expect: list[bytes]) -> None:
    conn = handshake()
    feed(conn, opt(OPT_STRUCTURED))
    _, out = feed(conn, opt(OPT_LIST_META, meta_data("disk", queries)))
    ctx = _meta_replies(out, OPT_LIST_META)
    assert [name for _, name in ctx] == expect
    assert all(cid == 0 for cid, _ in ctx)  # LIST ids are reserved: zero


def test_set_meta_context_selects_base_allocation() -> None:
    conn = handshake()
    events, out = feed(conn, opt(OPT_STRUCTURED)
                       + opt(OPT_SET_META, meta_data("disk", ["base:", "base:allocation"])))
    ((cid, name),) = _meta_replies(out[20:], OPT_SET_META)
    assert name == b"base:allocation" and cid != 0
    events, _ = feed(conn, opt(OPT_GO, info_data("disk")))
    assert events[0].meta_contexts == {cid: "base:allocation"}


def test_set_meta_context_for_another_export_is_not_kept() -> None:
    conn = handshake()
    feed(conn, opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_data("ro", ["base:allocation"])))
    events, _ = feed(conn, opt(OPT_GO, info_data("disk")))
    assert events[0].meta_contexts == {}
    req_ = one_request(conn, req(CMD_BLOCK_STATUS, 0, 4096))
    assert req_.error == EINVAL  # block status without a selected context


def test_set_meta_context_failure_clears_selection() -> None:
    conn = handshake()
    feed(conn, opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_data("disk", ["base:allocation"])))
    events, _ = feed(conn, opt(OPT_SET_META, meta_data("disk", ["nocolon"])))
    assert events[0].reply == REP_ERR_INVALID
    events, _ = feed(conn, opt(OPT_GO, info_data("disk")))
    assert events[0].meta_contexts == {}


@pytest.mark.parametrize("data, reply", [
    (b"", REP_ERR_INVALID),
    (struct.pack(">I", 4) + b"disk", REP_ERR_INVALID),  # no query count
    (struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF), REP_ERR_INVALID),
    (struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 0xFFFFFFF0),
     REP_ERR_INVALID),  # query length past the end
    (meta_data("disk", ["base:allocation"]) + b"\x00", REP_ERR_INVALID),  # trailing
    (meta_data("disk", ["x" * 5000]), REP_ERR_INVALID),  # query longer than 4096
    (meta_data("disk", ["base:allocation"] * 129), REP_ERR_TOO_BIG),  # > NBD_MAX_META_QUERIES
    (meta_data("disk", [b"base:\xff"]), REP_ERR_INVALID),  # not UTF-8
    (meta_data("nosuch", ["base:allocation"]), REP_ERR_UNKNOWN),
    (struct.pack(">I", 0xFFFFFFFF) + struct.pack(">I", 0), REP_ERR_INVALID),
])
@pytest.mark.parametrize("option", [OPT_LIST_META, OPT_SET_META])
def test_meta_context_malformed(option: int, data: bytes, reply: int) -> None:
    conn = handshake()
    feed(conn, opt(OPT_STRUCTURED))
    events, out = feed(conn, opt(option, data))
    assert (events[0].option, events[0].reply) == (option, reply)
    assert parse_option_replies(out) [0][:2] == (option, reply)
    assert conn.phase == "options"


# ==== transmission: requests =================================================================


def test_read_request_event() -> None:
    conn = negotiate()
    r = one_request(conn, req(CMD_READ, 4096, 8192, cookie=0xDEADBEEFCAFEF00D))
    assert (r.command, r.offset, r.length, r.cookie, r.error, r.data) == (
        CMD_READ, 4096, 8192, 0xDEADBEEFCAFEF00D, 0, None)


def test_write_request_carries_payload_in_any_chunking() -> None:
    conn = negotiate()
    payload = os.urandom(3000)
    wire = req(CMD_WRITE, 512, 3000, flags=FLAG_FUA, data=payload) + req(CMD_FLUSH, cookie=9)
    conn.receive_data(wire[:30])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(wire[30:2000])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(wire[2000:])
    w = conn.next_event()
    assert isinstance(w, Request) and w.data == payload and w.fua and w.error == 0
    f = conn.next_event()
    assert isinstance(f, Request) and f.command == CMD_FLUSH and f.cookie == 9
    assert conn.next_event() is NEED_DATA


def test_write_payload_from_the_adapters_buffers_stale_bytes_overwritten() -> None:
    """payload_buffer: a recycled buffer (old bytes in it) is what the event carries, every
    byte replaced by the write's; a refused write takes no buffer."""
    asked: list[int] = []

    def recycled(n: int) -> bytearray:
        asked.append(n)
        return bytearray(b"\xee" * n)

    conn = negotiate(payload_buffer=recycled)
    payload = os.urandom(5000)
    wire = req(CMD_WRITE, 4096, 5000, data=payload)
    for i in range(0, len(wire), 777):  # header and payload split anywhere
        conn.receive_data(wire[i:i + 777])
    events, _ = drain(conn)
    assert len(events) == 1 and isinstance(events[0], Request)
    assert isinstance(events[0].data, bytearray) and events[0].data == payload
    assert asked == [5000]
    r = one_request(conn, req(CMD_WRITE, 1 * MiB - 100, 200, data=bytes(200)))
    assert r.error == ENOSPC and r.data is None and asked == [5000]


def test_receive_chunks_are_under_the_allocators_mmap_threshold() -> None:
    """Each receive's fresh buffer (a client's socket, a worker's channel) must come from the
    heap, not an mmap of its own (see RECEIVE_CHUNK_BYTES and cowd/process.py)."""
    from cowd.frontends.nbd.wire import RECEIVE_CHUNK_BYTES
    from cowd.process import LARGE_BUFFER_BYTES
    from cowd.workers.channel import RECEIVE_BYTES

    assert RECEIVE_CHUNK_BYTES < LARGE_BUFFER_BYTES
    assert RECEIVE_BYTES < LARGE_BUFFER_BYTES


@pytest.mark.parametrize("cmd, offset, length, errno", [
    (CMD_READ, 1 * MiB - 512, 1024, EINVAL),  # past the end
    (CMD_READ, 1 * MiB, 0, 0),  # zero length at the end: allowed
    (CMD_READ, 2**64 - 512, 1024, EINVAL),  # offset + length wraps past 2^64
    (CMD_READ, 0, 0xFFFFFFFF, EINVAL),  # 4 GiB read: past the end, nothing allocated
    (CMD_READ, 0, 32 * MiB + 1, EINVAL),
    (CMD_TRIM, 1 * MiB, 1, EINVAL),
    (CMD_TRIM, 2**64 - 1, 2, EINVAL),
    (CMD_WRITE_ZEROES, 1 * MiB - 1, 2, ENOSPC),  # write past the end: ENOSPC
    (CMD_WRITE_ZEROES, 2**64 - 4096, 8192, ENOSPC),
    (CMD_CACHE, 1 * MiB, 4096, EINVAL),
    (CMD_BLOCK_STATUS, 1 * MiB - 4096, 8192, EINVAL),
    (CMD_BLOCK_STATUS, 0, 0, EINVAL),
    (CMD_FLUSH, 2**64 - 1, 0xFFFFFFFF, 0),  # reserved fields: ignored
    (8, 0, 0, EINVAL),  # NBD_CMD_RESIZE: not supported
    (9, 0, 0, EINVAL),
    (0xFFFF, 0, 100, EINVAL),  # unknown command: no payload assumed
])
def test_request_validation(cmd: int, offset: int, length: int, errno: int) -> None:
    conn = negotiate()
    r = one_request(conn, req(cmd, offset, length))
    assert r.error == errno
    assert conn.buffered_bytes == 0


@pytest.mark.parametrize("offset, length", [(1 * MiB - 100, 200), (2**64 - 100, 200),
                                            (1 * MiB, 1)])
def test_write_past_end_enospc_and_payload_consumed(offset: int, length: int) -> None:
    conn = negotiate()
    events, _ = feed(conn, req(CMD_WRITE, offset, length, data=b"w" * length)
                     + req(CMD_READ, 0, 512, cookie=5))
    assert [(e.command, e.error, e.data) for e in events] == [(CMD_WRITE, ENOSPC, None),
                                                              (CMD_READ, 0, None)]


@pytest.mark.parametrize("cmd, flags", [
    (CMD_READ, 1 << 5),  # undefined bit
    (CMD_READ, 1 << 15),
    (CMD_READ, FLAG_NO_HOLE),  # valid only for WRITE_ZEROES
    (CMD_READ, FLAG_REQ_ONE),
    (CMD_WRITE, FLAG_DF),
    (CMD_WRITE_ZEROES, FLAG_REQ_ONE),
    (CMD_BLOCK_STATUS, FLAG_FAST_ZERO),
])
def test_unknown_or_misplaced_flags_einval(cmd: int, flags: int) -> None:
    conn = negotiate()
    length = 512
    data = b"d" * length if cmd == CMD_WRITE else b""
    events, _ = feed(conn, req(cmd, 0, length, flags=flags, data=data) + req(CMD_FLUSH))
    assert [(e.command, e.error) for e in events] == [(cmd, EINVAL), (CMD_FLUSH, 0)]


def test_flags_that_need_negotiation() -> None:
    conn = negotiate()  # structured: DF offered; FUA offered; FAST_ZERO offered
    for cmd, flags in [(CMD_READ, FLAG_DF | FLAG_FUA), (CMD_WRITE_ZEROES, FLAG_FAST_ZERO
                                                        | FLAG_NO_HOLE),
                       (CMD_BLOCK_STATUS, FLAG_REQ_ONE), (CMD_TRIM, FLAG_FUA)]:
        assert one_request(conn, req(cmd, 0, 4096, flags=flags)).error == 0
    conn = negotiate(structured=False)  # no DF without structured replies
    assert one_request(conn, req(CMD_READ, 0, 512, flags=FLAG_DF)).error == EINVAL
    conn = negotiate("aligned", meta=False)  # no FUA, no FLUSH, no TRIM / WRITE_ZEROES
    assert one_request(conn, req(CMD_READ, 0, 512, flags=FLAG_FUA)).error == EINVAL
    assert one_request(conn, req(CMD_FLUSH)).error == EINVAL
    assert one_request(conn, req(CMD_TRIM, 0, 512)).error == EINVAL
    assert one_request(conn, req(CMD_WRITE_ZEROES, 0, 512)).error == EINVAL
    assert one_request(conn, req(CMD_CACHE, 0, 512)).error == EINVAL
    assert one_request(conn, req(CMD_BLOCK_STATUS, 0, 512)).error == EINVAL


def test_read_only_export_eperm() -> None:
    conn = negotiate("ro")
    events, _ = feed(conn, req(CMD_WRITE, 0, 100, data=b"x" * 100) + req(CMD_TRIM, 0, 512)
                     + req(CMD_WRITE_ZEROES, 0, 512) + req(CMD_READ, 0, 512))
    assert [(e.command, e.error) for e in events] == [
        (CMD_WRITE, EPERM), (CMD_TRIM, EPERM), (CMD_WRITE_ZEROES, EPERM), (CMD_READ, 0)]
    assert events[0].data is None


def test_block_size_constraints_enforced() -> None:
    conn = negotiate("aligned", meta=False)
    assert one_request(conn, req(CMD_READ, 512, 1024)).error == 0
    assert one_request(conn, req(CMD_READ, 100, 512)).error == EINVAL  # misaligned offset
    assert one_request(conn, req(CMD_READ, 512, 100)).error == EINVAL  # misaligned length
    assert one_request(conn, req(CMD_READ, 0, 128 * KiB)).error == EINVAL  # > max block
    # A write over the advertised maximum but within 32 MiB is read (and refused).
    events, _ = feed(conn, req(CMD_WRITE, 0, 128 * KiB, data=bytes(128 * KiB)))
    assert events[0].error == EINVAL and events[0].data is None


def test_huge_write_is_refused_for_that_request_only_without_allocation() -> None:
    """A write above the advertised maximum (even one that would not fit the 32 MiB payload
    bound) is NBD_EINVAL for that request: its payload is counted down as it arrives, never
    stored, and the next request is parsed as usual (nbdkit does the same)."""
    chunk = bytes(1 * MiB)
    big = ExportInfo("big", 256 * MiB)
    for length in (32 * MiB + 1, 96 * MiB):
        conn = ServerConnection({"big": big})
        conn.data_to_send()
        feed(conn, client_flags() + opt(OPT_GO, info_data("big", [INFO_BLOCK_SIZE])))
        conn.receive_data(req(CMD_WRITE, 0, length, cookie=7))
        assert drain(conn) == ([], b"")
        sent = 0
        while sent < length:
            n = min(len(chunk), length - sent)
            conn.receive_data(chunk[:n])
            sent += n
            assert conn.buffered_bytes <= nbd_wire.RECEIVE_BUFFER_LIMIT
            events, _ = drain(conn)
            assert events == [] or sent == length
        assert [(e.cookie, e.error, e.data) for e in events] == [(7, EINVAL, None)]
        assert one_request(conn, req(CMD_READ, 0, 4096, cookie=8)).error == 0
    # A 4 GiB length costs nothing up front either.
    conn = negotiate()
    conn.receive_data(req(CMD_WRITE, 0, 0xFFFFFFFF) + b"abc")
    assert drain(conn) == ([], b"") and conn.buffered_bytes == 0


def test_max_write_accepted() -> None:
    export = ExportInfo("big", 64 * MiB)
    conn = ServerConnection({"big": export})
    conn.data_to_send()
    feed(conn, client_flags() + opt(OPT_GO, info_data("big")))
    payload = bytes(range(256)) * (32 * MiB // 256)
    wire = req(CMD_WRITE, 0, 32 * MiB)
    events, _ = feed(conn, wire)
    assert events == [] and conn.buffered_bytes == 0
    view = memoryview(payload)
    for i in range(0, len(payload), nbd_wire.RECEIVE_CHUNK_BYTES):
        conn.receive_data(view[i:i + nbd_wire.RECEIVE_CHUNK_BYTES])
        assert conn.buffered_bytes <= nbd_wire.MAX_BUFFERED_BYTES
    events, _ = drain(conn)
    assert events[0].data == payload


def test_bad_request_magic_drops() -> None:
    conn = negotiate()
    conn.receive_data(struct.pack(">IHHQQI", 0x12560953, 0, CMD_READ, 1, 0, 512))
    with pytest.raises(NbdProtocolError, match="bad request magic"):
        conn.next_event()


def test_disc() -> None:
    conn = negotiate()
    events, _ = feed(conn, req(CMD_READ, 0, 512, cookie=1) + req(CMD_DISC, cookie=2)
                     + b"anything after DISC is ignored")
    assert [type(e) for e in events] == [Request, Disconnect, ConnectionClosed]
    assert events[1] == Disconnect(2)
    assert conn.buffered_bytes == 0


def test_eof_mid_write_payload() -> None:
    conn = negotiate()
    conn.receive_data(req(CMD_WRITE, 0, 1000, data=b"x" * 500))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="middle of a message"):
        conn.next_event()


def test_receive_buffer_bound_enforced() -> None:
    conn = negotiate()
    chunk = req(CMD_FLUSH) * (nbd_wire.RECEIVE_BUFFER_LIMIT // 28)
    conn.receive_data(chunk)
    with pytest.raises(NbdUsageError, match="drain next_event"):
        conn.receive_data(req(CMD_FLUSH) * 2)
    assert conn.buffered_bytes <= nbd_wire.RECEIVE_BUFFER_LIMIT


# ==== replies ================================================================================


def test_simple_replies() -> None:
    conn = negotiate(structured=False)
    r = one_request(conn, req(CMD_READ, 0, 4096, cookie=0x0102030405060708))
    # magic, error, cookie; the data follows, sent by the caller.
    assert conn.read_reply_header(r) == bytes.fromhex("67446698" "00000000" "0102030405060708")
    assert conn.error_reply(r, EIO) == bytes.fromhex("67446698" "00000005" "0102030405060708")
    w = one_request(conn, req(CMD_FLUSH, cookie=3))
    assert conn.ok_reply(w) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, 3)
    with pytest.raises(NbdUsageError):
        conn.ok_reply(r)


def test_structured_read_replies() -> None:
    conn = negotiate()
    r = one_request(conn, req(CMD_READ, 8192, 4096, cookie=77))
    hdr = conn.read_reply_header(r)
    # magic, flags=DONE, type=OFFSET_DATA(1), cookie, length = 8 + data, then the offset.
    assert hdr == struct.pack(">IHHQIQ", STRUCT_MAGIC, 1, 1, 77, 4096 + 8, 8192)
    err = parse_structured(conn.error_reply(r, EIO, "disk on fire"))
    assert err == [(1, 2**15 + 1, 77, struct.pack(">IH", EIO, 12) + b"disk on fire")]
    z = one_request(conn, req(CMD_READ, 0, 0, cookie=78))
    assert parse_structured(conn.read_reply_header(z)) == [(1, 0, 78, b"")]


def test_reply_builders_against_spec_bytes() -> None:
    assert nbd_wire.offset_hole_chunk(5, 4096, 512, done=False) == struct.pack(
        ">IHHQIQI", STRUCT_MAGIC, 0, 2, 5, 12, 4096, 512)
    assert nbd_wire.none_chunk(6) == struct.pack(">IHHQI", STRUCT_MAGIC, 1, 0, 6, 0)
    assert nbd_wire.error_offset_chunk(7, EIO, 1234, "x", done=True) == struct.pack(
        ">IHHQIIHcQ", STRUCT_MAGIC, 1, 2**15 + 2, 7, 4 + 2 + 1 + 8, EIO, 1, b"x", 1234)
    assert nbd_wire.offset_data_header(8, 0, 1, done=False) == struct.pack(
        ">IHHQIQ", STRUCT_MAGIC, 0, 1, 8, 9, 0)
    long_msg = nbd_wire.error_chunk(9, EINVAL, "é" * 3000)  # 6000 bytes: cut to <= 4096
    ((_, _, _, payload),) = parse_structured(long_msg)
    (_, mlen) = struct.unpack_from(">IH", payload)
    assert mlen <= 4096 and payload[6:].decode() == "é" * (mlen // 2)
    for bad in (lambda: nbd_wire.error_chunk(1, 0), lambda: nbd_wire.offset_hole_chunk(
            1, 0, 0, done=True), lambda: nbd_wire.offset_data_header(1, 0, 0, done=True),
            lambda: nbd_wire.block_status_chunk(1, 1, [])):
        with pytest.raises(ValueError):
            bad()


def test_block_status_reply() -> None:
    conn = negotiate()
    cid = next(iter(conn.meta_contexts))
    r = one_request(conn, req(CMD_BLOCK_STATUS, 0, 64 * KiB, cookie=11))
    hole_zero = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
    out = conn.block_status_reply(r, [(4096, 0), (0, 0), (16 * KiB, hole_zero),
                                      (1 * MiB, 0), (4096, hole_zero)])
    ((flags, rtype, cookie, payload),) = parse_structured(out)
    assert (flags, rtype, cookie) == (1, 5, 11)
    # The zero-length run is dropped and nothing follows the run that covers the request.
    assert payload == struct.pack(">IIIIIII", cid, 4096, 0, 16 * KiB, hole_zero, 1 * MiB, 0)

    one = one_request(conn, req(CMD_BLOCK_STATUS, 0, 8192, flags=FLAG_REQ_ONE, cookie=12))
    ((_, _, _, payload),) = parse_structured(conn.block_status_reply(one, [(1 * MiB, 0),
                                                                           (4096, 1)]))
    assert payload == struct.pack(">III", cid, 8192, 0)  # one run, no longer than asked

    huge = conn.block_status_reply(r, [(2**40, hole_zero)])
    ((_, _, _, payload),) = parse_structured(huge)
    assert struct.unpack(">III", payload) == (cid, 2**32 - 2**16, hole_zero)

    no_meta = negotiate(meta=False)
    r2 = one_request(no_meta, req(CMD_READ, 0, 512))
    with pytest.raises(NbdUsageError):
        no_meta.block_status_reply(r2, [(512, 0)])


def test_errno_mapping() -> None:
    assert [nbd_wire.nbd_error(e) for e in (
        errno.EPERM, errno.EACCES, errno.EROFS, errno.EIO, errno.ENOMEM, errno.EINVAL,
        errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EOVERFLOW, errno.EOPNOTSUPP,
        errno.ENOTSUP, errno.ESHUTDOWN, errno.EBADF, errno.ENOENT)] == [
        EPERM, EPERM, EPERM, EIO, ENOMEM, EINVAL, ENOSPC, ENOSPC, ENOSPC, EOVERFLOW, ENOTSUP,
        ENOTSUP, ESHUTDOWN, EIO, EIO]


@pytest.mark.parametrize("kw", [
    {"size_bytes": -1}, {"size_bytes": 2**63}, {"min_block_bytes": 3},
    {"min_block_bytes": 2**17, "preferred_block_bytes": 2**17},
    {"preferred_block_bytes": 256}, {"max_block_bytes": 1000, "min_block_bytes": 512},
    {"max_block_bytes": 64 * MiB}, {"name": "x" * 4097}, {"description": "a\0b"},
])
def test_export_info_validation(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"name": "e", "size_bytes": MiB} | kw
    with pytest.raises(ValueError):
        ExportInfo(**args)


def test_module_does_no_io() -> None:
    for module in (nbd_proto, nbd_options, nbd_wire):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level:  # the codec's own modules
                imported |= {"." + (node.module or a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        allowed = {"__future__", "enum", "errno", "struct", "collections", "dataclasses",
                   "typing", ".wire", ".options"}
        assert imported <= allowed, (module.__name__, imported)


# ==== chunking independence (property test) ==================================================

_OFFSETS = st.sampled_from([0, 0, 512, 4096, 4096, 1 * MiB - 512, 1 * MiB, 2**63,
                            2**64 - 512, 2**64 - 1])
_LENGTHS = st.sampled_from([0, 1, 512, 4096, 4096, 65536, 0xFFFFFFFF, 32 * MiB + 1])


def _rare(draw: st.DrawFn, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def _client_stream(draw: st.DrawFn) -> bytes:
    """A plausible-to-hostile client byte stream: handshake, options, requests.  Stream-
    breaking mistakes (bad flags or magic, huge lengths, writes without their payload) are
    kept rare so that most examples reach the transmission phase."""
    flags = 4 if _rare(draw, 20) else draw(st.sampled_from([0, 1, 2, 3]))
    out = bytearray(struct.pack(">I", flags))
    names = st.sampled_from(["disk", "disk", "ro", "aligned", "", "nosuch"])
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            out += opt(OPT_LIST, draw(st.sampled_from([b"", b"x"])))
        elif kind in (1, 2):
            out += opt(OPT_STRUCTURED)
        elif kind == 3:
            out += opt(OPT_INFO, info_data(draw(names), draw(st.lists(
                st.integers(0, 5), max_size=4))))
        elif kind in (4, 5):
            q = draw(st.lists(st.sampled_from(["base:allocation", "base:", "x:y", "nocolon"]),
                              max_size=3))
            out += opt(OPT_SET_META if kind == 4 else OPT_LIST_META, meta_data(draw(names), q))
        elif kind == 6:
            out += opt(draw(st.integers(11, 2**32 - 1)), draw(st.binary(max_size=40)))
        elif kind == 7:
            out += opt(draw(st.sampled_from([OPT_GO, OPT_INFO, OPT_STARTTLS])),
                       draw(st.binary(max_size=12)))  # garbage option data
        elif kind == 8 and _rare(draw, 10):
            out += b"IHAVEOPX" + bytes(8)  # garbage magic
        elif kind == 9 and _rare(draw, 5):
            out += opt_header(draw(st.sampled_from([OPT_GO, 77])), 0xFFFFFFFF) + b"xy"
    end = draw(st.integers(0, 9))
    final_names = st.sampled_from(["disk"] * 4 + ["", "ro", "aligned", "nosuch"])
    if end == 0:
        out += opt(OPT_ABORT)
    elif end in (1, 2):
        out += opt(OPT_EXPORT_NAME, draw(final_names).encode())
    else:
        out += opt(OPT_GO, info_data(draw(final_names), [INFO_BLOCK_SIZE]))
    for _ in range(draw(st.integers(0, 10))):
        cmd = draw(st.sampled_from([CMD_READ, CMD_WRITE, CMD_WRITE, CMD_WRITE, CMD_FLUSH,
                                    CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS,
                                    8, 0xFFFF]))
        flags = draw(st.sampled_from([0, 0, 0, FLAG_FUA, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO,
                                      FLAG_NO_HOLE, 0x20]))
        cookie = draw(st.integers(0, 2**64 - 1))
        if cmd == CMD_WRITE and not _rare(draw, 15):
            payload = draw(st.binary(max_size=600))
            out += req(cmd, draw(_OFFSETS), len(payload), flags, cookie, payload)
        else:  # includes writes whose payload never comes (or is the next requests)
            out += req(cmd, draw(_OFFSETS), draw(_LENGTHS), flags, cookie)
    if draw(st.booleans()):
        out += req(CMD_DISC)
    if _rare(draw, 5):
        out += b"\x25\x60"  # a truncated trailing header
    return bytes(out)


def _run(stream: bytes, cuts: Sequence[int], eof: bool) -> tuple[list[Any], bytes, str | None]:
    conn = ServerConnection(EXPORTS, default_export="disk")
    out = bytearray(conn.data_to_send())
    events: list[Any] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    if eof:
        chunks.append(b"")
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            assert conn.buffered_bytes <= nbd_wire.MAX_BUFFERED_BYTES
            while (ev := conn.next_event()) is not NEED_DATA:
                out += conn.data_to_send()
                events.append(ev)
                if isinstance(ev, ConnectionClosed):
                    return events, bytes(out), None
            out += conn.data_to_send()
    except NbdProtocolError as e:
        out += conn.data_to_send()
        return events, bytes(out), str(e)
    return events, bytes(out), None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_client_stream(), eof=st.booleans(), data=st.data())
def test_same_events_whole_bytewise_and_random_chunks(stream: bytes, eof: bool,
                                                      data: st.DataObject) -> None:
    whole = _run(stream, [], eof)
    bytewise = _run(stream, range(1, len(stream)), eof)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=10))
    chunked = _run(stream, cuts, eof)
    assert bytewise == whole
    assert chunked == whole


# ==== real peers ==============================================================================


class BytearrayNbdServer:
    """A throwaway blocking NBD server on a unix socket: one thread per connection, the
    codec under test, bytearray exports."""

    def __init__(self, path: Path, disks: dict[str, bytearray], infos: dict[str, ExportInfo]):
        self.path = path
        self.disks = disks
        self.infos = infos
        self.errors: list[BaseException] = []
        self.requests: list[tuple[str, int]] = []  # (command, error) seen
        self.options: list[int] = []
        # Guest ranges whose reads fail with NBD_EIO (a server-side error path).
        self.bad_ranges: list[tuple[int, int]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                s, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve_guarded, args=(s,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve_guarded(self, s: socket.socket) -> None:
        try:
            with s:
                s.settimeout(30)
                self._serve(s)
        except BaseException as e:  # reported by the test, not lost in the thread
            self.errors.append(e)

    def _serve(self, s: socket.socket) -> None:
        conn = ServerConnection(self.infos)
        s.sendall(conn.data_to_send())
        disk = bytearray()
        while True:
            data = s.recv(nbd_wire.RECEIVE_CHUNK_BYTES)
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                pending = conn.data_to_send()
                if isinstance(ev, Aborted):
                    # The spec lets a client close right after NBD_OPT_ABORT without
                    # waiting for the ACK (nbdinfo does): the ACK is best effort.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        s.sendall(pending)
                    self.options.append(nbd_wire.NBD_OPT_ABORT)
                    return
                if pending:
                    s.sendall(pending)
                if ev is NEED_DATA:
                    break
                if isinstance(ev, ConnectionClosed | Disconnect):
                    return
                if isinstance(ev, OptionHandled):
                    self.options.append(ev.option)
                elif isinstance(ev, NegotiationDone):
                    self.options.append(ev.via)
                    disk = self.disks[ev.export.name]
                elif isinstance(ev, Request):
                    self.requests.append((ev.command_name, ev.error))
                    self._answer(s, conn, disk, ev)
            if not data:
                return

    def _answer(self, s: socket.socket, conn: ServerConnection, disk: bytearray,
                r: Request) -> None:
        if r.error:
            s.sendall(conn.error_reply(r, r.error))
            return
        end = r.offset + r.length
        if r.command == CMD_READ and any(a < end and r.offset < b for a, b in self.bad_ranges):
            s.sendall(conn.error_reply(r, nbd_wire.nbd_error(errno.EIO), "bad sector"))
        elif r.command == CMD_READ:
            s.sendall(conn.read_reply_header(r))
            s.sendall(memoryview(disk)[r.offset:end])  # the data, never copied by the codec
        elif r.command == CMD_WRITE:
            assert r.data is not None
            disk[r.offset:end] = r.data
            s.sendall(conn.ok_reply(r))
        elif r.command in (CMD_TRIM, CMD_WRITE_ZEROES):
            disk[r.offset:end] = bytes(r.length)
            s.sendall(conn.ok_reply(r))
        elif r.command == CMD_BLOCK_STATUS:
            runs: list[tuple[int, int]] = []
            pos = r.offset
            while pos < min(end, len(disk)):
                step = min(4096 - pos % 4096, len(disk) - pos)
                flags = 3 if not any(disk[pos:pos + step]) else 0
                if runs and runs[-1][1] == flags:
                    runs[-1] = (runs[-1][0] + step, flags)
                else:
                    runs.append((step, flags))
                pos += step
            s.sendall(conn.block_status_reply(r, runs))
        else:  # FLUSH, CACHE
            s.sendall(conn.ok_reply(r))

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.acceptor.join(5)
        for t in self.threads:
            t.join(5)
        if self.errors:
            raise self.errors[0]


@contextlib.contextmanager
def nbd_server(tmp_path: Path, disks: dict[str, bytearray],
               infos: dict[str, ExportInfo]) -> Iterator[BytearrayNbdServer]:
    srv = BytearrayNbdServer(tmp_path / "nbd.sock", disks, infos)
    try:
        yield srv
    finally:
        srv.close()


def uri(srv: BytearrayNbdServer, name: str) -> str:
    return f"nbd+unix:///{name}?socket={srv.path}"


def _patterned(size: int, seed: int) -> bytearray:
    rnd = random.Random(seed)
    disk = bytearray(size)
    for _ in range(12):  # a few data extents, the rest zero
        off = rnd.randrange(0, size - 8192) & ~511
        disk[off:off + 8192] = rnd.randbytes(8192)
    return disk


def _smoke_exports() -> tuple[dict[str, bytearray], dict[str, ExportInfo]]:
    size = 4 * MiB
    disks = {"disk": _patterned(size, 1), "ro": _patterned(size, 2)}
    infos = {
        "disk": ExportInfo("disk", size, can_trim=True, can_write_zeroes=True,
                           can_fast_zero=True, can_cache=True, description="smoke disk"),
        "ro": ExportInfo("ro", size, read_only=True),
    }
    return disks, infos


@pytest.mark.timeout(60)
def test_real_peer_nbdinfo(tmp_path: Path) -> None:
    need("nbdinfo")
    disks, infos = _smoke_exports()
    with nbd_server(tmp_path, disks, infos) as srv:
        p = run("nbdinfo", "--json", uri(srv, "disk"), timeout=20)
        info = json.loads(p.stdout)
        exp = info["exports"][0]
        assert exp["export-size"] == 4 * MiB
        assert exp["export-name"] == "disk"
        assert exp["description"] == "smoke disk"
        assert exp["is_read_only"] is False
        assert exp["can_trim"] is True and exp["can_zero"] is True
        assert exp["can_fast_zero"] is True and exp["can_fua"] is True
        assert exp["can_flush"] is True and exp["can_cache"] is True
        assert exp["can_df"] is True and exp["can_multi_conn"] is False
        assert exp["block_size_maximum"] == 32 * MiB
        assert "base:allocation" in exp.get("contexts", [])
        assert info["protocol"] == "newstyle-fixed"

        p = run("nbdinfo", "--list", "--json", uri(srv, ""), timeout=20)
        listed = {e["export-name"]: e for e in json.loads(p.stdout)["exports"]}
        assert set(listed) == {"disk", "ro"}
        assert listed["ro"]["is_read_only"] is True

        # Block status through base:allocation against the bytearray.
        p = run("nbdinfo", "--map", "--json", uri(srv, "disk"), timeout=20)
        runs = json.loads(p.stdout)
        disk = disks["disk"]
        pos = 0
        for r in runs:
            assert r["offset"] == pos
            chunk = disk[r["offset"]:r["offset"] + r["length"]]
            assert (not any(chunk)) == bool(r["type"] & 2), r
            pos += r["length"]
        assert pos == 4 * MiB
        assert len(runs) > 2


@pytest.mark.timeout(90)
def test_real_peer_qemu_io_and_qemu_img(tmp_path: Path) -> None:
    need("qemu-io")
    need("qemu-img")
    disks, infos = _smoke_exports()
    with nbd_server(tmp_path, disks, infos) as srv:
        expect = bytearray(disks["disk"])
        # Unaligned write, zeroes with and without holes, discard, reads that verify.
        p = run("qemu-io", "-f", "raw", uri(srv, "disk"),
                "-c", "write -P 0xab 4097 70000",
                "-c", "write -z 1M 64k",
                "-c", "write -z -u 2M 128k",
                "-c", "discard 3M 4k",
                "-c", "read -P 0xab 4097 70000",
                "-c", "read -P 0 1M 64k",
                "-c", "flush", timeout=30)
        out = p.stdout.decode()
        assert "error" not in out.lower() and "fail" not in out.lower(), out
        expect[4097:4097 + 70000] = b"\xab" * 70000
        expect[1 * MiB:1 * MiB + 64 * KiB] = bytes(64 * KiB)
        expect[2 * MiB:2 * MiB + 128 * KiB] = bytes(128 * KiB)
        expect[3 * MiB:3 * MiB + 4096] = bytes(4096)
        assert disks["disk"] == expect

        # Read the whole export through qemu-img (structured replies, block status).
        out_raw = tmp_path / "out.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "disk"), out_raw,
            timeout=30)
        assert out_raw.read_bytes() == bytes(disks["disk"])

        # Write a whole image into the export.
        src = tmp_path / "src.raw"
        src.write_bytes(bytes(_patterned(4 * MiB, 3)))
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri(srv, "disk"),
            timeout=30)
        assert disks["disk"] == src.read_bytes()

        # A server-side read error reaches the client as EIO (structured error chunk), and
        # the connection goes on.
        srv.bad_ranges.append((3 * MiB + 512, 3 * MiB + 1024))
        p = run("qemu-io", "-f", "raw", uri(srv, "disk"), "-c", "read 3M 4k",
                "-c", "read 0 4k", check=False, timeout=30)
        out = p.stdout.decode()
        assert "read failed: Input/output error" in out, out
        assert "read 4096/4096 bytes at offset 0" in out, out
        srv.bad_ranges.clear()

        # A read-only export is opened read-only by qemu and reads fine.
        before = bytes(disks["ro"])
        p = run("qemu-io", "-f", "raw", "-r", uri(srv, "ro"), "-c", "read 0 4k", timeout=30)
        assert "read 4096/4096" in p.stdout.decode()
        assert bytes(disks["ro"]) == before


@pytest.mark.timeout(60)
def test_real_peer_nbdcopy(tmp_path: Path) -> None:
    need("nbdcopy")
    disks, infos = _smoke_exports()
    with nbd_server(tmp_path, disks, infos) as srv:
        out_raw = tmp_path / "copy.raw"
        run("nbdcopy", uri(srv, "disk"), str(out_raw), timeout=30)
        assert out_raw.read_bytes() == bytes(disks["disk"])
        src = tmp_path / "src.raw"
        src.write_bytes(bytes(_patterned(4 * MiB, 4)))
        run("nbdcopy", str(src), uri(srv, "disk"), timeout=30)
        assert disks["disk"] == src.read_bytes()
        # Writing to the read-only export fails cleanly (the client sees the READ_ONLY flag
        # or our EPERM) and the export is untouched.
        before = bytes(disks["ro"])
        p = run("nbdcopy", str(src), uri(srv, "ro"), check=False, timeout=30)
        assert p.returncode != 0
        assert bytes(disks["ro"]) == before
