"""Layer: cowd frontends (fuse), the sans-I/O codec: the FUSE kernel protocol as bytes in,
reply bytes out (structures and names from the kernel's UAPI header ``linux/fuse.h``), and the
mount's namespace.

Invariants: no I/O and no trio here (tests/test_layers.py checks it); everything is
synchronous and runs in the trio thread (no locks).  Every length the kernel controls is
checked before it is used: a request's length against the read (:func:`parse_request`), a
body against its struct (:func:`unpack_body`), names against :data:`MAX_NAME_BYTES`, a
READDIR reply against :data:`MAX_READDIR_BYTES`.

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

The protocol half
-----------------
The protocol half is sans-I/O: :func:`parse_request` splits a request read from the device
into a :class:`Request`, and :class:`FuseFs` answers every request that does not touch a
disk's data (INIT, LOOKUP, GETATTR, SETATTR, OPEN, READDIR, STATFS, ...) by returning the
reply's bytes; it keeps the namespace (inodes, open handles).  The trio adapter,
:class:`~.server.FuseFrontend`, reads the device and runs READ, WRITE, FSYNC, FALLOCATE, LSEEK and
SYNCFS against the Disk.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import CommandFailed, ProtocolError, UsageError

if TYPE_CHECKING:
    from ...disk.api import BlockDisk

log = logging.getLogger("cowd.fuse")

# ---- wire constants (linux/fuse.h) -----------------------------------------------------------

FUSE_KERNEL_VERSION = 7
# The protocol minor version we speak: the structures below are those of 7.38 (Linux 6.2).
FUSE_KERNEL_MINOR_VERSION = 38
# Oldest kernel minor we accept: 7.28 (Linux 4.20) brought FUSE_MAX_PAGES, without which
# requests are capped at 128 KiB and the measurements in server.py do not hold.
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
FUSE_INIT_EXT = 1 << 30  # flags2 (the high 32 bits) is valid
# flags2 bits (FUSE_OVER_IO_URING is 1 << 41 of the 64-bit flags: Linux 6.14, protocol 7.42)
FUSE_OVER_IO_URING_FLAGS2 = 1 << (41 - 32)

# FUSE-over-io_uring (Documentation/filesystems/fuse-io-uring.rst): the commands of
# IORING_OP_URING_CMD on /dev/fuse, and the layout of a ring entry's header buffer
# (struct fuse_uring_req_header: the in/out header area, the per-opcode header area, then
# struct fuse_uring_ent_in_out).
FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
FUSE_URING_IN_OUT_HEADER_SZ = 128
FUSE_URING_OP_IN_OUT_SZ = 128
URING_ENT_IN_OUT = struct.Struct("<QQIIQ")  # flags commit_id payload_sz padding reserved
URING_ENT_IN_OUT_OFFSET = FUSE_URING_IN_OUT_HEADER_SZ + FUSE_URING_OP_IN_OUT_SZ
URING_REQ_HEADER_BYTES = URING_ENT_IN_OUT_OFFSET + URING_ENT_IN_OUT.size
URING_CMD_REQ = struct.Struct("<QQH6x")  # struct fuse_uring_cmd_req: flags commit_id qid

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

@dataclass(frozen=True)
class FuseOptions:
    """How the mount talks to the kernel.  Defaults chosen by measurement and the reasons
    given in cowd/frontends/fuse/server.py's docstring.

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
    - ``io_uring``: answer the kernel's FUSE_OVER_IO_URING offer (Linux 6.14+ with the fuse
      module's ``enable_uring`` set): requests then arrive on an io_uring (.ring) instead of
      ``read(2)`` from the device.
    - ``uring_workers``: how many worker processes (cowd/workers/) serve the ring with
      entries of their own (each on every queue: :func:`.ring.worker_queues`); the daemon
      registers the queues no worker takes (none while there are workers).  The daemon sets
      it before the mount and clears it when the ring does not serve, so a worker given the
      options with the mount's clone registers only on a ring the kernel uses.
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
    # Serve over io_uring when the kernel offers it (server.py says when that is).
    io_uring: bool = False
    uring_workers: int = 0

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
        if not 0 <= self.uring_workers <= 1024:
            raise UsageError(f"fuse: uring_workers out of range "
                             f"(uring_workers={self.uring_workers})")


# ---- the protocol (sans I/O) -----------------------------------------------------------------


class FuseProtocolError(ProtocolError):
    """The kernel sent something we cannot parse."""


class Fail(Exception):
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


def unpack_body(st: struct.Struct, body: memoryview, what: str) -> tuple[Any, ...]:
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
class Node:
    ino: int
    name: str
    disk: BlockDisk
    handles: int = 0  # open file handles
    inflight: int = 0  # requests being served
    removed: bool = False


@dataclass(eq=False)
class _Handle:
    node: Node
    writable: bool


@dataclass(frozen=True)
class Negotiated:
    """What INIT settled."""

    minor: int
    flags: int
    max_write_bytes: int
    max_pages: int
    max_background: int
    io_uring: bool = False  # FUSE_OVER_IO_URING accepted: the adapter must register a ring


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
        self.nodes: dict[int, Node] = {}
        self.by_name: dict[str, Node] = {}
        self.handles: dict[int, _Handle] = {}
        self.negotiated: Negotiated | None = None
        self._next_ino = FUSE_ROOT_ID + 1
        self._next_fh = 1
        self.dir_handles: set[int] = set()
        # Set by the adapter before INIT when it has a working io_uring to serve with;
        # ``uring_offered`` records whether the kernel offered FUSE_OVER_IO_URING.
        self.uring_ready = False
        self.uring_offered = False

    # -- namespace ---------------------------------------------------------------------------

    def add(self, name: str, disk: BlockDisk) -> Node:
        if not valid_name(name):
            raise CommandFailed(f"fuse: not a usable file name (name={name!r})")
        if name in self.by_name:
            raise CommandFailed(f"fuse: a disk of that name is already mounted (name={name!r})")
        node = Node(self._next_ino, name, disk)
        self._next_ino += 1
        self.nodes[node.ino] = node
        self.by_name[name] = node
        return node

    def remove(self, name: str, force: bool = False) -> Node:
        node = self.by_name.get(name)
        if node is None:
            raise CommandFailed(f"fuse: no such disk (name={name!r})")
        if node.handles and not force:
            raise CommandFailed(f"fuse: {name} is still open (handles={node.handles})")
        del self.by_name[name]
        del self.nodes[node.ino]
        node.removed = True
        return node

    def node_of(self, fh: int) -> tuple[Node, _Handle]:
        h = self.handles.get(fh)
        if h is None:
            raise Fail(errno.EBADF)
        if h.node.removed:
            raise Fail(errno.EIO)
        return h.node, h

    # -- attributes ---------------------------------------------------------------------------

    def _attr(self, ino: int) -> bytes:
        sec, nsec = _split_ns(self.time)
        if ino == FUSE_ROOT_ID:
            return ATTR.pack(FUSE_ROOT_ID, 0, 0, sec, sec, sec, nsec, nsec, nsec,
                             stat.S_IFDIR | 0o755, 2, self.uid, self.gid, 0, PAGE_BYTES, 0)
        node = self.nodes.get(ino)
        if node is None:
            raise Fail(errno.ENOENT)
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
                raise Fail(errno.EIO)  # nothing before INIT
            fn = _SYNC_OPS.get(op)
            if fn is None:
                raise Fail(_REFUSED.get(op, errno.ENOSYS))
            return fn(self, req)
        except Fail as f:
            return reply_error(req.unique, f.err)

    def _init(self, req: Request) -> bytes:
        major, minor, max_readahead, flags, flags2 = unpack_body(INIT_IN, req.body, "INIT")
        if major != FUSE_KERNEL_VERSION or minor < MIN_KERNEL_MINOR:
            log.error("fuse: kernel protocol %d.%d unsupported (need 7.%d or later)",
                      major, minor, MIN_KERNEL_MINOR)
            raise Fail(errno.EPROTO)
        o = self.options
        want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS \
            | FUSE_MAX_PAGES
        if o.writeback_cache:
            want |= FUSE_WRITEBACK_CACHE
        got = flags & want
        if not got & FUSE_MAX_PAGES:
            raise Fail(errno.EPROTO)
        max_pages = max(o.max_write_bytes, o.max_read_bytes) // PAGE_BYTES
        self.uring_offered = bool(flags & FUSE_INIT_EXT and flags2 & FUSE_OVER_IO_URING_FLAGS2)
        uring = self.uring_offered and self.uring_ready and o.io_uring
        got2 = 0
        if uring:
            got |= FUSE_INIT_EXT
            got2 = FUSE_OVER_IO_URING_FLAGS2
        neg = Negotiated(min(minor, FUSE_KERNEL_MINOR_VERSION), got, o.max_write_bytes,
                         max_pages, o.max_background, uring)
        self.negotiated = neg
        congestion = max(1, o.max_background * 3 // 4)
        out = INIT_OUT.pack(FUSE_KERNEL_VERSION, neg.minor, max_readahead, got,
                            o.max_background, congestion, o.max_write_bytes, 1, max_pages, 0,
                            got2)
        return reply_ok(req.unique, out)

    def _lookup(self, req: Request) -> bytes:
        if req.nodeid != FUSE_ROOT_ID:
            raise Fail(errno.ENOTDIR)
        raw = bytes(req.body).split(b"\0", 1)[0]
        node = self.by_name.get(os.fsdecode(raw))
        if node is None:
            raise Fail(errno.ENOENT)
        return reply_ok(req.unique, self._entry_out(node.ino))

    def _getattr(self, req: Request) -> bytes:
        return reply_ok(req.unique, self._attr_out(req.nodeid))

    def _setattr(self, req: Request) -> bytes:
        f = unpack_body(SETATTR_IN, req.body, "SETATTR")
        valid, size = f[0], f[3]
        if req.nodeid != FUSE_ROOT_ID:
            node = self.nodes.get(req.nodeid)
            if node is None:
                raise Fail(errno.ENOENT)
            if valid & FATTR_SIZE and size != node.disk.size:
                raise Fail(errno.EPERM)  # a disk's size is fixed
        if valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise Fail(errno.EPERM)
        # Times (and FATTR_FH, lock owner, kill-suid) are accepted and ignored.
        return reply_ok(req.unique, self._attr_out(req.nodeid))

    def _open(self, req: Request) -> bytes:
        flags, _open_flags = unpack_body(OPEN_IN, req.body, "OPEN")
        if req.nodeid == FUSE_ROOT_ID:
            raise Fail(errno.EISDIR)
        node = self.nodes.get(req.nodeid)
        if node is None:
            raise Fail(errno.ENOENT)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and node.disk.readonly:
            raise Fail(errno.EROFS)
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
        fh = unpack_body(RELEASE_IN, req.body, "RELEASE")[0]
        h = self.handles.pop(fh, None)
        if h is not None:
            h.node.handles -= 1
        return reply_ok(req.unique)

    def _flush(self, req: Request) -> bytes:
        return reply_ok(req.unique)

    def _opendir(self, req: Request) -> bytes:
        if req.nodeid != FUSE_ROOT_ID:
            raise Fail(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles.add(fh)
        return reply_ok(req.unique, OPEN_OUT.pack(fh, 0, 0))

    def _releasedir(self, req: Request) -> bytes:
        self.dir_handles.discard(unpack_body(RELEASE_IN, req.body, "RELEASEDIR")[0])
        return reply_ok(req.unique)

    def _readdir(self, req: Request) -> bytes:
        fh, offset, size = unpack_body(READ_IN, req.body, "READDIR")[:3]
        if req.nodeid != FUSE_ROOT_ID or fh not in self.dir_handles:
            raise Fail(errno.EBADF)
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


__all__ = [
    "DATA_OPS",
    "FuseFs",
    "FuseOptions",
    "FuseProtocolError",
    "Request",
    "parse_request",
]
