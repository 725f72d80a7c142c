"""Layer: formats remote, top.  A remote base as a :class:`~formats.base.HostFile`: its
bytes are read from the local cache file (by fd, like any image file), and what the cache
does not hold yet is fetched from the server first.

Theory of operation
-------------------
One :class:`RemoteBase` per remote (per process): a :class:`~formats.remote.cache.CacheFiles`
and a pool of connections to the server.  A :class:`RemoteFile` is a HostFile whose fd is a
read-only descriptor of the cache's ``data`` file, so a codec (raw, qcow2, VHD) reads a
remote image exactly as a local one, and a remap into a remote layer names the cache file.

Before a range of the cache file is read, its blocks must be held.  :meth:`RemoteBase.read`
checks that (one ``bytearray.find`` over the presence map) and then reads with ``preadv``.
A block that is not held is fetched by :meth:`RemoteBase.fetch` — *inline* where the caller
may block (the library's commands, worker threads), or, in a thread that must not block (the
daemon's event loop: ``fetch_inline`` says which), by raising :class:`NotCached` with the
blocks missing, which the daemon fetches in a thread and then retries (cowd/remote/).

Faults: a read that fails (a dropped connection, a stalled server past the per-try timeout,
an error reply) is tried again on a new connection after a pause that doubles from
``RETRY_MIN_S`` up to ``RETRY_MAX_S``, until the request's deadline: then it fails with
``ImageIOError`` (EIO, saying why), never with zeroes.  The deadline (``timeout_s`` after the
request began) is one for the whole request: every run of blocks it misses and every
``MAX_FETCH_BYTES`` piece of a run is fetched before that same instant, so a request that
needs many pieces from a slow server fails at the deadline instead of waiting one deadline
per piece.  A remote that changed (HTTP 412, another size) fails every read of this base
from then on, and marks its cache changed (formats/remote/cache.py), so every later open of
it, in this process or another, fails too until the user drops the cache.

A full cache (its byte budget reached) keeps no new block: fetched blocks are kept in memory
(``TRANSIENT_BYTES`` at most, most recent first) for the reads that asked for them.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..base import HostFile
from ..errors import ImageIOError
from . import cache as cache_mod
from .cache import CacheError, CacheFiles, ChangeMark, Header
from .http import Changed, HttpConnection, HttpTls
from .nbd import NbdConnection, NbdTls
from .url import RemoteName

# Longest run of missing blocks fetched in one request.
MAX_FETCH_BYTES = 4 << 20
# Connections kept open to one server (and so reads in flight at once).
MAX_CONNECTIONS = 4
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
# One try of a read waits at most this long for the server before a new connection.
TRY_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 30.0
# Bytes a full cache keeps in memory for the reads that fetched them: more than the longest
# request (cowd's 32 MiB), so a read's blocks are all still there when it reads them.
TRANSIENT_BYTES = 64 << 20


class NotCached(Exception):
    """A read needs blocks the cache does not hold, and the caller may not wait for the
    network here: fetch ``blocks`` (runs of block numbers [first, end)) of ``remote`` and
    read again."""

    def __init__(self, remote: RemoteBase, blocks: list[tuple[int, int]]):
        super().__init__(f"{remote.url}: blocks not cached: {blocks[:4]}")
        self.remote = remote
        self.blocks = blocks


@dataclass(frozen=True)
class RemoteConfig:
    """The user's settings for remote bases (never an image's): which hosts an image may
    name (``hosts``: None for any), where caches live and how big they may grow, how long a
    read may take, and the TLS credentials."""

    cache_root: str
    hosts: frozenset[str] | None = None
    cache_budget_bytes: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    nbd_tls: NbdTls = field(default_factory=NbdTls)
    http_tls: HttpTls = field(default_factory=HttpTls)
    block_bits: int = cache_mod.DEFAULT_BLOCK_BITS


Connection = NbdConnection | HttpConnection


def _validator_of(conn: Connection) -> str:
    """What identifies the version a connection sees (an NBD export: its size; HTTP: size,
    ETag, Last-Modified)."""
    return conn.validator if isinstance(conn, HttpConnection) else f"size={conn.size}"


class RemoteBase:
    """One remote base in this process: its cache and its connections (thread-safe)."""

    def __init__(self, name: RemoteName, config: RemoteConfig):
        self.name = name
        self.url = name.url
        self.config = config
        self.timeout_s = config.timeout_s
        self.refs = 0
        self.stale: str | None = None  # why every read fails (the remote changed)
        self.stale_mark: ChangeMark | None = None  # the cache's marker, once stale
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._transient: OrderedDict[int, bytes] = OrderedDict()
        self._storing = 0  # bytes being stored by fetches in flight (under _lock)
        self.counters = {k: 0 for k in ("hit_bytes", "fetched_bytes", "fetches", "retries",
                                        "failures", "reconnects", "uncached_bytes",
                                        "other_process_blocks", "worker_hit_bytes")}
        first = self._connect(time.monotonic() + config.timeout_s)
        self.size = first.size
        # What says it is the version the cache holds: every later connection must see it.
        self.validator = validator = _validator_of(first)
        self._idle.append(first)
        root_fd = cache_mod.check_root(config.cache_root)
        self.files = CacheFiles(root_fd, cache_mod.cache_key_dir(name.key), config.cache_root)
        try:
            mark = self.files.open(Header(config.block_bits, self.size, validator, name.url),
                                   config.cache_budget_bytes)
            if mark is not None:
                # Refused until the user drops the cache (which accepts the new version):
                # the cache stays marked, so every later open fails the same way.
                raise CacheError(errno_mod.ESTALE, mark.describe(validator))
        except BaseException:
            self.files.close()  # (its lock too: `cowd cache drop` must not find it in use)
            os.close(root_fd)
            self._close_connections()
            raise
        self._root_fd = root_fd
        hdr = self.files.header
        assert hdr is not None
        self.block_size = hdr.block_size
        self.blocks = hdr.blocks

    # ---- connections --------------------------------------------------------------------

    def _connect(self, deadline: float) -> Connection:
        timeout = max(0.1, min(TRY_TIMEOUT_S, deadline - time.monotonic()))
        if self.name.protocol == "nbd":
            return NbdConnection(self.name, self.config.nbd_tls, timeout)
        return HttpConnection(self.name, self.config.http_tls, timeout)

    def _take(self, deadline: float) -> Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        self.counters["reconnects"] += 1
        conn = self._connect(deadline)
        now = _validator_of(conn)
        if now != self.validator:
            # A new connection learns the file as it is now (its probe carries no If-Match):
            # a file replaced by one of the same size has another ETag or Last-Modified.
            conn.close()
            raise Changed(errno_mod.ESTALE, f"the remote base changed ({self.validator} -> "
                          f"{now})")
        return conn

    def _give(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _close_connections(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # ---- what is held --------------------------------------------------------------------

    def missing(self, file_offset: int, length: int) -> list[tuple[int, int]]:
        """Runs [first, end) of blocks of the range that are neither held nor transient."""
        if length <= 0:
            return []
        bs = self.block_size
        b0 = file_offset // bs
        b1 = min(self.blocks, -(-(file_offset + length) // bs))
        present = self.files.present
        out: list[tuple[int, int]] = []
        b = present.find(0, b0, b1)
        while b >= 0:
            if b in self._transient:
                b = present.find(0, b + 1, b1)
                continue
            if self.files.on_disk(b):  # fetched by another process meanwhile
                self.files.adopt(b)
                self.counters["other_process_blocks"] += 1
                b = present.find(0, b + 1, b1)
                continue
            if out and out[-1][1] == b:
                out[-1] = (out[-1][0], b + 1)
            else:
                out.append((b, b + 1))
            b = present.find(0, b + 1, b1)
        return out

    def ready(self, file_offset: int, length: int) -> bool:
        """Make the blocks of a range of the cache file readable: True when all are held
        (the caller may pread the cache file), False when some are only in memory (a full
        cache: read them with :meth:`read_into`).  Missing blocks are fetched inline, or
        :class:`NotCached` is raised where the caller may not wait."""
        if self.stale is not None:
            raise ImageIOError(self.url, self.stale, errno_mod.EIO)
        bs = self.block_size
        b0 = file_offset // bs
        b1 = min(self.blocks, -(-(file_offset + length) // bs))
        if b0 >= b1:
            return True
        present = self.files.present
        self.files.used[b0:b1] = b"\1" * (b1 - b0)
        if present.find(0, b0, b1) < 0:
            self.counters["hit_bytes"] += length
            return True
        gaps = self.missing(file_offset, length)
        if gaps:
            if not _fetch_inline():
                raise NotCached(self, gaps)
            deadline = time.monotonic() + self.timeout_s  # one for the whole read
            for first, end in gaps:
                self.fetch(first, end, deadline)
        else:
            self.counters["hit_bytes"] += length
        return present.find(0, b0, b1) < 0

    def held_runs(self, file_offset: int, length: int) -> list[tuple[int, int, bool]]:
        """The range cut into runs ``(file_offset, length, held)`` at block boundaries:
        what may be read from the cache file by anyone (a worker, the kernel)."""
        out: list[tuple[int, int, bool]] = []
        bs = self.block_size
        present = self.files.present
        pos = file_offset
        end = file_offset + length
        while pos < end:
            b = pos // bs
            held = b >= self.blocks or bool(present[b])
            nxt = (present.find(0 if held else 1, b + 1, self.blocks) if b < self.blocks
                   else -1)
            stop = end if nxt < 0 else min(end, nxt * bs)
            out.append((pos, stop - pos, held))
            pos = stop
        return out

    def read_into(self, fd: int, file_offset: int, view: memoryview) -> int:
        """Read a range of the cache file into ``view`` (``fd`` is a descriptor of it),
        fetching what is missing as :meth:`ready` does.  Returns the bytes read (fewer only
        past the remote's end)."""
        if self.ready(file_offset, len(view)):
            return _pread_all(fd, view, file_offset)
        return self._read_transient(fd, file_offset, view)

    def _read_transient(self, fd: int, file_offset: int, view: memoryview) -> int:
        """A read that needs blocks a full cache did not keep: those from memory."""
        bs = self.block_size
        pos = 0
        n = len(view)
        while pos < n:
            off = file_offset + pos
            b = off // bs
            k = min(n - pos, (b + 1) * bs - off)
            if b >= self.blocks:
                break
            if self.files.present[b]:
                got = _pread_all(fd, view[pos:pos + k], off)
            else:
                data = self._transient.get(b)
                if data is None:
                    raise ImageIOError(self.url, "block not cached", errno_mod.EIO)
                piece = data[off - b * bs:off - b * bs + k]
                got = len(piece)
                view[pos:pos + got] = piece
            pos += got
            if got < k:
                break
        return pos

    # ---- fetching ------------------------------------------------------------------------

    def fetch(self, first: int, end: int, deadline: float | None = None) -> None:
        """Fetch blocks [first, end) from the server into the cache (blocking; retried with
        back-off).  ``deadline`` (``time.monotonic()``; default ``timeout_s`` from now) is
        the request's: all of the blocks must be had before it, or ImageIOError."""
        if self.stale is not None:
            raise ImageIOError(self.url, self.stale, errno_mod.EIO)
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        bs = self.block_size
        per = max(1, MAX_FETCH_BYTES // bs)
        for a in range(first, end, per):
            b = min(end, a + per)
            off = a * bs
            length = min(b * bs, self.size) - off
            data = self._fetch_range(off, length, deadline)
            self._keep(a, data)

    def _fetch_range(self, offset: int, length: int, deadline: float) -> bytes:
        pause = RETRY_MIN_S
        tries = 0
        while True:
            tries += 1
            conn: Connection | None = None
            try:
                conn = self._take(deadline)
                data = conn.pread(offset, length, min(deadline, time.monotonic()
                                                      + TRY_TIMEOUT_S))
                self._give(conn)
                self.counters["fetches"] += 1
                self.counters["fetched_bytes"] += len(data)
                return data
            except Changed as e:
                if conn is not None:
                    conn.close()
                self._went_stale(e.strerror or str(e))
                self.counters["failures"] += 1
                assert self.stale is not None
                raise ImageIOError(self.url, self.stale, errno_mod.EIO) from None
            except OSError as e:
                if conn is not None:
                    conn.close()
                left = deadline - time.monotonic()
                if left <= pause:
                    self.counters["failures"] += 1
                    raise ImageIOError(self.url, f"read of {length} bytes at {offset} failed "
                                       f"after {tries} tries, the request's deadline "
                                       f"({self.timeout_s:g} s) reached: "
                                       f"{e.strerror or e}", errno_mod.EIO) from None
                self.counters["retries"] += 1
                time.sleep(pause)
                pause = min(RETRY_MAX_S, pause * 2)

    def _went_stale(self, seen: str) -> None:
        """The remote changed while in use: every read of it fails from now on, and the
        cache is marked (durably), so no later open uses it either until the user drops
        it."""
        with self._lock:
            if self.stale is not None:
                return
            self.stale = (f"the remote base changed while in use ({seen}); to accept the "
                          f"new version, detach its disks and run `cowd cache drop "
                          f"{self.url}`")
        hdr = self.files.header
        assert hdr is not None
        mark, _ = self.files.mark_changed(hdr, seen)
        self.stale_mark = mark

    def _keep(self, first: int, data: bytes) -> None:
        budget = self.config.cache_budget_bytes
        # The room is taken under the lock before the (slow, durable) store: fetches in
        # other threads must not all take the last of it.
        with self._lock:
            room = budget is None or \
                self.files.held_bytes + self._storing + len(data) <= budget
            if room:
                self._storing += len(data)
        if room:
            try:
                self.files.store(first, data)
                return
            except OSError:
                pass  # a full file system: serve it from memory, like a full cache
            finally:
                with self._lock:
                    self._storing -= len(data)
        self.counters["uncached_bytes"] += len(data)
        bs = self.block_size
        for i in range(0, len(data), bs):
            b = first + i // bs
            self._transient[b] = data[i:i + bs]
            self._transient.move_to_end(b)
        while len(self._transient) > max(1, TRANSIENT_BYTES // bs):
            self._transient.popitem(last=False)

    # ---- lifetime ------------------------------------------------------------------------

    def note_hits(self, length: int, *, by_worker: bool = False) -> None:
        """Count ``length`` bytes read from the cache elsewhere (a worker process reads a
        cached block by fd, without this object: cowd/workers/host.py reports them)."""
        self.counters["hit_bytes"] += length
        if by_worker:
            self.counters["worker_hit_bytes"] += length

    def stats(self) -> dict[str, object]:
        fetched = self.counters["fetched_bytes"]
        hits = self.counters["hit_bytes"]
        return {"url": self.url, "size": self.size, "block_size": self.block_size,
                "cache": self.files.folder, "held_bytes": self.files.held_bytes,
                "budget_bytes": self.config.cache_budget_bytes, "stale": self.stale,
                "hit_rate": round(hits / (hits + fetched), 4) if hits + fetched else None,
                "saved_bytes": hits, **self.counters}

    def close(self) -> None:
        self._close_connections()
        self.files.close()
        os.close(self._root_fd)


def _always() -> bool:
    return True


# May a read fetch inline, here and now?  The daemon says no in its event loop
# (cowd/disk/remote.py), where a miss raises NotCached instead.
_fetch_inline: Callable[[], bool] = _always


def set_fetch_inline(check: Callable[[], bool]) -> None:
    global _fetch_inline
    _fetch_inline = check


def _pread_all(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        try:
            k = os.preadv(fd, [view[got:]], offset + got)
        except OSError as e:
            raise ImageIOError(f"/proc/self/fd/{fd}", f"read failed: {e.strerror}",
                               e.errno or errno_mod.EIO) from None
        if not k:
            break
        got += k
    return got


class RemoteFile(HostFile):
    """A remote base as a host file: reads come from its cache (see the module docstring)."""

    # The cache file's holes are blocks not fetched, not zeroes (raw's SEEK_HOLE must not
    # report them).
    sparse_is_zero = False

    def __init__(self, remote: RemoteBase):
        fd = os.open(f"/proc/self/fd/{remote.files.data_fd}", os.O_RDONLY | os.O_CLOEXEC)
        super().__init__(remote.url, False, fd=fd)
        self.remote: RemoteBase | None = remote
        remote.refs += 1

    def size(self) -> int:
        assert self.remote is not None
        return self.remote.size

    def pread_into(self, file_offset: int, dest: memoryview) -> None:
        assert self.remote is not None
        got = self.remote.read_into(self.fd, file_offset, dest)
        if got < len(dest):
            dest[got:] = bytes(len(dest) - got)

    def _pread(self, file_offset: int, length: int) -> bytes:
        assert self.remote is not None
        length = max(0, min(length, self.remote.size - file_offset))
        buf = bytearray(length)
        got = self.remote.read_into(self.fd, file_offset, memoryview(buf))
        return bytes(buf[:got])

    def close(self) -> None:
        super().close()
        remote, self.remote = self.remote, None
        if remote is not None:
            release(remote)


# ---- the process's remote bases ---------------------------------------------------------------

_bases: dict[str, RemoteBase] = {}
_bases_lock = threading.Lock()


def open_remote(name: RemoteName, config: RemoteConfig) -> RemoteFile:
    """The remote base ``name`` as a :class:`RemoteFile`, its cache opened (or made) and
    shared with every other user of the same remote in this process."""
    with _bases_lock:
        base = _bases.get(name.key)
        if base is not None and base.stale is not None:
            # Changed while in use here: a new disk over it is refused as a new process's
            # open would be (the cache is marked).
            mark = base.stale_mark
            raise CacheError(errno_mod.ESTALE, mark.describe() if mark else base.stale)
        if base is None:
            base = RemoteBase(name, config)
            _bases[name.key] = base
        return RemoteFile(base)


def release(base: RemoteBase) -> None:
    with _bases_lock:
        base.refs -= 1
        if base.refs > 0:
            return
        _bases.pop(base.name.key, None)
    base.close()


def open_bases() -> list[RemoteBase]:
    with _bases_lock:
        return list(_bases.values())


__all__ = ["DEFAULT_TIMEOUT_S", "NotCached", "RemoteBase", "RemoteConfig", "RemoteFile",
           "open_bases", "open_remote", "release"]
