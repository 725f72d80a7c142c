"""Layer: formats remote, storage.  The local cache of one remote base: a sparse data file
the size of the remote, and an index of the blocks it holds, checksummed with xxhash.

Theory of operation
-------------------
A cache lives in a folder of its own, named by a hash of the remote's identity (scheme, host
and port or socket, export or path), beneath the user's cache root, which must be a real
folder owned by the user that nobody else can write; every file in it is opened beneath the
root's fd with ``O_NOFOLLOW``.  Nothing in an image chooses a name here.

``data`` holds block *b* of the remote at offset ``b * block_size``; a block not fetched is a
hole.  ``index``:

- bytes 0..4095: the header, written once when the cache is made (in a temporary folder that
  is renamed into place, so no reader sees half of one): magic, version, block size, the
  remote's size and *validator* (NBD: its size; HTTP: size, ETag, Last-Modified), the URL,
  and an xxh3-64 of all of it;
- bytes 4096..4607: the state sector (session stamp, clean flag, xxh3-64), rewritten whole;
- from byte 8192: one 16-byte entry per block: the xxh3-64 of the block's bytes, the session
  stamp of its last use, and an xxh3-64 (low 32 bits) of the block number and those two
  fields.  An all-zero entry is a block not held; an entry whose check fails is treated as
  not held (a torn or foreign write never reads as data).

Crash safety: a block's entry is written only after its data is durable (``fdatasync`` of
``data``), so every entry that reaches the disk names bytes that reached it first; a crash
loses at most the blocks fetched since, which are fetched again.  A block is dropped the
other way round: its entry is zeroed and made durable before the hole is punched.

A changed remote: an overlay records only the URL of its base (as qemu's does), so the cache
is the one record of which version the overlays of that URL were written over.  When the
remote is seen to be another version (at open: its size or validator differs from the
header's; in use: an HTTP 412, a new connection with another validator), the cache is
*marked*: a ``changed`` file (``COWDRCC1``: magic, version, the time, the cached validator,
what was seen instead, the URL, an xxh3-64 of all of it) is written beside ``index`` as a
temporary file, made durable (``fsync``), renamed into place, and the folder made durable,
so it is either absent or whole.  Only then, and only by a sole user, are the cached blocks
discarded (entries zeroed and durable, then the data file emptied); the header stays.  A
marked cache is never used again: every open fails (ESTALE) whatever the remote says now —
even the old validator again, since an NBD export's size cannot tell two versions apart —
and a marker that cannot be read counts as one.  A crash before the rename leaves no marker
but the header, which the next open compares with the remote again.  Deleting the folder
(``cowd cache drop``: renamed out of the way first, then emptied) is what accepts the new
version.

Sharing: every process that uses the cache holds a shared ``flock`` on ``index``; dropping
or trimming the cache (eviction) takes it exclusively, so it never happens under another
user's feet (their remaps may point into ``data``).  Two users may fetch the same block: they
write the same bytes.  A user that misses a block looks at its entry on disk first (another
process may have fetched it).

Bounded: a cache has a byte budget.  At open, a sole user trims the cache to 7/8 of it, the
blocks least recently used (by session) first; while in use, a full cache stops keeping new
blocks (they are read through, :mod:`formats.remote.file`), so what it holds never exceeds
the budget.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import hashlib
import os
import stat
import struct
import time
from dataclasses import dataclass

import xxhash

from ..base import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

MAGIC = b"COWDRCA1"
VERSION = 1
HEADER_BYTES = 4096
STATE_OFFSET = 4096
STATE_BYTES = 512
ENTRIES_OFFSET = 8192
ENTRY = struct.Struct("<QII")  # data xxh3-64, last-use stamp, entry check
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, block_bits, remote size, block count
_STATE = struct.Struct("<QI")  # session stamp, clean

DEFAULT_BLOCK_BITS = 16  # 64 KiB: qcow2's default cluster, one NBD/HTTP request per miss
MIN_BLOCK_BITS = 12
MAX_BLOCK_BITS = 22
# Longest URL or validator kept in a header.
MAX_HEADER_STRING = 1024
# A remote larger than this is refused (the index would pass 512 MiB at 64 KiB blocks).
MAX_REMOTE_BYTES = 1 << 45
# Entries read or written in one system call.
ENTRY_CHUNK = 4096
# The change marker (see "A changed remote" above): its name in the folder and format.
MARKER = "changed"
MARKER_MAGIC = b"COWDRCC1"
_MARKER = struct.Struct("<8sIQ")  # magic, version, unix time seen
# Longest marker read (three strings of at most MAX_HEADER_STRING bytes and their fields).
MAX_MARKER_BYTES = 4 * MAX_HEADER_STRING


class CacheError(OSError):
    """The cache cannot be used (its folder is unsafe, it is in use, it is damaged)."""


@dataclass(frozen=True, slots=True)
class Header:
    block_bits: int
    remote_size: int
    validator: str
    url: str

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    @property
    def blocks(self) -> int:
        return -(-self.remote_size // self.block_size)

    def encode(self) -> bytes:
        url = self.url.encode()[:MAX_HEADER_STRING]
        val = self.validator.encode()[:MAX_HEADER_STRING]
        body = _HEADER.pack(MAGIC, VERSION, self.block_bits, self.remote_size, self.blocks) \
            + struct.pack("<H", len(url)) + url + struct.pack("<H", len(val)) + val
        return (body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))).ljust(
            HEADER_BYTES, b"\0")

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Header:
        try:
            magic, version, bits, size, blocks = _HEADER.unpack_from(raw)
            pos = _HEADER.size
            (n,) = struct.unpack_from("<H", raw, pos)
            url = raw[pos + 2:pos + 2 + n]
            pos += 2 + n
            (m,) = struct.unpack_from("<H", raw, pos)
            val = raw[pos + 2:pos + 2 + m]
            pos += 2 + m
            (check,) = struct.unpack_from("<Q", raw, pos)
        except struct.error:
            raise CacheError(errno_mod.EINVAL, f"{where}: cache header is short") from None
        if magic != MAGIC or version != VERSION:
            raise CacheError(errno_mod.EINVAL, f"{where}: not a cowd cache (magic={magic!r})")
        if check != xxhash.xxh3_64_intdigest(raw[:pos]):
            raise CacheError(errno_mod.EINVAL, f"{where}: cache header checksum mismatch")
        hdr = cls(bits, size, val.decode(errors="replace"), url.decode(errors="replace"))
        if not MIN_BLOCK_BITS <= bits <= MAX_BLOCK_BITS or size > MAX_REMOTE_BYTES or \
                blocks != hdr.blocks:
            raise CacheError(errno_mod.EINVAL, f"{where}: cache header out of range")
        return hdr


@dataclass(frozen=True, slots=True)
class ChangeMark:
    """What a cache's change marker records: the version cached (``was``: the header's
    validator), what the remote was seen as instead (``seen``: a validator, or why a read
    was refused), when (unix seconds; 0 when the marker is unreadable)."""

    was: str
    seen: str
    when: int
    url: str

    def encode(self) -> bytes:
        body = _MARKER.pack(MARKER_MAGIC, VERSION, self.when)
        for text in (self.was, self.seen, self.url):
            raw = text.encode()[:MAX_HEADER_STRING]
            body += struct.pack("<H", len(raw)) + raw
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))

    @classmethod
    def decode(cls, raw: bytes, was: str, url: str) -> ChangeMark:
        """A marker's bytes; damaged ones still mark the cache (``was`` and ``url``: the
        header's, for the message)."""
        try:
            magic, version, when = _MARKER.unpack_from(raw)
            pos = _MARKER.size
            texts = []
            for _ in range(3):
                (n,) = struct.unpack_from("<H", raw, pos)
                if pos + 2 + n > len(raw):
                    raise struct.error("short")
                texts.append(raw[pos + 2:pos + 2 + n].decode(errors="replace"))
                pos += 2 + n
            (check,) = struct.unpack_from("<Q", raw, pos)
        except struct.error:
            return cls(was, "an unreadable change marker (short)", 0, url)
        if magic != MARKER_MAGIC or version != VERSION or len(raw) != pos + 8 or \
                check != xxhash.xxh3_64_intdigest(raw[:pos]):
            return cls(was, "an unreadable change marker (damaged)", 0, url)
        return cls(texts[0], texts[1], when, texts[2])

    def describe(self, now: str | None = None) -> str:
        """One line: what changed (``now``: what the remote says at this open, if known)
        and how to accept the new version."""
        if now is not None and now != self.was:
            what = f"it was {self.was}, it is now {now}"
        else:  # (not known, or the old validator again: which proves nothing for NBD)
            when = time.strftime(" at %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.when)) \
                if self.when else ""
            what = f"it was {self.was}; seen since{when}: {self.seen}"
        return (f"the remote base changed since it was cached ({what}); its cache stays "
                "refused so the two versions are never mixed: to accept the new version, "
                f"detach its disks and run `cowd cache drop {self.url}`")


def read_mark(folder_fd: int, header: Header) -> ChangeMark | None:
    """The change marker of the cache folder ``folder_fd`` (None: there is none).  One that
    is not a regular file or cannot be read marks the cache all the same."""
    try:
        fd = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=folder_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        return ChangeMark(header.validator, f"an unreadable change marker ({e.strerror})", 0,
                          header.url)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ChangeMark(header.validator, "an unreadable change marker (not a file)", 0,
                              header.url)
        raw = os.pread(fd, MAX_MARKER_BYTES + 1, 0)
    except OSError as e:
        return ChangeMark(header.validator, f"an unreadable change marker ({e.strerror})", 0,
                          header.url)
    finally:
        os.close(fd)
    return ChangeMark.decode(raw, header.validator, header.url)


def _entry_check(block: int, digest: int, stamp: int) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack("<QQI", block, digest, stamp)) & 0xffffffff


def pack_entry(block: int, digest: int, stamp: int) -> bytes:
    return ENTRY.pack(digest, stamp, _entry_check(block, digest, stamp))


def block_digest(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data) or 1  # 0 would read as "not held"


def cache_key_dir(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def check_root(root: str) -> int:
    """Create (0700) and open the cache root; refuse one that is a symlink, not a folder,
    owned by another user, or writable by others.  Returns an O_PATH fd of it."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CacheError(e.errno or errno_mod.EIO,
                         f"{root}: cannot use as the remote-base cache folder: "
                         f"{e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise CacheError(errno_mod.EPERM, f"{root}: the remote-base cache folder must be "
                         "owned by you and writable by nobody else")
    return fd


class CacheFiles:
    """One remote base's cache folder, open: see the module docstring."""

    def __init__(self, root_fd: int, name: str, root: str):
        self.folder = os.path.join(root, name)
        self.name = name
        self._root_fd = root_fd
        self.data_fd = -1
        self.index_fd = -1
        self.header: Header | None = None
        self.present = bytearray()  # 1 per block held (this process's view)
        self.used = bytearray()  # 1 per block read in this session
        self.stamps: dict[int, int] = {}  # block -> stamp as loaded (for trimming)
        self.digests: dict[int, int] = {}  # block -> data digest (for verify)
        self.held_bytes = 0
        self.stamp = 1
        self.exclusive = False

    # ---- opening -----------------------------------------------------------------------

    def open(self, want: Header, budget_bytes: int | None) -> ChangeMark | None:
        """Open (or make) the cache for ``want``.  Returns None, or, when the cache was made
        for another version of the remote (another size or validator) or is marked changed,
        its :class:`ChangeMark`: the cache must not be used.  A change seen here is marked
        (durably) and, when no one else uses the cache, its blocks are discarded."""
        dfd = self._open_folder(want)
        try:
            self.index_fd = os.open("index", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    dir_fd=dfd)
            self.data_fd = os.open("data", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   dir_fd=dfd)
            for fd in (self.index_fd, self.data_fd):
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise CacheError(errno_mod.EINVAL, f"{self.folder}: not a regular file")
            try:
                fcntl.flock(self.index_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.exclusive = True
            except BlockingIOError:
                fcntl.flock(self.index_fd, fcntl.LOCK_SH)
            hdr = Header.decode(os.pread(self.index_fd, HEADER_BYTES, 0), self.folder)
            # Read under the lock: a marker written by a user before us is seen.
            mark = read_mark(dfd, hdr)
        finally:
            os.close(dfd)
        marked = mark is not None
        if mark is None and (hdr.remote_size, hdr.validator) != (want.remote_size,
                                                                want.validator):
            mark, marked = self.mark_changed(hdr, want.validator)
        if mark is not None:
            if self.exclusive and marked:  # only once the marker is durable
                self._discard(hdr)
            return mark
        self.header = hdr
        self._load()
        if self.exclusive and budget_bytes is not None:
            self.trim(budget_bytes - budget_bytes // 8)
        self._write_state(clean=False)
        if self.exclusive:
            fcntl.flock(self.index_fd, fcntl.LOCK_SH)  # others may join from now on
            self.exclusive = False
        return None

    def mark_changed(self, hdr: Header, seen: str) -> tuple[ChangeMark, bool]:
        """Mark the cache changed (see the module docstring: written whole and durable, or
        not at all; a marker already there is kept).  Returns the mark and whether it is
        on disk (when it could not be written, the header still tells the next open)."""
        mark = ChangeMark(hdr.validator, seen, int(time.time()), hdr.url)
        try:
            dfd = os.open(self.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC, dir_fd=self._root_fd)
        except OSError:
            return mark, False
        try:
            old = read_mark(dfd, hdr)
            if old is not None:
                return old, True
            tmp = f".{MARKER}.{os.getpid()}.{time.monotonic_ns()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                try:
                    os.write(fd, mark.encode())  # (a few hundred bytes: one write)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, MARKER, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.fsync(dfd)
            return mark, True
        except OSError:
            return mark, False
        finally:
            os.close(dfd)

    def _discard(self, hdr: Header) -> None:
        """Free a marked cache's blocks (sole user; the marker is durable, so nothing reads
        them again, but the module's order holds all the same: entries first)."""
        try:
            os.ftruncate(self.index_fd, ENTRIES_OFFSET)
            os.ftruncate(self.index_fd, ENTRIES_OFFSET + hdr.blocks * ENTRY.size)
            os.fdatasync(self.index_fd)
            os.ftruncate(self.data_fd, 0)
            os.ftruncate(self.data_fd, hdr.remote_size)
        except OSError:
            pass  # space only: the marker already refuses the cache

    def _open_folder(self, want: Header) -> int:
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.name, flags, dir_fd=self._root_fd)
        except FileNotFoundError:
            pass
        tmp = f".{self.name}.{os.getpid()}.tmp"
        os.mkdir(tmp, 0o700, dir_fd=self._root_fd)
        tfd = os.open(tmp, flags, dir_fd=self._root_fd)
        try:
            ifd = os.open("index", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=tfd)
            try:
                os.pwrite(ifd, want.encode(), 0)
                os.ftruncate(ifd, ENTRIES_OFFSET + want.blocks * ENTRY.size)
                os.fsync(ifd)
            finally:
                os.close(ifd)
            dfd = os.open("data", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=tfd)
            try:
                os.ftruncate(dfd, want.remote_size)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(tfd)
        try:
            os.rename(tmp, self.name, src_dir_fd=self._root_fd, dst_dir_fd=self._root_fd)
        except OSError:  # another process made it first: use theirs
            remove_folder(self._root_fd, tmp)
        return os.open(self.name, flags, dir_fd=self._root_fd)

    def _load(self) -> None:
        hdr = self.header
        assert hdr is not None
        n = hdr.blocks
        self.present = bytearray(n)
        self.used = bytearray(n)
        raw = os.pread(self.index_fd, STATE_BYTES, STATE_OFFSET)
        stamp, _clean = _STATE.unpack_from(raw)
        (check,) = struct.unpack_from("<Q", raw, _STATE.size)
        self.stamp = (stamp + 1 if check == xxhash.xxh3_64_intdigest(raw[:_STATE.size])
                      else 1)
        bs = hdr.block_size
        for first in range(0, n, ENTRY_CHUNK):
            count = min(ENTRY_CHUNK, n - first)
            raw = os.pread(self.index_fd, count * ENTRY.size, ENTRIES_OFFSET + first * ENTRY.size)
            if raw.count(0) == len(raw):
                continue
            for i, (digest, stamp, check) in enumerate(ENTRY.iter_unpack(raw.ljust(
                    count * ENTRY.size, b"\0"))):
                if digest == 0:
                    continue
                b = first + i
                if check != _entry_check(b, digest, stamp):
                    continue  # torn or foreign: not held
                self.present[b] = 1
                self.stamps[b] = stamp
                self.digests[b] = digest
                self.held_bytes += min(bs, hdr.remote_size - b * bs)

    def _write_state(self, clean: bool) -> None:
        body = _STATE.pack(self.stamp, int(clean))
        raw = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        os.pwrite(self.index_fd, raw.ljust(STATE_BYTES, b"\0"), STATE_OFFSET)

    # ---- blocks ------------------------------------------------------------------------

    def block_bytes(self, block: int) -> int:
        hdr = self.header
        assert hdr is not None
        return min(hdr.block_size, hdr.remote_size - block * hdr.block_size)

    def on_disk(self, block: int) -> bool:
        """Has another process stored this block since we loaded the index?"""
        raw = os.pread(self.index_fd, ENTRY.size, ENTRIES_OFFSET + block * ENTRY.size)
        if len(raw) != ENTRY.size:
            return False
        digest, stamp, check = ENTRY.unpack(raw)
        return digest != 0 and check == _entry_check(block, digest, stamp)

    def store(self, first: int, data: bytes) -> None:
        """Write blocks ``first``.. (``data`` is whole blocks, the last one possibly short:
        the end of the remote), data durable before their entries (crash-safety rule)."""
        hdr = self.header
        assert hdr is not None
        bs = hdr.block_size
        os.pwrite(self.data_fd, data, first * bs)
        os.fdatasync(self.data_fd)
        entries = bytearray()
        for i in range(0, len(data), bs):
            b = first + i // bs
            digest = block_digest(memoryview(data)[i:i + bs])
            entries += pack_entry(b, digest, self.stamp)
            self.digests[b] = digest
        os.pwrite(self.index_fd, entries, ENTRIES_OFFSET + first * ENTRY.size)
        for i in range(0, len(data), bs):
            b = first + i // bs
            if not self.present[b]:
                self.present[b] = 1
                self.held_bytes += self.block_bytes(b)

    def adopt(self, block: int) -> None:
        """Mark a block another process stored as held here too."""
        if not self.present[block]:
            self.present[block] = 1
            self.held_bytes += self.block_bytes(block)

    def trim(self, target_bytes: int) -> int:
        """Drop least recently used blocks until at most ``target_bytes`` are held (only
        while no one else uses the cache).  Returns the bytes dropped."""
        if not self.exclusive or self.held_bytes <= target_bytes:
            return 0
        order = sorted((self.stamps.get(b, 0), b) for b in range(len(self.present))
                       if self.present[b])
        victims = []
        dropped = 0
        for _stamp, b in order:
            if self.held_bytes - dropped <= target_bytes:
                break
            victims.append(b)
            dropped += self.block_bytes(b)
        self.drop_blocks(victims)
        return dropped

    def drop_blocks(self, blocks: list[int]) -> None:
        """Forget ``blocks``: entries zeroed and durable first, then the holes punched."""
        hdr = self.header
        assert hdr is not None
        zero = bytes(ENTRY.size)
        for b in blocks:
            os.pwrite(self.index_fd, zero, ENTRIES_OFFSET + b * ENTRY.size)
        os.fdatasync(self.index_fd)
        for b in blocks:
            fallocate(self.data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      b * hdr.block_size, self.block_bytes(b))
            if self.present[b]:
                self.present[b] = 0
                self.held_bytes -= self.block_bytes(b)
            self.stamps.pop(b, None)
            self.digests.pop(b, None)

    def verify(self) -> list[int]:
        """Blocks whose bytes in ``data`` no longer match their checksum (dropped when the
        cache is ours alone)."""
        bad = []
        for b in range(len(self.present)):
            if not self.present[b]:
                continue
            hdr = self.header
            assert hdr is not None
            data = os.pread(self.data_fd, self.block_bytes(b), b * hdr.block_size)
            if block_digest(data) != self.digests.get(b):
                bad.append(b)
        if bad and self.exclusive:
            self.drop_blocks(bad)
        return bad

    # ---- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Record this session's use of blocks (their stamps, for trimming) and that the
        cache was closed cleanly."""
        if self.index_fd < 0:
            return
        try:
            if self.header is not None:
                self._save_stamps()
                os.fdatasync(self.index_fd)
                self._write_state(clean=True)
        except OSError:
            pass  # best effort: stamps only order eviction
        finally:
            os.close(self.index_fd)
            if self.data_fd >= 0:
                os.close(self.data_fd)
            self.index_fd = self.data_fd = -1

    def _save_stamps(self) -> None:
        used = self.used
        b = used.find(1)
        while b >= 0:
            if self.present[b] and b in self.digests:
                os.pwrite(self.index_fd, pack_entry(b, self.digests[b], self.stamp),
                          ENTRIES_OFFSET + b * ENTRY.size)
            b = used.find(1, b + 1)


def remove_folder(root_fd: int, name: str) -> None:
    """Delete the cache folder ``name`` beneath the root, its change marker with it (which
    is how a changed remote's new version is accepted); the caller holds its index's lock
    exclusively.  The folder is first renamed to a hidden name, so a crash never leaves a
    folder with its marker gone but its header kept, or the other way round; then it is
    emptied and removed."""
    gone = f".{name}.{os.getpid()}.{time.monotonic_ns()}.drop"
    try:
        os.rename(name, gone, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except FileNotFoundError:
        return
    dfd = os.open(gone, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=root_fd)
    try:
        for entry in os.listdir(dfd):
            os.unlink(entry, dir_fd=dfd)
    finally:
        os.close(dfd)
    os.rmdir(gone, dir_fd=root_fd)


__all__ = ["DEFAULT_BLOCK_BITS", "CacheError", "CacheFiles", "ChangeMark", "Header",
           "block_digest", "cache_key_dir", "check_root", "read_mark", "remove_folder"]
