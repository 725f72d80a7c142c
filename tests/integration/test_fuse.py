"""cowd/frontends/fuse/: the FUSE frontend, against a bytearray model and the kernel's own clients.

Two halves.  The protocol half (:class:`~cowd.frontends.fuse.protocol.FuseFs`,
:func:`~cowd.frontends.fuse.protocol.parse_request`) is fed request bytes built from
linux/fuse.h's layouts, with no mount.  The mounted half serves a real :class:`cowd.disk.Disk`
(a qcow2 overlay made by qemu-img over a random raw base) through the kernel: plain file I/O
from a worker thread (pread, pwrite, fsync, fallocate punch-hole and zero-range, lseek) is
compared with a bytearray model; then the kernel's loop driver is put on the file, mkfs.ext4
and a mounted ext4 write a tree, and after everything is torn down ``qemu-img check`` must be
clean, the base's sha256 unchanged, the overlay's bytes (``qemu-img convert``) equal to the
model, and the tree readable from the overlay by debugfs.

Nothing in the trio thread may touch the mount (it is the thread that answers), so all file
access goes through ``trio.to_thread.run_sync``.  The mounted tests need root, /dev/fuse and
loop devices, and skip with the concrete reason when they are missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import shutil
import stat
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from cowd.disk import Disk, ImagePool
from cowd.errors import CommandFailed, UsageError
from cowd.frontends.fuse import mount as M
from cowd.frontends.fuse import protocol as F
from cowd.frontends.fuse import server as S
from cowd.frontends.fuse.protocol import FuseFs, FuseOptions, FuseProtocolError
from cowd.frontends.fuse.server import FuseFrontend, mount_fuse
from cowd.remap import RemapCache
from tests.support.host import evict_pages, read_concurrently
from tests.support.peers import need, qemu_check, qemu_img, qemu_raw, run, sha256
from tests.support.trees import make_tree, same_tree

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB

# ---- protocol half: request bytes in, reply bytes out --------------------------------------


@dataclass
class FakeDisk:
    """What FuseFs reads of a Disk (it never calls its I/O methods)."""

    size: int = 8 * MiB
    readonly: bool = False
    cluster_size: int = 64 * KiB
    path: str = "fake.qcow2"


def req(opcode: int, body: bytes = b"", *, nodeid: int = 1, unique: int = 7) -> memoryview:
    data = F.IN_HEADER.pack(F.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 1,
                            0, 0) + body
    return memoryview(data)


def init_body(minor: int = 45, flags: int = 0x73FFFFFB) -> bytes:
    return F.INIT_IN.pack(7, minor, 128 * KiB, flags, 0) + bytes(44)


def answer(fs: FuseFs, data: memoryview) -> tuple[int, int, bytes]:
    """(error, unique, payload) of the reply; the header's length must match."""
    out = fs.handle(F.parse_request(data))
    assert out is not None
    length, err, unique = F.OUT_HEADER.unpack_from(out)
    assert length == len(out)
    return -err, unique, out[F.OUT_HEADER.size:]


def make_fs(**disks: FakeDisk) -> FuseFs:
    fs = FuseFs(FuseOptions(), uid=0, gid=0, now=1000.5)
    for name, d in disks.items():
        fs.add(name, cast(Disk, d))
    err, _, _ = answer(fs, req(F.FUSE_INIT, init_body()))
    assert err == 0
    return fs


def test_init_negotiates_only_offered_flags_and_our_sizes() -> None:
    fs = FuseFs(FuseOptions(max_background=40), uid=0, gid=0)
    offered = F.FUSE_ASYNC_READ | F.FUSE_MAX_PAGES | F.FUSE_ASYNC_DIO | F.FUSE_WRITEBACK_CACHE
    err, unique, out = answer(fs, req(F.FUSE_INIT, init_body(flags=offered), unique=99))
    assert (err, unique) == (0, 99)
    assert len(out) == 64  # sizeof(struct fuse_init_out)
    major, minor, readahead, flags, bg, cong, max_write, gran, pages, _align, flags2 = \
        F.INIT_OUT.unpack(out)
    assert (major, minor, readahead) == (7, F.FUSE_KERNEL_MINOR_VERSION, 128 * KiB)
    assert flags & ~offered == 0  # never a flag the kernel did not offer
    assert flags & F.FUSE_MAX_PAGES and not flags & F.FUSE_WRITEBACK_CACHE
    assert (bg, cong, max_write, gran, pages, flags2) == (40, 30, 1 * MiB, 1, 256, 0)
    # An older kernel keeps its own minor.
    fs2 = FuseFs(FuseOptions(), uid=0, gid=0)
    _, _, out2 = answer(fs2, req(F.FUSE_INIT, init_body(minor=31)))
    assert F.INIT_OUT.unpack(out2)[1] == 31


def test_init_refuses_old_kernels_and_nothing_is_served_before_init() -> None:
    fs = FuseFs(FuseOptions(), uid=0, gid=0)
    fs.add("a", cast(Disk, FakeDisk()))
    assert answer(fs, req(F.FUSE_GETATTR, bytes(16)))[0] == errno.EIO
    assert answer(fs, req(F.FUSE_INIT, init_body(minor=27)))[0] == errno.EPROTO
    assert fs.negotiated is None
    no_max_pages = F.FUSE_ASYNC_READ
    assert answer(fs, req(F.FUSE_INIT, init_body(flags=no_max_pages)))[0] == errno.EPROTO
    assert answer(fs, req(F.FUSE_INIT, F.INIT_IN.pack(8, 0, 0, 0, 0) + bytes(44)))[0] \
        == errno.EPROTO


def _attr(payload: bytes, offset: int) -> tuple[int, ...]:
    return F.ATTR.unpack_from(payload, offset)


def test_lookup_getattr_setattr_open() -> None:
    fs = make_fs(**{"vm1.qcow2": FakeDisk(size=3 * MiB + 512),
                    "ro.vhd": FakeDisk(size=MiB, readonly=True)})
    err, _, out = answer(fs, req(F.FUSE_LOOKUP, b"vm1.qcow2\0"))
    assert err == 0 and len(out) == F.ENTRY_OUT.size
    ino = struct.unpack_from("<Q", out)[0]
    a = _attr(out, 40)
    assert a[0] == ino == 2 and a[1] == 3 * MiB + 512
    assert a[9] == stat.S_IFREG | 0o600 and (a[11], a[12]) == (0, 0)
    assert answer(fs, req(F.FUSE_LOOKUP, b"nope\0"))[0] == errno.ENOENT
    assert answer(fs, req(F.FUSE_LOOKUP, b"x\0", nodeid=2))[0] == errno.ENOTDIR

    err, _, out = answer(fs, req(F.FUSE_GETATTR, bytes(16), nodeid=3))
    assert err == 0 and _attr(out, 16)[9] == stat.S_IFREG | 0o400
    err, _, out = answer(fs, req(F.FUSE_GETATTR, bytes(16), nodeid=1))
    assert err == 0 and stat.S_ISDIR(_attr(out, 16)[9])
    assert answer(fs, req(F.FUSE_GETATTR, bytes(16), nodeid=99))[0] == errno.ENOENT

    def setattr(valid: int, size: int = 0, nodeid: int = 2) -> int:
        body = F.SETATTR_IN.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 5, 5, 0)
        return answer(fs, req(F.FUSE_SETATTR, body, nodeid=nodeid))[0]

    assert setattr(F.FATTR_SIZE, 0) == errno.EPERM  # truncate
    assert setattr(F.FATTR_SIZE, 4 * MiB) == errno.EPERM  # grow
    assert setattr(F.FATTR_SIZE, 3 * MiB + 512) == 0  # no change is fine
    assert setattr(F.FATTR_MODE) == errno.EPERM
    assert setattr(F.FATTR_UID | F.FATTR_GID) == errno.EPERM
    assert setattr(1 << 4 | 1 << 5) == 0  # atime/mtime: accepted, ignored

    rdwr = F.OPEN_IN.pack(os.O_RDWR, 0)
    err, _, out = answer(fs, req(F.FUSE_OPEN, rdwr, nodeid=2))
    fh, oflags, _ = F.OPEN_OUT.unpack(out)
    assert err == 0 and oflags & F.FOPEN_DIRECT_IO and oflags & F.FOPEN_PARALLEL_DIRECT_WRITES
    assert fs.nodes[2].handles == 1
    assert answer(fs, req(F.FUSE_OPEN, rdwr, nodeid=3))[0] == errno.EROFS
    assert answer(fs, req(F.FUSE_OPEN, F.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=3))[0] == 0
    assert answer(fs, req(F.FUSE_OPEN, rdwr, nodeid=1))[0] == errno.EISDIR
    with pytest.raises((UsageError, CommandFailed), match="still open"):
        fs.remove("vm1.qcow2")
    assert answer(fs, req(F.FUSE_RELEASE, F.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=2))[0] == 0
    assert fs.nodes[2].handles == 0
    fs.remove("vm1.qcow2")
    assert answer(fs, req(F.FUSE_LOOKUP, b"vm1.qcow2\0"))[0] == errno.ENOENT


def test_page_cache_mode_open_flags() -> None:
    fs = FuseFs(FuseOptions(direct_io=False), uid=0, gid=0)
    fs.add("d", cast(Disk, FakeDisk()))
    answer(fs, req(F.FUSE_INIT, init_body()))
    _, _, out = answer(fs, req(F.FUSE_OPEN, F.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=2))
    oflags = F.OPEN_OUT.unpack(out)[1]
    assert oflags & F.FOPEN_KEEP_CACHE and not oflags & F.FOPEN_DIRECT_IO


def readdir(fs: FuseFs, fh: int, offset: int, size: int = 4096) -> list[tuple[int, int, str]]:
    body = F.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
    err, _, out = answer(fs, req(F.FUSE_READDIR, body))
    assert err == 0 and len(out) <= size
    ents = []
    pos = 0
    while pos < len(out):
        ino, off, namelen, _kind = F.DIRENT.unpack_from(out, pos)
        name = out[pos + F.DIRENT.size:pos + F.DIRENT.size + namelen].decode()
        ents.append((ino, off, name))
        pos += (F.DIRENT.size + namelen + 7) // 8 * 8
    assert pos == len(out)
    return ents


def test_readdir_cookies_survive_disks_coming_and_going() -> None:
    fs = make_fs(a=FakeDisk(), b=FakeDisk(), c=FakeDisk())
    _, _, out = answer(fs, req(F.FUSE_OPENDIR, F.OPEN_IN.pack(0, 0)))
    fh = F.OPEN_OUT.unpack(out)[0]
    full = readdir(fs, fh, 0)
    assert [e[2] for e in full] == [".", "..", "a", "b", "c"]
    # Small buffers: one entry at a time, resuming from each entry's cookie.
    names, off = [], 0
    while True:
        got = readdir(fs, fh, off, size=32)
        if not got:
            break
        assert len(got) == 1
        names.append(got[0][2])
        off = got[0][1]
        if got[0][2] == "a":
            fs.remove("a")  # gone behind the cursor: nothing is repeated or skipped
            fs.add("d", cast(Disk, FakeDisk()))  # added ahead of it: listed
    assert names == [".", "..", "a", "b", "c", "d"]
    assert answer(fs, req(F.FUSE_READDIR, F.READ_IN.pack(fh + 100, 0, 4096, 0, 0, 0, 0)))[0] \
        == errno.EBADF


def test_refusals_and_unknown_requests() -> None:
    fs = make_fs(a=FakeDisk())
    for op in (F.FUSE_CREATE, F.FUSE_MKDIR, F.FUSE_UNLINK, F.FUSE_RENAME, F.FUSE_SYMLINK,
               F.FUSE_LINK, F.FUSE_MKNOD, F.FUSE_RMDIR):
        assert answer(fs, req(op, bytes(64)))[0] == errno.EPERM
    for op in (F.FUSE_GETXATTR, F.FUSE_LISTXATTR, F.FUSE_SETLK, F.FUSE_IOCTL, F.FUSE_BMAP,
               F.FUSE_COPY_FILE_RANGE, 52, 4000):
        assert answer(fs, req(op, bytes(64)))[0] == errno.ENOSYS
    for op in (F.FUSE_FORGET, F.FUSE_BATCH_FORGET, F.FUSE_INTERRUPT):
        assert fs.handle(F.parse_request(req(op, bytes(16)))) is None
    _, _, out = answer(fs, req(F.FUSE_STATFS))
    blocks, bfree, bavail, files, _ffree, bsize, namelen, _frsize, _pad = F.KSTATFS.unpack(out)
    assert (blocks * bsize, bfree, bavail, files, namelen) == (8 * MiB, 0, 0, 2, 255)


def test_names_are_checked() -> None:
    fs = FuseFs(FuseOptions(), uid=0, gid=0)
    for bad in ("", ".", "..", "a/b", "x\0y", "n" * 256):
        with pytest.raises((UsageError, CommandFailed)):
            fs.add(bad, cast(Disk, FakeDisk()))
    fs.add("ok", cast(Disk, FakeDisk()))
    with pytest.raises((UsageError, CommandFailed), match="already"):
        fs.add("ok", cast(Disk, FakeDisk()))
    with pytest.raises((UsageError, CommandFailed), match="no such disk"):
        fs.remove("missing")


def test_options_are_bounded() -> None:
    for bad in ({"max_write_bytes": 2 * MiB}, {"max_read_bytes": 1000},
                {"max_background": 0}, {"max_workers": 0}):
        with pytest.raises((UsageError, CommandFailed)):
            FuseOptions(**bad).check()  # type: ignore[arg-type]


def test_malformed_requests() -> None:
    fs = make_fs(a=FakeDisk())
    with pytest.raises(FuseProtocolError, match="shorter than its header"):
        F.parse_request(memoryview(bytes(39)))
    bad_len = bytearray(req(F.FUSE_GETATTR, bytes(16)))
    struct.pack_into("<I", bad_len, 0, 1000)
    with pytest.raises(FuseProtocolError, match="does not match"):
        F.parse_request(memoryview(bytes(bad_len)))
    for op in (F.FUSE_SETATTR, F.FUSE_OPEN, F.FUSE_INIT, F.FUSE_READDIR, F.FUSE_RELEASE):
        with pytest.raises(FuseProtocolError, match="too short"):
            fs.handle(F.parse_request(req(op, b"\1\2\3")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 4), st.binary(max_size=120)),
                max_size=30))
def test_any_request_gets_a_well_formed_answer_or_a_protocol_error(
        reqs: list[tuple[int, int, bytes]]) -> None:
    fs = make_fs(a=FakeDisk(), b=FakeDisk(readonly=True))
    for opcode, nodeid, body in reqs:
        if opcode in F.DATA_OPS:
            continue  # served by the adapter against a real Disk (the mounted tests)
        try:
            out = fs.handle(F.parse_request(req(opcode, body, nodeid=nodeid)))
        except FuseProtocolError:
            continue
        if out is None:
            assert opcode in (F.FUSE_FORGET, F.FUSE_BATCH_FORGET, F.FUSE_INTERRUPT)
            continue
        length, err, unique = F.OUT_HEADER.unpack_from(out)
        assert length == len(out) and unique == 7 and err <= 0
        assert err < 0 or opcode in (F.FUSE_INIT, F.FUSE_LOOKUP, F.FUSE_GETATTR,
                                     F.FUSE_SETATTR, F.FUSE_OPEN, F.FUSE_RELEASE,
                                     F.FUSE_FLUSH, F.FUSE_OPENDIR, F.FUSE_READDIR,
                                     F.FUSE_RELEASEDIR, F.FUSE_FSYNCDIR, F.FUSE_STATFS,
                                     F.FUSE_DESTROY)
    # Handle counts never go negative, whatever was released.
    assert all(n.handles >= 0 for n in fs.nodes.values())


# ---- mounted half ------------------------------------------------------------------------------

def mount_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, loop devices)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse unusable: {e.strerror}"
    return None


def loop_problem() -> str | None:
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop driver missing)"
    for tool in ("losetup", "mkfs.ext4", "debugfs", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (util-linux/e2fsprogs; make check installs it)"
    return None


needs_mount = pytest.mark.skipif(mount_problem() is not None,
                                 reason=mount_problem() or "")
pytestmark = [pytest.mark.timeout(120)]


def qcow2_writable() -> bool:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "probe.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", p, "1M")
        try:
            img = formats.open_one(str(p), True)
        except NotImplementedError:
            return False
        ok = img.format_name == "qcow2" and img.writable
        img.close()
        return ok


@dataclass
class Images:
    base: Path
    top: Path
    fmt: str
    base_sha: str


def make_images(tmp: Path, size: int, seed: int) -> Images:
    """A random raw base and a qcow2 overlay on it (a raw copy while qcow2 cannot write)."""
    need("qemu-img")
    base = tmp / "base.raw"
    base.write_bytes(random.Random(seed).randbytes(size))
    if qcow2_writable():
        top = tmp / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", top)
        fmt = "qcow2"
    else:
        top = tmp / "top.raw"
        shutil.copyfile(base, top)
        fmt = "raw"
    return Images(base, top, fmt, sha256(base))


async def thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


@asynccontextmanager
async def served(mnt: Path, disks: dict[str, Disk], options: FuseOptions | None = None
                 ) -> AsyncIterator[FuseFrontend]:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        yield await mount_fuse(stack, nursery, str(mnt), disks, options)


def is_mounted(mnt: Path) -> bool:
    return any(t.startswith("fuse") for t, _ in M.mounts_at(str(mnt)))


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


PUNCH = F.FALLOC_FL_PUNCH_HOLE | F.FALLOC_FL_KEEP_SIZE
ZERO = F.FALLOC_FL_ZERO_RANGE | F.FALLOC_FL_KEEP_SIZE

SIZE = 4 * MiB
op_st = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 300 * KiB)),
    st.tuples(st.just("read"), st.integers(0, SIZE + 10), st.integers(0, 300 * KiB)),
    st.tuples(st.just("punch"), st.integers(0, SIZE - 1), st.integers(1, 400 * KiB)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 400 * KiB)),
    st.tuples(st.just("fsync"), st.just(0), st.just(0)),
)


def file_io_property(path: str, model: bytearray, seed: int) -> int:
    """Hypothesis-driven pread/pwrite/fallocate/fsync on the mounted file vs ``model``
    (one file for every example: the model carries over).  Returns examples run."""
    rng = random.Random(seed)
    examples = 0

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(op_st, min_size=1, max_size=12))
    def prop(ops: list[tuple[str, int, int]]) -> None:
        nonlocal examples
        examples += 1
        fd = os.open(path, os.O_RDWR)
        try:
            for op, off, n in ops:
                if op == "write":
                    n = min(n, SIZE - off)
                    data = rng.randbytes(n)
                    assert os.pwrite(fd, data, off) == n
                    model[off:off + n] = data
                elif op == "read":
                    assert os.pread(fd, n, off) == bytes(model[off:off + n])
                elif op in ("punch", "zero"):
                    fallocate(fd, PUNCH if op == "punch" else ZERO, off, n)
                    end = min(SIZE, off + n)
                    model[off:end] = bytes(end - off)
                else:
                    os.fsync(fd)
            # Every op's effect, checked at the end too (a read at an odd offset).
            o = rng.randrange(SIZE)
            assert os.pread(fd, 200 * KiB, o) == bytes(model[o:o + 200 * KiB])
        finally:
            os.close(fd)

    prop()
    return examples


def file_io_edges(path: str, model: bytearray, writeback: bool) -> None:
    """Errors and seek semantics; ``model`` is updated for whatever changes.  With the
    writeback cache the kernel owns the file size and takes a write past the end into its
    cache (it fails at write-back), so that check is left out there."""
    st_ = os.stat(path)
    assert stat.S_IMODE(st_.st_mode) == 0o600 and stat.S_ISREG(st_.st_mode)
    assert (st_.st_size, st_.st_uid, st_.st_gid) == (SIZE, 0, 0)
    fd = os.open(path, os.O_RDWR)
    try:
        if not writeback:
            # Crossing the end: what fits is written, the count is short (a block device's
            # answer); starting at the end: ENOSPC.
            assert os.pwrite(fd, b"x" * 10, SIZE - 5) == 5
            model[SIZE - 5:] = b"x" * 5
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 10, SIZE)
            assert e.value.errno == errno.ENOSPC
        assert bytes(model[SIZE - 5:]) == os.pread(fd, 100, SIZE - 5)  # short read at the end
        assert os.pread(fd, 100, SIZE) == b""
        for size in (0, SIZE - 1, SIZE + 1):
            with pytest.raises(OSError) as e:
                os.ftruncate(fd, size)
            assert e.value.errno == errno.EPERM
        os.ftruncate(fd, SIZE)  # the size it has: not a change
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 0, 4096)
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            fallocate(fd, F.FALLOC_FL_ZERO_RANGE, SIZE - 4096, 8192)  # would grow the file
        assert e.value.errno == errno.ENOSPC
        # Punch and zero past the end are clipped (KEEP_SIZE).
        fallocate(fd, PUNCH, SIZE - 4096, 1 * MiB)
        model[SIZE - 4096:] = bytes(4096)
        assert os.fstat(fd).st_size == SIZE
        with pytest.raises(OSError) as e:
            os.fchmod(fd, 0o644)
        assert e.value.errno == errno.EPERM
        # SEEK_DATA / SEEK_HOLE: a whole punched cluster is a hole in an otherwise written
        # region (qcow2's 64 KiB clusters; the range is written first so it is data).
        region = 2 * MiB
        data = random.Random(5).randbytes(256 * KiB)
        os.pwrite(fd, data, region)
        model[region:region + len(data)] = data
        fallocate(fd, PUNCH, region + 64 * KiB, 64 * KiB)
        model[region + 64 * KiB:region + 128 * KiB] = bytes(64 * KiB)
        assert os.lseek(fd, region, os.SEEK_HOLE) == region + 64 * KiB
        assert os.lseek(fd, region + 64 * KiB, os.SEEK_DATA) == region + 128 * KiB
        with pytest.raises(OSError) as e:
            os.lseek(fd, SIZE, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, SIZE, 0) == bytes(model)
    finally:
        os.close(fd)
    # The namespace cannot change.
    d = os.path.dirname(path)
    for call in (lambda: os.open(os.path.join(d, "new"), os.O_CREAT | os.O_RDWR, 0o600),
                 lambda: os.unlink(path), lambda: os.rename(path, path + ".x"),
                 lambda: os.mkdir(os.path.join(d, "sub"))):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EPERM
    sv = os.statvfs(d)
    assert sv.f_blocks * sv.f_frsize >= SIZE and sv.f_bfree == 0


@needs_mount
@pytest.mark.parametrize("options", [
    FuseOptions(),
    FuseOptions(direct_io=False),
    FuseOptions(direct_io=False, writeback_cache=True),
], ids=["direct-io", "page-cache", "page-cache+writeback"])
async def test_file_io_against_model(tmp_path: Path, options: FuseOptions) -> None:
    imgs = make_images(tmp_path, SIZE, seed=11)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    model = bytearray(imgs.base.read_bytes())
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(90):
            async with served(mnt, {"vm.img": disk}, options) as fe:
                path = fe.path_of("vm.img")
                assert await thread(os.listdir, str(mnt)) == ["vm.img"]
                await thread(file_io_edges, path, model, options.writeback_cache)
                examples = await thread(file_io_property, path, model, 3)
                assert examples >= 10
                assert fe.counters["fallocates"] > 0 and fe.counters["fsyncs"] > 0
                # Every fsync became a Disk.flush (durability itself needs a crash to see).
                assert disk.stats()["ops"]["flushes"] >= fe.counters["fsyncs"]
            assert not is_mounted(mnt)
    finally:
        await disk.close()
    assert qemu_raw(imgs.top, tmp_path, fmt=imgs.fmt) == bytes(model)
    if imgs.fmt == "qcow2":
        qemu_check(imgs.top)
    assert sha256(imgs.base) == imgs.base_sha


@needs_mount
async def test_cold_small_reads_are_batched_and_right(tmp_path: Path) -> None:
    """Small reads whose data is not in the page cache are put aside, advised, and answered
    at the batch's end (session.py, "Batches of small reads"); larger ones, reads past the
    end and reads of written clusters take their usual paths.  Every byte against a model."""
    imgs = make_images(tmp_path, SIZE, seed=13)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    model = bytearray(imgs.base.read_bytes())
    rng = random.Random(3)
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(90):
            async with served(mnt, {"vm.img": disk}) as fe:
                path = fe.path_of("vm.img")
                # Some clusters written (so reads span the overlay and the base).
                fd = await thread(os.open, path, os.O_RDWR)
                try:
                    for _ in range(8):
                        off = rng.randrange(SIZE // 4096) * 4096
                        data = rng.randbytes(12 * KiB)
                        await thread(os.pwrite, fd, data, off)
                        model[off:off + len(data)] = data[:max(0, SIZE - off)]
                    await thread(os.fsync, fd)
                finally:
                    await thread(os.close, fd)
                reads = [(rng.randrange(SIZE // 512) * 512, rng.choice((512, 4096, 12288,
                                                                      65536, 200000)))
                         for _ in range(600)]
                reads += [(SIZE - 4096, 65536), (SIZE, 4096)]  # short at the end; at it
                await thread(evict_pages, imgs.base, imgs.top)
                bad = await thread(read_concurrently, path, reads, model, 8)
                assert not bad, bad[:5]
                # Some of them were put aside (cold, queued together); none was lost.
                assert fe.counters["reads_put_aside"] > 0
                assert fe.counters["errors"] == 0
        assert not is_mounted(mnt)
    finally:
        await disk.close()
    assert sha256(imgs.base) == imgs.base_sha


# ---- loop device and ext4 on the FUSE file ---------------------------------------------------

def ext4_on_loop(path: str, tree: Path, fsmnt: Path, made: list[str]) -> str:
    """losetup --direct-io=on the FUSE file, mkfs.ext4, mount, copy ``tree``, umount, detach.
    Every step runs in this worker thread; the loop device is detached (by name) even on
    failure, and recorded in ``made`` first so the caller can detach it too."""
    dev = run("losetup", "--find", "--show", "--direct-io=on", path).stdout.decode().strip()
    made.append(dev)
    try:
        name = os.path.basename(dev)
        assert Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"
        # Discard and write-zeroes reach us as fallocate (the loop driver asks the file).
        assert int(Path(f"/sys/block/{name}/queue/discard_max_bytes").read_text()) > 0
        run("mkfs.ext4", "-q", "-F", "-E", "discard", dev)
        run("mount", dev, fsmnt)
        try:
            shutil.copytree(tree, fsmnt / "tree")
            run("fstrim", fsmnt, check=False)  # discards of free space: overlay metadata only
        finally:
            run("umount", fsmnt)
    finally:
        run("losetup", "-d", dev)
        made.remove(dev)
    return dev


@needs_mount
@pytest.mark.skipif(loop_problem() is not None, reason=loop_problem() or "")
async def test_loop_device_ext4_tree_lands_in_overlay(tmp_path: Path) -> None:
    imgs = make_images(tmp_path, 32 * MiB, seed=21)
    mnt = tmp_path / "mnt"
    fsmnt = tmp_path / "fs"
    tree = tmp_path / "tree"
    for d in (mnt, fsmnt, tree):
        d.mkdir()
    make_tree(tree, seed=4)
    made: list[str] = []
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(90):
            async with served(mnt, {"vm.img": disk}) as fe:
                try:
                    await thread(ext4_on_loop, fe.path_of("vm.img"), tree, fsmnt, made)
                finally:
                    for dev in made:  # only the device this test created, by name
                        await thread(lambda d=dev: run("losetup", "-d", d, check=False))
                assert fe.counters["fallocates"] > 0  # mkfs's discards came as fallocate
                assert fe.counters["fsyncs"] > 0  # umount's flush reached Disk.flush
            assert not is_mounted(mnt)
    finally:
        await disk.close()
    if imgs.fmt == "qcow2":
        qemu_check(imgs.top)
    assert sha256(imgs.base) == imgs.base_sha
    # Read the tree back from the overlay with tools that share no code with cowd.
    raw = tmp_path / "out.raw"
    qemu_img("convert", "-f", imgs.fmt, "-O", "raw", imgs.top, raw)
    run("e2fsck", "-f", "-n", raw)
    out = tmp_path / "dump"
    out.mkdir()
    run("debugfs", "-R", f"rdump /tree {out}", raw)
    assert same_tree(tree, out / "tree")


# ---- namespace changes on a live mount, read-only disks, teardown ----------------------------

@needs_mount
async def test_add_and_remove_disks_while_mounted(tmp_path: Path) -> None:
    imgs = make_images(tmp_path, 1 * MiB, seed=31)
    second = tmp_path / "second.raw"
    second.write_bytes(random.Random(2).randbytes(2 * MiB))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pool = ImagePool()
    cache = RemapCache()
    d1 = await Disk.open(str(imgs.top), pool=pool, cache=cache)
    d2 = await Disk.open(str(second), pool=pool, cache=cache, readonly=True)
    try:
        with trio.fail_after(60):
            async with served(mnt, {"one": d1}) as fe:
                ino1 = (await thread(os.stat, fe.path_of("one"))).st_ino
                assert fe.add_disk("two", d2) == fe.path_of("two")
                assert sorted(await thread(os.listdir, str(mnt))) == ["one", "two"]
                st2 = await thread(os.stat, fe.path_of("two"))
                assert st2.st_size == 2 * MiB and st2.st_ino != ino1
                assert stat.S_IMODE(st2.st_mode) == 0o400
                with pytest.raises(OSError) as e:  # root passes the mode bits; not this
                    await thread(os.open, fe.path_of("two"), os.O_RDWR)
                assert e.value.errno == errno.EROFS
                assert await thread(read_file, fe.path_of("two")) == second.read_bytes()
                fd = await thread(os.open, fe.path_of("two"), os.O_RDONLY)
                try:
                    with pytest.raises((UsageError, CommandFailed), match="still open"):
                        await fe.remove_disk("two")
                finally:
                    await thread(os.close, fd)
                await fe.remove_disk("two")
                assert await thread(os.listdir, str(mnt)) == ["one"]
                with pytest.raises(FileNotFoundError):
                    await thread(os.stat, fe.path_of("two"))
                fe.add_disk("two", d2)  # a new inode for the same name
                assert (await thread(os.stat, fe.path_of("two"))).st_ino not in (ino1,
                                                                                   st2.st_ino)
                assert (await thread(os.stat, fe.path_of("one"))).st_ino == ino1
    finally:
        await d1.close()
        await d2.close()


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@needs_mount
async def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    imgs = make_images(tmp_path, 1 * MiB, seed=41)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache(), readonly=True)
    try:
        async with served(mnt, {"ro": disk}) as fe:
            with pytest.raises(OSError) as e:
                await thread(os.open, fe.path_of("ro"), os.O_WRONLY)
            assert e.value.errno == errno.EROFS
            assert await thread(read_file, fe.path_of("ro")) == imgs.base.read_bytes()
    finally:
        await disk.close()
    assert sha256(imgs.base) == imgs.base_sha


@needs_mount
async def test_teardown_unmounts_on_error_and_aborts_open_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = make_images(tmp_path, 1 * MiB, seed=51)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setattr(S, "DRAIN_TIMEOUT_S", 0.5)
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    fd = -1
    try:
        with trio.fail_after(30):
            with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="boom"),
                                    flatten_subgroups=True):
                async with served(mnt, {"d": disk}) as fe:
                    fd = await thread(os.open, fe.path_of("d"), os.O_RDWR)
                    raise RuntimeError("boom")
        assert not is_mounted(mnt)
        # The file was still open: the connection was aborted, not left hanging.
        with pytest.raises(OSError) as e:
            await thread(os.pread, fd, 4096, 0)
        # ECONNABORTED: what the kernel answers when the connection served over io_uring
        # (the fuse module's enable_uring=Y) is aborted.
        assert e.value.errno in (errno.ENOTCONN, errno.EIO, errno.ENODEV, errno.ECONNABORTED)
    finally:
        if fd >= 0:
            os.close(fd)
        await disk.close()


@needs_mount
async def test_never_unmounts_what_it_did_not_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "DRAIN_TIMEOUT_S", 0.5)
    imgs = make_images(tmp_path, 1 * MiB, seed=61)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(30):
            async with served(mnt, {"d": disk}):
                # Someone mounts a tmpfs over our directory: teardown must leave it alone.
                await thread(lambda: run("mount", "-t", "tmpfs", "-o", "size=1m", "cowdtest",
                                         mnt))
            mounts = M.mounts_at(str(mnt))
            assert mounts[-1] == ("tmpfs", "cowdtest")
    finally:
        # Clean up exactly the two mounts this test made: the tmpfs, then our dead FUSE one.
        for fstype, _src in reversed(M.mounts_at(str(mnt))):
            if fstype in ("tmpfs", "fuse.cowd"):
                run("umount", "-l", mnt, check=False)
        await disk.close()
    assert not M.mounts_at(str(mnt))


@needs_mount
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 not installed "
                    "(package fuse3; make check installs it)")
async def test_mount_through_fusermount3(tmp_path: Path) -> None:
    imgs = make_images(tmp_path, 1 * MiB, seed=71)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(30):
            async with served(mnt, {"d": disk}, FuseOptions(use_fusermount=True)) as fe:
                assert M.mounts_at(str(mnt))[-1] == ("fuse.cowd", fe.source)
                data = b"through fusermount3"

                def io() -> bytes:
                    fd = os.open(fe.path_of("d"), os.O_RDWR)
                    try:
                        os.pwrite(fd, data, 4096)
                        os.fsync(fd)
                        return os.pread(fd, len(data), 4096)
                    finally:
                        os.close(fd)

                assert await thread(io) == data
            assert not is_mounted(mnt)
    finally:
        await disk.close()
    raw = qemu_raw(imgs.top, tmp_path, fmt=imgs.fmt)
    assert raw[4096:4096 + len(data)] == data


def test_mount_problems_are_usage_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            await mount_fuse(stack, nursery, str(tmp_path / "missing"), {})

    with pytest.RaisesGroup(pytest.RaisesExc(CommandFailed, match="not a directory"),
                            flatten_subgroups=True):
        trio.run(main)


@needs_mount
async def test_a_killed_daemons_mount_is_cleaned_up(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = make_images(tmp_path, 1 * MiB, seed=81)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(30):
            # A daemon that dies without unmounting: the device is closed, the mount stays.
            async def no_unmount(self: FuseFrontend) -> None:
                await trio.lowlevel.checkpoint()

            monkeypatch.setattr(FuseFrontend, "_unmount", no_unmount)
            monkeypatch.setattr(S, "DRAIN_TIMEOUT_S", 0.1)
            async with served(mnt, {"d": disk}) as fe:
                source = fe.source
            monkeypatch.undo()
            assert M.mounts_at(str(mnt))[-1] == ("fuse.cowd", source)
            assert await M.unmount_stale(str(mnt)) is True
            assert not M.mounts_at(str(mnt))
            assert await M.unmount_stale(str(mnt)) is False  # nothing there
            # A live mount is left alone (probed from another process, as attach would).
            async with served(mnt, {"d": disk}) as fe:
                code = ("import trio, cowd.frontends.fuse.mount as m; "
                        "print(trio.run(m.unmount_stale, %r))")
                out = await thread(lambda: run(sys.executable, "-c", code % str(mnt)))
                assert out.stdout.strip() == b"False"
                assert M.mounts_at(str(mnt))[-1] == ("fuse.cowd", fe.source)
            assert not M.mounts_at(str(mnt))
    finally:
        for fstype, _src in reversed(M.mounts_at(str(mnt))):
            if fstype == "fuse.cowd":
                run("umount", "-l", mnt, check=False)
        await disk.close()


def interleaved_writer(path: str, model: bytearray, lane: int, lanes: int, seed: int) -> None:
    """Write, punch and fsync only the 4 KiB blocks ``b`` with ``b % lanes == lane``: lanes
    share every cluster, so concurrent allocations of one cluster meet in the Disk."""
    rng = random.Random(seed)
    blk = 4 * KiB
    mine = [b for b in range(len(model) // blk) if b % lanes == lane]
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(150):
            b = rng.choice(mine)
            off = b * blk
            r = rng.random()
            if r < 0.7:
                data = rng.randbytes(blk)
                os.pwrite(fd, data, off)
                model[off:off + blk] = data
            elif r < 0.85:
                fallocate(fd, PUNCH if i % 2 else ZERO, off, blk)
                model[off:off + blk] = bytes(blk)
            else:
                os.fsync(fd)
            if i % 10 == 0:
                assert os.pread(fd, blk, off) == bytes(model[off:off + blk])
    finally:
        os.close(fd)


@needs_mount
async def test_concurrent_writers_sharing_clusters(tmp_path: Path) -> None:
    imgs = make_images(tmp_path, 2 * MiB, seed=91)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    model = bytearray(imgs.base.read_bytes())
    disk = await Disk.open(str(imgs.top), pool=ImagePool(), cache=RemapCache())
    try:
        with trio.fail_after(60):
            async with served(mnt, {"d": disk}) as fe:
                path = fe.path_of("d")
                async with trio.open_nursery() as n:
                    for lane in range(4):
                        n.start_soon(thread, interleaved_writer, path, model, lane, 4, lane)
                assert await thread(read_file, path) == bytes(model)
                # Every fsync waits for Disk.flush's thread: the hand-over path was taken.
                assert fe.counters["waited"] >= fe.counters["fsyncs"] > 0
    finally:
        await disk.close()
    assert qemu_raw(imgs.top, tmp_path, fmt=imgs.fmt) == bytes(model)
    if imgs.fmt == "qcow2":
        qemu_check(imgs.top)
    assert sha256(imgs.base) == imgs.base_sha
