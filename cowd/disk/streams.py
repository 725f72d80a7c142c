"""Layer: cowd disk.  What a disk remembers between reads: which reads form sequential
streams (and how far ahead the kernel was asked to fetch their data), and the plans of reads
that had to wait for the disk.

Both are per-disk bookkeeping on the read path, trio-thread only, with no I/O except
``posix_fadvise`` (advice: a failure is ignored).

- :class:`Streams`: a read that starts within one granule of where one of the last
  SEQUENTIAL_STREAMS reads ended, or a few reads of its length ahead of it, continues that
  stream (a few concurrent streams, queue-depth reordering, and a stream's reads shared
  between processes); the planner resolves ahead for it, and :meth:`Streams.advise_ahead`
  has the kernel fetch the stream's next data.
- :class:`KeptPlans`: a frontend that answers a batch in one wakeup tries each read without
  waiting; the plan of one that would wait is kept here, its data advised, and the read that
  follows uses it — a page-cache miss is planned once — unless the disk's mapping changed in
  between (the generation it was kept in is gone).
"""

from __future__ import annotations

import os

from formats.base import Kind

from .chain import Segment
from .remote import FETCHER

# Reads that start within one granule of where one of the last SEQUENTIAL_STREAMS reads
# ended count as sequential (a few concurrent streams, and queue-depth reordering), and so
# do reads up to STREAM_GAP_REQUESTS reads of their length ahead of it: one stream served by
# several processes (a FUSE file's requests go to whichever worker reads /dev/fuse first, an
# NBD multi-conn client's to its connections) shows each of them only some of its reads.
SEQUENTIAL_STREAMS = 8
STREAM_GAP_REQUESTS = 8

# Data read-ahead for a sequential stream: advise the kernel this many requests' worth of
# bytes ahead of the stream, at most DATA_READAHEAD_MAX_BYTES: enough that a cold base is
# read faster than a loop device with direct I/O reads it, and no more (the measurements
# are in docs/disk-costs.md, "Sequential read-ahead").
DATA_READAHEAD_REQUESTS = 8
DATA_READAHEAD_MAX_BYTES = 32 << 20

# Plans of reads that had to wait for the disk, kept for the advice and the read that follow
# (a frontend's batch: NBD answers up to a few hundred requests per wakeup).
MAX_KEPT_PLANS = 256


class Streams:
    """The recent sequential read streams of one disk; see the module docstring."""

    __slots__ = ("_advised", "_ends", "granule")

    def __init__(self, granule: int):
        self.granule = granule
        self._ends: list[int] = []  # where each recent stream's last read ended
        self._advised = (-1, 0)  # (fd, file offset) the last data advice reached

    def note(self, offset: int, end: int) -> bool:
        """Record a read of [offset, end); True if it continues a recent stream."""
        g = self.granule
        ahead = max(g, (end - offset) * STREAM_GAP_REQUESTS)
        ends = self._ends
        for i, e in enumerate(ends):
            if e - g <= offset <= e + ahead:
                ends[i] = end
                return True
        if len(ends) >= SEQUENTIAL_STREAMS:
            ends.pop(0)
        ends.append(end)
        return False

    def advise_ahead(self, segs: list[Segment], length: int) -> None:
        """A sequential stream read ``segs`` (``length`` bytes): have the kernel fetch the
        data ahead of it.  The file's own readahead window (128 KiB by default) is smaller
        than one 1 MiB request, so without this every such request waits for the disk.  The
        guess: the stream's next bytes follow its last DATA run in the same file (true for a
        raw base and for clusters allocated in order); a wrong guess costs only page cache,
        and no remap lookups are made for it.  Advises DATA_READAHEAD_REQUESTS requests'
        worth, half a window at a time."""
        last = next((seg for seg in reversed(segs) if seg.kind is Kind.DATA), None)
        if last is not None and last.file is not None:
            self.advise_after(last.file.fd, last.file_offset + last.length, length)

    def advise_after(self, fd: int, end: int, length: int) -> None:
        """:meth:`advise_ahead` for a stream whose last read ended at file offset ``end`` of
        ``fd`` (what a worker's MappedDisk knows of its runs)."""
        window = min(max(length, self.granule) * DATA_READAHEAD_REQUESTS,
                     DATA_READAHEAD_MAX_BYTES)
        afd, advised_to = self._advised
        if afd == fd and end + window // 2 < advised_to <= end + window:
            return  # at least half a window is already on its way
        start = advised_to if afd == fd and end <= advised_to <= end + window else end
        try:
            os.posix_fadvise(fd, start, end + window - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            return  # advice only
        self._advised = (fd, end + window)


class KeptPlans:
    """Plans of reads that had to wait for the disk, by (guest offset, length), each good
    only while the mapping generation it was kept in lasts; see the module docstring."""

    __slots__ = ("plans", "reused")

    def __init__(self) -> None:
        # (guest_offset, length) -> (mapping generation, plan); oldest first.  Empty most of
        # the time: the hot path tests it before calling get().
        self.plans: dict[tuple[int, int], tuple[int, list[Segment]]] = {}
        self.reused = 0

    def get(self, guest_offset: int, length: int, generation: int, *,
            pop: bool) -> list[Segment] | None:
        """The kept plan of this read if it is still good (``pop``: and forget it)."""
        plans = self.plans
        got = plans.pop((guest_offset, length), None) if pop else \
            plans.get((guest_offset, length))
        if got is None or got[0] != generation:
            return None
        self.reused += 1
        return got[1]

    def keep(self, guest_offset: int, length: int, generation: int,
             segs: list[Segment]) -> None:
        plans = self.plans
        if len(plans) >= MAX_KEPT_PLANS:
            del plans[next(iter(plans))]  # the oldest
        plans[(guest_offset, length)] = (generation, segs)


def advise_segments(segs: list[Segment]) -> None:
    """Start reading the DATA of ``segs`` into the page cache without waiting (and, for a
    remote base, fetching the blocks its cache lacks: cowd/disk/remote.py)."""
    for seg in segs:
        f = seg.file
        if f is not None and seg.kind is Kind.DATA:
            remote = getattr(f, "remote", None)
            if remote is not None:
                FETCHER.advise(remote, seg.file_offset, seg.length)
            try:
                os.posix_fadvise(f.fd, seg.file_offset, seg.length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # advice only


__all__ = ["KeptPlans", "Streams", "advise_segments"]
