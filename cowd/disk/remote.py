"""Layer: cowd disk, bottom.  Fetching remote bases' blocks for the daemon without blocking
its event loop (formats/remote/ is the library side: the cache and the clients).

Theory of operation
-------------------
In the daemon, a read of a remote layer's cache file that needs a block the cache does not
hold raises :class:`~formats.remote.NotCached` in the trio thread (formats/remote/file.py:
``fetch_inline`` is false there) instead of waiting for the network.  The disk catches it,
awaits :meth:`Fetcher.fetch` — the blocks are fetched by ``RemoteBase.fetch`` in worker
threads (``trio.to_thread``, at most ``MAX_FETCH_THREADS`` at once), retried with back-off
until the configured deadline, one for all the blocks of the miss (each 4 MiB piece and
the wait for a fetch thread count against it, not a deadline each) — and plans again.
Misses of the same block wait for the one fetch in flight (single flight).  A frontend
that answers a batch first *advises* its reads: a remote block that is missing starts
fetching in the background then (the fetcher's nursery), so the misses of a batch travel
together.

Read-ahead: a miss right after the end of the previous fetch of the same remote (a
sequential reader) fetches ``READAHEAD_MIN_BLOCKS`` more blocks, doubling on each further
sequential miss up to ``READAHEAD_MAX_BLOCKS``; a miss elsewhere starts again from nothing.

*In the disk* (cowd/disk/disk.py): the async paths fetch (as above) and plan again; the
synchronous ones (``try_read_into``, ``try_write``, ``advise``) start the fetch in the
background and say "not now".  A write that copies up from a remote layer has its copy-up
sources fetched first.  ``segments`` — the remaps handed to workers and the kernel shim —
never names a remote block the cache does not hold: such runs are left unmapped, so their
reads come back to the daemon as misses and are answered with the data.  A block that cannot
be fetched before the deadline fails the request with EIO, never zeroes.  Opening a disk
over a remote base first opens its chain once in a thread (:func:`warm_chain`), so the
metadata its codecs read at open is in the cache before the event loop's open needs it.

Contract: everything here runs in the trio thread but the fetches themselves; a block's
presence only ever goes from missing to held while disks use it (nothing in the daemon drops
blocks: only a sole user trims a cache, when it opens), so a remap of a cached block handed
to a worker or the kernel stays good for as long as the disk is open.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import trio

import formats
from formats.errors import FormatError, ImageIOError
from formats.opener import OpenPolicy
from formats.remote import NotCached, RemoteBase, open_bases
from formats.remote import file as remote_file

# Fetches running at once over all remotes (each holds one connection and one thread).
MAX_FETCH_THREADS = 8
READAHEAD_MIN_BLOCKS = 4
READAHEAD_MAX_BLOCKS = 64
# Background fetches started by advice and not yet done; more advice is ignored past this.
MAX_BACKGROUND = 64


class _Flight:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class Fetcher:
    """The daemon's fetches of remote blocks; see the module docstring.  Trio-thread only."""

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(MAX_FETCH_THREADS)
        self._flights: dict[tuple[int, int], _Flight] = {}  # (id(base), block) -> fetch
        self._seq: dict[int, tuple[int, int]] = {}  # id(base) -> (end of last fetch, window)
        self._nursery: trio.Nursery | None = None
        self._background = 0
        self.counters = {"fetch_waits": 0, "background_fetches": 0, "readahead_blocks": 0,
                         "trace_fetches": 0}

    def serve_in(self, nursery: trio.Nursery) -> None:
        """Let advice start fetches in ``nursery`` (the daemon's); without one, advice
        fetches nothing and reads fetch when they run."""
        self._nursery = nursery
        trio_thread = threading.get_ident()
        remote_file.set_fetch_inline(lambda: threading.get_ident() != trio_thread)

    async def fetch(self, miss: NotCached, prefetch: bool = False,
                    deadline: float | None = None) -> None:
        """Fetch the blocks ``miss`` names (joining fetches already in flight); raises the
        fetch's ImageIOError when they cannot be had before the deadline: one deadline for
        all of them (a wait for a fetch thread counts too), ``timeout_s`` from now unless
        the request's :class:`Deadline` gives an earlier round's (CLOCK_MONOTONIC).
        ``prefetch``: a boot trace's cache fill (cowd/disk/boottrace.py), which neither
        grows by read-ahead nor counts as the guest's sequential stream."""
        self.counters["trace_fetches" if prefetch else "fetch_waits"] += 1
        base = miss.remote
        if deadline is None:
            deadline = time.monotonic() + base.timeout_s
        waits: list[_Flight] = []
        async with trio.open_nursery() as nursery:
            for first, end in miss.blocks:
                if not prefetch:
                    end = self._ahead(base, first, end)
                run_start = -1
                for b in range(first, end + 1):
                    flight = self._flights.get((id(base), b)) if b < end else None
                    free = b < end and flight is None and not base.files.present[b]
                    if free and run_start < 0:
                        run_start = b
                    if not free and run_start >= 0:
                        nursery.start_soon(self._run, base, run_start, b, deadline,
                                           self._claim(base, run_start, b))
                        run_start = -1
                    if flight is not None and flight not in waits:
                        waits.append(flight)
        for flight in waits:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error

    def _ahead(self, base: RemoteBase, first: int, end: int) -> int:
        """``end`` grown by read-ahead when the miss continues the last fetch."""
        last_end, window = self._seq.get(id(base), (-1, 0))
        window = min(READAHEAD_MAX_BLOCKS, max(READAHEAD_MIN_BLOCKS, window * 2)) \
            if first == last_end else 0
        grown = min(base.blocks, end + window)
        self.counters["readahead_blocks"] += grown - end
        self._seq[id(base)] = (grown, window)
        return grown

    def _claim(self, base: RemoteBase, first: int, end: int) -> _Flight:
        flight = _Flight()
        for b in range(first, end):
            self._flights[(id(base), b)] = flight
        return flight

    async def _run(self, base: RemoteBase, first: int, end: int, deadline: float,
                   flight: _Flight) -> None:
        try:
            await trio.to_thread.run_sync(base.fetch, first, end, deadline,
                                          limiter=self.limiter)
        except ImageIOError as e:
            flight.error = e
        finally:
            for b in range(first, end):
                self._flights.pop((id(base), b), None)
            flight.done.set()
        if flight.error is not None:
            raise flight.error

    def start(self, miss: NotCached) -> None:
        """Fetch in the background (advice): errors are left for the read that follows."""
        if self._nursery is None or self._background >= MAX_BACKGROUND:
            return
        self._background += 1
        self.counters["background_fetches"] += 1
        self._nursery.start_soon(self._quiet, miss)

    async def _quiet(self, miss: NotCached) -> None:
        try:
            await fetch_missing(miss)
        except ImageIOError:
            pass  # the read that follows fetches again and reports it
        finally:
            self._background -= 1

    def advise(self, base: RemoteBase, file_offset: int, length: int) -> None:
        """A read of this range of ``base``'s cache file is coming: start what it misses."""
        if self._nursery is None:
            return
        gaps = base.missing(file_offset, length)
        if gaps:
            self.start(NotCached(base, gaps))

    def stats(self) -> list[dict[str, Any]]:
        return [base.stats() for base in open_bases()]


FETCHER = Fetcher()


class Deadline:
    """One request's deadline for all its fetch rounds.  A request over a remote qcow2 or
    VHD may miss several times (an L2 table or BAT block, then the data it names: fetched,
    then planned again); the first miss sets the deadline, ``timeout_s`` of that base from
    then, and every later round must finish by it, so a request fails with EIO after one
    ``--remote-timeout``, not one per round."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at: float | None = None

    def of(self, miss: NotCached) -> float:
        if self.at is None:
            self.at = time.monotonic() + miss.remote.timeout_s
        return self.at


async def fetch_missing(miss: NotCached, prefetch: bool = False,
                        deadline: Deadline | None = None) -> None:
    """:meth:`Fetcher.fetch` of the process's fetcher (by ``deadline``, when the request
    has one), errors as one ImageIOError."""
    try:
        await FETCHER.fetch(miss, prefetch, None if deadline is None else deadline.of(miss))
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def warm_chain(path: str, fmt: str | None, policy: OpenPolicy) -> Any:
    """Open the chain read-only with the library (in a thread: remote layers connect and
    fetch what their codecs read at open); None when it cannot be opened (the real open
    says why).  A remote base that changed since it was cached is the exception: its error
    (ESTALE) is raised here, in one line, before the real open connects again (which would
    fail the same way: the cache stays marked changed until the user drops it)."""
    try:
        return formats.open_image(path, False, fmt, policy=policy)
    except (FormatError, OSError) as e:
        if getattr(e, "errno", None) == errno.ESTALE:
            raise
        return None


__all__ = ["FETCHER", "Deadline", "Fetcher", "NotCached", "fetch_missing", "warm_chain"]
