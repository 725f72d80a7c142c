"""Layer: cowd disk (below the frontends, above ``formats`` and the remap cache).

A :class:`Disk` is one virtual disk: a top image (writable unless read-only) and its parent
chain.  Frontends (NBD, FUSE, the kernel channel) call its async methods with guest offsets;
it answers through the :class:`~cowd.remap.RemapCache` and falls back to the format library.
An :class:`ImagePool` opens every parent image once and shares it, refcounted, between the
disks of one daemon, so many overlays on one base share the base's open file *and* its cache
entries (the base has one layer id).

Theory of operation
-------------------
*Reads* plan first, then do I/O.  Planning walks the top layer's granules through the cache;
an UNALLOCATED extent sends the walk one layer down (past a shorter parent's end, or below
the last layer, the bytes are zero).  A miss calls the layer's resolver right there and
inserts the answer; if the read looks sequential (it starts where a recent read ended), the
same resolver pass also covers the next ``readahead_clusters`` granules, which go in flagged as
read-ahead.  The plan is a list of segments (DATA at a file offset, ZERO, COMPRESSED); DATA
segments contiguous in one file merge into one ``preadv`` (see :func:`pread_into`, the one
place to change to move data reads to a thread).  Planning and the DATA reads are one
synchronous step, so no write can change the mapping in between.

*Writes* look up the top layer's granules.  If every byte lands in DATA that the top layer
owns (``writable``) and no slow operation holds one of those granules, the write is a plain
``pwrite`` in place.  Otherwise the disk takes the granules' range lock (a second writer to the
same granule waits for the first allocation), writes the in-place parts, and hands the rest to
the library's ``Image.write`` (allocation with copy-up of head and tail from the parents).  The
touched clusters' entries are invalidated before the call and refilled after it.
``write_zeroes`` and ``trim`` go to the library the same way and invalidate.  ``flush`` calls
the top image's ``flush`` (data durable before the metadata that reaches it — the library's
promise).  Every write path, in place or not, writes the one top file, so a flush on any
connection covers every write acknowledged on any connection (NBD multi-conn is safe).

Checkpoints: a read or write that the cache answers, and a miss whose layers are not busy,
completes without a trio checkpoint (one costs ~6 us, a page-cache pread ~1.4 us); frontends
checkpoint on their sockets between requests, and a caller that loops over the disk alone
must checkpoint itself.

Invariants and locks
--------------------
- An ``Image`` is not thread-safe.  Each :class:`Layer` has a ``trio.Lock``; code that calls
  into an image from a worker thread holds the locks of every layer the call may touch (a
  write copies up from the whole chain; a flush touches only the top).  Code that calls an
  image inline in the trio thread needs no lock *if none is held* (it runs to completion
  without an await); if one is held it waits for it.  Locks are taken top first, and chains
  are paths towards the root of one tree of images, so the order is the same for every disk.
- Remap cache entries are computed and inserted in one synchronous step while the layer's
  lock is free or held by the caller (the cache's own contract; see cowd/remap.py).
- The range lock (:class:`_GranuleLocks`) covers top-layer granules for the whole of a write,
  write-zeroes or trim that is not a pure in-place write.
- Parents are never written: they are opened read-only by the pool, and write-zeroes and
  trim become overlay metadata through the library.

Where the time goes, and why only flush runs in a thread
-------------------------------------------------------
Measured on the project machine (Debian 12, 2 cores, ext4 on virtio; a quick script, 2000
iterations, medians; not a test): ``trio.to_thread.run_sync`` round trip 160 us (a no-op;
175 us around a 64 KiB pwrite); inline ``pwrite`` of 64 KiB 16 us; inline ``pread`` of 4 KiB
1.4 us; a trio checkpoint 6 us; ``fdatasync`` 0.14 ms after 64 KiB of dirty data, 0.9 ms after
1 MiB, 5 ms after 8 MiB, 16 ms after 32 MiB.  The library's writes (800 of 4 KiB, each into
a new 64 KiB cluster, then each again): a qcow2 allocation with copy-up of head and tail 65 us
(p90 134 us), a differencing-VHD allocation 24 us, a rewrite in place 6-7 us; none of them
syncs (ordering is settled at flush), and the flush after them took 28 ms (qcow2) and 15 ms
(VHD).  An allocation costs less than a thread hop, so writes, write-zeroes and trims run inline:
a thread would cost more than it saves, and it would force every reader of a shared base to
lock against it.  ``flush`` waits for the disk for as long as there is dirty data, unbounded
by anything the daemon controls, so it — and only it — goes to a worker thread under the
pool's ``CapacityLimiter``.  ``offload_writes=True`` (or OFFLOAD_WRITES) sends library writes
to threads as well, should a codec's allocation ever need to wait for the disk (the VHD codec
already flushes by itself, inline, when its dirty metadata passes a bound); the locking above
keeps that correct, and the tests run both ways.

Errors: every failure of a request raises :class:`DiskError` (a ``RequestError``) carrying the
errno a frontend replies with.  ``ImageIOError`` keeps its errno; ``ImageReadOnly`` and writes
to a read-only disk are EPERM; reads out of range are EINVAL, writes past the end ENOSPC;
``CorruptImage`` is EIO and marks the disk corrupt (read-only from then on).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import count
from typing import Any, TypeVar

import trio

import formats
from formats.base import Extent, Image, Kind, NearOpener
from formats.errors import (
    CorruptImage,
    FormatError,
    ImageIOError,
    ImageReadOnly,
    SyncFailed,
    UnsupportedImage,
)
from formats.opener import OpenPolicy

from . import imagelock
from .errors import RequestError, UsageError
from .remap import Extents, Origin, RemapCache, RemapCounters

T = TypeVar("T")

# Longest READ or WRITE accepted in one request.  Frontends advertise it (NBD's maximum block
# size); it bounds the buffer one request can make the daemon allocate.
MAX_REQUEST_BYTES = 32 << 20

# write_zeroes and trim carry no payload and may span the whole disk (mkfs discards
# everything); they are worked through in pieces of this size, each under its range lock.
ZERO_CHUNK_BYTES = 32 << 20

# block_status answers at most this much of the asked range (NBD lets the server answer a
# prefix) and at most this many extents, so a status walk of a huge sparse disk is bounded.
MAX_STATUS_BYTES = 256 << 20
MAX_STATUS_EXTENTS = 4096

# A remap granule is the layer's cluster size, but never smaller than this (a qcow2 image of
# 512-byte clusters would otherwise need 128 lookups per 64 KiB) nor larger than
# MAX_GRANULE_BYTES (one entry's resolver pass must stay short).
MIN_GRANULE_BYTES = 64 << 10
MAX_GRANULE_BYTES = 64 << 20

DEFAULT_READAHEAD_CLUSTERS = 16
# Read-ahead never inserts more than this fraction of the cache's bound in one go (a window
# larger than the cache would evict its own entries before they are used).
READAHEAD_MAX_FRACTION = 4

# Reads that start within one granule of where one of the last SEQUENTIAL_STREAMS reads
# ended count as sequential (a few concurrent streams, and queue-depth reordering).
SEQUENTIAL_STREAMS = 8

# Priming works through a layer in pieces of this many granules, yielding to other tasks in
# between, so a big image does not stall the daemon.
PRIME_CHUNK_GRANULES = 4096

# Data read-ahead for a sequential stream: advise the kernel this many requests' worth of
# bytes ahead of the stream, at most DATA_READAHEAD_MAX_BYTES.
DATA_READAHEAD_REQUESTS = 4
DATA_READAHEAD_MAX_BYTES = 8 << 20

# Worker threads for blocking calls (flush; library writes when offloaded), per pool.
MAX_SYNC_THREADS = 8

# Run library writes (allocation, write-zeroes, trim) in worker threads?  No: measured, a
# thread hop (160 us) costs more than an allocation (see the module docstring).
OFFLOAD_WRITES = False

_layer_ids = count(1)



class DiskError(RequestError):
    """A request failed; ``errno`` is what the frontend answers with."""


class _WouldBlock(Exception):
    """A RWF_NOWAIT read found data that is not in the page cache."""


def pread_into(fd: int, view: memoryview, file_offset: int, nowait: bool = False) -> int:
    """Fill ``view`` from ``fd`` at ``file_offset``; returns the bytes read (fewer only at end
    of file).  With ``nowait`` the read must be served from the page cache (preadv2's
    RWF_NOWAIT) or it raises _WouldBlock without waiting for the disk: page-cache hits are
    read inline (a thread costs more than the read, DESIGN.md); a frontend advises the misses
    of a batch (Disk.advise) so that the disk works on them in parallel, then reads them."""
    total = len(view)
    if nowait:
        try:
            n = os.preadv(fd, [view], file_offset, RWF_NOWAIT)
        except BlockingIOError:
            raise _WouldBlock from None
        except OSError as e:
            # FUSE (a base in an nbdfuse or sshfs mount) and some other file systems refuse
            # RWF_NOWAIT (EOPNOTSUPP): take the blocking path, never fail the read.
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                raise _WouldBlock from None
            raise
        if n < total:  # partly cached, or end of file: let the blocking path sort it out
            raise _WouldBlock
        return n
    got = 0
    while got < total:
        n = os.preadv(fd, [view[got:]], file_offset + got)
        if n <= 0:
            break
        got += n
    return got


RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)


def pwrite_from(fd: int, view: memoryview, file_offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, file_offset)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]
        file_offset += n


_ZEROS = bytes(1 << 20)


def _zero(view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos:pos + n] = _ZEROS[:n]
        pos += n


def _read_run(fd: int, view: memoryview, file_offset: int, zeroed: bool,
              nowait: bool = False, cluster_bytes: int = 0) -> int:
    """Read one run of DATA; returns -1, or the file offset where a cluster lying wholly
    past the end of the file begins (the file was truncated: the caller raises).  Like
    qemu, only the last cluster of a file may be short (it reads as zeroes past the end)."""
    got = pread_into(fd, view, file_offset, nowait)
    if got < len(view):
        end = file_offset + got  # the end of the file
        if cluster_bytes > 0:
            last_cluster_end = -(-end // cluster_bytes) * cluster_bytes
            if file_offset + len(view) > last_cluster_end:
                return max(end, last_cluster_end)
        if not zeroed:
            _zero(view[got:])
    return -1


def _granule_for(image: Image) -> int:
    size = image.cluster_size
    if size <= 0:
        return MIN_GRANULE_BYTES
    return min(max(size, MIN_GRANULE_BYTES), MAX_GRANULE_BYTES)


class Layer:
    """One image of a chain as the daemon holds it: the image, its cache identity and lock."""

    def __init__(self, image: Image):
        self.image = image
        self.layer_id = next(_layer_ids)
        self.granule = _granule_for(image)
        self.size = image.virtual_size
        self.lock = trio.Lock()  # held by whoever calls into the image from a worker thread
        self.refs = 0
        self.file_key = image.file.dev_ino
        self.primed = False  # a shared parent is primed once (it never changes)

    def __repr__(self) -> str:
        return f"<Layer {self.layer_id} {self.image.path!r} granule={self.granule}>"


def _lock(image: Image, writable: bool) -> None:
    """qemu's lock bytes on the image's fd (cowd/imagelock.py), held while it is open; an
    image a qemu process writes (or reads and forbids writing) is refused in one line."""
    try:
        imagelock.lock_image(image.file.fd, image.path, writable)
    except imagelock.ImageLocked as e:
        raise UsageError(str(e)) from None


def _file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class ImagePool:
    """Parent images opened once per daemon and shared, refcounted, between disks.

    Also remembers which files are open as a top, so a file is never a writable top and
    anyone's parent (or two writable tops) at the same time.  Trio-thread only.
    """

    def __init__(self, *, sync_threads: int = MAX_SYNC_THREADS):
        self._parents: dict[tuple[int, int], Layer] = {}
        self._by_image: dict[int, Layer] = {}  # id(image) -> layer, for open_parent's callers
        # file key -> [disks with it as their top, whether one of them writes it]
        self._tops: dict[tuple[int, int], list[int | bool]] = {}
        self.limiter = trio.CapacityLimiter(sync_threads)
        self.images_opened = 0  # parents actually opened (sharing shows as fewer)

    def open_parent(self, file: formats.HostFile, fmt: str | None,
                    near: NearOpener) -> Image:
        """``formats.open_image``'s ``open_parent``: the shared, read-only parent image for
        the file the chain's opener found (keyed by what was opened, never by name)."""
        key = file.dev_ino
        layer = self._parents.get(key)
        if layer is not None or self._top_writable(key):
            file.close()
        if self._top_writable(key):
            raise UsageError(f"{file.path}: is served as a writable disk and cannot be a "
                             "parent too")
        if layer is None:
            image = formats.open_file(file, False, fmt, near)
            try:
                _lock(image, writable=False)
            except UsageError:
                image.close()
                raise
            layer = Layer(image)
            self._parents[layer.file_key] = layer
            self._by_image[id(image)] = layer
            self.images_opened += 1
        elif fmt is not None and formats.canonical_format(fmt) != layer.image.format_name:
            raise CorruptImage(file.path, "parent is already open in another format",
                               "backing_format", fmt)
        layer.refs += 1
        return layer.image

    def layer_of(self, image: Image) -> Layer:
        return self._by_image[id(image)]

    def release(self, layer: Layer) -> bool:
        """Drop one reference; True if it was the last (the image is now closed)."""
        layer.refs -= 1
        if layer.refs > 0:
            return False
        self._parents.pop(layer.file_key, None)
        self._by_image.pop(id(layer.image), None)
        layer.image.close()
        return True

    def _top_writable(self, key: tuple[int, int]) -> bool:
        entry = self._tops.get(key)
        return entry is not None and bool(entry[1])

    def check_top(self, path: str, key: tuple[int, int] | None, writable: bool) -> None:
        if key is None:
            return
        if writable and key in self._parents:
            raise UsageError(f"{path}: is a parent of a served disk and cannot be written")
        if key in self._tops and (writable or self._top_writable(key)):
            raise UsageError(f"{path}: is already served")

    def add_top(self, key: tuple[int, int], writable: bool) -> None:
        entry = self._tops.setdefault(key, [0, False])
        entry[0] = int(entry[0]) + 1
        entry[1] = bool(entry[1]) or writable

    def remove_top(self, key: tuple[int, int]) -> None:
        entry = self._tops.get(key)
        if entry is None:
            return
        entry[0] = int(entry[0]) - 1
        if entry[0] <= 0:
            del self._tops[key]

    def open_count(self) -> int:
        return len(self._parents)


class _GranuleLocks:
    """Range lock over top-layer granule indices (a map of granule -> Event, cleaned up)."""

    def __init__(self) -> None:
        self._held: dict[int, trio.Event] = {}

    def any_held(self, first: int, end: int) -> bool:
        held = self._held
        if not held:
            return False
        return any(i in held for i in range(first, end))

    def __len__(self) -> int:
        return len(self._held)

    @asynccontextmanager
    async def hold(self, first: int, end: int) -> AsyncIterator[None]:
        held = self._held
        while True:
            busy = next((held[i] for i in range(first, end) if i in held), None) if held else None
            if busy is None:
                break
            await busy.wait()
        done = trio.Event()
        for i in range(first, end):
            held[i] = done
        try:
            yield
        finally:
            for i in range(first, end):
                del held[i]
            done.set()


class _Req:
    """Per-request planning state."""

    __slots__ = ("ahead", "ahead_origin", "end", "lookups", "owned", "resume", "resume_len",
                 "to_end")

    def __init__(self, ahead: int = 0, ahead_origin: int = Origin.READAHEAD,
                 end: int = 0, to_end: bool = False):
        self.lookups = 0
        self.ahead = ahead  # granules to resolve past a miss
        self.ahead_origin = ahead_origin
        self.end = end
        self.to_end = to_end  # resolve to the end of the request on a miss (status, prefetch)
        self.resume = 0
        self.resume_len = 0
        self.owned = False  # the caller holds every layer's lock


# A planned segment: (guest_offset, length, depth of the layer or -1 for "below the chain",
# the cached extent that covers it).
Seg = tuple[int, int, int, Extent]

_ZERO = Extent(0, 0, Kind.ZERO)


def _clip(ext: Extent, guest_offset: int, length: int) -> Extent:
    """The part of ``ext`` covering [guest_offset, guest_offset + length)."""
    if ext.kind is Kind.DATA:
        fo = ext.file_offset + (guest_offset - ext.guest_offset)
        return Extent(guest_offset, length, Kind.DATA, ext.file, fo, writable=ext.writable)
    if ext.kind is Kind.COMPRESSED:
        return Extent(guest_offset, length, Kind.COMPRESSED, ext.file, ext.file_offset,
                      ext.compressed_length, cluster_guest_offset=ext.cluster_guest_offset)
    return Extent(guest_offset, length, ext.kind)


class Disk:
    """One virtual disk served by the daemon; see the module docstring."""

    def __init__(self, path: str, chain: list[Layer], *, pool: ImagePool, cache: RemapCache,
                 readahead_clusters: int, offload_writes: bool, top_key: tuple[int, int]):
        self.path = path
        self._chain = chain
        self._top = chain[0]
        self._pool = pool
        self._cache = cache
        self._top_key = top_key
        self.readahead_clusters = max(0, readahead_clusters)
        self.offload_writes = offload_writes
        self.readonly = not self._top.image.writable
        self.readonly_reason = self._top.image.read_only_reason
        self.corrupt_reason: str | None = None
        self.flush_failed: str | None = None  # sticky: see flush()
        self.counters = RemapCounters()  # lookups made for this disk
        self.prime_seconds: float | None = None
        self._locks = _GranuleLocks()
        self._recent_ends: list[int] = []
        self._advised = (-1, 0)  # data read-ahead: (fd, file offset) the last advice reached
        self._closed = False
        self._ops = {k: 0 for k in ("reads", "writes", "writes_in_place", "library_writes",
                                    "write_zeroes", "trims", "flushes", "block_status",
                                    "prefetches", "bytes_read", "bytes_written",
                                    "lock_waits", "allocations")}

    # ---- opening and closing ---------------------------------------------------------------

    @classmethod
    async def open(cls, path: str, *, pool: ImagePool, cache: RemapCache,
                   readonly: bool = False,
                   readahead_clusters: int = DEFAULT_READAHEAD_CLUSTERS,
                   fmt: str | None = None,
                   offload_writes: bool = OFFLOAD_WRITES,
                   policy: OpenPolicy | None = None) -> Disk:
        """Open ``path`` (writable unless ``readonly``) and its chain, parents from ``pool``.

        Format errors propagate as ``formats.FormatError``; serving a file twice, or writing a
        file that is another disk's parent, is a ``UsageError``.
        """
        await trio.lowlevel.checkpoint()
        writable = not readonly
        pool.check_top(path, _file_key(path), writable)
        acquired: list[Layer] = []

        def open_parent(pfile: formats.HostFile, pfmt: str | None,
                        near: NearOpener) -> Image:
            img = pool.open_parent(pfile, pfmt, near)
            acquired.append(pool.layer_of(img))
            return img

        top_image: Image | None = None
        try:
            # What the chain's names may reach is the caller's (the user's) choice:
            # confined to the top's folder by default (formats/opener.py).
            top_image = formats.open_image(path, writable, fmt, open_parent=open_parent,
                                           policy=policy)
            key = top_image.file.dev_ino
            pool.check_top(path, key, writable)
            _lock(top_image, writable=top_image.writable)
            chain = [Layer(top_image)]
            layer: Image | None = top_image.backing
            while layer is not None:
                chain.append(pool.layer_of(layer))
                layer = layer.backing
            chain[0].refs = 1
        except BaseException:
            if top_image is not None:
                top_image.close()
            for lay in acquired:
                if pool.release(lay):
                    cache.drop_layer(lay.layer_id)
            raise
        # open_image walks a shared parent's own chain again, taking one more reference on
        # every link: exactly one per disk and layer, which close() gives back.
        pool.add_top(key, top_image.writable)
        return cls(path, chain, pool=pool, cache=cache, readahead_clusters=readahead_clusters,
                   offload_writes=offload_writes, top_key=key)

    async def close(self) -> None:
        """Flush (if writable) and release the images.  Idempotent."""
        if self._closed:
            return
        err: BaseException | None = None
        if not self.readonly and self.corrupt_reason is None:
            try:
                await self.flush()
            except DiskError as e:
                err = e
        self._closed = True
        top = self._top
        self._cache.drop_layer(top.layer_id)
        try:
            top.image.close()  # some codecs write metadata here
        except (FormatError, OSError) as e:
            err = err or self._translate(e)
        finally:
            self._pool.remove_top(self._top_key)
            for lay in self._chain[1:]:
                if self._pool.release(lay):
                    self._cache.drop_layer(lay.layer_id)
        if err is not None:
            raise err

    # ---- properties ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._top.size

    @property
    def cluster_size(self) -> int:
        return self._top.image.cluster_size

    @property
    def granule(self) -> int:
        return self._top.granule

    @property
    def layers(self) -> Sequence[Layer]:
        return tuple(self._chain)

    # ---- checks and errors -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DiskError(errno.ESHUTDOWN, f"{self.path}: disk is closed")

    def _check_read(self, offset: int, length: int, limit: int | None = MAX_REQUEST_BYTES) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(errno.EINVAL, f"{self.path}: range outside the disk "
                                          f"(offset={offset}, length={length}, size={self.size})")
        if limit is not None and length > limit:
            raise DiskError(errno.EINVAL, f"{self.path}: request too long "
                                          f"(length={length}, max={limit})")

    def _check_write(self, offset: int, length: int, limit: int | None = MAX_REQUEST_BYTES) -> None:
        self._check_open()
        if self.readonly or self.corrupt_reason is not None:
            why = self.corrupt_reason or self.readonly_reason or "opened read-only"
            raise DiskError(errno.EPERM, f"{self.path}: disk is read-only ({why})")
        if offset < 0 or length < 0:
            raise DiskError(errno.EINVAL, f"{self.path}: negative range "
                                          f"(offset={offset}, length={length})")
        if offset + length > self.size:
            raise DiskError(errno.ENOSPC, f"{self.path}: write past the end of the disk "
                                          f"(offset={offset}, length={length}, size={self.size})")
        if limit is not None and length > limit:
            raise DiskError(errno.EINVAL, f"{self.path}: request too long "
                                          f"(length={length}, max={limit})")

    def _translate(self, e: Exception) -> DiskError:
        if isinstance(e, DiskError):
            return e
        if isinstance(e, ImageReadOnly):
            return DiskError(errno.EPERM, str(e))
        if isinstance(e, SyncFailed):
            # After a failed fdatasync (in a flush, or one a codec makes by itself in a
            # write) the kernel may have dropped the dirty pages it could not write and
            # marked them clean, so the next fdatasync can succeed without the data: like
            # qemu's file-posix, every later flush of this disk fails too.  (A failed
            # pwrite, e.g. ENOSPC, loses nothing: the codec keeps its dirty state and the
            # next flush writes it again.)
            self.flush_failed = self.flush_failed or str(e)
            return DiskError(e.errno or errno.EIO, str(e))
        if isinstance(e, ImageIOError):
            return DiskError(e.errno or errno.EIO, str(e))
        if isinstance(e, CorruptImage):
            self.corrupt_reason = str(e)
            return DiskError(errno.EIO, f"{e} (disk marked corrupt, now read-only)")
        if isinstance(e, UnsupportedImage):
            return DiskError(errno.EOPNOTSUPP, str(e))
        if isinstance(e, FormatError):
            return DiskError(errno.EIO, str(e))
        if isinstance(e, OSError):
            where = e.filename or self.path
            return DiskError(e.errno or errno.EIO, f"{where}: {e.strerror or e}")
        return DiskError(errno.EINVAL, f"{self.path}: {e}")

    # ---- locking and calling into images ---------------------------------------------------

    def _locked_any(self, layers: Sequence[Layer]) -> bool:
        return any(lay.lock.locked() for lay in layers)

    @asynccontextmanager
    async def _exclusive(self, layers: Sequence[Layer], will_await: bool) -> AsyncIterator[None]:
        """Make calls into ``layers`` safe.  Inline callers (no await in the body) need no lock
        when none is held; otherwise take them all, top first."""
        if not will_await and not self._locked_any(layers):
            yield
            return
        self._ops["lock_waits"] += self._locked_any(layers)
        async with AsyncExitStack() as stack:
            for lay in layers:
                await stack.enter_async_context(lay.lock)
            yield

    async def _run(self, fn: Callable[..., T], *args: Any, offload: bool) -> T:
        if offload:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._pool.limiter)
        return fn(*args)

    # ---- cache fills -----------------------------------------------------------------------

    def _fill(self, depth: int, idx: int, ahead: int, req: _Req, *,
              first_origin: int = Origin.MISS, ahead_origin: int = Origin.READAHEAD,
              replace_ahead: bool = False) -> Extents:
        """Resolve granule ``idx`` of layer ``depth`` (plus ``ahead`` more) and cache them.

        Caller guarantees exclusivity (the layer's lock is free or its own, no await).
        Returns granule ``idx``'s extents whether or not they could be cached.
        """
        layer = self._chain[depth]
        g = layer.granule
        size = layer.size
        cap = self._cache.max_entries // READAHEAD_MAX_FRACTION
        ahead = max(0, min(ahead, cap))
        start = idx * g
        end = min(size, (idx + 1 + ahead) * g)
        if start >= end:
            raise CorruptImage(layer.image.path, "granule past the end of the layer", "offset",
                               start)
        lid = layer.layer_id
        cache = self._cache
        local = self.counters
        first: Extents | None = None
        for gi, exts in self._split(layer, start, end, req):
            if gi == idx:
                first = exts
                cache.insert((lid, gi), exts, first_origin, local)
            elif replace_ahead or (lid, gi) not in cache:
                cache.insert((lid, gi), exts, ahead_origin, local)
        if first is None:
            raise CorruptImage(layer.image.path, "resolver left a gap", "offset", start)
        return first

    # ---- planning --------------------------------------------------------------------------

    def _plan(self, start: int, end: int, segs: list[Seg], req: _Req) -> Layer | None:
        """Append the segments of [start, end) to ``segs``.  Returns None when done, or the
        layer whose lock a worker thread holds: then ``req.resume``/``resume_len`` say where
        to start again once it is free."""
        req.resume = start
        req.resume_len = len(segs)
        return self._plan_layer(0, start, end, segs, req)

    def _plan_layer(self, depth: int, start: int, end: int, segs: list[Seg],
                    req: _Req) -> Layer | None:
        layer = self._chain[depth]
        g = layer.granule
        lid = layer.layer_id
        lookup = self._cache.lookup
        local = self.counters
        idx = start // g
        pos = start
        while pos < end:
            gend = (idx + 1) * g
            if gend > end:
                gend = end
            exts = lookup((lid, idx), local)
            if exts is None:
                if not req.owned and layer.lock.locked():
                    return layer
                ahead = req.ahead
                if req.to_end:
                    ahead = (req.end - 1) // g - idx
                exts = self._fill(depth, idx, ahead, req, ahead_origin=req.ahead_origin)
            for ext in exts:
                e_end = ext.guest_offset + ext.length
                if e_end <= pos:
                    continue
                if ext.guest_offset >= gend:
                    break
                if e_end > gend:
                    e_end = gend
                if ext.kind is Kind.UNALLOCATED:
                    blocked = self._plan_below(depth, pos, e_end, segs, req)
                    if blocked is not None:
                        return blocked
                else:
                    segs.append((pos, e_end - pos, depth, ext))
                pos = e_end
            if pos != gend:
                raise CorruptImage(layer.image.path, "cached remap does not cover its cluster",
                                   "offset", pos)
            idx += 1
            if depth == 0:
                req.resume = pos
                req.resume_len = len(segs)
        return None

    def _plan_below(self, depth: int, start: int, end: int, segs: list[Seg],
                    req: _Req) -> Layer | None:
        nd = depth + 1
        if nd == len(self._chain):
            segs.append((start, end - start, -1, _ZERO))
            return None
        psize = self._chain[nd].size
        mid = min(end, max(start, psize))
        if start < mid:
            blocked = self._plan_layer(nd, start, mid, segs, req)
            if blocked is not None:
                return blocked
        if mid < end:
            segs.append((mid, end - mid, -1, _ZERO))
        return None

    async def _segments(self, start: int, end: int, req: _Req) -> list[Seg]:
        """Plan [start, end).  Inline when no layer lock is held; otherwise take every lock
        (top first) and plan the rest under them.  (Waiting for a lock to become free and
        trying again would convoy: a released trio lock passes straight to the next waiter,
        so it may never be seen free.)"""
        segs: list[Seg] = []
        if self._plan(start, end, segs, req) is None:
            return segs
        pos = req.resume
        del segs[req.resume_len:]
        self._ops["lock_waits"] += 1
        async with self._exclusive(self._chain, will_await=True):
            req.owned = True
            try:
                self._plan(pos, end, segs, req)
            finally:
                req.owned = False
        return segs

    def _stream_of(self, offset: int) -> int:
        """Index of the recent read stream that ``offset`` continues, or -1."""
        g = self._top.granule
        for i, e in enumerate(self._recent_ends):
            if e - g <= offset <= e + g:
                return i
        return -1

    def _note_end(self, stream: int, end: int) -> None:
        ends = self._recent_ends
        if stream >= 0:
            ends[stream] = end
            return
        if len(ends) >= SEQUENTIAL_STREAMS:
            ends.pop(0)
        ends.append(end)

    # ---- reading ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """The guest bytes at [offset, offset + length)."""
        self._check_read(offset, length)
        buf = bytearray(length)
        await self._read(offset, memoryview(buf), zeroed=True)
        return bytes(buf)

    async def read_into(self, offset: int, dest: memoryview | bytearray) -> None:
        """Read ``len(dest)`` bytes at ``offset`` into ``dest`` (the zero-copy :meth:`read`)."""
        view = memoryview(dest).cast("B")
        self._check_read(offset, len(view))
        await self._read(offset, view, zeroed=False)

    def try_read_into(self, offset: int, dest: memoryview | bytearray, *,
                      may_block: bool = False) -> bool:
        """Synchronous :meth:`read_into` for the common case: True when the read is done.
        False when it would have to wait for a lock or, unless ``may_block``, for the disk
        (data not in the page cache; then :meth:`advise` it and try again with
        ``may_block``, or call :meth:`read_into`).  Lets a frontend answer a batch of
        requests in one wakeup, with no task or checkpoint each."""
        view = memoryview(dest).cast("B")
        self._check_read(offset, len(view))
        return bool(len(view)) and self._try_read(offset, view, zeroed=False,
                                                  nowait=not may_block)

    def advise(self, offset: int, length: int) -> None:
        """Start reading the range's data into the page cache without waiting
        (POSIX_FADV_WILLNEED on the planned DATA runs): a frontend that advises every read of
        a batch before doing the first one has the disk work on all of them at once, the way
        an AIO server does, with no thread."""
        req = _Req()
        segs: list[Seg] = []
        try:
            if self._plan(offset, offset + length, segs, req) is None:
                self._advise(segs)
        except (FormatError, OSError, ValueError):
            pass  # advice only: the read itself reports the error

    def advise_write(self, offset: int, length: int) -> bool:
        """Will this write copy up from the parents?  If so, start reading what the copy-up
        needs (the parents' data under the partly written clusters) into the page cache
        without waiting, and return True: a frontend advises every such write of a batch
        before doing the first, so the disk fetches their copy-up sources in parallel."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            return False
        try:
            _inplace, lib = self._write_plan(offset, offset + length, count=False)
        except (FormatError, OSError, ValueError):
            return False  # the write itself reports it
        # Only the clusters the write covers partly are copied up: the head of the first
        # and the tail of the last cluster of each piece.  Advise those (whole clusters
        # that the write replaces need nothing from the parents).
        cs = self.cluster_size
        fetch = False
        for gs, ge in lib:
            head = gs - gs % cs
            tail = ge - ge % cs
            if head < gs:
                self.advise(head, min(cs, self.size - head))
                fetch = True
            if tail < ge and ge < self.size and (tail >= gs or head == gs):
                self.advise(tail, min(cs, self.size - tail))
                fetch = True
        return fetch

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Synchronous :meth:`write` (without FUA): True when done (in place, or allocated
        through the library inline), False when it must wait for a lock or the library
        writes in worker threads (then call :meth:`write`)."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_write(offset, length)
        if not length:
            return False
        end = offset + length
        first, gend = self._granules(offset, end)
        lookups = 0
        try:
            inplace, lib = self._write_plan(offset, end, count=True)
            if self._locks.any_held(first, gend):
                return False
            if lib and (self.offload_writes or self._locked_any(self._chain)):
                return False
            # Allocation runs inline too (measured: cheaper than a thread hop or a task, see
            # the module docstring); with no await until the end, nothing can interleave.
            self._pwrite_all(inplace, view, offset)
            for gs, ge in lib:
                lookups += self._library_write_inline(gs, view[gs - offset:ge - offset])
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._cache.note_request(lookups, self.counters)
        if not lib:
            self._ops["writes_in_place"] += 1
        self._ops["writes"] += 1
        self._ops["bytes_written"] += length
        return True

    def _try_read(self, offset: int, dest: memoryview, zeroed: bool,
                  nowait: bool = False) -> bool:
        """Plan and read with no await: False if a layer lock is in the way or (``nowait``)
        the data is not in the page cache.  Nothing is counted as done then; the caller
        reads again."""
        end = offset + len(dest)
        stream = self._stream_of(offset)
        self._note_end(stream, end)
        req = _Req(self.readahead_clusters if stream >= 0 else 0)
        try:
            segs: list[Seg] = []
            if self._plan(offset, end, segs, req) is not None:
                return False
            if self._read_segments(offset, dest, segs, zeroed, owned=False,
                                   nowait=nowait) is not None:
                return False  # a compressed cluster's layer is busy in a worker thread
        except _WouldBlock:
            return False
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._done_read(req, len(dest))
        if stream >= 0:
            self._read_ahead_data(segs, len(dest))
        return True

    def _read_ahead_data(self, segs: list[Seg], length: int) -> None:
        """A sequential stream: have the kernel fetch the data ahead of it.  The file's own
        readahead window (128 KiB by default) is smaller than one 1 MiB request, so without
        this every such request waits for the disk.  The guess: the stream's next bytes
        follow its last DATA run in the same file (true for a raw base and for clusters
        allocated in order); a wrong guess costs only page cache, and no remap lookups are
        made for it.  Advises DATA_READAHEAD_REQUESTS requests' worth, half at a time."""
        last = next((seg for seg in reversed(segs) if seg[3].kind is Kind.DATA), None)
        if last is None or last[3].file is None:
            return
        g, n, _depth, ext = last
        assert ext.file is not None
        fd = ext.file.fd
        end = ext.file_offset + (g - ext.guest_offset) + n
        window = min(max(length, self._top.granule) * DATA_READAHEAD_REQUESTS,
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

    def _done_read(self, req: _Req, length: int) -> None:
        self._cache.note_request(req.lookups, self.counters)
        self._ops["reads"] += 1
        self._ops["bytes_read"] += length

    async def _read(self, offset: int, dest: memoryview, zeroed: bool) -> None:
        length = len(dest)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        if self._try_read(offset, dest, zeroed):
            return
        # A layer is busy in a worker thread (a flush, an offloaded copy-up): plan and read
        # again under every lock.  Part of ``dest`` may hold bytes of the first attempt, so
        # zero explicitly instead of trusting ``zeroed``.  (Waiting for one lock and trying
        # again would convoy: a released trio lock passes straight to the next waiter.)
        self._ops["lock_waits"] += 1
        req = _Req()
        try:
            async with self._exclusive(self._chain, will_await=True):
                req.owned = True
                segs: list[Seg] = []
                self._plan(offset, offset + length, segs, req)
                self._read_segments(offset, dest, segs, False, owned=True)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._done_read(req, length)

    def _read_segments(self, offset: int, dest: memoryview, segs: list[Seg],
                       zeroed: bool, owned: bool, nowait: bool = False) -> Layer | None:
        """Do the planned reads (DATA first, in merged runs, then compressed clusters).
        Returns a layer whose lock blocks a compressed decode (the caller waits and reads
        again) or None when done."""
        run_fd = -1
        run_fo = run_g = run_n = run_depth = 0
        compressed: list[Seg] = []
        for g, n, depth, ext in segs:
            kind = ext.kind
            if kind is Kind.DATA:
                f = ext.file
                assert f is not None
                fd = f.fd
                fo = ext.file_offset + (g - ext.guest_offset)
                if fd == run_fd and fo == run_fo + run_n and g == run_g + run_n:
                    run_n += n
                    continue
                if run_n:
                    self._data_run(run_depth, run_fd, dest[run_g - offset:run_g - offset + run_n],
                                   run_fo, zeroed, nowait)
                run_fd, run_fo, run_g, run_n, run_depth = fd, fo, g, n, depth
            elif kind is Kind.COMPRESSED:
                compressed.append((g, n, depth, ext))
            elif not zeroed:
                _zero(dest[g - offset:g - offset + n])
        if run_n:
            self._data_run(run_depth, run_fd, dest[run_g - offset:run_g - offset + run_n],
                           run_fo, zeroed, nowait)
        for g, n, depth, ext in compressed:
            layer = self._chain[depth]
            if not owned and layer.lock.locked():
                return layer
            data = layer.image.read_compressed(_clip(ext, g, n))
            if len(data) != n:
                raise CorruptImage(layer.image.path, "compressed cluster decodes to the wrong "
                                   "length", "length", len(data))
            dest[g - offset:g - offset + n] = data
        return None

    def _data_run(self, depth: int, fd: int, view: memoryview, file_offset: int,
                  zeroed: bool, nowait: bool) -> None:
        """One merged DATA read from layer ``depth``.  A cluster the metadata places wholly
        past the end of the file means the file was truncated (or replaced) under us: EIO,
        and the disk — and a top image's own header, where the format has a corrupt flag —
        is marked corrupt, never silent zeroes."""
        image = self._chain[depth].image
        past = _read_run(fd, view, file_offset, zeroed, nowait,
                         cluster_bytes=max(image.cluster_size, 1))
        if past < 0:
            return
        what = "data cluster past the end of the file (truncated while in use?)"
        if depth == 0 and not self.readonly:
            raise image.mark_corrupt(what, "offset", past)
        raise CorruptImage(image.path, what, "offset", past)

    # ---- writing ---------------------------------------------------------------------------

    def _granules(self, offset: int, end: int) -> tuple[int, int]:
        g = self._top.granule
        return offset // g, (end - 1) // g + 1

    def _cluster_granules(self, offset: int, end: int) -> tuple[int, int]:
        """Granules covering every top cluster that [offset, end) touches (what an allocation
        or discard there may change)."""
        cs = max(1, self._top.image.cluster_size)
        g = self._top.granule
        c0 = offset // cs * cs
        c1 = -(-end // cs) * cs
        return c0 // g, -(-min(c1, self.size) // g)

    def _write_plan(self, offset: int, end: int, count: bool
                    ) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
        """Split [offset, end) into in-place pieces ``(fd, file_offset, guest_offset,
        length)`` — the top layer's writable DATA, merged where contiguous — and library
        pieces ``(guest_offset, guest_end)``: everything else, including uncached granules."""
        top = self._top
        g = top.granule
        lid = top.layer_id
        cache = self._cache
        local = self.counters
        inplace: list[tuple[int, int, int, int]] = []
        lib: list[tuple[int, int]] = []
        idx = offset // g
        pos = offset
        while pos < end:
            gend = min(end, (idx + 1) * g)
            exts = cache.lookup((lid, idx), local) if count else cache.peek((lid, idx))
            ok = exts is not None
            if exts is not None:
                for ext in exts:
                    if ext.guest_offset + ext.length <= pos or ext.guest_offset >= gend:
                        continue
                    if ext.kind is not Kind.DATA or not ext.writable:
                        ok = False
                        break
            if ok and exts is not None:
                for ext in exts:
                    e_end = min(ext.guest_offset + ext.length, gend)
                    if e_end <= pos or ext.guest_offset >= gend:
                        continue
                    f = ext.file
                    assert f is not None
                    fo = ext.file_offset + (pos - ext.guest_offset)
                    n = e_end - pos
                    if inplace:
                        pfd, pfo, pg, pn = inplace[-1]
                        if pfd == f.fd and pfo + pn == fo and pg + pn == pos:
                            inplace[-1] = (pfd, pfo, pg, pn + n)
                            pos = e_end
                            continue
                    inplace.append((f.fd, fo, pos, n))
                    pos = e_end
            else:
                if lib and lib[-1][1] == pos:
                    lib[-1] = (lib[-1][0], gend)
                else:
                    lib.append((pos, gend))
                pos = gend
            idx += 1
        return inplace, lib

    @staticmethod
    def _pwrite_all(inplace: list[tuple[int, int, int, int]], view: memoryview,
                    offset: int) -> None:
        for fd, fo, gofs, n in inplace:
            pwrite_from(fd, view[gofs - offset:gofs - offset + n], fo)

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua``, durable when this returns."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._check_write(offset, length)
        if length:
            end = offset + length
            first, gend = self._granules(offset, end)
            try:
                inplace, lib = self._write_plan(offset, end, count=True)
                if not lib and not self._locks.any_held(first, gend):
                    # The fast path: nothing but pwrite, no await, no lock.
                    self._pwrite_all(inplace, view, offset)
                    self._cache.note_request(0, self.counters)
                    self._ops["writes_in_place"] += 1
                else:
                    lookups = 0
                    async with self._locks.hold(first, gend):
                        inplace, lib = self._write_plan(offset, end, count=False)
                        self._pwrite_all(inplace, view, offset)
                        for gs, ge in lib:
                            lookups += await self._library_write(
                                gs, view[gs - offset:ge - offset])
                    self._cache.note_request(lookups, self.counters)
                    if not lib:
                        self._ops["writes_in_place"] += 1
            except (FormatError, OSError, ValueError) as e:
                raise self._translate(e) from e
            self._ops["writes"] += 1
            self._ops["bytes_written"] += length
        if fua:
            await self.flush()
        elif not length:
            await trio.lowlevel.checkpoint()

    async def _library_write(self, guest_offset: int, view: memoryview) -> int:
        """``Image.write`` for one piece (caller holds its granules); refills the touched
        clusters' entries.  Returns the resolver calls made."""
        offload = self.offload_writes
        async with self._exclusive(self._chain, will_await=offload):
            if not offload:
                return self._library_write_inline(guest_offset, view)
            top = self._top
            c0, c1 = self._cluster_granules(guest_offset, guest_offset + len(view))
            self._ops["library_writes"] += 1
            self._cache.invalidate_range(top.layer_id, c0, c1)
            await self._run(top.image.write, guest_offset, view, offload=True)
            return self._refill(c0, c1)

    def _library_write_inline(self, guest_offset: int, view: memoryview) -> int:
        """The library write with no await in it: the caller makes sure nothing else can
        touch the chain meanwhile (no lock held, or it holds them)."""
        top = self._top
        c0, c1 = self._cluster_granules(guest_offset, guest_offset + len(view))
        self._ops["library_writes"] += 1
        self._cache.invalidate_range(top.layer_id, c0, c1)
        top.image.write(guest_offset, view)
        return self._refill(c0, c1)

    def _refill(self, c0: int, c1: int) -> int:
        req = _Req()
        self._cache.invalidate_range(self._top.layer_id, c0, c1)
        self._fill(0, c0, c1 - c0 - 1, req, first_origin=Origin.REFILL,
                   ahead_origin=Origin.REFILL, replace_ahead=True)
        return req.lookups

    async def _metadata_op(self, what: str, offset: int, length: int,
                           call: Callable[[int, int], None]) -> None:
        """write_zeroes / trim: in ZERO_CHUNK_BYTES pieces, each under its range lock, the
        touched clusters' entries invalidated before and after the library call."""
        lid = self._top.layer_id
        offload = self.offload_writes
        end = offset + length
        pos = offset
        try:
            while pos < end:
                n = min(ZERO_CHUNK_BYTES, end - pos)
                first, gend = self._granules(pos, pos + n)
                c0, c1 = self._cluster_granules(pos, pos + n)
                async with self._locks.hold(first, gend), \
                        self._exclusive(self._chain, will_await=offload):
                    self._cache.invalidate_range(lid, c0, c1)
                    await self._run(call, pos, n, offload=offload)
                    self._cache.invalidate_range(lid, c0, c1)
                pos += n
                if pos < end:
                    await trio.lowlevel.checkpoint()
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._cache.note_request(0, self.counters)
        self._ops[what] += 1

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           fua: bool = False) -> None:
        """Make [offset, offset + length) read as zeroes — in the top layer, never a parent."""
        self._check_write(offset, length, limit=None)
        image = self._top.image

        def call(pos: int, n: int) -> None:
            image.write_zeroes(pos, n, may_unmap)

        if length:
            await self._metadata_op("write_zeroes", offset, length, call)
        if fua:
            await self.flush()
        elif not length:
            await trio.lowlevel.checkpoint()

    async def trim(self, offset: int, length: int) -> None:
        """Discard [offset, offset + length): afterwards it reads as zeroes."""
        self._check_write(offset, length, limit=None)
        if length:
            await self._metadata_op("trims", offset, length, self._top.image.discard)
        else:
            await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        """Every write completed before this call (on any connection) becomes durable."""
        self._check_open()
        self._ops["flushes"] += 1
        if self.readonly:
            await trio.lowlevel.checkpoint()
            return
        if self.flush_failed is not None:
            raise DiskError(errno.EIO, f"{self.path}: an earlier flush failed, so no later "
                            f"one can promise durability ({self.flush_failed})")
        top = self._top
        try:
            async with self._exclusive([top], will_await=True):
                await self._run(top.image.flush, offload=True)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e

    # ---- the kernel shim's questions --------------------------------------------------------

    async def segments(self, offset: int, length: int, ahead: int = 0) -> list[Seg]:
        """Where [offset, offset + length) lives, in order: ``(guest_offset, length, depth,
        extent)`` with depth the layer's index in the chain (-1: below every layer, zeroes).
        A miss also resolves ``ahead`` more granules into the cache.  The kernel frontend
        turns these into remaps."""
        self._check_read(offset, length, limit=None)
        req = _Req(ahead=ahead)
        try:
            segs = await self._segments(offset, offset + length, req)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        self._cache.note_request(req.lookups, self.counters)
        return segs

    async def allocate(self, offset: int, length: int) -> None:
        """Make every top-layer cluster touching the range DATA that the top layer owns,
        copying up from the parents, without changing a guest byte: afterwards writes there
        can go in place (the kernel shim's first write to a cluster)."""
        self._check_write(offset, length)
        if not length:
            await trio.lowlevel.checkpoint()
            return
        end = offset + length
        first, gend = self._granules(offset, end)
        top = self._top
        offload = self.offload_writes
        try:
            async with self._locks.hold(first, gend):
                _inplace, lib = self._write_plan(offset, end, count=False)
                for gs, ge in lib:
                    async with self._exclusive(self._chain, will_await=offload):
                        c0, c1 = self._cluster_granules(gs, ge)
                        self._cache.invalidate_range(top.layer_id, c0, c1)
                        await self._run(top.image.allocate, gs, ge - gs, offload=offload)
                        self._refill(c0, c1)
                    self._ops["allocations"] += 1
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e

    # ---- mapping, prefetch, priming --------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[tuple[int, bool, bool]]:
        """NBD base:allocation for a prefix of [offset, offset + length): a list of
        ``(length, is_hole, is_zero)``.  DATA and compressed clusters anywhere in the chain
        are data; ZERO clusters and ranges no layer has are holes that read as zeroes."""
        self._check_read(offset, length, limit=None)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return []
        end = offset + min(length, MAX_STATUS_BYTES)
        req = _Req(ahead_origin=Origin.PREFETCH, end=end, to_end=True)
        try:
            segs = await self._segments(offset, end, req)
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        out: list[tuple[int, bool, bool]] = []
        for _g, n, _depth, ext in segs:
            hole = ext.kind is Kind.ZERO
            if out and out[-1][1] == hole:
                out[-1] = (out[-1][0] + n, hole, hole)
            elif len(out) >= MAX_STATUS_EXTENTS:
                break
            else:
                out.append((n, hole, hole))
        self._cache.note_request(req.lookups, self.counters)
        self._ops["block_status"] += 1
        return out

    async def prefetch(self, offset: int, length: int) -> None:
        """NBD CACHE: fill the remap cache for the range (and ask the kernel to read the data
        ahead).  Work is bounded by the cache: a range longer than half of what the cache
        can map is prefetched only up to that point."""
        self._check_read(offset, length, limit=None)
        g = self._top.granule
        reach = max(g, self._cache.max_entries // 2 * g)
        end = offset + min(length, reach)
        pos = offset
        try:
            while pos < end:
                n = min(end - pos, MAX_REQUEST_BYTES)
                req = _Req(ahead_origin=Origin.PREFETCH, end=pos + n, to_end=True)
                segs = await self._segments(pos, pos + n, req)
                self._advise(segs)
                self._cache.note_request(req.lookups, self.counters)
                pos += n
                await trio.lowlevel.checkpoint()
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        if length == 0:
            await trio.lowlevel.checkpoint()
        self._ops["prefetches"] += 1

    @staticmethod
    def _advise(segs: list[Seg]) -> None:
        for g, n, _depth, ext in segs:
            if ext.kind is Kind.DATA and ext.file is not None:
                try:
                    os.posix_fadvise(ext.file.fd, ext.file_offset + (g - ext.guest_offset), n,
                                     os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass  # advice only

    def _split(self, layer: Layer, start: int, end: int,
               req: _Req) -> Iterator[tuple[int, Extents]]:
        """Walk the layer's extents over [start, end) (granule-aligned, or ending at the
        layer's end) and yield ``(granule_index, extents clipped to the granule)``."""
        g = layer.granule
        size = layer.size
        gi = start // g
        gend = min(size, (gi + 1) * g)
        parts: list[Extent] = []
        pos = start
        for ext in layer.image.extents(start, end):
            req.lookups += 1
            ext_end = ext.guest_offset + ext.length
            e_end = min(ext_end, end)
            if ext.guest_offset != pos or e_end <= pos:
                raise CorruptImage(layer.image.path, "resolver answered out of order",
                                   "offset", pos)
            while pos < e_end:
                piece_end = min(e_end, gend)
                if pos == ext.guest_offset and piece_end == ext_end:
                    parts.append(ext)
                else:
                    parts.append(_clip(ext, pos, piece_end - pos))
                pos = piece_end
                if pos == gend:
                    yield gi, tuple(parts)
                    parts = []
                    gi += 1
                    gend = min(size, gend + g)
        if pos != end:
            raise CorruptImage(layer.image.path, "resolver left a gap", "offset", pos)

    async def prime(self) -> float:
        """Walk every layer's metadata and cache every granule that holds anything, then
        (room permitting) the empty ones an overlay read falls through; returns the seconds
        it took.  Never evicts: it stops when the cache is full."""
        self._check_open()
        t0 = time.perf_counter()
        cache = self._cache
        complete = True
        try:
            for want_allocated in (True, False):
                for depth, layer in enumerate(self._chain):
                    if depth > 0 and layer.primed:
                        continue
                    g = layer.granule
                    pos = 0
                    while pos < layer.size:
                        if len(cache) >= cache.max_entries:
                            complete = False
                            break
                        chunk_end = min(layer.size, pos + PRIME_CHUNK_GRANULES * g)
                        if layer.lock.locked():
                            async with layer.lock:
                                self._prime_chunk(layer, pos, chunk_end, want_allocated)
                        else:
                            self._prime_chunk(layer, pos, chunk_end, want_allocated)
                        pos = chunk_end
                        await trio.lowlevel.checkpoint()
        except (FormatError, OSError, ValueError) as e:
            raise self._translate(e) from e
        if complete:
            for layer in self._chain[1:]:
                layer.primed = True
        self.prime_seconds = time.perf_counter() - t0
        return self.prime_seconds

    def _prime_chunk(self, layer: Layer, start: int, end: int, want_allocated: bool) -> None:
        cache = self._cache
        lid = layer.layer_id
        req = _Req()
        for gi, exts in self._split(layer, start, end, req):
            allocated = any(e.kind is not Kind.UNALLOCATED for e in exts)
            if allocated != want_allocated or (lid, gi) in cache:
                continue
            if len(cache) >= cache.max_entries:
                return
            cache.insert((lid, gi), exts, Origin.PRIME, self.counters)

    # ---- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of this disk (lookups made for it; the shared cache has its own)."""
        return {
            "path": self.path,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "granule": self.granule,
            "readonly": self.readonly,
            "corrupt": self.corrupt_reason,
            "flush_failed": self.flush_failed,
            "readahead_clusters": self.readahead_clusters,
            "prime_seconds": self.prime_seconds,
            "layers": [
                {"path": lay.image.path, "format": lay.image.format_name,
                 "layer_id": lay.layer_id, "granule": lay.granule, "shared_by": lay.refs}
                for lay in self._chain
            ],
            "remap": self.counters.as_dict(),
            "ops": dict(self._ops),
        }


__all__ = [
    "DEFAULT_READAHEAD_CLUSTERS",
    "MAX_REQUEST_BYTES",
    "Disk",
    "DiskError",
    "ImagePool",
    "Layer",
    "pread_into",
]
