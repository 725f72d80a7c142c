"""NBD_OPT_STARTTLS and the TLS rules of the NBD protocol in the sans-I/O codec
(cowd.frontends.nbd.protocol with a wire.TlsPolicy): no TLS library, no socket.

The client's bytes are built by tests/support/nbdspec.py from the protocol document's numbers
and every reply is checked against the spec's "TLS support" section: under FORCEDTLS
(``require``) each option but STARTTLS and ABORT gets exactly one NBD_REP_ERR_TLS_REQD and
nothing else, EXPORT_NAME ends the session; SELECTIVETLS (``on``) refuses only TLS-only
exports; nothing negotiated before TLS survives it; TLS_REQD is never sent once TLS is on.
Each exchange is run twice, the client's bytes fed whole and one byte at a time, and must give
the same events and the same bytes.  The TLS handshake itself is the adapter's
(cowd/frontends/nbd/tls.py) and is stood in for by a call to ``tls_established``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowd.frontends.nbd.protocol import NEED_DATA, ServerConnection
from cowd.frontends.nbd.wire import (
    Aborted,
    ConnectionClosed,
    ExportInfo,
    NbdProtocolError,
    NbdUsageError,
    NegotiationDone,
    OptionHandled,
    StartTls,
    TlsPolicy,
)
from tests.support.nbdspec import (
    CMD_READ,
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
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META,
    REP_SERVER,
    KiB,
    MiB,
    client_flags,
    info_data,
    meta_data,
    opt,
    opt_header,
    parse_option_replies,
    req,
)

OPT_EXTENDED_HEADERS = 11  # not offered by cowd: an "unsupported option" here
PLAIN = ExportInfo("plain", 1 * MiB)
SECRET = ExportInfo("secret", 1 * MiB)
EXPORTS = {e.name: e for e in (PLAIN, SECRET)}
ALICE = "CN=alice,O=Example"
BOB = "bob"  # a PSK username
AUTHZ = frozenset({("secret", ALICE), ("secret", BOB)})

# Every option a client may send before STARTTLS, with well-formed data (and a few without).
OPTIONS_BEFORE_TLS: list[tuple[int, bytes]] = [
    (OPT_LIST, b""),
    (OPT_PEEK, b""),
    (OPT_INFO, info_data("plain", [3])),
    (OPT_INFO, info_data("secret")),
    (OPT_INFO, info_data("nosuch")),
    (OPT_GO, info_data("plain", [3])),
    (OPT_GO, info_data("secret")),
    (OPT_STRUCTURED, b""),
    (OPT_LIST_META, meta_data("plain", ["base:allocation"])),
    (OPT_SET_META, meta_data("plain", ["base:allocation"])),
    (OPT_EXTENDED_HEADERS, b""),
    (0, b""),
    (0x4242, b"payload"),
    (0xFFFFFFFF, b""),
    (OPT_GO, b"garbage"),
    (OPT_LIST, b"x"),
]


# ---- drivers ---------------------------------------------------------------------------------


class Outcome:
    """What one exchange produced: events, server bytes, the protocol error (if any)."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.out = bytearray()
        self.error: str | None = None

    def key(self) -> tuple[list[Any], bytes, str | None]:
        return self.events, bytes(self.out), self.error


def _exchange(policy: TlsPolicy, segments: Sequence[bytes], identity: str | None,
              bytewise: bool) -> tuple[Outcome, ServerConnection]:
    """Feed the client's plaintext segments: the first is what it sends before TLS, each
    later one what it sends after the handshake that a StartTls event asked for."""
    conn = ServerConnection(EXPORTS, peer="test client", tls=policy)
    res = Outcome()
    res.out += conn.data_to_send()
    try:
        for i, segment in enumerate(segments):
            if i:
                assert res.events and isinstance(res.events[-1], StartTls), res.events
                conn.tls_established(identity)
            chunks = [segment[j:j + 1] for j in range(len(segment))] if bytewise else [segment]
            chunks = [c for c in chunks if c]  # b"" would mean EOF
            for chunk in chunks:
                conn.receive_data(chunk)
                while (ev := conn.next_event()) is not NEED_DATA:
                    res.out += conn.data_to_send()
                    res.events.append(ev)
                    if isinstance(ev, ConnectionClosed):
                        return res, conn
                res.out += conn.data_to_send()
    except NbdProtocolError as e:
        res.out += conn.data_to_send()
        res.error = str(e)
    return res, conn


def exchange(policy: TlsPolicy, *segments: bytes,
             identity: str | None = None) -> tuple[Outcome, ServerConnection]:
    """The exchange fed whole and byte by byte: both must agree."""
    whole, conn = _exchange(policy, segments, identity, bytewise=False)
    bytewise, _ = _exchange(policy, segments, identity, bytewise=True)
    assert bytewise.key() == whole.key()
    return whole, conn


def replies(res: Outcome) -> list[tuple[int, int, bytes]]:
    greeting = 18
    return parse_option_replies(bytes(res.out[greeting:]))


REQUIRE = TlsPolicy("require")
SELECTIVE = TlsPolicy("on", AUTHZ)
REQUIRE_AUTHZ = TlsPolicy("require", AUTHZ)
STARTTLS = opt(OPT_STARTTLS)


# ==== FORCEDTLS (--tls=require) ==================================================================


@pytest.mark.parametrize("policy", [REQUIRE, REQUIRE_AUTHZ], ids=["no-authz", "authz"])
def test_require_every_option_before_starttls_is_tls_reqd(policy: TlsPolicy) -> None:
    """The spec: 'If the server receives any other option, including NBD_OPT_INFO and
    unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been
    initiated'; for NBD_OPT_INFO and NBD_OPT_GO a FORCEDTLS server 'MUST NOT send
    NBD_REP_INFO replies'.  Negotiation goes on after each, with nothing negotiated."""
    stream = client_flags() + b"".join(opt(o, d) for o, d in OPTIONS_BEFORE_TLS)
    res, conn = exchange(policy, stream)
    assert res.error is None
    assert [(e.option, e.reply) for e in res.events] == [
        (o, REP_ERR_TLS_REQD) for o, _ in OPTIONS_BEFORE_TLS]
    got = replies(res)
    assert [(o, r) for o, r, _ in got] == [(o, REP_ERR_TLS_REQD) for o, _ in OPTIONS_BEFORE_TLS]
    for _, _, message in got:
        message.decode("utf-8")  # an error reply's data is a string for a human
        assert len(message) <= 4096
    assert conn.phase == "options" and not conn.structured and not conn.meta_contexts
    assert not conn.tls_active


@pytest.mark.parametrize("name", [b"plain", b"", b"nosuch", b"x" * 5000])
def test_require_export_name_before_tls_ends_the_session(name: bytes) -> None:
    """'If the server receives a request to enter transmission mode via NBD_OPT_EXPORT_NAME
    when TLS has not been initiated, then as this request cannot error, it MUST terminate
    the session' -- without a reply and without reading the name."""
    res, conn = exchange(REQUIRE, client_flags() + opt_header(OPT_EXPORT_NAME, len(name)))
    assert res.error is not None and "before TLS" in res.error
    assert replies(res) == [] and conn.phase == "error"
    assert conn.export is None


def test_require_abort_before_tls_is_acknowledged() -> None:
    res, _ = exchange(REQUIRE, client_flags() + opt(OPT_ABORT))
    assert res.events == [Aborted(), ConnectionClosed()]
    assert [r[:2] for r in replies(res)] == [(OPT_ABORT, REP_ACK)]


def test_require_payload_before_tls_is_never_buffered() -> None:
    conn = ServerConnection(EXPORTS, tls=REQUIRE)
    conn.data_to_send()
    conn.receive_data(client_flags() + opt_header(OPT_INFO, 500 * KiB))
    assert conn.next_event() is NEED_DATA
    for _ in range(10):
        conn.receive_data(bytes(50 * KiB))
        assert conn.buffered_bytes == 0
        ev = conn.next_event()
    assert ev == OptionHandled(OPT_INFO, REP_ERR_TLS_REQD, None, ev.message)
    assert [r[:2] for r in parse_option_replies(conn.data_to_send())] == [
        (OPT_INFO, REP_ERR_TLS_REQD)]
    # Past the discard bound: TLS_REQD still (the spec's MUST), then a hard disconnect.
    res, _ = exchange(REQUIRE, client_flags() + opt_header(OPT_GO, 0xFFFFFFFF) + b"xy")
    assert res.error is not None and "too long" in res.error
    assert [r[:2] for r in replies(res)] == [(OPT_GO, REP_ERR_TLS_REQD)]


def test_require_starttls_then_negotiation_under_tls() -> None:
    pre = client_flags() + opt(OPT_LIST) + opt(OPT_STARTTLS, b"x") + STARTTLS
    post = (opt(OPT_STARTTLS) + opt(OPT_STRUCTURED)
            + opt(OPT_SET_META, meta_data("plain", ["base:allocation"]))
            + opt(OPT_GO, info_data("plain", [3])))
    res, conn = exchange(REQUIRE, pre, post, identity=ALICE)
    assert res.error is None
    kinds = [(type(e).__name__, getattr(e, "option", None), getattr(e, "reply", None))
             for e in res.events]
    assert kinds == [
        ("OptionHandled", OPT_LIST, REP_ERR_TLS_REQD),
        ("OptionHandled", OPT_STARTTLS, REP_ERR_INVALID),  # STARTTLS takes no data
        ("StartTls", None, None),
        ("OptionHandled", OPT_STARTTLS, REP_ERR_INVALID),  # a second one, under TLS
        ("OptionHandled", OPT_STRUCTURED, REP_ACK),
        ("OptionHandled", OPT_SET_META, REP_ACK),
        ("NegotiationDone", None, None),
    ]
    got = [(o, r) for o, r, _ in replies(res)]
    assert got[:3] == [(OPT_LIST, REP_ERR_TLS_REQD), (OPT_STARTTLS, REP_ERR_INVALID),
                       (OPT_STARTTLS, REP_ACK)]
    assert REP_ERR_TLS_REQD not in [r for _, r in got[3:]]  # never once TLS is on
    done = res.events[-1]
    assert isinstance(done, NegotiationDone) and done.export is PLAIN and done.structured
    assert conn.tls_active and conn.tls_identity == ALICE


def test_require_list_under_tls_shows_what_the_client_may_open() -> None:
    post = opt(OPT_LIST)
    for identity, names in ((ALICE, {"plain", "secret"}), ("CN=mallory", {"plain"}),
                            (None, {"plain"})):
        res, _ = exchange(REQUIRE_AUTHZ, client_flags() + STARTTLS, post, identity=identity)
        listed = set()
        for option, rtype, payload in replies(res)[1:]:
            assert option == OPT_LIST
            if rtype == REP_SERVER:
                (n,) = struct.unpack_from(">I", payload)
                listed.add(payload[4:4 + n].decode())
            else:
                assert rtype == REP_ACK
        assert listed == names, identity


# ==== state from before TLS ===================================================================


def test_nothing_negotiated_before_starttls_survives_it() -> None:
    """'When this command succeeds, the server MUST NOT preserve any negotiation state (such
    as a request for NBD_OPT_STRUCTURED_REPLY, or metadata contexts from
    NBD_OPT_SET_META_CONTEXT) issued before this command.'"""
    pre = (client_flags() + opt(OPT_STRUCTURED)
           + opt(OPT_SET_META, meta_data("plain", ["base:allocation"])) + STARTTLS)
    res, conn = exchange(TlsPolicy("on"), pre, opt(OPT_GO, info_data("plain", [3])))
    assert [(o, r) for o, r, _ in replies(res)][:3] == [
        (OPT_STRUCTURED, REP_ACK), (OPT_SET_META, REP_META), (OPT_SET_META, REP_ACK)]
    done = res.events[-1]
    assert isinstance(done, NegotiationDone)
    assert not done.structured and dict(done.meta_contexts) == {}
    assert not done.transmission_flags & (1 << 7)  # no NBD_FLAG_SEND_DF without structured
    # Transmission works, with simple replies and no block status.
    conn.receive_data(req(CMD_READ, 0, 4096, cookie=5))
    ev = conn.next_event()
    assert not isinstance(ev, type(NEED_DATA)) and ev.error == 0  # type: ignore[union-attr]
    assert conn.read_reply_header(ev)[:4] == bytes.fromhex("67446698")  # simple reply magic


def test_plaintext_after_starttls_is_never_parsed() -> None:
    """A client must wait for STARTTLS's reply; bytes that came with it in plaintext (what a
    man in the middle would inject) are a protocol error, not options under TLS."""
    injected = opt(OPT_GO, info_data("secret"))
    res, conn = exchange(SELECTIVE, client_flags() + STARTTLS + injected, b"", identity=ALICE)
    assert res.error is not None and "after NBD_OPT_STARTTLS" in res.error
    assert [r[:2] for r in replies(res)] == [(OPT_STARTTLS, REP_ACK)]
    assert not any(isinstance(e, NegotiationDone) for e in res.events)
    assert conn.export is None and not conn.tls_active


def test_no_events_until_the_adapter_says_tls_is_up() -> None:
    conn = ServerConnection(EXPORTS, tls=REQUIRE)
    conn.data_to_send()
    conn.receive_data(client_flags() + STARTTLS)
    assert conn.next_event() == StartTls()
    assert conn.next_event() is NEED_DATA and conn.phase == "options"
    with pytest.raises(NbdUsageError):
        ServerConnection(EXPORTS, tls=REQUIRE).tls_established("x")  # no StartTls yet
    conn.tls_established(None)
    with pytest.raises(NbdUsageError):
        conn.tls_established(None)  # once only


# ==== NOTLS (--tls=off) ========================================================================


def test_off_refuses_starttls_with_policy_and_never_says_tls_reqd() -> None:
    stream = (client_flags() + STARTTLS + b"".join(opt(o, d) for o, d in OPTIONS_BEFORE_TLS)
              + opt(OPT_GO, info_data("secret")))
    res, _ = exchange(TlsPolicy(), stream)
    got = replies(res)
    assert got[0][:2] == (OPT_STARTTLS, REP_ERR_POLICY)
    assert REP_ERR_TLS_REQD not in [r for _, r, _ in got]
    assert isinstance(res.events[-1], NegotiationDone)


# ==== SELECTIVETLS (--tls=on): exports with an authorization list are TLS-only =================


def test_selective_before_tls() -> None:
    stream = (client_flags() + opt(OPT_LIST) + opt(OPT_STRUCTURED)
              + opt(OPT_INFO, info_data("secret", [3]))
              + opt(OPT_GO, info_data("secret", [3]))
              + opt(OPT_LIST_META, meta_data("secret", ["base:"]))
              + opt(OPT_SET_META, meta_data("secret", ["base:allocation"]))
              + opt(OPT_GO, info_data("plain", [3])))
    res, _ = exchange(SELECTIVE, stream)
    got = replies(res)
    listed = [p[4:4 + struct.unpack_from(">I", p)[0]] for o, r, p in got if r == REP_SERVER]
    assert listed == [b"plain"]  # 'MAY omit exports that are TLS-only from NBD_OPT_LIST'
    rest = [(o, r) for o, r, _ in got if o != OPT_LIST]
    assert rest[:5] == [
        (OPT_STRUCTURED, REP_ACK),
        (OPT_INFO, REP_ERR_TLS_REQD),  # 'MUST reply with NBD_REP_ERR_TLS_REQD if ... TLS-only'
        (OPT_GO, REP_ERR_TLS_REQD),
        # TLS_REQD only for INFO/GO/EXPORT_NAME: the meta context options get POLICY.
        (OPT_LIST_META, REP_ERR_POLICY),
        (OPT_SET_META, REP_ERR_POLICY),
    ]
    assert (OPT_INFO, REP_INFO) not in rest[:5] and (OPT_GO, REP_INFO) not in rest[:5]
    done = res.events[-1]
    assert isinstance(done, NegotiationDone) and done.export is PLAIN  # plaintext is fine


def test_selective_export_name_of_tls_only_export_ends_the_session() -> None:
    res, _ = exchange(SELECTIVE, client_flags() + opt(OPT_EXPORT_NAME, b"secret"))
    assert res.error is not None and "needs TLS" in res.error and replies(res) == []
    res, _ = exchange(SELECTIVE, client_flags() + opt(OPT_EXPORT_NAME, b"plain"))
    assert res.error is None and isinstance(res.events[-1], NegotiationDone)


@pytest.mark.parametrize("identity", [ALICE, BOB])
def test_authorized_identity_opens_the_export(identity: str) -> None:
    res, conn = exchange(SELECTIVE, client_flags() + STARTTLS,
                         opt(OPT_GO, info_data("secret", [3])), identity=identity)
    done = res.events[-1]
    assert isinstance(done, NegotiationDone) and done.export is SECRET
    assert conn.tls_identity == identity


@pytest.mark.parametrize("identity", ["CN=alice", "CN=alice,O=Example,C=GB", "BOB", None])
def test_identity_not_on_the_list_is_refused(identity: str | None) -> None:
    post = (opt(OPT_INFO, info_data("secret")) + opt(OPT_GO, info_data("secret"))
            + opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_data("secret", ["base:allocation"]))
            + opt(OPT_LIST) + opt(OPT_GO, info_data("plain")))
    res, _ = exchange(SELECTIVE, client_flags() + STARTTLS, post, identity=identity)
    got = [(o, r) for o, r, _ in replies(res)]
    assert got[1:5] == [(OPT_INFO, REP_ERR_POLICY), (OPT_GO, REP_ERR_POLICY),
                        (OPT_STRUCTURED, REP_ACK), (OPT_SET_META, REP_ERR_POLICY)]
    assert (OPT_LIST, REP_SERVER) in got and REP_ERR_TLS_REQD not in [r for _, r in got]
    done = res.events[-1]
    assert isinstance(done, NegotiationDone) and done.export is PLAIN  # the open export
    # EXPORT_NAME cannot be refused with an error: the session ends.
    res, _ = exchange(SELECTIVE, client_flags() + STARTTLS, opt(OPT_EXPORT_NAME, b"secret"),
                      identity=identity)
    assert res.error is not None and "not authorized" in res.error


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        TlsPolicy("maybe")
    with pytest.raises(ValueError):
        TlsPolicy("off", AUTHZ)
    assert TlsPolicy("require").tls_only("anything")
    assert SELECTIVE.tls_only("secret") and not SELECTIVE.tls_only("plain")
    assert SELECTIVE.allows("plain", None) and not SELECTIVE.allows("secret", None)


# ==== any option sequence under require (property test) ======================================

_option = st.one_of(
    st.sampled_from(OPTIONS_BEFORE_TLS),
    st.tuples(st.integers(0, 2**32 - 1).filter(lambda o: o not in (OPT_ABORT, OPT_STARTTLS,
                                                                     OPT_EXPORT_NAME)),
              st.binary(max_size=64)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.lists(_option, max_size=8), then_tls=st.booleans())
def test_require_any_options_before_tls(options: list[tuple[int, bytes]],
                                        then_tls: bool) -> None:
    """Whatever options come before STARTTLS, each gets exactly one TLS_REQD and nothing
    else, whole or byte by byte; after the handshake none gets TLS_REQD."""
    pre = client_flags() + b"".join(opt(o, d) for o, d in options)
    # After TLS the same options again, GO as INFO (a GO that succeeds ends negotiation).
    post = b"".join(opt(OPT_INFO if o == OPT_GO else o, d) for o, d in options)
    segments = [pre + STARTTLS, post] if then_tls else [pre]
    res, _ = exchange(REQUIRE_AUTHZ, *segments, identity=ALICE)
    assert res.error is None
    got = [(o, r) for o, r, _ in replies(res)]
    n = len(options)
    assert got[:n] == [(o, REP_ERR_TLS_REQD) for o, _ in options]
    if then_tls:
        assert got[n] == (OPT_STARTTLS, REP_ACK)
        assert all(r != REP_ERR_TLS_REQD for _, r in got[n + 1:])
        assert all(r in (REP_ACK, REP_SERVER, REP_INFO, REP_META, REP_ERR_UNSUP,
                         REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG) or r > 2**31
                   for _, r in got[n + 1:])
