"""The remap cache (cowd/remap.py): bound, LRU, expiry with a fake clock, invalidation,
counters, and a hypothesis state machine against a plain model.  No I/O."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cowd.remap import MAX_EXTENTS_PER_ENTRY, Origin, RemapCache, RemapCounters
from formats.base import Extent, Kind

G = 65536


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exts(layer: int, idx: int, tag: int = 0) -> tuple[Extent, ...]:
    """A recognisable one-extent answer for (layer, idx); ``tag`` tells versions apart."""
    return (Extent(idx * G, G, Kind.ZERO if tag % 2 else Kind.UNALLOCATED,
                   file_offset=layer * 1000 + tag),)


def test_lookup_miss_then_hit() -> None:
    c = RemapCache(max_entries=4, max_age_s=None)
    assert c.lookup((1, 0)) is None
    c.insert((1, 0), exts(1, 0))
    assert c.lookup((1, 0)) == exts(1, 0)
    assert (c.counters.hits, c.counters.misses, c.counters.inserted) == (1, 1, 1)


def test_bound_and_lru_eviction() -> None:
    c = RemapCache(max_entries=3, max_age_s=None)
    for i in range(3):
        c.insert((1, i), exts(1, i))
    assert c.lookup((1, 0)) is not None  # 0 becomes most recent; 1 is now least recent
    c.insert((1, 3), exts(1, 3))
    assert len(c) == 3
    assert (1, 1) not in c
    assert all(k in c for k in [(1, 0), (1, 2), (1, 3)])
    assert c.counters.evictions == 1
    # Replacing an existing key never evicts.
    c.insert((1, 3), exts(1, 3, tag=1))
    assert len(c) == 3 and c.counters.evictions == 1
    assert c.lookup((1, 3)) == exts(1, 3, tag=1)


def test_expiry_by_age_with_fake_clock() -> None:
    clock = FakeClock()
    c = RemapCache(max_entries=10, max_age_s=5.0, clock=clock)
    c.insert((1, 0), exts(1, 0))
    clock.now += 5.0
    assert c.lookup((1, 0)) is not None  # exactly the age limit: still valid
    c.insert((1, 1), exts(1, 1))
    clock.now += 0.5
    assert c.lookup((1, 0)) is None  # 5.5 s old
    assert c.counters.expiries == 1 and (1, 0) not in c
    assert c.peek((1, 1)) is not None
    clock.now += 5.0
    assert c.peek((1, 1)) is None  # expired, peek does not count or drop
    assert (1, 1) in c
    assert c.expire() == 1
    assert len(c) == 0 and c.counters.expiries == 2


def test_hits_do_not_renew_age() -> None:
    clock = FakeClock()
    c = RemapCache(max_entries=10, max_age_s=10.0, clock=clock)
    c.insert((1, 0), exts(1, 0))
    for _ in range(3):
        clock.now += 4.0
        c.lookup((1, 0))
    assert (1, 0) not in c  # 12 s after insertion, hits notwithstanding


def test_invalidate_key_and_range() -> None:
    c = RemapCache(max_entries=100, max_age_s=None)
    for layer in (1, 2):
        for i in range(10):
            c.insert((layer, i), exts(layer, i))
    assert c.invalidate((1, 3))
    assert not c.invalidate((1, 3))
    assert c.invalidate_range(1, 5, 8) == 3
    assert sorted(i for (lay, i) in c._entries if lay == 1) == [0, 1, 2, 4, 8, 9]
    # A range wider than the cache takes the scanning path.
    assert c.invalidate_range(2, 2, 1 << 40) == 8
    assert sorted(i for (lay, i) in c._entries if lay == 2) == [0, 1]
    assert c.drop_layer(1) == 6
    assert len(c) == 2
    assert c.counters.invalidations == 1 + 3 + 8 + 6


def test_readahead_used_and_unused_counters() -> None:
    clock = FakeClock()
    c = RemapCache(max_entries=3, max_age_s=10.0, clock=clock)
    c.insert((1, 0), exts(1, 0), Origin.READAHEAD)
    c.insert((1, 1), exts(1, 1), Origin.READAHEAD)
    c.insert((1, 2), exts(1, 2), Origin.READAHEAD)
    assert c.counters.readahead_inserted == 3
    c.lookup((1, 1))
    c.lookup((1, 1))  # used once, counted once
    assert c.counters.readahead_used == 1
    c.insert((1, 3), exts(1, 3))  # evicts (1, 0), unused
    assert c.counters.readahead_unused == 1
    c.invalidate((1, 2))  # unused, invalidated
    assert c.counters.readahead_unused == 2
    c.invalidate((1, 1))  # used: not counted
    assert c.counters.readahead_unused == 2
    c.insert((1, 4), exts(1, 4), Origin.READAHEAD)
    clock.now += 11
    assert c.expire() == 2
    assert c.counters.readahead_unused == 3


def test_primed_counter_and_local_counters() -> None:
    c = RemapCache(max_entries=10, max_age_s=None)
    mine = RemapCounters()
    c.insert((1, 0), exts(1, 0), Origin.PRIME, mine)
    c.lookup((1, 0), mine)
    c.lookup((1, 1), mine)
    c.lookup((1, 0))  # someone else's lookup
    assert (mine.primed, mine.hits, mine.misses) == (1, 1, 1)
    assert (c.counters.primed, c.counters.hits, c.counters.misses) == (1, 2, 1)
    c.note_request(3, mine)
    c.note_request(1, mine)
    d = mine.as_dict()
    assert d["requests"] == 2 and d["metadata_lookups"] == 4 and d["max_metadata_lookups"] == 3
    assert d["metadata_lookups_per_request"] == 2.0
    assert d["hit_rate"] == 0.5


def test_too_fragmented_answer_is_not_cached() -> None:
    c = RemapCache(max_entries=10, max_age_s=None)
    c.insert((1, 0), exts(1, 0))
    many = tuple(Extent(i * 512, 512, Kind.ZERO) for i in range(MAX_EXTENTS_PER_ENTRY + 1))
    assert not c.insert((1, 0), many)
    assert (1, 0) not in c  # the older answer is gone too: it may be stale
    assert c.counters.uncacheable == 1
    ok = many[:MAX_EXTENTS_PER_ENTRY]
    assert c.insert((1, 1), ok)


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        RemapCache(max_entries=0)
    with pytest.raises(ValueError, match="max_age_s"):
        RemapCache(max_age_s=0)


# ---- state machine against a model ---------------------------------------------------------

keys = st.tuples(st.integers(1, 3), st.integers(0, 7))


class CacheMachine(RuleBasedStateMachine):
    """Model: a dict key -> (value, born, flags) and a list giving LRU order."""

    @initialize(max_entries=st.integers(1, 6), max_age=st.one_of(st.none(), st.integers(1, 5)))
    def setup(self, max_entries: int, max_age: int | None) -> None:
        self.clock = FakeClock()
        self.cache = RemapCache(max_entries=max_entries,
                                max_age_s=None if max_age is None else float(max_age),
                                clock=self.clock)
        self.max_entries = max_entries
        self.max_age = max_age
        self.model: dict[tuple[int, int], tuple[tuple[Extent, ...], float, bool]] = {}
        self.order: list[tuple[int, int]] = []  # least recently used first
        self.tag = 0
        self.hits = self.misses = self.evictions = self.expiries = 0
        self.ra_unused = 0

    def _expired(self, key: tuple[int, int]) -> bool:
        return self.max_age is not None and self.clock.now - self.model[key][1] > self.max_age

    def _gone(self, key: tuple[int, int]) -> None:
        if self.model[key][2]:
            self.ra_unused += 1
        del self.model[key]
        self.order.remove(key)

    @rule(key=keys, readahead=st.booleans())
    def insert(self, key: tuple[int, int], readahead: bool) -> None:
        self.tag += 1
        value = exts(key[0], key[1], self.tag)
        self.cache.insert(key, value, Origin.READAHEAD if readahead else Origin.MISS)
        if key in self.model:
            self._gone(key)
        else:
            while len(self.model) >= self.max_entries:
                self.evictions += 1
                self._gone(self.order[0])
        self.model[key] = (value, self.clock.now, readahead)
        self.order.append(key)

    @rule(key=keys)
    def lookup(self, key: tuple[int, int]) -> None:
        got = self.cache.lookup(key)
        if key in self.model and self._expired(key):
            self.expiries += 1
            self._gone(key)
        if key not in self.model:
            self.misses += 1
            assert got is None
            return
        self.hits += 1
        value, born, _ = self.model[key]
        assert got == value
        self.model[key] = (value, born, False)
        self.order.remove(key)
        self.order.append(key)

    @rule(key=keys)
    def invalidate(self, key: tuple[int, int]) -> None:
        assert self.cache.invalidate(key) == (key in self.model)
        if key in self.model:
            self._gone(key)

    @rule(layer=st.integers(1, 3), a=st.integers(0, 8), n=st.integers(0, 100))
    def invalidate_range(self, layer: int, a: int, n: int) -> None:
        doomed = [k for k in self.model if k[0] == layer and a <= k[1] < a + n]
        assert self.cache.invalidate_range(layer, a, a + n) == len(doomed)
        for k in doomed:
            self._gone(k)

    @rule(layer=st.integers(1, 3))
    def drop_layer(self, layer: int) -> None:
        doomed = [k for k in self.model if k[0] == layer]
        assert self.cache.drop_layer(layer) == len(doomed)
        for k in doomed:
            self._gone(k)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @precondition(lambda self: self.max_age is not None)
    @rule()
    def sweep(self) -> None:
        doomed = [k for k in self.model if self._expired(k)]
        assert self.cache.expire() == len(doomed)
        self.expiries += len(doomed)
        for k in doomed:
            self._gone(k)

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "cache"):
            return
        c = self.cache.counters
        assert len(self.cache) == len(self.model) <= self.max_entries
        assert list(self.cache._entries) == self.order
        assert (c.hits, c.misses, c.evictions, c.expiries) == (
            self.hits, self.misses, self.evictions, self.expiries)
        assert c.readahead_unused == self.ra_unused
        assert c.readahead_used <= c.readahead_inserted


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                          deadline=None)
TestCacheMachine = CacheMachine.TestCase
