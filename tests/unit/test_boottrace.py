"""The boot-trace codec and bookkeeping (cowd/disk/boottrace.py): round trip, every kind of
damage rejected, staleness, the bound, coverage counting.  No I/O."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from cowd.disk.boottrace import (
    HEADER,
    MAX_TRACE_ENTRIES,
    TRACE_GRANULE_BYTES,
    BaseIdentity,
    BootTrace,
    RemoteIdentity,
    TraceError,
    decode,
    encode,
)

ID = BaseIdentity(size=1 << 30, mtime_ns=1_700_000_000_123_456_789, ino=4242)
G = TRACE_GRANULE_BYTES


def _reseal(body: bytes) -> bytes:
    """``body`` (header and indices) with a correct checksum: damage that the checksum
    alone would not catch."""
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@given(st.lists(st.integers(0, 0xFFFFFFFF), max_size=300, unique=True))
def test_round_trip(indices: list[int]) -> None:
    data = encode(ID, G, indices)
    assert decode(data, ID) == (G, indices)
    assert decode(data, None) == (G, indices)


def test_layout_is_the_documented_one() -> None:
    data = encode(ID, G, [5, 1, 3])
    assert data[:8] == b"COWDTRC1"
    assert struct.unpack_from("<IIQqQII", data, 8) == (1, G, ID.size, ID.mtime_ns, ID.ino, 3, 0)
    assert struct.unpack_from("<3I", data, 48) == (5, 1, 3)
    assert len(data) == 48 + 12 + 8


def test_bad_magic() -> None:
    data = bytearray(encode(ID, G, [1, 2]))
    data[0:8] = b"NOTTRACE"
    with pytest.raises(TraceError, match="bad magic"):
        decode(_reseal(bytes(data[:-8])), ID)


def test_bad_version() -> None:
    body = bytearray(encode(ID, G, [1, 2])[:-8])
    struct.pack_into("<I", body, 8, 2)
    with pytest.raises(TraceError, match="unknown version"):
        decode(_reseal(bytes(body)), ID)


@pytest.mark.parametrize("pos", [0, 9, 20, 40, 48, 55])
def test_checksum_catches_any_flipped_byte(pos: int) -> None:
    data = bytearray(encode(ID, G, [1, 2, 3]))
    data[pos] ^= 0x40
    with pytest.raises(TraceError):
        decode(bytes(data), ID)


def test_checksum_mismatch_named() -> None:
    data = bytearray(encode(ID, G, [1, 2, 3]))
    data[50] ^= 1  # an index
    with pytest.raises(TraceError, match="checksum mismatch"):
        decode(bytes(data), ID)


@pytest.mark.parametrize("cut", [0, 1, 47, 48, 55, 59, 67])
def test_truncated(cut: int) -> None:
    data = encode(ID, G, [1, 2, 3])  # 68 bytes
    with pytest.raises(TraceError, match="truncated"):
        decode(data[:cut], ID)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(TraceError, match="truncated"):
        decode(encode(ID, G, [1]) + b"\0", ID)


def test_count_over_the_bound_rejected_before_reading() -> None:
    body = bytearray(encode(ID, G, [])[:-8])
    struct.pack_into("<I", body, 40, MAX_TRACE_ENTRIES + 1)
    with pytest.raises(TraceError, match="too many entries"):
        decode(_reseal(bytes(body)), ID)


@pytest.mark.parametrize("granule", [0, 3, 1024, 3 << 16, 1 << 30])
def test_bad_granule(granule: int) -> None:
    with pytest.raises(TraceError, match="bad granule"):
        decode(encode(ID, granule, [1]), ID)


def test_reserved_must_be_zero() -> None:
    body = bytearray(encode(ID, G, [1])[:-8])
    struct.pack_into("<I", body, 44, 1)
    with pytest.raises(TraceError, match="reserved"):
        decode(_reseal(bytes(body)), ID)


@pytest.mark.parametrize("other", [ID._replace(size=ID.size + 512),
                                   ID._replace(mtime_ns=ID.mtime_ns + 1),
                                   ID._replace(ino=ID.ino + 1)])
def test_stale_identity(other: BaseIdentity) -> None:
    with pytest.raises(TraceError, match="stale"):
        decode(encode(ID, G, [1, 2]), other)


def test_encode_keeps_only_the_bound() -> None:
    data = encode(ID, G, range(MAX_TRACE_ENTRIES + 10))
    assert len(decode(data, ID)[1]) == MAX_TRACE_ENTRIES
    assert HEADER.size == 48


def test_first_touch_order_and_bound() -> None:
    t = BootTrace(3, "/nowhere/base.raw", enabled=True)
    t.note(5 * G + 100, 10, t_ns=10)
    t.note(2 * G, 2 * G, t_ns=20)  # granules 2 and 3
    t.note(5 * G, G, t_ns=30)  # seen already: keeps its first time
    assert t.touched == {5: 10, 2: 20, 3: 20}
    # A worker's touch that happened earlier but arrived late moves the granule forward.
    t.note_worker([[5, 3 * G, G], [40, 9 * G, G], ["junk"], [1, -1, 5], [1, 0, 0]])
    assert sorted(t.touched, key=t.touched.__getitem__) == [3, 5, 2, 9]
    t.touched = {i: i for i in range(MAX_TRACE_ENTRIES)}
    t.note(MAX_TRACE_ENTRIES * G, 1)
    assert not t.recording and len(t.touched) == MAX_TRACE_ENTRIES


def test_runs_merge_adjacent_granules_in_order() -> None:
    t = BootTrace(3, "/nowhere/base.raw", enabled=True)
    t.loaded = [7, 8, 9, 2, 3, 100]
    assert t.runs() == [(7, 3), (2, 2), (100, 1)]
    t.loaded = list(range(40))
    per = (1 << 20) // G
    assert t.runs() == [(0, per), (per, per), (2 * per, 8)]


def test_coverage_and_prefetched_before_read() -> None:
    t = BootTrace(3, "/nowhere/base.raw", enabled=True)
    t.loaded = [1, 2, 3, 4]
    t.loaded_set = frozenset(t.loaded)
    t.prefetched_at = {1: 100, 2: 100, 3: 500}
    t.touched = {1: 200, 2: 50, 3: 600, 9: 700}
    s = t.stats()
    assert s["entries"] == 4 and s["base_granules_read"] == 4
    assert s["covered"] == 3 and s["covered_share"] == 0.75
    assert s["prefetched_before_read"] == 2 and s["prefetched_before_read_share"] == 0.5


def test_off_and_no_base_record_nothing() -> None:
    off = BootTrace(3, "/x/base", enabled=False)
    assert not off.recording and off.state.startswith("off")
    none = BootTrace(None, None, enabled=True, why_not="no base: a disk of one layer")
    assert not none.enabled and none.state == "no base: a disk of one layer"


# ---- a remote base's trace (beside its cache: URL, size and validator as identity) ----------

RID = RemoteIdentity(url="http://golden.lan/base.raw", size=1 << 30,
                     validator='size=1073741824 etag="66a-5f0" last-modified=Mon, 07 Dec 2026')


@given(st.lists(st.integers(0, 0xFFFFFFFF), max_size=300, unique=True))
def test_remote_round_trip(indices: list[int]) -> None:
    data = encode(RID, G, indices)
    assert decode(data, RID) == (G, indices)
    assert decode(data, None) == (G, indices)


def test_remote_layout_is_the_documented_one() -> None:
    data = encode(RID, G, [5, 1, 3])
    url, val = RID.url.encode(), RID.validator.encode()
    assert data[:8] == b"COWDTRR1"
    assert struct.unpack_from("<IIQIHH", data, 8) == (1, G, RID.size, 3, len(url), len(val))
    assert data[32:32 + len(url)] == url
    assert data[32 + len(url):32 + len(url) + len(val)] == val
    assert struct.unpack_from("<3I", data, 32 + len(url) + len(val)) == (5, 1, 3)
    assert len(data) == 32 + len(url) + len(val) + 12 + 8


@pytest.mark.parametrize("other,why", [
    (RID._replace(validator=RID.validator.replace("5f0", "5f1")), "the remote base changed"),
    (RID._replace(size=RID.size + 65536), "the remote base changed"),
    (RID._replace(url="http://golden.lan/other.raw"), "a trace of another remote"),
    (BaseIdentity(RID.size, 0, 0), "a trace of a remote base"),
])
def test_remote_stale_identity(other: RemoteIdentity | BaseIdentity, why: str) -> None:
    with pytest.raises(TraceError, match=f"stale: {why}"):
        decode(encode(RID, G, [1, 2]), other)


def test_a_local_trace_is_stale_for_a_remote_base() -> None:
    with pytest.raises(TraceError, match="stale: a trace of a local base"):
        decode(encode(ID, G, [1, 2]), RID)


def test_remote_damage_rejected() -> None:
    data = encode(RID, G, [1, 2, 3])
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x20
        with pytest.raises(TraceError):
            decode(bytes(bad), RID)
    for cut in range(len(data)):
        with pytest.raises(TraceError):
            decode(data[:cut], RID)
    with pytest.raises(TraceError, match="truncated"):
        decode(data + b"\0", RID)
    body = bytearray(data[:-8])
    struct.pack_into("<H", body, 28, 5000)  # a URL length past the bound
    with pytest.raises(TraceError, match="identity too long"):
        decode(_reseal(bytes(body)), RID)
    body = bytearray(data[:-8])
    struct.pack_into("<I", body, 24, MAX_TRACE_ENTRIES + 1)
    with pytest.raises(TraceError, match="too many entries"):
        decode(_reseal(bytes(body)), RID)
    body = bytearray(data[:-8])
    body[32] = 0xFF  # the URL's first byte: not UTF-8
    with pytest.raises(TraceError, match="not UTF-8"):
        decode(_reseal(bytes(body)), None)


def test_remote_identity_bounded() -> None:
    with pytest.raises(ValueError, match="too long"):
        encode(RID._replace(url="http://x/" + "a" * 5000), G, [1])
