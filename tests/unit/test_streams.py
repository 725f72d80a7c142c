"""cowd/disk/streams.py: which reads continue a sequential stream (and so get read-ahead)."""

from __future__ import annotations

import random

from cowd.disk.streams import SEQUENTIAL_STREAMS, STREAM_GAP_REQUESTS, Streams

KiB = 1024
GRANULE = 64 * KiB


def test_a_stream_read_in_order_is_sequential_from_its_second_read() -> None:
    s = Streams(GRANULE)
    length = 512 * KiB
    seen = [s.note(off, off + length) for off in range(0, 16 * length, length)]
    assert seen == [False] + [True] * 15


def test_a_stream_split_between_processes_stays_sequential_for_each() -> None:
    # Two FUSE workers take the 512 KiB halves of 1 MiB reads as they come: each sees every
    # other read (or a few in a row, or a run of the other's), and each must still know the
    # stream for its read-ahead.  Model: one Streams per worker, the reads dealt at random.
    rng = random.Random(7)
    workers = [Streams(GRANULE), Streams(GRANULE)]
    length = 512 * KiB
    firsts = [True, True]
    for off in range(0, 1024 * length, length):
        w = rng.randrange(2)
        got = workers[w].note(off, off + length)
        if firsts[w]:
            firsts[w] = False
            continue
        # This seed's deal has no run of more than STREAM_GAP_REQUESTS reads for one worker.
        assert got, f"worker {w} lost the stream at offset {off}"


def test_a_read_beyond_the_gap_or_behind_the_stream_starts_a_new_one() -> None:
    length = 512 * KiB
    s = Streams(GRANULE)
    s.note(0, length)
    assert not s.note(length + STREAM_GAP_REQUESTS * length + 1, 2 * length
                      + STREAM_GAP_REQUESTS * length + 1)
    s = Streams(GRANULE)
    s.note(10 * length, 11 * length)
    assert not s.note(10 * length - GRANULE - 1, 11 * length)  # more than a granule back
    assert s.note(11 * length - GRANULE, 12 * length)  # reordered by less than a granule


def test_small_random_reads_are_not_streams() -> None:
    # 4 KiB reads: the allowance is one granule, as before gaps were allowed, so random
    # reads over a disk almost never look sequential (and get no read-ahead).
    rng = random.Random(1)
    s = Streams(GRANULE)
    disk = 1 << 30
    hits = sum(s.note(o, o + 4 * KiB)
               for o in (rng.randrange(disk // (4 * KiB)) * 4 * KiB for _ in range(5000)))
    # Expected about 5000 * SEQUENTIAL_STREAMS * (granule + granule) / disk = 5
    assert hits <= 4 * 5000 * SEQUENTIAL_STREAMS * 2 * GRANULE // disk
