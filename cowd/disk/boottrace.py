"""Layer: cowd disk, beside the read path: boot-trace priming (issue 16).

A VM's first boot reads its base image's blocks in an order that the next first boot of
another overlay of the same base repeats.  While a disk is served, this module records the
*first-touch order* of the base file's granules that the guest's reads reach (reads that
fall through every overlay to the bottom layer — the shared base), and writes it beside the
base as ``BASE.cowd-trace`` when the disk is closed.  A later disk over the same base loads
it and reads the base's traced ranges into the page cache, in trace order, ahead of the
guest.  The trace only orders prefetches: no data path depends on it, and a stale or corrupt
one is ignored with one log line.

A *remote* base (formats/remote/: an NBD export or an HTTP file read through a local cache)
has no local path to write beside: its trace lives beside its cache folder, as
``CACHE_ROOT/<cache folder>.cowd-trace``, and names the remote's identity (URL, size and
validator — NBD: the export's size; HTTP: size, ETag, Last-Modified), so a trace of another
version of the remote is stale.  It is kept when the cache is dropped or trimmed (it orders
the refill).  Its prefetch is a *cache fill*: the traced blocks the cache does not hold are
fetched into it (one fetch each, through the daemon's fetcher, single flight with the
guest's misses, no read-ahead); traced runs it holds already are read into the page cache as
a local base's are.  A full cache (its budget reached) stops the prefetch: it would keep
nothing.

What is seen
------------
The daemon's own reads (FUSE and NBD served by the daemon) are noted in :class:`Disk`'s read
path.  Worker processes (``--workers``, the default on more than one core) read mapped
ranges themselves; they note their first touches too (:mod:`cowd.workers.mapped`) and the
daemon drains them with its stats query (on ``cowd stats``, before a detach and at stop),
merged with its own by CLOCK_MONOTONIC time.  The kernel shim (``--via kmod``) reads mapped
ranges in the kernel and asks the daemon only for remaps; a module with ``COWD_FEAT_TOUCH``
keeps a bitmap of the base file's granules and reports each one's first mapped read in the
same [t_ns, file_offset, length] form (:mod:`cowd.frontends.kmod.channel`), which the daemon
hands to :meth:`BootTrace.note_worker` as it reads the channel and before a detach.

The trace files (all integers little-endian)
--------------------------------------------
A local base's (``BASE.cowd-trace``)::

    offset size
         0    8  magic b"COWDTRC1"
         8    4  version (1)
        12    4  granule_bytes (a power of two, 4 KiB .. 64 MiB)
        16    8  base size in bytes      \\
        24    8  base st_mtime_ns         > the base's identity: a trace whose identity
        32    8  base st_ino             /  differs from the base's is stale, ignored
        40    4  count (at most MAX_TRACE_ENTRIES)
        44    4  reserved, zero
        48  4*n  granule indices of the base *file* (byte offset = index * granule_bytes),
                 first touch first, each once
      48+4n   8  xxh3_64 of every byte before it

A remote base's (``CACHE_ROOT/<cache folder>.cowd-trace``)::

    offset size
         0    8  magic b"COWDTRR1"
         8    4  version (1)
        12    4  granule_bytes (a power of two, 4 KiB .. 64 MiB)
        16    8  the remote's size in bytes
        24    4  count (at most MAX_TRACE_ENTRIES)
        28    2  U, the URL's length in bytes (at most MAX_IDENTITY_BYTES)
        30    2  V, the validator's length in bytes (at most MAX_IDENTITY_BYTES)
        32    U  the URL (UTF-8)                 \\ the remote's identity with the size: a
      32+U    V  the validator (UTF-8)           /  trace whose identity differs is stale
    32+U+V  4*n  granule indices of the remote *file*, first touch first, each once
         …    8  xxh3_64 of every byte before it

Written atomically: a temporary file in the base's folder (a remote base's: the cache
root), fsync, rename, fsync of the folder.  Only where that folder is the daemon's user's
own and writable by it; elsewhere nothing is written (one log line; ``cowd stats`` says
why) — a run dir copy would outlive the base it names and serve no other daemon, and a file
in a folder someone else owns (a user's base in /tmp, root's daemon in a user's folder)
would be a file its owner never asked for.  A disk that loaded a valid trace leaves it as
it is: the trace is the *first* boot's first touches; a missing, stale or corrupt trace is
replaced.

Prefetching: at most :data:`PREFETCH_IN_FLIGHT` reads (or cache fills) of at most
:data:`PREFETCH_RUN_BYTES` (adjacent traced granules merged) run in worker threads; a
granule the guest already read is skipped; the prefetcher stops when the trace is done, the
disk closes or a read or fetch fails (one log line; the guest's own reads report their
errors).  It yields to the guest only by being small: two reads in flight next to the
guest's (for a remote base: two of the fetcher's eight threads), and the trio loop
checkpoints between them.

Contract: trio-thread only (the prefetch threads only ``pread`` or fetch).  ``note`` is on
the read path: a set lookup per base segment, and nothing once :data:`MAX_TRACE_ENTRIES`
granules were seen.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import struct
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import trio
import xxhash

from formats.errors import FormatError
from formats.remote import NotCached, RemoteBase

from .remote import fetch_missing

log = logging.getLogger("cowd.boottrace")

MAGIC = b"COWDTRC1"
VERSION = 1
HEADER = struct.Struct("<8sIIQqQII")
# A remote base's trace: magic, version, granule, size, count, URL length, validator length.
REMOTE_MAGIC = b"COWDTRR1"
REMOTE_VERSION = 1
REMOTE_HEADER = struct.Struct("<8sIIQIHH")
CHECKSUM = struct.Struct("<Q")
SUFFIX = ".cowd-trace"

# The unit of the trace: a granule of the base file.  64 KiB is qcow2's default cluster and
# about what a boot's small reads cluster into; a finer unit only lengthens the trace.
TRACE_GRANULE_BYTES = 64 << 10
MIN_GRANULE_BYTES = 4 << 10
MAX_GRANULE_BYTES = 64 << 20

# At most this many granules are recorded and loaded: a Debian boot reads a few hundred MiB
# (a few thousand 64 KiB granules); 32768 granules (2 GiB) covers any boot, and bounds the
# file at 128 KiB and the memory of a disk's sets.  Past it a boot is a copy, not a boot.
MAX_TRACE_ENTRIES = 1 << 15
# The longest URL or validator a remote trace names (the cache header keeps 1024 bytes of
# each; an HTTP validator is a size, an ETag and a date).
MAX_IDENTITY_BYTES = 4096
MAX_LOCAL_TRACE_BYTES = HEADER.size + 4 * MAX_TRACE_ENTRIES + CHECKSUM.size
MAX_TRACE_BYTES = REMOTE_HEADER.size + 2 * MAX_IDENTITY_BYTES + 4 * MAX_TRACE_ENTRIES \
    + CHECKSUM.size

# Prefetch reads in flight at once, and the most bytes one reads (adjacent granules merged).
PREFETCH_IN_FLIGHT = 2
PREFETCH_RUN_BYTES = 1 << 20


_TMP_SEQ = itertools.count()


class TraceError(ValueError):
    """A trace file that cannot be trusted; ``str`` says why (shown by ``cowd stats``)."""


class BaseIdentity(NamedTuple):
    """What changes when the base changes: its size, mtime and inode."""

    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of_fd(cls, fd: int) -> BaseIdentity:
        st = os.fstat(fd)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class RemoteIdentity(NamedTuple):
    """What names one version of a remote base: its URL, size and validator (what its
    cache is kept for: formats/remote/cache.py)."""

    url: str
    size: int
    validator: str

    @classmethod
    def of(cls, remote: RemoteBase) -> RemoteIdentity:
        return cls(remote.url, remote.size, remote.validator)


Identity = BaseIdentity | RemoteIdentity


# ---- the codec (no I/O) -----------------------------------------------------------------------


def encode(identity: Identity, granule_bytes: int, indices: Iterable[int]) -> bytes:
    """The trace file's bytes for ``indices`` (the first MAX_TRACE_ENTRIES): a local base's
    layout for a :class:`BaseIdentity`, a remote base's for a :class:`RemoteIdentity`
    (ValueError if its URL or validator is longer than MAX_IDENTITY_BYTES)."""
    idx = list(indices)[:MAX_TRACE_ENTRIES]
    if isinstance(identity, RemoteIdentity):
        url = identity.url.encode()
        val = identity.validator.encode()
        if len(url) > MAX_IDENTITY_BYTES or len(val) > MAX_IDENTITY_BYTES:
            raise ValueError(f"{identity.url}: URL or validator too long for a trace "
                             f"(max={MAX_IDENTITY_BYTES} bytes)")
        head = REMOTE_HEADER.pack(REMOTE_MAGIC, REMOTE_VERSION, granule_bytes, identity.size,
                                  len(idx), len(url), len(val)) + url + val
    else:
        head = HEADER.pack(MAGIC, VERSION, granule_bytes, identity.size, identity.mtime_ns,
                           identity.ino, len(idx), 0)
    body = head + struct.pack(f"<{len(idx)}I", *idx)
    return body + CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def decode(data: bytes, identity: Identity | None) -> tuple[int, list[int]]:
    """(granule_bytes, indices) of a trace file; TraceError if anything is wrong, or (with
    ``identity``) if it was recorded on another base or another version of it."""
    if len(data) < 8 + CHECKSUM.size:
        raise TraceError(f"truncated (length={len(data)})")
    if data[:8] == REMOTE_MAGIC:
        return _decode_remote(data, identity)
    if len(data) < HEADER.size + CHECKSUM.size:
        raise TraceError(f"truncated (length={len(data)})")
    if len(data) > MAX_LOCAL_TRACE_BYTES:
        raise TraceError(f"too long (length={len(data)}, max={MAX_LOCAL_TRACE_BYTES})")
    magic, version, granule, size, mtime_ns, ino, count, reserved = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise TraceError(f"bad magic (magic={magic!r})")
    if version != VERSION:
        raise TraceError(f"unknown version (version={version})")
    if count > MAX_TRACE_ENTRIES:
        raise TraceError(f"too many entries (count={count}, max={MAX_TRACE_ENTRIES})")
    end = HEADER.size + 4 * count
    if len(data) != end + CHECKSUM.size:
        raise TraceError(f"truncated (length={len(data)}, expected={end + CHECKSUM.size})")
    _check_sum(data, end)
    if reserved != 0:
        raise TraceError(f"reserved field set (reserved={reserved})")
    _check_granule(granule)
    if isinstance(identity, RemoteIdentity):
        raise TraceError("stale: a trace of a local base, this base is remote")
    if identity is not None and (size, mtime_ns, ino) != tuple(identity):
        raise TraceError(f"stale: the base changed (size={size}, mtime_ns={mtime_ns}, "
                         f"ino={ino}; now {identity.size}, {identity.mtime_ns}, "
                         f"{identity.ino})")
    return granule, list(struct.unpack_from(f"<{count}I", data, HEADER.size))


def _decode_remote(data: bytes, identity: Identity | None) -> tuple[int, list[int]]:
    if len(data) < REMOTE_HEADER.size + CHECKSUM.size:
        raise TraceError(f"truncated (length={len(data)})")
    if len(data) > MAX_TRACE_BYTES:
        raise TraceError(f"too long (length={len(data)}, max={MAX_TRACE_BYTES})")
    _magic, version, granule, size, count, url_len, val_len = REMOTE_HEADER.unpack_from(data)
    if version != REMOTE_VERSION:
        raise TraceError(f"unknown version (version={version})")
    if count > MAX_TRACE_ENTRIES:
        raise TraceError(f"too many entries (count={count}, max={MAX_TRACE_ENTRIES})")
    if url_len > MAX_IDENTITY_BYTES or val_len > MAX_IDENTITY_BYTES:
        raise TraceError(f"identity too long (url_length={url_len}, "
                         f"validator_length={val_len}, max={MAX_IDENTITY_BYTES})")
    start = REMOTE_HEADER.size + url_len + val_len
    end = start + 4 * count
    if len(data) != end + CHECKSUM.size:
        raise TraceError(f"truncated (length={len(data)}, expected={end + CHECKSUM.size})")
    _check_sum(data, end)
    _check_granule(granule)
    try:
        url = data[REMOTE_HEADER.size:REMOTE_HEADER.size + url_len].decode()
        val = data[REMOTE_HEADER.size + url_len:start].decode()
    except UnicodeDecodeError:
        raise TraceError("identity is not UTF-8") from None
    if isinstance(identity, BaseIdentity):
        raise TraceError("stale: a trace of a remote base, this base is local")
    if identity is not None:
        if url != identity.url:
            raise TraceError(f"stale: a trace of another remote (url={url!r}; now "
                             f"{identity.url!r})")
        if (size, val) != (identity.size, identity.validator):
            raise TraceError(f"stale: the remote base changed (size={size}, validator="
                             f"{val!r}; now {identity.size}, {identity.validator!r})")
    return granule, list(struct.unpack_from(f"<{count}I", data, start))


def _check_sum(data: bytes, end: int) -> None:
    (want,) = CHECKSUM.unpack_from(data, end)
    if xxhash.xxh3_64_intdigest(data[:end]) != want:
        raise TraceError("checksum mismatch")


def _check_granule(granule: int) -> None:
    if granule & (granule - 1) or not MIN_GRANULE_BYTES <= granule <= MAX_GRANULE_BYTES:
        raise TraceError(f"bad granule (granule_bytes={granule})")


def trace_path(base_path: str) -> str:
    return base_path + SUFFIX


def remote_trace_path(remote: RemoteBase) -> str:
    """Beside the remote's cache folder (named by a hash of the remote: nothing an image
    chooses), in the cache root that only its user can write."""
    return remote.files.folder + SUFFIX


def read_trace(path: str, identity: Identity) -> tuple[int, list[int]]:
    """Load and check a trace file (bounded read, no symlinks); TraceError or OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.read(fd, MAX_TRACE_BYTES + 1)
    finally:
        os.close(fd)
    return decode(data, identity)


def write_trace(path: str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temp file, fsync, rename, fsync folder."""
    folder = os.path.dirname(path) or "."
    # Unique per process and call: two disks of one base may close at the same time.
    tmp = f"{path}.tmp-{os.getpid()}-{next(_TMP_SEQ)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---- one disk's trace ---------------------------------------------------------------------------


class BootTrace:
    """One disk's boot trace: what it loaded, what this boot touched, what it prefetched.

    ``base_fd``/``base_path``: the bottom layer's file; None when there is nothing to trace
    (a disk with one layer, or the feature off: ``state`` says which).  ``remote``: the
    bottom layer's remote base (formats/remote/), when it is one: its trace lives beside its
    cache and its prefetch fills the cache (see the module docstring)."""

    def __init__(self, base_fd: int | None, base_path: str | None, *, enabled: bool,
                 why_not: str | None = None, remote: RemoteBase | None = None):
        self.base_fd = base_fd
        self.base_path = base_path
        self.remote = remote
        self.enabled = enabled and base_fd is not None and base_path is not None
        self.state = why_not or ("off (--no-boot-trace)" if not enabled else "not loaded")
        # Where the trace file is (None: nothing to trace).
        self.path = None if base_path is None else \
            remote_trace_path(remote) if remote is not None else trace_path(base_path)
        self.identity: Identity | None = None
        self.granule = TRACE_GRANULE_BYTES
        self.loaded: list[int] = []
        self.loaded_set: frozenset[int] = frozenset()
        self.loaded_valid = False
        self.saved: str = "not yet"
        # This boot: first-touch time of each base granule (CLOCK_MONOTONIC ns), insertion
        # ordered by when the note arrived; sorted by time when saved.
        self.touched: dict[int, int] = {}
        self.recording = self.enabled
        self.prefetched_at: dict[int, int] = {}  # granule -> when its read completed
        self.prefetch_state = "not started"
        self.fetched_bytes = 0  # a remote base's: bytes the prefetch found missing, fetched
        self._stopped: str | None = None  # why the prefetch stopped early (a failure)
        self._filling = 0  # a remote base's: bytes of the prefetch's fetches in flight
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._done.set()

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        """Read the disk's trace file (blocking: call from a thread, or at open)."""
        if not self.enabled:
            return
        assert self.base_fd is not None and self.path is not None
        self.identity = RemoteIdentity.of(self.remote) if self.remote is not None else \
            BaseIdentity.of_fd(self.base_fd)
        path = self.path
        try:
            granule, indices = read_trace(path, self.identity)
        except FileNotFoundError:
            self.state = "no trace yet"
            return
        except (TraceError, OSError) as e:
            self.state = f"ignored: {e}"
            log.warning("%s: boot trace ignored: %s", path, e)
            return
        self.granule = granule
        self.loaded = indices
        self.loaded_set = frozenset(indices)
        self.loaded_valid = True
        self.state = "loaded"
        log.info("%s: boot trace loaded (%d granules of %d bytes)", path, len(indices),
                 granule)

    # -- recording --------------------------------------------------------------------------

    def note(self, file_offset: int, length: int, t_ns: int | None = None) -> None:
        """The guest read [file_offset, +length) of the base file."""
        g = self.granule
        first = file_offset // g
        last = (file_offset + length - 1) // g
        touched = self.touched
        for i in range(first, last + 1):
            if i not in touched:
                if len(touched) >= MAX_TRACE_ENTRIES or i > 0xFFFFFFFF:
                    self.recording = False
                    return
                touched[i] = time.monotonic_ns() if t_ns is None else t_ns

    def note_worker(self, entries: Iterable[Any]) -> None:
        """A worker's first touches: [t_ns, file_offset, length] each (checked: they come
        over the worker channel)."""
        for e in entries:
            if not self.recording:
                return
            if (isinstance(e, list) and len(e) == 3 and all(isinstance(x, int) for x in e)
                    and e[1] >= 0 and 0 < e[2] <= 1 << 26):
                t_ns, off, n = e
                first = off // self.granule
                had = self.touched.get(first)
                self.note(off, n, t_ns)
                if had is not None and t_ns < had:  # an earlier touch arrived late
                    self.touched[first] = t_ns

    # -- prefetching ------------------------------------------------------------------------

    def runs(self) -> list[tuple[int, int]]:
        """The loaded trace as (first granule, count) runs, in trace order."""
        out: list[tuple[int, int]] = []
        per_run = max(1, PREFETCH_RUN_BYTES // self.granule)
        for i in self.loaded:
            if out and out[-1][0] + out[-1][1] == i and out[-1][1] < per_run:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((i, 1))
        return out

    def start(self, nursery: trio.Nursery) -> None:
        """Start prefetching the loaded trace in ``nursery`` (stopped by :meth:`stop`)."""
        if not self.loaded_valid or not self.loaded or self._scope is not None:
            return
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        nursery.start_soon(self._prefetch)

    async def _prefetch(self) -> None:
        assert self._scope is not None
        limiter = trio.CapacityLimiter(PREFETCH_IN_FLIGHT)
        self.prefetch_state = "running"
        try:
            with self._scope:
                async with trio.open_nursery() as n:
                    for first, count in self.runs():
                        if all(first + k in self.touched for k in range(count)):
                            continue
                        await limiter.acquire_on_behalf_of(first)
                        n.start_soon(self._prefetch_run, first, count, limiter)
            if self._stopped is not None:
                self.prefetch_state = self._stopped
            elif self._scope.cancelled_caught:
                self.prefetch_state = "stopped (disk closed)"
            else:
                self.prefetch_state = "done"
        finally:
            self._done.set()

    async def _prefetch_run(self, first: int, count: int,
                            limiter: trio.CapacityLimiter) -> None:
        """One run of the trace: read into the page cache, or (a remote base) fetched into
        its cache.  A failure stops the whole prefetch (the guest's reads report theirs)."""
        assert self.base_fd is not None and self._scope is not None
        g = self.granule
        try:
            if self.remote is not None:
                await self._fill(self.remote, first * g, count * g)
            else:
                await trio.to_thread.run_sync(_read_ahead, self.base_fd, first * g, count * g)
            now = time.monotonic_ns()
            for k in range(count):
                self.prefetched_at.setdefault(first + k, now)
        except _CacheFull as e:
            self._stop(f"stopped: {e}", logging.INFO)
        except (OSError, FormatError) as e:
            self._stop(f"failed: {e}", logging.WARNING)
        finally:
            limiter.release_on_behalf_of(first)

    def _stop(self, why: str, level: int) -> None:
        assert self._scope is not None
        if self._stopped is None:
            self._stopped = why
            log.log(level, "%s: boot-trace prefetch %s", self.path, why)
        self._scope.cancel()

    async def _fill(self, remote: RemoteBase, file_offset: int, length: int) -> None:
        """Fetch the range's blocks that the remote's cache does not hold into it (one
        fetch each, no read-ahead); a range it holds is read into the page cache."""
        length = min(length, remote.size - file_offset)
        if length <= 0:
            return
        gaps = remote.missing(file_offset, length)
        if not gaps:
            assert self.base_fd is not None
            await trio.to_thread.run_sync(_read_ahead, self.base_fd, file_offset, length)
            return
        bs = remote.block_size
        want = sum(min(end * bs, remote.size) - first * bs for first, end in gaps)
        budget = remote.config.cache_budget_bytes
        # (Counting this prefetch's fills in flight: the two runs must not both take the
        # last room.)
        if budget is not None and remote.files.held_bytes + self._filling + want > budget:
            raise _CacheFull(f"the cache is full (held_bytes={remote.files.held_bytes}, "
                             f"budget_bytes={budget})")
        self._filling += want
        try:
            await fetch_missing(NotCached(remote, gaps), prefetch=True)
        finally:
            self._filling -= want
        # (What it found missing: a block the guest's miss was fetching already is counted
        # here too, fetched once.)
        self.fetched_bytes += want

    async def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._done.wait()

    # -- saving -----------------------------------------------------------------------------

    def save(self) -> None:
        """Write this boot's first touches to the trace file, unless a valid trace was
        loaded (blocking: call from a thread)."""
        if not self.enabled or self.identity is None or self.path is None:
            return
        if self.loaded_valid:
            self.saved = "kept the loaded trace"
            self._log_summary()
            return
        if not self.touched:
            self.saved = "nothing read from the base"
            return
        path = self.path
        folder = os.path.dirname(path) or "."
        try:
            owner = os.stat(folder).st_uid
        except OSError as e:
            owner = -1
            log.debug("%s: %s", folder, e)
        if owner != os.geteuid():
            self.saved = f"skipped: {folder} is not the daemon user's own (owner uid={owner})"
            log.info("%s: boot trace not written: the folder is not the daemon user's own "
                     "(owner uid=%d)", path, owner)
            return
        if not os.access(folder, os.W_OK):
            self.saved = f"skipped: {folder} is not writable"
            log.info("%s: boot trace not written: the folder is not writable", path)
            return
        order = sorted(self.touched, key=self.touched.__getitem__)
        try:
            write_trace(path, encode(self.identity, self.granule, order))
        except (OSError, ValueError) as e:
            self.saved = f"failed: {e}"
            log.warning("%s: boot trace not written: %s", path, e)
            return
        self.saved = f"wrote {len(order)} granules"
        log.info("%s: boot trace written (%d granules)", path, len(order))
        self._log_summary()

    def _log_summary(self) -> None:
        """One line at close (tools/vm/bench_boot.py reads it): this boot's figures."""
        log.info("%s: boot trace at close: %s", self.base_path,
                 json.dumps(self.stats(), sort_keys=True))

    # -- reporting --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        touched = self.touched
        covered = sum(1 for i in touched if i in self.loaded_set)
        before = sum(1 for i, t in touched.items()
                     if self.prefetched_at.get(i, t + 1) <= t)
        out = {
            "state": self.state,
            "path": self.path,
            "granule": self.granule,
            "entries": len(self.loaded),
            "base_granules_read": len(touched),
            "covered": covered,
            "covered_share": round(covered / len(touched), 4) if touched else None,
            "prefetched": len(self.prefetched_at),
            "prefetched_before_read": before,
            "prefetched_before_read_share":
                round(before / len(touched), 4) if touched else None,
            "prefetch": self.prefetch_state,
            "saved": self.saved,
        }
        if self.remote is not None:
            out["remote"] = self.remote.url
            out["prefetch_fetched_bytes"] = self.fetched_bytes
        return out


class _CacheFull(Exception):
    """A remote base's cache is at its budget: a prefetch would keep nothing."""


def _read_ahead(fd: int, offset: int, length: int) -> None:
    """Bring the range into the page cache (a thread): a read, so that it is there when
    this returns (WILLNEED would only start it)."""
    buf = bytearray(min(length, PREFETCH_RUN_BYTES))
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        try:
            got = os.preadv(fd, [view[:min(len(view), end - offset)]], offset)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise
        if got <= 0:
            return  # past the end of the base: nothing more to bring in
        offset += got


__all__ = ["MAX_TRACE_ENTRIES", "TRACE_GRANULE_BYTES", "BaseIdentity", "BootTrace",
           "RemoteIdentity", "TraceError", "decode", "encode", "read_trace",
           "remote_trace_path", "trace_path", "write_trace"]
