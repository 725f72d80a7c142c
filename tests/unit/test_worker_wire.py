"""The worker channel's codec (cowd/workers/wire.py): every message survives encode and
decode, fed whole and one byte at a time, fds travel with the message that carries them, and
what is not a message is refused before anything is allocated for it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowd.workers import wire as W

RUNS = (W.RemapRun(0, 65536, 0, W.REMAP_WRITABLE, 1 << 20),
        W.RemapRun(65536, 4096, W.ZERO_FILE, 0, 0),
        W.RemapRun(69632, 61440, 2, 0, 69632))

MESSAGES: list[W.Message] = [
    W.DiskSpec(7, "vm1.qcow2", "/srv/vm1.qcow2", 1 << 30, 65536, 65536, False,
               (True, False), fds=(11, 12)),
    W.DiskSpec(8, "vm2.qcow2", "/srv/vm2.qcow2", 1 << 20, 4096, 65536, True, (False,),
               scope=W.SCOPE_DEVICE, fuse_ino=3, fds=(14,)),
    W.DiskSpec(9, "vm3.qcow2", "/srv/vm3.qcow2", 1 << 30, 65536, 65536, False,
               (True, False), lend_file=0, fds=(17, 18)),
    W.DiskSpec(10, "vm4.qcow2", "/srv/vm4.qcow2", 1 << 30, 65536, 65536, False,
               (True, False), files_remote=(False, True), fds=(19, 20)),
    W.DiskSpec(11, "vm5.qcow2", "/srv/vm5.qcow2", 1 << 30, 131072, 131072, False,
               (True, False), lend_file=0, unit=4096, fds=(21, 22)),
    W.DiskGone(7),
    W.DiskState(7, True, "base.qcow2: L2 table past end of file (marked corrupt)"),
    W.Connection("nbd client 127.0.0.1:4242", fds=(13,)),
    W.Connection("/dev/nbd0", W.SCOPE_DEVICE, fds=(15,)),
    W.FuseSession({"max_read_bytes": 1 << 20, "max_workers": 16}, fds=(16,)),
    W.FuseForward(12, b"\x28\0\0\0" + bytes(36)),
    W.Remaps(7, RUNS),
    W.Remaps(7, ()),
    W.Invalidate(99, 7, 4096, 1 << 20, True),
    W.Invalidate(0, 7, 0, 65536, False),
    W.Reply(5, 0, b"\x01" * 4096),
    W.Reply(6, 28, b"no space left (offset=4096)"),
    W.Reply(7, 0, b""),
    W.Stop(),
    W.StatsQuery(3),
    W.Miss(8, 7, 1 << 30, 4096),
    W.Request(9, 7, W.Op.WRITE, W.FLAG_FUA, 8192, 3, b"abc"),
    W.Request(10, 7, W.Op.FLUSH, 0, 0, 0),
    W.Request(11, 7, W.Op.BLOCK_STATUS, 0, 0, 1 << 40),
    W.Request(12, 7, W.Op.LEND, 0, 0, 512),
    W.Request(13, 7, W.Op.ADOPT, W.FLAG_FUA, 1 << 20, 2 << 20, W.adoptions(
        [W.Adoption(1 << 20, 65536, 5 << 20), W.Adoption(2 << 20, 1 << 20, 9 << 20)])),
    W.Reply(14, 0, W.lent_runs([W.LentRun(5 << 20, 32 << 20), W.LentRun(1 << 40, 65536)])),
    W.Request(17, 7, W.Op.ADOPT_UNITS, 0, 0, 2, W.adoptions(
        [W.Adoption(8192, 4096, (5 << 20) + 8192), W.Adoption(1 << 30, 12288, 9 << 20)])),
    W.Reply(17, 0, b"\x01\x00"),
    W.Adopted(18, 7, (W.Adoption(8192, 4096, (5 << 20) + 8192),), True),
    W.Adopted(0, 7, (), False),
    W.Reclaim(15, 7),
    W.Reclaimed(15, (W.LentRun(6 << 20, 1 << 20), W.LentRun(8 << 20, 65536))),
    W.Reclaimed(16, ()),
    W.Invalidated(99),
    W.Release(7),
    W.Stats(4, {"reads": 3, "disks": {"7": {"entries": 10}}}),
]


def _fds_of(msg: W.Message) -> tuple[int, ...]:
    return getattr(msg, "fds", ())


def _same(a: W.Message, b: W.Message) -> None:
    assert type(a) is type(b)
    assert a == b
    assert _fds_of(a) == _fds_of(b)
    if isinstance(a, W.Reply | W.Request):
        assert bytes(a.data) == bytes(b.data)  # type: ignore[union-attr]


def test_each_message_round_trips_whole() -> None:
    d = W.Decoder()
    for msg in MESSAGES:
        raw, fds = W.encode(msg)
        d.feed(raw, fds)
        got = d.next_message()
        assert got is not W.NEED_DATA
        _same(msg, got)
        assert d.next_message() is W.NEED_DATA


def test_all_messages_byte_by_byte_with_fds_on_their_first_byte() -> None:
    d = W.Decoder()
    out: list[W.Message] = []
    for msg in MESSAGES:
        raw, fds = W.encode(msg)
        for i in range(len(raw)):
            d.feed(raw[i:i + 1], fds if i == 0 else ())
            while (got := d.next_message()) is not W.NEED_DATA:
                out.append(got)
    assert len(out) == len(MESSAGES)
    for a, b in zip(MESSAGES, out, strict=True):
        _same(a, b)
    assert d.pending_fds() == []


def test_fds_come_out_in_order_across_messages() -> None:
    d = W.Decoder()
    a = W.Connection("a", fds=(20,))
    b = W.DiskSpec(1, "x", "/x", 512, 512, 65536, True, (False,), fds=(21,))
    raw_a, fds_a = W.encode(a)
    raw_b, fds_b = W.encode(b)
    d.feed(raw_a + raw_b, fds_a + fds_b)  # one receive brought both
    assert _fds_of(d.next_message()) == (20,)  # type: ignore[arg-type]
    assert _fds_of(d.next_message()) == (21,)  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.integers(0, 1 << 62), st.integers(1, 1 << 40),
                          st.integers(-1, 63), st.integers(0, 1), st.integers(0, 1 << 62)),
                max_size=50),
       st.integers(1, 1 << 31))
def test_remaps_property(runs: list[tuple[int, int, int, int, int]], disk_id: int) -> None:
    msg = W.Remaps(disk_id, tuple(W.RemapRun(*r) for r in runs))
    d = W.Decoder()
    d.feed(W.encode(msg)[0])
    assert d.next_message() == msg


def test_remaps_split_at_the_bound() -> None:
    runs = [W.RemapRun(i * 4096, 4096, 0, 0, i * 4096)
            for i in range(W.MAX_RUNS_PER_MESSAGE + 5)]
    chunks = W.encode_remaps(3, runs)
    assert len(chunks) == 2
    d = W.Decoder()
    d.feed(b"".join(chunks))
    got: list[W.RemapRun] = []
    while (m := d.next_message()) is not W.NEED_DATA:
        assert isinstance(m, W.Remaps) and m.disk_id == 3
        got.extend(m.runs)
    assert got == runs


def test_status_runs_round_trip() -> None:
    runs = [(65536, False), (1 << 40, True), (512, False)]
    assert W.parse_status_runs(W.status_runs(runs)) == runs
    with pytest.raises(W.ChannelError, match="whole runs"):
        W.parse_status_runs(b"\0" * 5)


@pytest.mark.parametrize("length", [0, 15, W.MAX_MESSAGE_BYTES + 1, 0xFFFFFFFF])
def test_bad_lengths_refused_before_buffering(length: int) -> None:
    d = W.Decoder()
    d.feed(W.HEADER.pack(length, W.MsgType.STOP, 0, 0))
    with pytest.raises(W.ChannelError, match="length"):
        d.next_message()


def test_unknown_type_and_malformed_bodies() -> None:
    for raw in (W.HEADER.pack(16, 999, 0, 0),
                W.HEADER.pack(16 + 3, W.MsgType.MISS, 0, 1) + b"abc",
                W.HEADER.pack(16 + 8, W.MsgType.REMAPS, 0, 0) + struct.pack("<II", 1, 2),
                W.HEADER.pack(16 + 2, W.MsgType.STATS, 0, 0) + b"[]"):
        d = W.Decoder()
        d.feed(raw)
        with pytest.raises(W.ChannelError):
            d.next_message()


def test_message_without_its_fds_is_refused() -> None:
    raw, _fds = W.encode(W.Connection("x", fds=(5,)))
    d = W.Decoder()
    d.feed(raw)  # the fd never came
    with pytest.raises(W.ChannelError, match="without its fds"):
        d.next_message()


def test_encode_refuses_what_cannot_be_framed() -> None:
    with pytest.raises(ValueError, match="too long"):
        W.encode(W.Request(1, 1, W.Op.WRITE, 0, 0, W.MAX_MESSAGE_BYTES,
                           bytes(W.MAX_MESSAGE_BYTES)))
    with pytest.raises(ValueError, match="one fd per file"):
        W.encode(W.DiskSpec(1, "x", "/x", 512, 512, 512, True, (True, False), fds=(3,)))
    with pytest.raises(ValueError, match="one fd"):
        W.encode(W.Connection("x", fds=()))


def test_lending_payloads_round_trip() -> None:
    """A LEND reply's runs and an ADOPT's adoptions read back as written; data that is not
    whole records is a ChannelError, and a disk's lending file must be one of its writable
    files."""
    runs = [W.LentRun(5 << 20, 32 << 20), W.LentRun(1 << 40, 65536)]
    assert W.parse_lent_runs(W.lent_runs(runs)) == runs
    adopt = [W.Adoption(0, 65536, 1 << 20), W.Adoption(1 << 30, 2 << 20, 7 << 20)]
    assert W.parse_adoptions(W.adoptions(adopt)) == adopt
    assert W.parse_lent_runs(b"") == [] and W.parse_adoptions(b"") == []
    with pytest.raises(W.ChannelError, match="whole runs"):
        W.parse_lent_runs(W.lent_runs(runs)[:-1])
    with pytest.raises(W.ChannelError, match="whole adoptions"):
        W.parse_adoptions(W.adoptions(adopt) + b"x")
    raw, fds = W.encode(W.DiskSpec(1, "x", "/x", 512, 512, 512, False, (True, False),
                                   files_remote=(True,), fds=(3, 4)))
    dec = W.Decoder()
    dec.feed(raw, fds)
    with pytest.raises(W.ChannelError, match="remote flags"):
        dec.next_message()
    for unit, lend_file in ((3000, 0), (4096, -1), (1 << 20, 0)):  # a subcluster it can have
        raw, fds = W.encode(W.DiskSpec(1, "x", "/x", 1 << 20, 65536, 65536, False,
                                       (True, False), lend_file=lend_file, unit=unit,
                                       fds=(3, 4)))
        dec = W.Decoder()
        dec.feed(raw, fds)
        with pytest.raises(W.ChannelError, match="subcluster"):
            dec.next_message()
    for lend_file, writable in ((1, (True, False)), (2, (True, False)), (-2, (True,))):
        raw, fds = W.encode(W.DiskSpec(1, "x", "/x", 512, 512, 512, False, writable,
                                       lend_file=lend_file, fds=(3,) * len(writable)))
        dec = W.Decoder()
        dec.feed(raw, fds)
        with pytest.raises(W.ChannelError, match="lending file"):
            dec.next_message()
