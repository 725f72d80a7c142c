"""Layer: cowd frontends.  The FUSE frontend: one mounted directory holding one regular file per
served :class:`~cowd.disk.Disk`, of the disk's size, so that ``losetup --direct-io=on --find
--show DIR/NAME`` gives the user a real block device on any kernel that has FUSE and loop.

The FUSE kernel protocol is spoken directly on ``/dev/fuse`` (structures and names from the
kernel's UAPI header ``linux/fuse.h``), not through pyfuse3: pyfuse3 (3.5) registers no
``fallocate`` handler, so libfuse answers FUSE_FALLOCATE with ENOSYS and the kernel then fails
every punch-hole and zero-range on the mount with EOPNOTSUPP — a loop device could neither
discard nor write zeroes, and a guest's ``fstrim`` could never shrink the overlay.  Speaking
the protocol also lets us choose per-open flags (FOPEN_PARALLEL_DIRECT_WRITES) and INIT
parameters (max_background, max_pages) that pyfuse3 does not expose, and pyfuse3's one mount
per process limit goes away (we still use one directory for every disk).

What the mount looks like
-------------------------
- The root (inode 1, mode 0755) lists one file per disk, named by its export name.  A disk's
  inode number is given when it is added and never reused while the mount lives, so a name
  removed and added again gets a new inode and no kernel cache can confuse the two.
- Files are mode 0600 (0400 for a read-only disk), owned by the daemon's uid/gid (root), of the
  disk's size, which never changes: truncate and chmod/chown are EPERM, writes past the end
  ENOSPC (one that crosses the end writes what fits and returns a short count, as a block
  device does), opening a read-only disk for writing EROFS.  Namespace changes (create, unlink,
  rename, mkdir, ...) are EPERM.
- READ and WRITE pass guest offsets straight to the Disk (a READ crossing the end of the file
  is answered short, as for any file).  FSYNC (fsync and fdatasync alike) is an NBD FLUSH:
  ``Disk.flush`` makes every completed write durable.  FLUSH (sent on close) makes nothing
  durable (POSIX close does not either) and is not even sent (FOPEN_NOFLUSH).
- FALLOCATE: PUNCH_HOLE|KEEP_SIZE is ``Disk.trim``, ZERO_RANGE (with or without KEEP_SIZE)
  is ``Disk.write_zeroes``; both are clipped at the end of the file, and a ZERO_RANGE that
  would grow the file is ENOSPC.  Every other mode is EOPNOTSUPP (the kernel only forwards
  KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE anyway).  The loop driver turns discards into
  PUNCH_HOLE and write-zeroes into ZERO_RANGE or PUNCH_HOLE, so mkfs's discard becomes
  overlay metadata and never reaches a base image.
- LSEEK with SEEK_DATA/SEEK_HOLE answers from ``Disk.block_status``; STATFS reports the
  disks' total size as used and nothing free.  Errors: a :class:`~cowd.disk.DiskError`'s errno
  is the reply; any other exception is logged and answered EIO.

Theory of operation
-------------------
The protocol half is sans-I/O: :func:`parse_request` splits a request read from the device
into a :class:`Request`, and :class:`FuseFs` answers every request that does not touch a
disk's data (INIT, LOOKUP, GETATTR, SETATTR, OPEN, READDIR, STATFS, ...) by returning the
reply's bytes; it keeps the namespace (inodes, open handles).  The trio adapter,
:class:`FuseFrontend`, reads the device and runs READ, WRITE, FSYNC, FALLOCATE, LSEEK and
SYNCFS against the Disk.

Workers: each worker task owns a request buffer (max_write plus a page; the kernel refuses
smaller reads) and a reply buffer.  The worker holding the read lock reads a request
(non-blocking; it waits for readability only when the device is empty) and runs the first
step of its handler by hand (``coro.send(None)``).  Most requests finish in that step —
``Disk.read_into`` and in-place writes do no ``await`` on their fast paths — and the worker
goes on to the next request with no task switch, up to MAX_INLINE_REQUESTS in a row before it
lets other tasks run.  A request that must wait (a flush in a worker thread, an allocating
write behind a granule lock) makes its worker release the read lock, so another worker reads
on, and is then finished by the same worker in the same task (:class:`_Resume` forwards the
trap its first step yielded, exactly as ``await`` would have).  When every worker is busy
another is started, up to ``max_workers``.  Measured with fio 4 KiB QD32 on a loop device
over the file, warm cache: 33-37k random reads/s against 18k when every request went through
a lock hand-over to the next worker (one trio scheduling pass, and one epoll call, per
request).  Data is not copied more than the kernel makes us: a WRITE's payload is handed to
``Disk.write`` as a view into the request buffer; a READ is read into the reply buffer right
behind its header and sent with one ``write(2)``.

Lifetime: :func:`mount_fuse` opens ``/dev/fuse``, mounts (``mount(2)`` as root, otherwise
``fusermount3``), starts the workers in the caller's nursery, waits for the kernel's INIT and
registers :meth:`FuseFrontend.close` on the caller's exit stack.  Teardown unmounts only the
mount this object made (the mount's source names this process and a random token, and is
checked in /proc/self/mountinfo first), lazily (MNT_DETACH, as libfuse does), waits up to
``DRAIN_TIMEOUT_S`` for the kernel to end the connection (it does when the last open file —
a loop device's — is closed), then stops the workers and closes the device, which aborts
whatever is still connected.  Nothing in the trio thread may touch the mounted files: the
thread that would have to answer is the one that would block.

Mount options, chosen by measurement
------------------------------------
``tools/bench_fuse.py`` (fio 3.33 on /dev/loopN, ``losetup --direct-io=on``; 1 GiB
random base, a fresh qcow2 overlay per run; plain loop device on a raw copy of the base in the
same run = 1.0; 3 s per job, medians; Linux 6.18, 2 vCPUs).  The machine was shared with
other engineers' test runs: the "idle" figure is the machine's idle CPU during the jobs, and
the ratios are lower bounds (the loop device needs almost no CPU, the daemon needs a core).
"CPU" is the daemon's CPU time (user + system, including the kernel work done in its
write(2) of each reply) per I/O, in us.

Cold cache (page cache dropped before every job, as DESIGN.md's baselines; idle ~40%):

| path | 1 MiB seq read QD1 | 4 KiB rand read QD32 | 4 KiB rand write QD32 | CPU us/IO |
|---|---|---|---|---|
| loop on raw copy = 1.0 | 1110 MB/s | 74.6k IOPS | 31.4k IOPS | - |
| cowd FUSE, defaults | 1.79 | 0.12 | 0.20 | 426 / 59 / 115 |
| the same, 128 KiB requests | 0.72 | 0.10 | 0.14 | 858 / 64 / 149 |
| pyfuse3 over the same Disk (no fallocate) | 0.65 | 0.08 | 0.06 | 1125 / 105 / 302 |

Warm cache (the base read into the page cache before every job; 5 interleaved runs, idle
~25%), the options that might matter to a loop device:

| cowd FUSE | seq read | rand read | rand write | CPU us/IO |
|---|---|---|---|---|
| loop on raw copy = 1.0 | 1247 MB/s | 63.7k IOPS | 27.8k IOPS | - |
| defaults (direct_io, parallel writes, max_background 64) | 1.28 | 0.40 | 0.24 | 531 / 30 / 125 |
| page cache (no FOPEN_DIRECT_IO) | 1.36 | 0.36 | 0.32 | 489 / 33 / 97 |
| no FOPEN_PARALLEL_DIRECT_WRITES | 1.31 | 0.37 | 0.34 | 489 / 31 / 92 |
| max_background 12 (the kernel's default) | 1.38 | 0.37 | 0.26 | 464 / 39 / 126 |
| loop on raw copy, buffered (direct-io=off), warm | 4.50 | 3.48 | 0.67 | - |

A 3-run warm pass over every option (idle ~2%, so only large differences count) gave, as
seq/rand read/rand write ratios: defaults 1.68/0.39/0.24, writeback cache 1.89/0.35/0.21,
4 workers 1.96/0.31/0.29, max_background 256 2.06/0.36/0.33, 128 KiB requests
1.42/0.39/0.27, pyfuse3 0.67/0.21/0.23.

What the figures say, and the choices:

- Requests of 1 MiB (max_pages 256, the kernel's limit) against 128 KiB: 2.5x the
  sequential read, half the CPU per MiB.  Chosen.
- The worker loop above (handlers run inline by the reading worker) against a lock
  hand-over per request: 33-37k against 18k 4 KiB reads/s, warm (an A/B of this module).
- pyfuse3 over the same Disk: 2-3x the CPU per request and well behind on every job, besides
  having no fallocate.
- FOPEN_DIRECT_IO, FOPEN_PARALLEL_DIRECT_WRITES, max_background 12..256, 4..16 workers: no
  difference beyond the run-to-run spread (rand write ranged 4.8k-8.5k IOPS within one
  configuration; a 4-round A/B of direct_io/parallel writes on a 256 MiB disk gave medians
  of 22k/24k/18k IOPS).  The loop device opens the file O_DIRECT, so the page cache is
  bypassed either way.  Chosen on other grounds: ``direct_io`` because the image files are
  already in the host's page cache and a second cached copy of every byte in the FUSE file's
  cache would only cost memory, and every read of the file then sees the Disk; parallel
  direct writes because concurrent writers need not queue on the inode lock; max_background
  64, above the loop device's usual queue depth, so the kernel's limit of 12 never caps
  asynchronous direct I/O.
- The writeback cache: no gain for a loop device (its I/O is direct), and it breaks the
  fixed size: the kernel owns i_size under it, so a write past the end is acknowledged into
  the page cache and fails only at write-back (close or fsync gets ENOSPC).  Off.
- What the figures do not show is the frontend: cold 4 KiB random reads (0.12) were
  ``Disk.read_into`` reading the base synchronously in the trio thread, one cache miss at a
  time (QD1 against the device's QD32).  Now a READ that misses the page cache advises the
  kernel (POSIX_FADV_WILLNEED) and yields the device to the next worker before it reads, so
  the misses of everything queued are on the disk at once (an allocating WRITE does the same
  for its copy-up source): cold 4 KiB random reads QD32 through `cowd attach` went from
  7.4-9.8k to 20.8-22.5k IOPS (1 GiB qcow2 overlay over a half-filled raw base, 3 runs
  each).  Sequential reads beat the loop device (1.79) because the Disk reads the base
  through the page cache and its readahead, the loop device with direct I/O does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shutil
import socket
import stat
import struct
import time
from collections.abc import Coroutine, Generator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import trio

from ...disk import Disk, DiskError
from ...errors import ProtocolError, UsageError

log = logging.getLogger("cowd.fuse")

# ---- wire constants (linux/fuse.h) -----------------------------------------------------------

FUSE_KERNEL_VERSION = 7
# The protocol minor version we speak: the structures below are those of 7.38 (Linux 6.2).
FUSE_KERNEL_MINOR_VERSION = 38
# Oldest kernel minor we accept: 7.28 (Linux 4.20) brought FUSE_MAX_PAGES, without which
# requests are capped at 128 KiB and the measurements below do not hold.
MIN_KERNEL_MINOR = 28
FUSE_ROOT_ID = 1
FUSE_MIN_READ_BUFFER = 8192

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_READLINK = 5
FUSE_SYMLINK = 6
FUSE_MKNOD = 8
FUSE_MKDIR = 9
FUSE_UNLINK = 10
FUSE_RMDIR = 11
FUSE_RENAME = 12
FUSE_LINK = 13
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_SETXATTR = 21
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_REMOVEXATTR = 24
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_GETLK = 31
FUSE_SETLK = 32
FUSE_SETLKW = 33
FUSE_ACCESS = 34
FUSE_CREATE = 35
FUSE_INTERRUPT = 36
FUSE_BMAP = 37
FUSE_DESTROY = 38
FUSE_IOCTL = 39
FUSE_POLL = 40
FUSE_NOTIFY_REPLY = 41
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43
FUSE_READDIRPLUS = 44
FUSE_RENAME2 = 45
FUSE_LSEEK = 46
FUSE_COPY_FILE_RANGE = 47
FUSE_SYNCFS = 50
FUSE_TMPFILE = 51

FUSE_NOTIFY_INVAL_ENTRY = 3

# INIT flags
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22

# OPEN reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# SETATTR valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SEEK_DATA = 3
SEEK_HOLE = 4

DT_DIR = 4
DT_REG = 8

# Structures, little-endian as the kernel writes them on x86 and arm64.
IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header: len opcode unique nodeid uid gid pid
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])  # fuse_entry_out
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])  # fuse_attr_out
INIT_IN = struct.Struct("<IIIII")  # fuse_init_in (the fields we read)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQIIQII")  # fuse_read_in
WRITE_IN = struct.Struct("<QQIIQII")  # fuse_write_in
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # fuse_setattr_in
KSTATFS = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")  # fuse_dirent without its name
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")

# ---- bounds and tunables ---------------------------------------------------------------------

PAGE_BYTES = 4096
# The kernel caps a request at fs.fuse.max_pages_limit pages (256 by default: 1 MiB).
MAX_PAGES = 256
# Longest name of a file in the mount (NAME_MAX).
MAX_NAME_BYTES = 255
# A READDIR reply is at most this long, whatever size the request asks for.
MAX_READDIR_BYTES = 64 << 10
# How long the kernel may cache a name and its attributes.  Attributes never change (the size
# is fixed) but a removed disk's name should not linger; removal also invalidates it.
ENTRY_TIMEOUT_S = 1.0
ATTR_TIMEOUT_S = 1.0
# The kernel's first request (INIT) must arrive this soon after the mount.
INIT_TIMEOUT_S = 10.0
# A worker reads and answers at most this many requests in a row without yielding to other
# tasks (the control socket, other frontends): fairness, not speed.
MAX_INLINE_REQUESTS = 64
# Teardown waits this long for open files (a loop device) to be closed before it aborts.
DRAIN_TIMEOUT_S = 10.0

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


@dataclass(frozen=True)
class FuseOptions:
    """How the mount talks to the kernel.  Defaults chosen by measurement and the reasons
    given in the module docstring.

    - ``direct_io``: open files with FOPEN_DIRECT_IO (no page cache for this file; every read
      and write is a request).  A loop device with ``--direct-io=on`` bypasses the page cache
      either way; this decides buffered users (cp, dd, qemu-img on the file).
    - ``parallel_direct_writes``: FOPEN_PARALLEL_DIRECT_WRITES, so direct writes to one file
      are not serialised by the inode lock (only with ``direct_io``).
    - ``writeback_cache``: FUSE_WRITEBACK_CACHE: buffered writes are gathered in the page
      cache.  The kernel then owns the file size: a write past the end is acknowledged and
      fails only at write-back (ENOSPC from close/fsync).
    - ``max_write_bytes`` / ``max_read_bytes``: the longest request (max_pages).
    - ``max_background``: asynchronous requests (readahead, async direct I/O from the loop
      driver) the kernel keeps in flight; the kernel's default is 12.
    - ``max_workers``: worker tasks (each owns max_write + max_read bytes of buffers).
    """

    direct_io: bool = True
    parallel_direct_writes: bool = True
    writeback_cache: bool = False
    max_write_bytes: int = MAX_PAGES * PAGE_BYTES
    max_read_bytes: int = MAX_PAGES * PAGE_BYTES
    max_background: int = 64
    max_workers: int = 16
    allow_other: bool = False
    use_fusermount: bool | None = None  # None: mount(2) as root, fusermount3 otherwise

    def check(self) -> None:
        for name in ("max_write_bytes", "max_read_bytes"):
            v = getattr(self, name)
            if not (PAGE_BYTES <= v <= MAX_PAGES * PAGE_BYTES) or v % PAGE_BYTES:
                raise UsageError(f"fuse: {name} must be a multiple of {PAGE_BYTES} between "
                                 f"{PAGE_BYTES} and {MAX_PAGES * PAGE_BYTES} ({name}={v})")
        if not 1 <= self.max_background <= 0xFFFF:
            raise UsageError(f"fuse: max_background out of range "
                             f"(max_background={self.max_background})")
        if not 1 <= self.max_workers <= 1024:
            raise UsageError(f"fuse: max_workers out of range (max_workers={self.max_workers})")


# ---- the protocol (sans I/O) -----------------------------------------------------------------


class FuseProtocolError(ProtocolError):
    """The kernel sent something we cannot parse."""


class _Fail(Exception):
    """Answer the current request with this errno."""

    def __init__(self, err: int):
        super().__init__(err)
        self.err = err


@dataclass(slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview


def parse_request(data: memoryview) -> Request:
    """Split one request as read from the device (exactly one read's bytes)."""
    if len(data) < IN_HEADER.size:
        raise FuseProtocolError(f"fuse: request shorter than its header (length={len(data)})")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    if length != len(data):
        raise FuseProtocolError(f"fuse: request length does not match the read "
                                f"(len={length}, read={len(data)})")
    return Request(opcode, unique, nodeid, uid, gid, pid, data[IN_HEADER.size:])


def reply_error(unique: int, err: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def reply_ok(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def _unpack(st: struct.Struct, body: memoryview, what: str) -> tuple[Any, ...]:
    if len(body) < st.size:
        raise FuseProtocolError(f"fuse: {what} body too short (length={len(body)})")
    return st.unpack_from(body)


def _split_ns(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * 1e9)


def valid_name(name: str) -> bool:
    try:
        raw = os.fsencode(name)
    except UnicodeError:
        return False
    return (0 < len(raw) <= MAX_NAME_BYTES and b"/" not in raw and b"\0" not in raw
            and raw not in (b".", b".."))


@dataclass(eq=False)
class _Node:
    ino: int
    name: str
    disk: Disk
    handles: int = 0  # open file handles
    inflight: int = 0  # requests being served
    removed: bool = False


@dataclass(eq=False)
class _Handle:
    node: _Node
    writable: bool


@dataclass(frozen=True)
class Negotiated:
    """What INIT settled."""

    minor: int
    flags: int
    max_write_bytes: int
    max_pages: int
    max_background: int


class FuseFs:
    """The namespace and every request that does not touch disk data; returns reply bytes.

    Trio-thread only (no locks): every method is synchronous.
    """

    def __init__(self, options: FuseOptions, *, uid: int | None = None, gid: int | None = None,
                 now: float | None = None):
        self.options = options
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self.time = time.time() if now is None else now
        self.nodes: dict[int, _Node] = {}
        self.by_name: dict[str, _Node] = {}
        self.handles: dict[int, _Handle] = {}
        self.negotiated: Negotiated | None = None
        self._next_ino = FUSE_ROOT_ID + 1
        self._next_fh = 1
        self.dir_handles: set[int] = set()

    # -- namespace ---------------------------------------------------------------------------

    def add(self, name: str, disk: Disk) -> _Node:
        if not valid_name(name):
            raise UsageError(f"fuse: not a usable file name (name={name!r})")
        if name in self.by_name:
            raise UsageError(f"fuse: a disk of that name is already mounted (name={name!r})")
        node = _Node(self._next_ino, name, disk)
        self._next_ino += 1
        self.nodes[node.ino] = node
        self.by_name[name] = node
        return node

    def remove(self, name: str, force: bool = False) -> _Node:
        node = self.by_name.get(name)
        if node is None:
            raise UsageError(f"fuse: no such disk (name={name!r})")
        if node.handles and not force:
            raise UsageError(f"fuse: {name} is still open (handles={node.handles})")
        del self.by_name[name]
        del self.nodes[node.ino]
        node.removed = True
        return node

    def node_of(self, fh: int) -> tuple[_Node, _Handle]:
        h = self.handles.get(fh)
        if h is None:
            raise _Fail(errno.EBADF)
        if h.node.removed:
            raise _Fail(errno.EIO)
        return h.node, h

    # -- attributes ---------------------------------------------------------------------------

    def _attr(self, ino: int) -> bytes:
        sec, nsec = _split_ns(self.time)
        if ino == FUSE_ROOT_ID:
            return ATTR.pack(FUSE_ROOT_ID, 0, 0, sec, sec, sec, nsec, nsec, nsec,
                             stat.S_IFDIR | 0o755, 2, self.uid, self.gid, 0, PAGE_BYTES, 0)
        node = self.nodes.get(ino)
        if node is None:
            raise _Fail(errno.ENOENT)
        disk = node.disk
        mode = stat.S_IFREG | (0o400 if disk.readonly else 0o600)
        blksize = min(max(disk.cluster_size, PAGE_BYTES), self.options.max_write_bytes)
        return ATTR.pack(ino, disk.size, -(-disk.size // 512), sec, sec, sec, nsec, nsec, nsec,
                         mode, 1, self.uid, self.gid, 0, blksize, 0)

    def _attr_out(self, ino: int) -> bytes:
        s, ns = _split_ns(ATTR_TIMEOUT_S)
        return struct.pack("<QII", s, ns, 0) + self._attr(ino)

    def _entry_out(self, ino: int) -> bytes:
        es, ens = _split_ns(ENTRY_TIMEOUT_S)
        s, ns = _split_ns(ATTR_TIMEOUT_S)
        return struct.pack("<QQQQII", ino, 0, es, s, ens, ns) + self._attr(ino)

    # -- dispatch -----------------------------------------------------------------------------

    def handle(self, req: Request) -> bytes | None:
        """The reply to a request that does not touch disk data (None: no reply is due)."""
        op = req.opcode
        if op in (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT):
            return None  # inodes live as long as their disk; interrupts are not supported
        try:
            if op == FUSE_INIT:
                return self._init(req)
            if self.negotiated is None:
                raise _Fail(errno.EIO)  # nothing before INIT
            fn = _SYNC_OPS.get(op)
            if fn is None:
                raise _Fail(_REFUSED.get(op, errno.ENOSYS))
            return fn(self, req)
        except _Fail as f:
            return reply_error(req.unique, f.err)

    def _init(self, req: Request) -> bytes:
        major, minor, max_readahead, flags, _flags2 = _unpack(INIT_IN, req.body, "INIT")
        if major != FUSE_KERNEL_VERSION or minor < MIN_KERNEL_MINOR:
            log.error("fuse: kernel protocol %d.%d unsupported (need 7.%d or later)",
                      major, minor, MIN_KERNEL_MINOR)
            raise _Fail(errno.EPROTO)
        o = self.options
        want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS \
            | FUSE_MAX_PAGES
        if o.writeback_cache:
            want |= FUSE_WRITEBACK_CACHE
        got = flags & want
        if not got & FUSE_MAX_PAGES:
            raise _Fail(errno.EPROTO)
        max_pages = max(o.max_write_bytes, o.max_read_bytes) // PAGE_BYTES
        neg = Negotiated(min(minor, FUSE_KERNEL_MINOR_VERSION), got, o.max_write_bytes,
                         max_pages, o.max_background)
        self.negotiated = neg
        congestion = max(1, o.max_background * 3 // 4)
        out = INIT_OUT.pack(FUSE_KERNEL_VERSION, neg.minor, max_readahead, got,
                            o.max_background, congestion, o.max_write_bytes, 1, max_pages, 0, 0)
        return reply_ok(req.unique, out)

    def _lookup(self, req: Request) -> bytes:
        if req.nodeid != FUSE_ROOT_ID:
            raise _Fail(errno.ENOTDIR)
        raw = bytes(req.body).split(b"\0", 1)[0]
        node = self.by_name.get(os.fsdecode(raw))
        if node is None:
            raise _Fail(errno.ENOENT)
        return reply_ok(req.unique, self._entry_out(node.ino))

    def _getattr(self, req: Request) -> bytes:
        return reply_ok(req.unique, self._attr_out(req.nodeid))

    def _setattr(self, req: Request) -> bytes:
        f = _unpack(SETATTR_IN, req.body, "SETATTR")
        valid, size = f[0], f[3]
        if req.nodeid != FUSE_ROOT_ID:
            node = self.nodes.get(req.nodeid)
            if node is None:
                raise _Fail(errno.ENOENT)
            if valid & FATTR_SIZE and size != node.disk.size:
                raise _Fail(errno.EPERM)  # a disk's size is fixed
        if valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise _Fail(errno.EPERM)
        # Times (and FATTR_FH, lock owner, kill-suid) are accepted and ignored.
        return reply_ok(req.unique, self._attr_out(req.nodeid))

    def _open(self, req: Request) -> bytes:
        flags, _open_flags = _unpack(OPEN_IN, req.body, "OPEN")
        if req.nodeid == FUSE_ROOT_ID:
            raise _Fail(errno.EISDIR)
        node = self.nodes.get(req.nodeid)
        if node is None:
            raise _Fail(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and node.disk.readonly:
            raise _Fail(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = _Handle(node, writable)
        node.handles += 1
        o = self.options
        oflags = FOPEN_NOFLUSH
        if o.direct_io:
            oflags |= FOPEN_DIRECT_IO
            if o.parallel_direct_writes:
                oflags |= FOPEN_PARALLEL_DIRECT_WRITES
        else:
            oflags |= FOPEN_KEEP_CACHE  # we are the only writer: the cache stays true
        return reply_ok(req.unique, OPEN_OUT.pack(fh, oflags, 0))

    def _release(self, req: Request) -> bytes:
        fh = _unpack(RELEASE_IN, req.body, "RELEASE")[0]
        h = self.handles.pop(fh, None)
        if h is not None:
            h.node.handles -= 1
        return reply_ok(req.unique)

    def _flush(self, req: Request) -> bytes:
        return reply_ok(req.unique)

    def _opendir(self, req: Request) -> bytes:
        if req.nodeid != FUSE_ROOT_ID:
            raise _Fail(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles.add(fh)
        return reply_ok(req.unique, OPEN_OUT.pack(fh, 0, 0))

    def _releasedir(self, req: Request) -> bytes:
        self.dir_handles.discard(_unpack(RELEASE_IN, req.body, "RELEASEDIR")[0])
        return reply_ok(req.unique)

    def _readdir(self, req: Request) -> bytes:
        fh, offset, size = _unpack(READ_IN, req.body, "READDIR")[:3]
        if req.nodeid != FUSE_ROOT_ID or fh not in self.dir_handles:
            raise _Fail(errno.EBADF)
        size = min(size, MAX_READDIR_BYTES)
        # A directory offset is the cookie of the entry after it: "." is 1, ".." is 2 and a
        # disk's is its inode number + 2 (inodes start at 2, are never reused and are
        # listed in order), so a listing survives disks coming and going in between.
        entries: list[tuple[int, int, bytes, int]] = [
            (FUSE_ROOT_ID, 1, b".", DT_DIR), (FUSE_ROOT_ID, 2, b"..", DT_DIR)]
        entries += [(n.ino, n.ino + 2, os.fsencode(n.name), DT_REG)
                    for n in sorted(self.nodes.values(), key=lambda n: n.ino)]
        out = bytearray()
        for ino, cookie, name, kind in entries:
            if cookie <= offset:
                continue
            rec = DIRENT.pack(ino, cookie, len(name), kind) + name
            rec += bytes(-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return reply_ok(req.unique, bytes(out))

    def _statfs(self, req: Request) -> bytes:
        total = sum(n.disk.size for n in self.nodes.values())
        st = KSTATFS.pack(-(-total // PAGE_BYTES), 0, 0, len(self.nodes) + 1, 0, PAGE_BYTES,
                          MAX_NAME_BYTES, PAGE_BYTES, 0)
        return reply_ok(req.unique, st)

    def _ok(self, req: Request) -> bytes:
        return reply_ok(req.unique)


_SYNC_OPS = {
    FUSE_LOOKUP: FuseFs._lookup,
    FUSE_GETATTR: FuseFs._getattr,
    FUSE_SETATTR: FuseFs._setattr,
    FUSE_OPEN: FuseFs._open,
    FUSE_RELEASE: FuseFs._release,
    FUSE_FLUSH: FuseFs._flush,
    FUSE_OPENDIR: FuseFs._opendir,
    FUSE_READDIR: FuseFs._readdir,
    FUSE_RELEASEDIR: FuseFs._releasedir,
    FUSE_FSYNCDIR: FuseFs._ok,
    FUSE_STATFS: FuseFs._statfs,
    FUSE_DESTROY: FuseFs._ok,
}

# Requests refused outright (anything else unknown is ENOSYS, which tells the kernel to stop
# sending it: xattrs, locks, ioctl, poll, bmap, copy_file_range, statx, ...).
_REFUSED = {op: errno.EPERM for op in (
    FUSE_SYMLINK, FUSE_MKNOD, FUSE_MKDIR, FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_LINK,
    FUSE_CREATE, FUSE_RENAME2, FUSE_TMPFILE)}

# Requests the adapter serves against a Disk.
DATA_OPS = frozenset({FUSE_READ, FUSE_WRITE, FUSE_FSYNC, FUSE_FALLOCATE, FUSE_LSEEK,
                      FUSE_SYNCFS})


# ---- mounting ------------------------------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def _unescape_mountinfo(field: str) -> str:
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at(mountpoint: str) -> list[tuple[str, str]]:
    """(fstype, source) of every mount at ``mountpoint``, bottom first (/proc/self/mountinfo)."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2 and \
                    _unescape_mountinfo(fields[4]) == mountpoint:
                found.append((rfields[0], _unescape_mountinfo(rfields[1])))
    return found


async def unmount_stale(mountpoint: str) -> bool:
    """Lazily unmount a dead cowd FUSE mount at ``mountpoint`` (its daemon was killed: the
    kernel answers ENOTCONN).  A live mount, or anything that is not a cowd FUSE mount, is
    left alone.  Returns True if it unmounted one.  Never call it on a mount this process
    serves (the check would wait for this thread)."""
    mountpoint = str(await trio.Path(mountpoint).absolute())
    mounts = mounts_at(mountpoint)
    if not mounts or mounts[-1][0] != "fuse.cowd":
        await trio.lowlevel.checkpoint()
        return False

    def probe() -> int:
        try:
            # statfs always asks the daemon; stat may be answered from cached attributes
            # for ATTR_TIMEOUT_S after the daemon died.
            os.statvfs(mountpoint)
        except OSError as e:
            return e.errno or 0
        return 0

    with trio.move_on_after(INIT_TIMEOUT_S):
        err = await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
        if err != errno.ENOTCONN:
            return False
        if _c().umount2(os.fsencode(mountpoint), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            raise UsageError(f"{mountpoint}: cannot unmount a dead cowd mount: {os.strerror(e)}")
        return True
    return False  # a live daemon that does not answer: not ours to judge


async def _mount_syscall(fd: int, mountpoint: str, source: str, opts: str) -> None:
    await trio.lowlevel.checkpoint()
    data = f"fd={fd},rootmode=40000,user_id={os.geteuid()},group_id={os.getegid()},{opts}"
    if _c().mount(source.encode(), os.fsencode(mountpoint), b"fuse.cowd",
                  MS_NOSUID | MS_NODEV, data.encode()) != 0:
        e = ctypes.get_errno()
        raise UsageError(f"{mountpoint}: cannot mount FUSE: {os.strerror(e)}")


async def _mount_fusermount(mountpoint: str, source: str, opts: str) -> int:
    """fusermount3 mounts for us and passes the /dev/fuse fd back over a socket."""
    exe = shutil.which("fusermount3")
    if exe is None:
        raise UsageError("fusermount3 not found (package fuse3); it mounts FUSE without root")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        p = await trio.run_process(
            [exe, "-o", f"nosuid,nodev,fsname={source},subtype=cowd,{opts}", "--", mountpoint],
            env=env, pass_fds=(theirs.fileno(),), check=False, capture_stderr=True)
        if p.returncode != 0:
            msg = p.stderr.decode(errors="replace").strip()
            raise UsageError(f"{mountpoint}: fusermount3 failed: {msg}")
        ours.setblocking(False)
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        except BlockingIOError:
            fds = []
        if not fds:
            raise UsageError(f"{mountpoint}: fusermount3 passed no file descriptor")
        return fds[0]
    finally:
        ours.close()
        theirs.close()


# ---- the trio adapter ----------------------------------------------------------------------


class _Resume:
    """Finish a coroutine whose first step already ran (and yielded ``trap``) in this task:
    what ``await`` would have done had the first step not been taken by hand.  The coroutine
    runs in the same task throughout, so trio sees nothing unusual."""

    __slots__ = ("coro", "trap")

    def __init__(self, coro: Coroutine[Any, Any, None], trap: Any):
        self.coro = coro
        self.trap = trap

    def __await__(self) -> Generator[Any, Any, None]:
        coro, trap = self.coro, self.trap
        while True:
            try:
                value = yield trap
            except BaseException as e:
                try:
                    trap = coro.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    trap = coro.send(value)
                except StopIteration:
                    return


class _Worker:
    __slots__ = ("reply", "request")

    def __init__(self, request_bytes: int, reply_bytes: int):
        self.request = bytearray(request_bytes)
        self.reply = bytearray(reply_bytes)


class FuseFrontend:
    """The mounted directory; see the module docstring.  Build it with :func:`mount_fuse`."""

    def __init__(self, mountpoint: str, options: FuseOptions):
        options.check()
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = options
        self.fs = FuseFs(options)
        # The mount's source names this process and a random token, so teardown can tell
        # our mount from anything mounted on the same directory later.
        self.source = f"cowd-{os.getpid()}-{secrets.token_hex(4)}"
        self.fd = -1
        self.mounted = False
        self._fusermount = False
        self._read_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._initialized = trio.Event()
        self._ended = trio.Event()
        self._drained = trio.Condition()
        self._workers = 0
        self._idle = 0
        self._closed = False
        self.counters: dict[str, int] = {
            "requests": 0, "reads": 0, "writes": 0, "fsyncs": 0, "fallocates": 0,
            "bytes_read": 0, "bytes_written": 0, "errors": 0, "protocol_errors": 0,
            "workers_max": 0, "waited": 0,
        }

    # -- public ---------------------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    def add_disk(self, name: str, disk: Disk) -> str:
        """Serve ``disk`` as file ``name`` in the mount; returns its path."""
        self.fs.add(name, disk)
        return self.path_of(name)

    async def remove_disk(self, name: str, force: bool = False) -> None:
        """Stop serving ``name``: refused while the file is open unless ``force`` (then its
        handles fail with EIO).  Returns once no request on it is in flight; the caller still
        owns the Disk and closes it."""
        node = self.fs.remove(name, force)
        if self.mounted and self.fs.negotiated is not None:
            # The kernel may have the name cached; the notification can block while a lookup
            # in the root is pending, which only this thread can answer: send it from a worker.
            with trio.move_on_after(DRAIN_TIMEOUT_S):
                await trio.to_thread.run_sync(self._notify_inval_entry, node.name,
                                              abandon_on_cancel=True)
        async with self._drained:
            while node.inflight:
                await self._drained.wait()

    @property
    def names(self) -> list[str]:
        return list(self.fs.by_name)

    def stats(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "files": {n.name: {"inode": n.ino, "open_handles": n.handles}
                      for n in self.fs.nodes.values()},
            "workers": self._workers,
            **self.counters,
        }

    async def shutdown(self, deadline_s: float = DRAIN_TIMEOUT_S) -> None:
        """Unmount (lazily) and wait up to ``deadline_s`` for the kernel to end the
        connection, which it does when no file in the mount is open any more."""
        await self._unmount()
        with trio.move_on_after(deadline_s):
            await self._ended.wait()

    async def close(self) -> None:
        """Unmount, drain (bounded), stop the workers and close the device.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.CancelScope(shield=True):
                await self.shutdown(DRAIN_TIMEOUT_S)
                if not self._ended.is_set():
                    busy = [n.name for n in self.fs.nodes.values() if n.handles]
                    log.warning("fuse: %s: files still open after %g s, aborting the "
                                "connection (open: %s)", self.mountpoint, DRAIN_TIMEOUT_S,
                                ", ".join(busy) or "-")
        finally:
            if self._scope is not None:
                self._scope.cancel()
            if self.fd >= 0 and self._workers == 0:
                self._close_fd()

    # -- mount and unmount --------------------------------------------------------------------

    async def _mount(self) -> None:
        o = self.options
        opts = f"default_permissions,max_read={o.max_read_bytes}"
        if o.allow_other:
            opts += ",allow_other"
        use_fm = o.use_fusermount if o.use_fusermount is not None else os.geteuid() != 0
        if not await trio.Path(self.mountpoint).is_dir():
            raise UsageError(f"{self.mountpoint}: mount point is not a directory")
        if use_fm:
            self.fd = await _mount_fusermount(self.mountpoint, self.source, opts)
            self._fusermount = True
        else:
            try:
                self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise UsageError(f"/dev/fuse: cannot open: {e.strerror}") from None
            try:
                await _mount_syscall(self.fd, self.mountpoint, self.source, opts)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise
        os.set_blocking(self.fd, False)
        self.mounted = True

    def _ours_on_top(self) -> bool:
        mounts = mounts_at(self.mountpoint)
        return bool(mounts) and mounts[-1] == ("fuse.cowd", self.source)

    async def _unmount(self) -> None:
        if not self.mounted:
            await trio.lowlevel.checkpoint()
            return
        self.mounted = False
        if not self._ours_on_top():
            if any(m == ("fuse.cowd", self.source) for m in mounts_at(self.mountpoint)):
                log.warning("fuse: %s: another mount sits on ours; not unmounting it",
                            self.mountpoint)
            await trio.lowlevel.checkpoint()
            return
        if self._fusermount:
            exe = shutil.which("fusermount3") or "fusermount3"
            p = await trio.run_process([exe, "-u", "-z", "--", self.mountpoint], check=False,
                                       capture_stderr=True)
            if p.returncode != 0:
                log.warning("fuse: fusermount3 -u %s: %s", self.mountpoint,
                            p.stderr.decode(errors="replace").strip())
            return
        await trio.lowlevel.checkpoint()
        if _c().umount2(os.fsencode(self.mountpoint), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            log.warning("fuse: cannot unmount %s: %s", self.mountpoint, os.strerror(e))

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def _notify_inval_entry(self, name: str) -> None:
        raw = os.fsencode(name)
        body = NOTIFY_INVAL_ENTRY_OUT.pack(FUSE_ROOT_ID, len(raw), 0) + raw + b"\0"
        msg = OUT_HEADER.pack(OUT_HEADER.size + len(body), FUSE_NOTIFY_INVAL_ENTRY, 0) + body
        fd = self.fd
        if fd < 0:
            return
        try:
            os.write(fd, msg)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.warning("fuse: invalidating %s: %s", name, e.strerror)

    # -- the session loop ---------------------------------------------------------------------

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._nursery = nursery
                self._spawn()
                self._spawn()
                task_status.started()
        finally:
            self._ended.set()
            if self._closed:
                self._close_fd()

    def _spawn(self) -> None:
        assert self._nursery is not None
        o = self.options
        w = _Worker(max(FUSE_MIN_READ_BUFFER, o.max_write_bytes + PAGE_BYTES),
                    OUT_HEADER.size + o.max_read_bytes)
        self._workers += 1
        self._idle += 1
        self.counters["workers_max"] = max(self.counters["workers_max"], self._workers)
        self._nursery.start_soon(self._worker, w)

    async def _receive(self, buf: bytearray) -> int:
        """Read one request into ``buf``; 0 when the connection has ended."""
        while True:
            fd = self.fd
            if fd < 0:
                return 0
            try:
                return os.readv(fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue  # the request was interrupted before we read it
                if e.errno in (errno.ENODEV, errno.EBADF, errno.ECONNABORTED):
                    return 0
                raise

    async def _worker(self, w: _Worker) -> None:
        view = memoryview(w.request)
        lock = self._read_lock
        try:
            while True:
                await lock.acquire()
                held = True
                try:
                    for _ in range(MAX_INLINE_REQUESTS):
                        try:
                            n = await self._receive(w.request)
                        except trio.ClosedResourceError:
                            n = 0
                        if n == 0:
                            self._ended.set()
                            return
                        # Run the handler's first step here.  Most requests finish in it
                        # (no await on the Disk's fast paths): then read the next one with
                        # no task switch.  One that must wait hands the device to another
                        # worker and is finished by this one.
                        coro = self._handle(view[:n], w)
                        try:
                            trap = coro.send(None)
                        except StopIteration:
                            continue
                        lock.release()
                        held = False
                        self.counters["waited"] += 1
                        self._idle -= 1
                        if self._idle == 0 and self._workers < self.options.max_workers:
                            self._spawn()
                        try:
                            await _Resume(coro, trap)
                        finally:
                            self._idle += 1
                        break
                finally:
                    if held:
                        lock.release()
        finally:
            self._workers -= 1
            self._idle -= 1

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            os.write(self.fd, data)
        except OSError as e:
            # ENOENT: the kernel gave up on the request (interrupted or aborted); ENODEV:
            # the connection is gone.  Neither is ours to report.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("fuse: writing a reply failed: %s", e.strerror)

    async def _handle(self, data: memoryview, w: _Worker) -> None:
        self.counters["requests"] += 1
        try:
            req = parse_request(data)
        except FuseProtocolError as e:
            self.counters["protocol_errors"] += 1
            log.error("%s", e)
            if len(data) >= IN_HEADER.size:
                self._send(reply_error(IN_HEADER.unpack_from(data)[2], errno.EIO))
            return
        if req.opcode not in DATA_OPS or self.fs.negotiated is None:
            try:
                reply = self.fs.handle(req)
            except FuseProtocolError as e:
                self.counters["protocol_errors"] += 1
                log.error("%s", e)
                reply = reply_error(req.unique, errno.EIO)
            if reply is not None:
                self._send(reply)
            if req.opcode == FUSE_INIT and self.fs.negotiated is not None:
                self._initialized.set()
            return
        node: _Node | None = None
        try:
            if req.opcode == FUSE_READ:
                fh, offset, size = _unpack(READ_IN, req.body, "READ")[:3]
                node, _h = self.fs.node_of(fh)
                node.inflight += 1
                await self._read(req.unique, node.disk, offset, size, w)
                return
            if req.opcode == FUSE_WRITE:
                fh, offset, size = _unpack(WRITE_IN, req.body, "WRITE")[:3]
                payload = req.body[WRITE_IN.size:]
                if len(payload) != size:
                    raise FuseProtocolError(f"fuse: WRITE payload length does not match "
                                            f"(size={size}, payload={len(payload)})")
                node, _h = self.fs.node_of(fh)
                node.inflight += 1
                disk = node.disk
                if offset < disk.size < offset + size:
                    # Crossing the end: write what fits and answer short, as a block device
                    # does (the kernel's buffered path splits such a write the same way).
                    size = disk.size - offset
                    payload = payload[:size]
                if disk.advise_write(offset, size):
                    # An allocation: its copy-up source is being fetched; let the requests
                    # queued behind this one start theirs before we wait for it (as _read).
                    await trio.lowlevel.checkpoint()
                await disk.write(offset, payload)  # at or past the end: ENOSPC
                self.counters["writes"] += 1
                self.counters["bytes_written"] += size
                self._send(reply_ok(req.unique, WRITE_OUT.pack(size, 0)))
                return
            if req.opcode == FUSE_SYNCFS:
                for n in list(self.fs.nodes.values()):
                    if not n.disk.readonly:
                        await n.disk.flush()
                self._send(reply_ok(req.unique))
                return
            fh = _unpack(FSYNC_IN, req.body, "request")[0]
            node, _h = self.fs.node_of(fh)
            node.inflight += 1
            if req.opcode == FUSE_FSYNC:
                self.counters["fsyncs"] += 1
                await node.disk.flush()
                self._send(reply_ok(req.unique))
            elif req.opcode == FUSE_FALLOCATE:
                _fh, offset, length, mode, _pad = _unpack(FALLOCATE_IN, req.body, "FALLOCATE")
                self.counters["fallocates"] += 1
                await self._fallocate(node.disk, offset, length, mode)
                self._send(reply_ok(req.unique))
            else:  # FUSE_LSEEK
                _fh, offset, whence, _pad = _unpack(LSEEK_IN, req.body, "LSEEK")
                pos = await self._lseek(node.disk, offset, whence)
                self._send(reply_ok(req.unique, LSEEK_OUT.pack(pos)))
        except _Fail as f:
            self.counters["errors"] += 1
            self._send(reply_error(req.unique, f.err))
        except DiskError as e:
            self.counters["errors"] += 1
            log.debug("fuse: %s", e)
            self._send(reply_error(req.unique, e.errno or errno.EIO))
        except FuseProtocolError as e:
            self.counters["protocol_errors"] += 1
            log.error("%s", e)
            self._send(reply_error(req.unique, errno.EIO))
        except Exception:
            self.counters["errors"] += 1
            log.exception("fuse: request %d failed", req.opcode)
            self._send(reply_error(req.unique, errno.EIO))
        finally:
            if node is not None:
                node.inflight -= 1
                if node.removed and node.inflight == 0:
                    async with self._drained:
                        self._drained.notify_all()

    async def _read(self, unique: int, disk: Disk, offset: int, size: int, w: _Worker) -> None:
        if size > self.options.max_read_bytes:
            raise _Fail(errno.EINVAL)
        n = max(0, min(size, disk.size - offset))
        out = memoryview(w.reply)
        if n:
            dest = out[OUT_HEADER.size:OUT_HEADER.size + n]
            if not disk.try_read_into(dest=dest, offset=offset):
                # Not in the page cache (or behind a lock): have the disk start on it, and
                # give the device to the next worker first, so that the requests queued
                # behind this one are advised too and the disk works on all of them at
                # once; then read (by now usually from the page cache).
                disk.advise(offset, n)
                await trio.lowlevel.checkpoint()
                await disk.read_into(offset, dest)
        OUT_HEADER.pack_into(w.reply, 0, OUT_HEADER.size + n, 0, unique)
        self.counters["reads"] += 1
        self.counters["bytes_read"] += n
        self._send(out[:OUT_HEADER.size + n])

    @staticmethod
    async def _fallocate(disk: Disk, offset: int, length: int, mode: int) -> None:
        size = disk.size
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            end = min(size, offset + length)
            if offset < end:
                await disk.trim(offset, end - offset)
            return
        if mode & ~FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE:
            if not mode & FALLOC_FL_KEEP_SIZE and offset + length > size:
                raise _Fail(errno.ENOSPC)  # it would grow the file
            end = min(size, offset + length)
            if offset < end:
                await disk.write_zeroes(offset, end - offset, may_unmap=False)
            return
        raise _Fail(errno.EOPNOTSUPP)

    @staticmethod
    async def _lseek(disk: Disk, offset: int, whence: int) -> int:
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise _Fail(errno.EINVAL)
        size = disk.size
        if offset >= size:
            raise _Fail(errno.ENXIO)
        pos = offset
        while pos < size:
            runs = await disk.block_status(pos, size - pos)
            if not runs:
                break
            for n, hole, _zero in runs:
                if hole == (whence == SEEK_HOLE):
                    return pos
                pos += n
        if whence == SEEK_DATA:
            raise _Fail(errno.ENXIO)
        return size


async def mount_fuse(stack: AsyncExitStack, nursery: trio.Nursery, mountpoint: str,
                     disks: Mapping[str, Disk], options: FuseOptions | None = None
                     ) -> FuseFrontend:
    """Mount ``mountpoint`` serving ``disks`` (file name -> Disk), run it in ``nursery`` and
    register its teardown (unmount, drain, close) on ``stack``.  Returns once the kernel has
    completed INIT, so the files can be opened right away (from another thread)."""
    fe = FuseFrontend(mountpoint, options or FuseOptions())
    for name, disk in disks.items():
        fe.add_disk(name, disk)
    await fe._mount()
    stack.push_async_callback(fe.close)
    await nursery.start(fe._serve)
    with trio.move_on_after(INIT_TIMEOUT_S):
        await fe._initialized.wait()
    if not fe._initialized.is_set():
        raise UsageError(f"{fe.mountpoint}: the kernel did not initialise the FUSE mount "
                         f"within {INIT_TIMEOUT_S:.0f} s")
    return fe


__all__ = [
    "DATA_OPS",
    "FuseFrontend",
    "FuseFs",
    "FuseOptions",
    "FuseProtocolError",
    "Request",
    "mount_fuse",
    "mounts_at",
    "parse_request",
    "unmount_stale",
]
