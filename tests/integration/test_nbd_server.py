"""The NBD server end to end: the real `cowd serve` command, driven by clients nobody here
wrote (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh/libnbd, fio's nbd engine) and by hostile
raw-socket clients written in this file.

Every test starts the daemon the way a user does (the ``cowd`` console script next to
``sys.executable``, ``--nbd unix:SOCK --run-dir DIR``), stops it with SIGTERM and requires exit
status 0.  Oracles: qemu's own reading of the same chain (``qemu_raw``, ``qemu-img compare``,
``qemu-img map``) and a plain ``bytearray`` model of every write.  After every test that
writes, the daemon is stopped, ``qemu-img check`` must be clean and the base's sha256
unchanged.

The wire constants used by the raw-socket clients are typed in from the NBD protocol document
(NetworkBlockDevice/nbd ``doc/proto.md``), not imported from cowd, so the tests check cowd's
numbers rather than repeat them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import nbdserve
from tests.support.nbdserve import NBDSH_PRELUDE, Served, nbdsh, nbdsh_env
from tests.support.peers import (
    COWD,
    need,
    qemu_check,
    qemu_img,
    qemu_io,
    qemu_raw,
    run,
    sha256,
)

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SECTOR = 512
CLUSTER = 64 << 10

# ---- NBD wire constants (doc/proto.md) ------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_INFO = 6
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FAST_ZERO = 1 << 4
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75


# ---- the daemon, as a user runs it (tests/support/nbdserve.py) --------------------------------

# ``serve(image, ...)``: a running `cowd serve`, in the daemon and from two worker processes.
serve = nbdserve.serve


# ---- images ---------------------------------------------------------------------------------


@dataclass
class Chain:
    """The served top image and what it sits on."""

    top: Path
    fmt: str
    base: Path | None = None
    base_sha: str | None = None
    size: int = 0
    tmp: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return self.top.name

    def oracle(self) -> bytes:
        return qemu_raw(self.top, self.tmp, self.fmt)

    def check(self) -> None:
        """After a writing test (daemon stopped): metadata clean, base untouched."""
        if self.fmt == "qcow2":
            qemu_check(self.top)
        if self.base is not None:
            assert sha256(self.base) == self.base_sha, "the base image was modified"


def make_chain(tmp: Path, kind: str, size: int = 8 * MiB, seed: int = 1,
               name: str | None = None, base: Path | None = None) -> Chain:
    """``raw``: a raw image of random bytes served directly.  ``qcow2``: a qcow2 overlay
    (made by qemu-img) over a raw base of random bytes, with a little of its own data, a
    zero cluster and a discarded range written by qemu-io, so reads cross both layers."""
    rng = random.Random(seed)
    if kind == "raw":
        top = tmp / (name or "disk.raw")
        top.write_bytes(rng.randbytes(size))
        return Chain(top, "raw", size=size, tmp=tmp)
    assert kind == "qcow2"
    if base is None:
        base = tmp / "base.raw"
        base.write_bytes(rng.randbytes(size))
    top = tmp / (name or "ov.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", top)
    qemu_io(top, "write -P 0x5a 0 64k", "write -P 0x33 1000000 70000",
            "write -z 192k 64k", "discard 512k 128k", "write -P 0x44 524288 1000",
            fmt="qcow2")
    return Chain(top, "qcow2", base, sha256(base), size, tmp)


@pytest.fixture(params=["raw", "qcow2"])
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Chain:
    return make_chain(tmp_path, request.param)


# ---- peers ----------------------------------------------------------------------------------


def convert_uri(uri: str, out: Path) -> bytes:
    qemu_img("convert", "-f", "raw", "-O", "raw", uri, out)
    data = out.read_bytes()
    out.unlink()
    return data


def _runs(entries: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
    """Merge adjacent (offset, length, hole, zero) runs with the same meaning."""
    out: list[tuple[int, int, bool, bool]] = []
    for off, n, hole, zero in sorted(entries):
        if out and out[-1][2:] == (hole, zero) and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, hole, zero)
        else:
            out.append((off, n, hole, zero))
    return out


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool, bool]]:
    need("nbdinfo")
    doc = json.loads(run("nbdinfo", "--map", "--json", uri, timeout=30).stdout)
    return _runs([(e["offset"], e["length"], bool(e["type"] & 1), bool(e["type"] & 2))
                  for e in doc])


def qemu_map(image: Path, fmt: str) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map's view in base:allocation's terms: not data = hole; zero = zero."""
    doc = json.loads(qemu_img("map", "-U", "--output=json", "-f", fmt, image).stdout)
    return _runs([(e["start"], e["length"], not e["data"], e["zero"]) for e in doc])


# ---- a raw-socket NBD client, for what well-behaved clients never send ----------------------


class RawClient:
    """A blocking NBD client speaking the wire format directly (fixed newstyle)."""

    def __init__(self, path: Path, timeout: float = 10):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(str(path))

    def close(self) -> None:
        self.s.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def eof_within(self, seconds: float) -> bool:
        """Read and drop whatever comes until the server closes; False on timeout."""
        self.s.settimeout(seconds)
        try:
            while self.s.recv(1 << 16):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True

    def handshake(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        magic, opt_magic, server_flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        assert server_flags & FLAG_FIXED_NEWSTYLE
        self.s.sendall(struct.pack(">I", flags))

    def send_option(self, option: int, payload: bytes = b"", length: int | None = None) -> None:
        n = len(payload) if length is None else length
        self.s.sendall(struct.pack(">QII", IHAVEOPT, option, n) + payload)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, n = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REPLY_MAGIC, hex(magic)
        assert n <= 1 << 20, n
        return option, rtype, self.recv_exact(n)

    def go(self, name: bytes) -> tuple[int, int] | int:
        """NBD_OPT_GO: (size, transmission flags), or the error reply type."""
        self.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        size_flags: tuple[int, int] | None = None
        while True:
            option, rtype, payload = self.option_reply()
            assert option == OPT_GO
            if rtype & REP_FLAG_ERROR:
                return rtype
            if rtype == REP_INFO and struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                _, size, tflags = struct.unpack(">HQH", payload)
                size_flags = (size, tflags)
            elif rtype == REP_ACK:
                assert size_flags is not None
                return size_flags

    def connect(self, name: str) -> int:
        self.handshake()
        r = self.go(name.encode())
        assert isinstance(r, tuple), f"GO {name!r} refused: {r:#x}"
        return r[0]

    def request(self, cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0,
                payload: bytes = b"") -> None:
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset,
                                   length) + payload)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """A simple reply: (error, cookie, data) — data only for a successful read."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data


def assert_serves(d: Served, expect: bytes | None, within_s: float = 5.0) -> None:
    """A well-behaved client connects and reads (correct data, if known) promptly."""
    assert d.alive(), d.log_text()
    t0 = time.monotonic()
    with RawClient(d.sock, timeout=within_s) as c:
        size = c.connect(d.names[0])
        for off in (0, size - 4096):
            c.request(CMD_READ, off, 4096, cookie=off)
            err, cookie, data = c.reply(4096)
            assert (err, cookie) == (0, off)
            if expect is not None:
                assert data == expect[off:off + 4096]
        c.request(CMD_DISC, 0, 0)
    took = time.monotonic() - t0
    assert took < within_s, f"a well-behaved client took {took:.1f} s"


# =============================================================================================
# qemu-img and qemu-io
# =============================================================================================


@pytest.mark.timeout(60)
def test_qemu_img_compare_and_convert(chain: Chain, serve: Callable[..., Served],
                                      tmp_path: Path) -> None:
    """qemu reads the export exactly as it reads the chain itself."""
    oracle = chain.oracle()
    (tmp_path / "oracle.raw").write_bytes(oracle)
    d = serve(chain.top)
    uri = d.uri()
    # qemu's reading of the same files, while cowd serves them (-U: cowd holds qemu's
    # image locks while it serves a disk, cowd/imagelock.py).
    qemu_img("compare", "-U", "-f", chain.fmt, "-F", "raw", chain.top, uri)
    qemu_img("compare", "-f", "raw", "-F", "raw", tmp_path / "oracle.raw", uri)
    assert convert_uri(uri, tmp_path / "conv.raw") == oracle
    # Into a sparse qcow2: qemu uses block status to skip the holes; data must still match.
    qemu_img("convert", "-f", "raw", "-O", "qcow2", uri, tmp_path / "conv.qcow2")
    assert qemu_raw(tmp_path / "conv.qcow2", tmp_path, "qcow2") == oracle
    # A compare that must fail: the comparison can tell.
    bad = bytearray(oracle)
    bad[len(bad) // 2] ^= 1
    (tmp_path / "bad.raw").write_bytes(bad)
    p = qemu_img("compare", "-f", "raw", "-F", "raw", tmp_path / "bad.raw", uri, check=False)
    assert p.returncode == 1, p.stdout
    d.stop()


def _qemu_io_script(rng: random.Random, size: int,
                    model: bytearray) -> list[str]:
    """Writes of every shape qemu-io can send, each applied to ``model`` and followed by a
    read verified with -P; discards are cluster-aligned (qemu may drop unaligned ones)."""
    cmds: list[str] = []

    def write(off: int, n: int, pat: int) -> None:
        cmds.append(f"write -P {pat:#x} {off} {n}")
        cmds.append(f"read -P {pat:#x} {off} {n}")
        model[off:off + n] = bytes([pat]) * n

    def zero(off: int, n: int, how: str) -> None:
        cmds.append(f"{how} {off} {n}")
        cmds.append(f"read -P 0 {off} {n}")
        model[off:off + n] = bytes(n)

    # The fixed edges first: the last sector, the last byte, a cluster straddle.
    write(size - SECTOR, SECTOR, 0xE1)
    write(size - 7, 7, 0xE2)
    write(CLUSTER - 100, 200, 0xE3)
    zero(size - 3 * CLUSTER, 3 * CLUSTER, "write -z -u")
    write(size - CLUSTER - 1000, 500, 0xE4)  # inside a zeroed range: a cluster allocates
    for i in range(60):
        kind = rng.choice(["aligned", "unaligned", "unaligned", "zero", "zero_u", "discard",
                           "sector"])
        pat = 1 + (i % 250)
        if kind == "aligned":
            off = rng.randrange(size // CLUSTER) * CLUSTER
            n = min(size - off, rng.randint(1, 3) * CLUSTER)
            write(off, n, pat)
        elif kind == "unaligned":
            off = rng.randrange(size - 1)
            n = min(size - off, rng.randint(1, 3 * CLUSTER))
            write(off, n, pat)
        elif kind == "sector":
            off = rng.randrange(size // SECTOR) * SECTOR
            n = min(size - off, rng.randint(1, 16) * SECTOR)
            write(off, n, pat)
        elif kind in ("zero", "zero_u"):
            off = rng.randrange(size - 1)
            n = min(size - off, rng.randint(1, 4 * CLUSTER))
            zero(off, n, "write -z" if kind == "zero" else "write -z -u")
        else:
            off = rng.randrange(size // CLUSTER) * CLUSTER
            n = min(size - off, rng.randint(1, 4) * CLUSTER)
            zero(off, n, "discard")
    # Reads of unaligned pieces of whatever the model now holds as one byte value.
    for _ in range(40):
        off = rng.randrange(size)
        n = 1
        while off + n < size and n < 3 * CLUSTER and model[off + n] == model[off]:
            n += 1
        cmds.append(f"read -P {model[off]:#x} {off} {n}")
    cmds.append("flush")
    return cmds


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seed", [1, 2])
def test_qemu_io_script_against_model(chain: Chain, serve: Callable[..., Served],
                                      tmp_path: Path, seed: int) -> None:
    model = bytearray(chain.oracle())
    cmds = _qemu_io_script(random.Random(seed), chain.size, model)
    d = serve(chain.top)
    qemu_io(d.uri(), *cmds, fmt="raw")
    ops = d.disk_stats()["ops"]
    assert ops["trims"] and ops["write_zeroes"] and ops["flushes"], ops  # all reached us
    assert convert_uri(d.uri(), tmp_path / "live.raw") == model
    d.stop()
    chain.check()
    assert chain.oracle() == model  # what cowd wrote, as qemu reads the files
    # And served again (read-only): qemu's reading of the chain equals cowd's.
    ro = serve(chain.top, readonly=True)
    qemu_img("compare", "-f", chain.fmt, "-F", "raw", chain.top, ro.uri())
    ro.stop()
    chain.check()


@pytest.mark.timeout(60)
def test_tcp_listener(serve: Callable[..., Served], tmp_path: Path) -> None:
    c = make_chain(tmp_path, "qcow2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = serve(c.top, nbd=f"tcp:{port}")  # the host defaults to loopback
    uri = f"nbd://127.0.0.1:{port}/{c.name}"
    qemu_io(uri, "write -P 0x77 4096 8192", "read -P 0x77 4096 8192", fmt="raw")
    model = bytearray(c.oracle())
    model[4096:4096 + 8192] = b"\x77" * 8192
    assert convert_uri(uri, tmp_path / "tcp.raw") == model
    d.stop()
    c.check()
    assert c.oracle() == model


# =============================================================================================
# libnbd: nbdinfo, nbdcopy, nbdsh
# =============================================================================================


def _map_chain(tmp: Path) -> Chain:
    """A chain whose map has every kind of run: a compressed qcow2 base with gaps
    (unallocated in the whole chain), base data, overlay data, overlay zero clusters,
    discarded clusters."""
    base = tmp / "base.qcow2"
    size = 8 * MiB
    rng = random.Random(3)
    src = tmp / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for off, n in ((0, MiB), (3 * MiB, 640 << 10), (7 * MiB, MiB)):
            f.seek(off)
            f.write(rng.randbytes(n // 2) + bytes([off >> 20]) * (n // 2))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", src, base)
    src.unlink()
    top = tmp / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x21 64k 128k", "write -z 256k 64k", "discard 3M 64k",
            "write -P 0x22 5M 200000", "write -z -u 7M 192k", fmt="qcow2")
    return Chain(top, "qcow2", base, sha256(base), size, tmp)


@pytest.mark.timeout(60)
def test_nbdinfo_map_matches_qemu_img_map(serve: Callable[..., Served], tmp_path: Path) -> None:
    c = _map_chain(tmp_path)
    want = qemu_map(c.top, "qcow2")
    assert {r[2:] for r in want} >= {(True, True), (False, False)}, want  # the test has teeth
    d = serve(c.top)
    assert nbdinfo_map(d.uri()) == want
    before = c.oracle()
    assert convert_uri(d.uri(), tmp_path / "conv.raw") == before  # compressed reads
    # Change the map through cowd, then qemu-img map of what cowd wrote must agree with
    # cowd's own answer, served again.
    qemu_io(d.uri(), "write -P 0x31 2M 64k", "write -z -u 0 64k", "discard 7M 64k",
            "write -P 0x32 6500000 70000", "write -P 0x33 3500000 1000", fmt="raw")
    live = nbdinfo_map(d.uri())
    live_data = convert_uri(d.uri(), tmp_path / "conv.raw")
    d.stop()
    c.check()
    after = qemu_map(c.top, "qcow2")
    assert live == after
    model = bytearray(before)
    for off, n, pat in ((2 * MiB, CLUSTER, 0x31), (0, CLUSTER, 0), (7 * MiB, CLUSTER, 0),
                        (6500000, 70000, 0x32), (3500000, 1000, 0x33)):
        model[off:off + n] = bytes([pat]) * n
    assert live_data == model  # incl. a copy-up from a compressed cluster
    assert c.oracle() == model
    ro = serve(c.top, readonly=True)
    assert nbdinfo_map(ro.uri()) == after
    ro.stop()


@pytest.mark.timeout(60)
def test_nbdinfo_map_raw(serve: Callable[..., Served], tmp_path: Path) -> None:
    c = make_chain(tmp_path, "raw")
    d = serve(c.top)
    assert nbdinfo_map(d.uri()) == qemu_map(c.top, "raw") == [(0, c.size, False, False)]
    d.stop()


@pytest.mark.timeout(60)
def test_nbdinfo_map_sparse_raw_base(serve: Callable[..., Served], tmp_path: Path) -> None:
    """A sparse raw base (holes left by truncate and punched by fallocate) under a qcow2
    overlay: base:allocation finds the base's holes as qemu does (SEEK_DATA/SEEK_HOLE), with
    qemu-img map of the chain and qemu-nbd serving it as the oracles."""
    need("fallocate")
    size = 8 * MiB
    rng = random.Random(11)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
        for off, n in ((0, MiB), (3 * MiB, 640 << 10), (5 * MiB, 2 * MiB)):
            f.seek(off)
            f.write(rng.randbytes(n))
    run("fallocate", "--punch-hole", "--offset", str(5 * MiB + 256 * 1024), "--length",
        str(256 << 10), base)
    top = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", top)
    # Overlay data over a base hole, over base data, and a zero cluster over base data.
    qemu_io(top, "write -P 0x21 2M 64k", "write -P 0x22 512k 64k", "write -z 3M 64k",
            fmt="qcow2")
    want = qemu_map(top, "qcow2")
    assert (2 * MiB, 64 << 10, False, False) in want, want  # overlay data in a base hole
    assert any(r[0] >= 5 * MiB and r[2:] == (True, True) for r in want), want  # punched
    _map_as_qemu_nbd(top, want, serve, tmp_path)


def _map_as_qemu_nbd(top: Path, want: list[tuple[int, int, bool, bool]],
                     serve: Callable[..., Served], tmp_path: Path) -> None:
    """base:allocation of ``top`` as nbdinfo reads it equals ``want`` (qemu-img map's)
    through qemu-nbd serving the same image, then through cowd."""
    sock = tmp_path / "qemu-nbd.sock"
    q = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", str(sock), str(top)],
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nbdinfo_map(f"nbd+unix:///?socket={sock}") == want
    finally:
        q.terminate()
        q.wait(timeout=10)
    d = serve(top)
    assert nbdinfo_map(d.uri()) == want
    d.stop()


@pytest.mark.timeout(60)
def test_nbdinfo_map_qcow2_raw_data_file(serve: Callable[..., Served], tmp_path: Path) -> None:
    """A qcow2 with a raw external data file (data_file_raw=on: every cluster allocated)
    whose data file has holes, never written and punched under written data: qemu-nbd's
    base:allocation does not look into the data file (qcow2 answers no RECURSE there), and
    neither must cowd's; a zero cluster over written data is a hole in both."""
    need("fallocate")
    data = tmp_path / "d.raw"
    top = tmp_path / "df.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on",
             top, "8M")
    qemu_io(top, "write -P 0x41 0 1M", "write -P 0x42 4M 512k", "write -z 6M 64k",
            fmt="qcow2")
    run("fallocate", "--punch-hole", "--offset", str(256 << 10), "--length", str(256 << 10),
        data)
    want = qemu_map(top, "qcow2")
    assert (0, 6 * MiB, False, False) in want, want  # the data file's holes are data
    assert (6 * MiB, 64 << 10, True, True) in want, want
    _map_as_qemu_nbd(top, want, serve, tmp_path)


@pytest.mark.timeout(60)
def test_nbdcopy_round_trip(chain: Chain, serve: Callable[..., Served], tmp_path: Path) -> None:
    need("nbdcopy")
    oracle = chain.oracle()
    d = serve(chain.top)
    out = tmp_path / "out.raw"
    run("nbdcopy", d.uri(), out, timeout=60)
    assert out.read_bytes() == oracle
    # In: a source with data, zeroes and a hole (nbdcopy sends the hole as zeroes).
    rng = random.Random(7)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(rng.randbytes(3 * MiB))
        f.write(bytes(MiB))
        f.seek(6 * MiB)
        f.write(rng.randbytes(chain.size - 6 * MiB - 5))
        f.write(b"\xff" * 5)
    want = src.read_bytes()
    assert len(want) == chain.size
    run("nbdcopy", "--connections=4", "--requests=16", src, d.uri(), timeout=60)
    run("nbdcopy", d.uri(), out, timeout=60)
    assert out.read_bytes() == want
    d.stop()
    chain.check()
    assert chain.oracle() == want


@pytest.mark.timeout(60)
def test_nbdsh_protocol_edges(chain: Chain, serve: Callable[..., Served],
                              tmp_path: Path) -> None:
    """Structured replies on and off, EXPORT_NAME, the last byte, out-of-range requests,
    block status with REQ_ONE, CACHE, FAST_ZERO, FUA writes: libnbd against cowd."""
    oracle = chain.oracle()
    (tmp_path / "oracle.raw").write_bytes(oracle)
    size = chain.size
    d = serve(chain.top)
    nbdsh('''
want = open(ORACLE, "rb").read()
for structured in (True, False):
    h = connect(NAME, structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert h.get_size() == SIZE
    assert h.can_multi_conn() and h.can_fua() and h.can_flush() and h.can_cache()
    assert h.can_zero() and h.can_fast_zero() and h.can_trim() and not h.is_read_only()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION) == structured
    assert h.pread(1, SIZE - 1) == want[-1:]
    assert h.pread(512, SIZE - 512) == want[-512:]
    assert h.pread(1, 0) == want[:1]
    assert h.pread(3 << 20, 12345) == want[12345:12345 + (3 << 20)]
    # Out of range: EINVAL for reads, ENOSPC for writes (the spec's choices).
    fails({errno.EINVAL}, h.pread, 2, SIZE - 1)
    fails({errno.EINVAL}, h.pread, 512, SIZE)
    fails({errno.EINVAL}, h.pread, 512, (1 << 63) - 256)
    fails({errno.ENOSPC}, h.pwrite, b"xy", SIZE - 1)
    fails({errno.ENOSPC}, h.zero, 4096, SIZE - 1024)
    fails({errno.EINVAL, errno.ENOSPC}, h.trim, 4096, SIZE)
    fails({errno.EINVAL}, h.cache, 4096, SIZE)
    if structured:
        fails({errno.EINVAL}, extents, h, 4096, SIZE)
    # Not negotiated / unknown flags.
    fails({errno.EINVAL}, h.pread, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
    if not structured:
        fails({errno.EINVAL}, extents, h, 4096, 0)
    assert h.pread(4096, 0) == want[:4096]  # the connection is still in step
    h.shutdown()

# EXPORT_NAME: a client without fixed newstyle may send nothing else.  Without NO_ZEROES the
# reply carries 124 bytes of padding.
for flags in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE):
    h = connect(NAME, structured=False, handshake_flags=flags)
    assert h.get_size() == SIZE, flags
    assert h.pread(SECTOR, SIZE - SECTOR) == want[-SECTOR:]
    h.shutdown()

# An unknown export is refused, and the server goes on serving.
try:
    connect("no-such-export")
except nbd.Error:
    pass
else:
    raise AssertionError("unknown export accepted")

h = connect(NAME)
# Block status: full answer tiles the request's prefix; REQ_ONE gives exactly one extent.
ext = extents(h, SIZE, 0)
assert ext and all(n > 0 for n, _ in ext) and sum(n for n, _ in ext) <= SIZE, ext
one = extents(h, SIZE - 4096, 4096, nbd.CMD_FLAG_REQ_ONE)
assert len(one) == 1 and 0 < one[0][0] <= SIZE - 4096, one
assert one[0][1] == [f for n, f in extents(h, SIZE - 4096, 4096)][0]
h.cache(SIZE, 0)
h.cache(1, SIZE - 1)
# FUA writes, zeroes with FAST_ZERO / NO_HOLE, and a trim, read back on another connection.
h.pwrite(b"\\xab" * 5000, 100000, nbd.CMD_FLAG_FUA)
h.pwrite(b"\\xcd" * SECTOR, SIZE - SECTOR, nbd.CMD_FLAG_FUA)
h.zero(70000, 300000, nbd.CMD_FLAG_FAST_ZERO)
h.zero(4096, 1 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
h.trim(65536, 4 << 20, nbd.CMD_FLAG_FUA)
h.flush()
g = connect(NAME, structured=False)
assert g.pread(5000, 100000) == b"\\xab" * 5000
assert g.pread(SECTOR, SIZE - SECTOR) == b"\\xcd" * SECTOR
for off, n in ((300000, 70000), (1 << 20, 4096), (2 << 20, 65536), (4 << 20, 65536)):
    assert g.pread(n, off) == bytes(n), off
g.shutdown()
h.shutdown()
''', SOCK=str(d.sock), NAME=chain.name, SIZE=size, SECTOR=SECTOR,
          ORACLE=str(tmp_path / "oracle.raw"))
    stats = d.disk_stats()
    assert stats["ops"]["prefetches"] >= 2
    d.stop()
    chain.check()
    model = bytearray(oracle)
    model[100000:105000] = b"\xab" * 5000
    model[size - SECTOR:] = b"\xcd" * SECTOR
    for off, n in ((300000, 70000), (1 << 20, 4096), (2 << 20, 65536), (4 << 20, 65536)):
        model[off:off + n] = bytes(n)
    assert chain.oracle() == model


@pytest.mark.timeout(120)
def test_block_size_limits_advertised_and_enforced_per_request(serve: Callable[..., Served],
                                                               tmp_path: Path) -> None:
    """NBD_INFO_BLOCK_SIZE as libnbd reads it: minimum 1 (any byte range is served),
    preferred the overlay's cluster size, maximum 32 MiB.  A request above the maximum gets
    NBD_EINVAL for that request only and the connection goes on (libnbd in non-strict mode
    sends what the server advertised against); FAST_ZERO zeroing and TRIM are not bound by
    it (the spec)."""
    c = make_chain(tmp_path, "qcow2", size=128 * MiB)
    oracle = c.oracle()
    (tmp_path / "oracle.raw").write_bytes(oracle)
    d = serve(c.top)
    nbdsh('''
want = open(ORACLE, "rb").read()
h = connect(NAME)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == CLUSTER
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
big = (32 << 20) + 4096
fails({errno.EINVAL}, h.pwrite, b"\\x77" * big, 1 << 20)
assert h.pread(8192, 1 << 20) == want[1 << 20:(1 << 20) + 8192]  # in step, nothing written
fails({errno.EINVAL}, h.pread, big, 0)
fails({errno.EINVAL}, h.cache, big, 0)
h.pwrite(b"\\x78" * (32 << 20), 40 << 20)  # exactly the maximum is served
assert h.pread(4096, (72 << 20) - 4096) == b"\\x78" * 4096
h.zero(big, 80 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.flush()
h.shutdown()
''', SOCK=str(d.sock), NAME=c.name, CLUSTER=CLUSTER, ORACLE=str(tmp_path / "oracle.raw"))
    d.stop()
    c.check()
    model = bytearray(oracle)
    model[40 * MiB:72 * MiB] = b"\x78" * (32 * MiB)
    model[80 * MiB:80 * MiB + 32 * MiB + 4096] = bytes(32 * MiB + 4096)
    assert c.oracle() == bytes(model[:c.size])


@pytest.mark.timeout(60)
def test_nbdsh_readonly_server_refuses_writes(chain: Chain, serve: Callable[..., Served],
                                              tmp_path: Path) -> None:
    before = sha256(chain.top)
    d = serve(chain.top, readonly=True)
    nbdsh('''
h = connect(NAME)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero() and not h.can_fast_zero()
size = h.get_size()
fails({errno.EPERM}, h.pwrite, b"x" * 4096, 0)
fails({errno.EPERM}, h.pwrite, b"x", size - 1)
fails({errno.EPERM}, h.zero, 4096, 0)
fails({errno.EPERM}, h.trim, 4096, 0)
h.flush()
assert len(h.pread(4096, 0)) == 4096
h.cache(4096, 0)
h.shutdown()
''', SOCK=str(d.sock), NAME=chain.name)
    d.stop()
    assert sha256(chain.top) == before
    chain.check()


@pytest.mark.timeout(60)
def test_fua_and_flush_survive_sigkill(serve: Callable[..., Served], tmp_path: Path) -> None:
    """Acknowledged FUA writes and flushed writes are in the files even if the daemon dies
    without a chance to flush: the metadata that reaches them was written too."""
    c = make_chain(tmp_path, "qcow2")
    model = bytearray(c.oracle())
    d = serve(c.top)
    nbdsh('''
h = connect(NAME)
h.pwrite(b"\\x61" * 70000, 3 << 20, nbd.CMD_FLAG_FUA)
h.zero(65536, 5 << 20, nbd.CMD_FLAG_FUA)
h.pwrite(b"\\x62" * 1000, 6000000)
h.pwrite(b"\\x63" * 200000, 7 << 20)
h.flush()
# Multi-conn: a flush on one connection covers writes acknowledged on another.
g = connect(NAME)
h.pwrite(b"\\x64" * 100000, 1 << 20)
h.zero(65536, 2 << 20)
g.flush()
print("acked", flush=True)
''', SOCK=str(d.sock), NAME=c.name)
    d.kill()
    model[3 << 20:(3 << 20) + 70000] = b"\x61" * 70000
    model[5 << 20:(5 << 20) + 65536] = bytes(65536)
    model[6000000:6001000] = b"\x62" * 1000
    model[7 << 20:(7 << 20) + 200000] = b"\x63" * 200000
    model[1 << 20:(1 << 20) + 100000] = b"\x64" * 100000
    model[2 << 20:(2 << 20) + 65536] = bytes(65536)
    c.check()
    assert c.oracle() == model


LENT_WRITES = '''
h = connect(NAME)
g = connect(NAME)
# Whole clusters, never written: first writes.  Odd ones on h, even on g (both workers'
# pools); the first four one at a time (a worker's first lendable write asks for its pool),
# the rest in flight at once.  0..128k mixes the overlay's own cluster 0 (written in place)
# with a first write in one request.
cookies = []
for i, (off, n) in enumerate(PIECES):
    c = h if i % 2 else g
    if i < 4:
        c.pwrite(bytes([0x70 + i]) * n, off)
    else:
        cookies.append((c, c.aio_pwrite(bytes([0x70 + i]) * n, off)))
for c, ck in cookies:
    while not c.aio_command_completed(ck):
        c.poll(-1)
# Multi-conn: what h wrote reads back on g, and the other way round.
for i, (off, n) in enumerate(PIECES):
    assert (g if i % 2 else h).pread(n, off) == bytes([0x70 + i]) * n, (off, n)
h.flush()
print("flushed", flush=True)
'''

# (guest offset, length): whole 64 KiB clusters of the top layer, first written here (and one
# request that starts on the overlay's own cluster 0).
LENT_PIECES = [(0, 2 * CLUSTER), (1 * MiB, MiB), (4 * MiB, 64 * CLUSTER), (9 * MiB, CLUSTER),
               (12 * MiB, 3 * MiB), (20 * MiB, 256 * CLUSTER), (17 * MiB, 2 * CLUSTER)]


def _workers_of(d: Served) -> list[dict[str, Any]]:
    workers = d.stats()["workers"]
    assert isinstance(workers, list)
    return workers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", ["sigkill-after-flush", "stop", "worker-killed"])
def test_first_writes_in_lent_clusters(serve: Callable[..., Served], tmp_path: Path,
                                       end: str) -> None:
    """First writes of whole clusters.  With workers they are written by the worker into
    clusters the daemon lent it (the payload never crosses the channel) and then adopted:
    the bytes qemu reads equal a model, a write on one connection reads back on the other,
    and every way the daemon can end leaves qemu-img check clean — a flush takes back
    what the workers were lent and did not write (SIGKILL after it leaks nothing), a clean
    stop gives it back, and so does a worker's death (the daemon starts another)."""
    c = make_chain(tmp_path, "qcow2", size=36 * MiB)
    model = bytearray(c.oracle())
    d = serve(c.top)
    nbdsh(LENT_WRITES, SOCK=str(d.sock), NAME=c.name, PIECES=LENT_PIECES)
    for i, (off, n) in enumerate(LENT_PIECES):
        model[off:off + n] = bytes([0x70 + i]) * n
    w = d.disk_stats().get("workers", {})
    if d.workers:  # a worker's first lendable write goes before its pool arrives
        assert w["writes_lent"] > 0 and w["clusters_written"] > 0, w
    if end == "sigkill-after-flush":
        d.kill()
    elif end == "worker-killed":
        if d.workers:
            for wk in _workers_of(d):
                os.kill(wk["worker"]["pid"], 9)
            deadline = time.monotonic() + 60  # until the daemon has started both again
            while not all(wk["starts"] == 2 and wk["alive"] and "worker" in wk
                          for wk in _workers_of(d)):
                assert time.monotonic() < deadline, _workers_of(d)
                time.sleep(0.2)
        # A new connection (to a new worker): more first writes, then a clean stop.
        nbdsh(LENT_WRITES, SOCK=str(d.sock), NAME=c.name, PIECES=[(30 * MiB, 2 * MiB)])
        model[30 * MiB:32 * MiB] = bytes([0x70]) * (2 * MiB)
        d.stop()
    else:
        nbdsh('''
h = connect(NAME)
h.pwrite(b"\\x99" * (2 << 20), 32 << 20)  # lent, not flushed: the stop flushes it
''', SOCK=str(d.sock), NAME=c.name)
        model[32 * MiB:34 * MiB] = b"\x99" * (2 * MiB)
        d.stop()
    c.check()
    assert c.oracle() == model


UNIT_WRITES = '''
import random
h = connect(NAME)
g = connect(NAME)
def in_flight(ops):
    """Issue every (conn, kind, offset, data) at once, wait for all."""
    cookies = []
    for c, kind, off, data in ops:
        if kind == "w":
            cookies.append((c, c.aio_pwrite(data, off)))
        else:
            cookies.append((c, c.aio_zero(len(data), off)))
    for c, ck in cookies:
        while not c.aio_command_completed(ck):
            c.poll(-1)
for phase in PHASES:
    in_flight([(h if i % 2 else g, kind, off, random.Random(seed).randbytes(n))
               for i, (kind, off, n, seed) in enumerate(phase)])
    # Multi-conn: every write of the phase reads back on both connections.
    for kind, off, n, seed in phase:
        want = random.Random(seed).randbytes(n) if kind == "w" else bytes(n)
        assert h.pread(len(want), off) == want and g.pread(len(want), off) == want, off
h.flush()
print("flushed", flush=True)
'''


def _unit_phases(size: int, cluster: int, unit: int) -> list[list[tuple[str, int, int, int]]]:
    """Phases of writes that do not overlap within a phase (so the result is known while
    they are all in flight): whole subclusters (1-3) of clusters never written and of
    clusters an earlier phase wrote, several in one cluster (a lent cluster shared by writes
    under way, then the cluster's own), partial writes that copy up (forwarded), zeroes."""
    r = random.Random(5)
    phases = []
    for p in range(3):
        taken: set[int] = set()
        ops: list[tuple[str, int, int, int]] = []  # (kind, offset, length, data's seed)
        for _ in range(120):
            c = r.randrange(size // cluster // 2) if p else r.randrange(size // cluster)
            u0 = r.randrange(cluster // unit)
            n = min(r.randrange(1, 4), cluster // unit - u0)
            units = set(range(c * cluster // unit + u0, c * cluster // unit + u0 + n))
            if units & taken:
                continue
            taken |= units
            off, length = (c * cluster + u0 * unit), n * unit
            k = r.randrange(10)
            seed = r.randrange(1 << 30)
            if k < 7:
                ops.append(("w", off, length, seed))
            elif k < 9:  # a partial write: copy-up, through the daemon
                ops.append(("w", off + 512, length - 1024, seed))
            else:
                ops.append(("z", off, length, seed))
        phases.append(ops)
    return phases


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", ["stop", "sigkill-after-flush"])
def test_first_writes_of_subclusters(serve: Callable[..., Served], tmp_path: Path,
                                     end: str) -> None:
    """An extended-L2 overlay (128 KiB clusters, 4 KiB subclusters, as qemu recommends):
    first writes of whole subclusters are written by the workers at their place (a lent
    cluster, or the cluster's own) and adopted in batches.  Two connections with writes in
    flight on both, partial writes and zeroes between: both read every write back, and
    qemu reads the model with qemu-img check clean however the daemon ends."""
    size, cluster, unit = 16 * MiB, 128 * 1024, 4096
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(3).randbytes(size))
    top = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,extended_l2=on",
             "-b", base.name, "-F", "raw", top)
    c = Chain(top, "qcow2", base, sha256(base), size, tmp_path)
    model = bytearray(base.read_bytes())
    phases = _unit_phases(size, cluster, unit)
    d = serve(c.top)
    nbdsh(UNIT_WRITES, SOCK=str(d.sock), NAME=c.name, PHASES=phases)
    for phase in phases:
        for kind, off, n, seed in phase:
            model[off:off + n] = random.Random(seed).randbytes(n) if kind == "w" else bytes(n)
    if d.workers:
        w = d.disk_stats()["workers"]
        assert w["writes_units"] > 0, w
        links = d.stats()["workers"]
        assert sum(lk["units_adopted"] for lk in links) > 0, links
    if end == "sigkill-after-flush":
        d.kill()
    else:
        d.stop()
    c.check()
    assert c.oracle() == model


SECOND_WRITER = '''
h = connect(NAME)
g = connect(NAME)
for off in FIRST:  # h's first writes allocate these clusters (its worker learns them)
    h.pwrite(b"\\x61" * 4096, off)
for off in FIRST:  # then g writes elsewhere in each: in place, through its own worker
    g.pwrite(b"\\x62" * 4096, off + 8192)
for off in FIRST:  # and again: g's worker has the remaps now
    g.pwrite(b"\\x63" * 4096, off + 16384)
g.flush()
'''


def test_second_worker_writes_in_place_into_clusters_the_first_allocated(
        serve: Callable[..., Served], tmp_path: Path) -> None:
    """Two connections (with workers: one on each) write the same clusters, one after the
    other: the first allocates them; the second's worker holds no writable remap of them
    (the allocation took them away), so its first write in each goes to the daemon, which
    writes it in place without a change (no invalidation, no gate) and sends the remaps
    back: its next writes there are its own.  The bytes qemu reads equal a model, and
    qemu-img check is clean."""
    c = make_chain(tmp_path, "qcow2", size=16 * MiB)
    model = bytearray(c.oracle())
    first = [2 * MiB + i * 5 * CLUSTER for i in range(40)]
    d = serve(c.top)
    nbdsh(SECOND_WRITER, SOCK=str(d.sock), NAME=c.name, FIRST=first)
    for off in first:
        model[off:off + 4096] = b"\x61" * 4096
        model[off + 8192:off + 12288] = b"\x62" * 4096
        model[off + 16384:off + 20480] = b"\x63" * 4096
    if d.workers:
        links = d.stats()["workers"]
        assert isinstance(links, list)
        assert sum(link["writes_in_place"] for link in links) >= len(first) // 2, links
        w = d.disk_stats()["workers"]
        assert w["writes_local"] >= len(first) // 2, w  # the third round, mostly
    assert convert_uri(d.uri(), tmp_path / "live.raw") == model
    d.stop()
    c.check()
    assert c.oracle() == model


CONCURRENT = '''
hs = [connect(NAME, structured=(i % 2 == 0)) for i in range(CONNS)]
for rnd in range(ROUNDS):
    cookies = []
    for k, (off, n, kind, pat) in enumerate(PIECES[rnd]):
        h = hs[k % CONNS]
        if kind == "w":
            cookies.append((h, h.aio_pwrite(bytes([pat]) * n, off)))
        else:
            flags = nbd.CMD_FLAG_NO_HOLE if k % 3 == 0 else 0
            cookies.append((h, h.aio_zero(n, off, flags=flags)))
    assert sum(h.aio_in_flight() for h in hs) > CONNS  # really concurrent
    for h in hs:
        while h.aio_in_flight() > 0:
            h.poll(-1)
    for h, cookie in cookies:
        assert h.aio_command_completed(cookie)  # raises if the command failed
for h in hs:
    h.flush()
    h.shutdown()
'''


@pytest.mark.timeout(60)
def test_concurrent_writes_to_shared_clusters(chain: Chain, serve: Callable[..., Served],
                                              tmp_path: Path) -> None:
    """Four connections write and zero disjoint unaligned pieces of the same clusters, all
    in flight at once: every first write of a cluster copies up from the base while others
    wait for it.  The result must equal the model whatever order the server chose."""
    rng = random.Random(5)
    model = bytearray(chain.oracle())
    rounds = []
    for rnd in range(3):
        pieces = []
        pos = (2 + rnd) * MiB + rng.randrange(SECTOR)
        end = pos + 4 * CLUSTER
        while pos < end:
            n = min(end - pos, rng.randint(1, 6000))
            kind = "z" if rng.random() < 0.2 else "w"
            pat = 1 + rng.randrange(250)
            pieces.append((pos, n, kind, pat))
            model[pos:pos + n] = bytes(n) if kind == "z" else bytes([pat]) * n
            pos += n
        rng.shuffle(pieces)
        rounds.append(pieces)
    d = serve(chain.top)
    nbdsh(CONCURRENT, SOCK=str(d.sock), NAME=chain.name, CONNS=4, ROUNDS=len(rounds),
          PIECES=rounds)
    assert convert_uri(d.uri(), tmp_path / "live.raw") == model
    d.stop()
    chain.check()
    assert chain.oracle() == model


# =============================================================================================
# fio
# =============================================================================================


@pytest.mark.timeout(90)
def test_fio_nbd_engine_verify(serve: Callable[..., Served], tmp_path: Path) -> None:
    """4 jobs (4 connections), iodepth 32 each, random writes with crc32c, verified."""
    need("fio")
    p = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True)
    if p.returncode:
        pytest.skip("fio was built without the nbd engine")
    size = 64 * MiB
    c = make_chain(tmp_path, "qcow2", size=size)
    d = serve(c.top)
    p = run("fio", "--name=cowd", "--ioengine=nbd", f"--uri={d.uri()}", "--rw=randwrite",
            "--bsrange=4k-64k", "--iodepth=32", "--numjobs=4", "--size=16M",
            "--offset_increment=16M", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", "--verify_state_save=0", "--group_reporting",
            "--output-format=json", timeout=80)
    res = json.loads(p.stdout[p.stdout.index(b"{"):])
    job = res["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] >= size, job["write"]
    assert job["read"]["io_bytes"] >= size, job["read"]  # the verify pass read it all back
    d.stop()
    c.check()


# =============================================================================================
# Many disks, counters, shutdown
# =============================================================================================


@pytest.mark.timeout(60)
def test_two_overlays_of_one_base(serve: Callable[..., Served], tmp_path: Path) -> None:
    a = make_chain(tmp_path, "qcow2", name="a.qcow2")
    assert a.base is not None
    b = make_chain(tmp_path, "qcow2", name="b.qcow2", base=a.base)
    d = serve(a.top, b.top)
    listing = json.loads(run("nbdinfo", "--list", "--json", d.uri(""), timeout=20).stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == ["a.qcow2", "b.qcow2"]
    qemu_io(d.uri("a.qcow2"), "write -P 0xaa 0 1M", fmt="raw")
    qemu_io(d.uri("b.qcow2"), "write -z 512k 1M", "write -P 0xbb 6M 100000", fmt="raw")
    ma = bytearray(a.oracle())
    mb = bytearray(b.oracle())
    ma[0:MiB] = b"\xaa" * MiB
    mb[512 << 10:(512 << 10) + MiB] = bytes(MiB)
    mb[6 * MiB:6 * MiB + 100000] = b"\xbb" * 100000
    assert convert_uri(d.uri("a.qcow2"), tmp_path / "a.raw") == ma
    assert convert_uri(d.uri("b.qcow2"), tmp_path / "b.raw") == mb
    # Export to export through one daemon: b becomes a copy of a.
    run("nbdcopy", d.uri("a.qcow2"), d.uri("b.qcow2"), timeout=60)
    assert convert_uri(d.uri("b.qcow2"), tmp_path / "b.raw") == ma
    layers = d.disk_stats("a.qcow2")["layers"]
    assert isinstance(layers, list) and layers[1]["shared_by"] == 2, layers
    d.stop()
    a.check()
    b.check()
    assert a.oracle() == ma
    assert b.oracle() == ma


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prime", [True, False], ids=["primed", "cold"])
def test_stats_counters_move(serve: Callable[..., Served], tmp_path: Path,
                             prime: bool) -> None:
    c = make_chain(tmp_path, "qcow2")
    d = serve(c.top, prime=prime)
    s0 = d.disk_stats()["remap"]
    qemu_io(d.uri(), "read 0 4M", fmt="raw")
    s1 = d.disk_stats()["remap"]
    w1 = d.disk_stats().get("workers", {})
    qemu_io(d.uri(), "read 0 4M", fmt="raw")
    s2 = d.disk_stats()["remap"]
    w2 = d.disk_stats().get("workers", {})
    if d.workers:
        # The daemon planned the workers' misses (from the layers' resolvers, an extent at
        # a time: requests and their metadata lookups, not the cache's hits and misses);
        # their tables answer the rest: the second read (on a connection the other worker
        # took, round robin) misses at most for its first granules before the remaps'
        # read-ahead and priming arrive.
        assert w2["reads_local"] > w1["reads_local"], (w1, w2)
        assert w1["misses"] > 0 and w2["misses"] - w1["misses"] <= 2, (w1, w2)
        assert s1["requests"] > s0["requests"], (s0, s1)
        assert s1["metadata_lookups"] > s0["metadata_lookups"], (s0, s1)
        d.stop()
        return
    assert s2["hits"] > s1["hits"], (s1, s2)  # the second read is all hits
    assert s2["misses"] == s1["misses"], (s1, s2)
    if prime:
        assert s0["primed"] > 0
        assert s1["hits"] > s0["hits"], (s0, s1)
        assert s2["misses"] == 0, s2  # priming left no compulsory miss
    else:
        assert s0["primed"] == 0
        assert s1["misses"] > s0["misses"], (s0, s1)  # a cold cache misses first
    out = run(*COWD, "stats", "--run-dir", d.run_dir, timeout=20).stdout.decode()
    assert f"disk {c.name}" in out and "hits=" in out
    d.stop()


WRITER = '''
import time
h = connect(NAME, structured=False)
n = 0
try:
    while True:
        slot = n % SLOTS
        h.pwrite(bytes([1 + n % 251]) * CHUNK, slot * CHUNK)
        if n % 8 == 7:
            h.flush()
        print(n, flush=True)
        n += 1
except nbd.Error as e:
    print("stopped", e.errno, flush=True)
'''


@pytest.mark.timeout(60)
def test_sigterm_while_a_client_writes(serve: Callable[..., Served], tmp_path: Path) -> None:
    """SIGTERM mid-stream: exit 0, every acknowledged write present afterwards (the last
    unacknowledged one may or may not have landed)."""
    c = make_chain(tmp_path, "qcow2")
    model = c.oracle()
    d = serve(c.top)
    env = nbdsh_env()
    if env is None:
        pytest.skip("nbdsh with python3-libnbd not installed")
    chunk, slots = 65536, c.size // 65536
    head = f"SOCK = {str(d.sock)!r}\nNAME = {c.name!r}\nCHUNK = {chunk}\nSLOTS = {slots}\n"
    w = subprocess.Popen(["nbdsh", "-n", "-c", head + NBDSH_PRELUDE + WRITER], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        acked = -1
        assert w.stdout is not None
        while acked < 300:
            line = w.stdout.readline()
            assert line, w.stderr.read() if w.stderr else b""
            acked = int(line)
        d.terminate()
        rest, _ = w.communicate(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    for line in rest.decode().splitlines():
        if line.startswith("stopped"):
            break
        acked = int(line)
    d.stop()
    c.check()
    data = c.oracle()
    for slot in range(slots):
        last = max((n for n in range(acked + 1) if n % slots == slot), default=None)
        got = data[slot * chunk:(slot + 1) * chunk]
        allowed = {bytes([1 + last % 251]) * chunk if last is not None
                   else model[slot * chunk:(slot + 1) * chunk]}
        if slot == (acked + 1) % slots:  # the write in flight at SIGTERM
            allowed.add(bytes([1 + (acked + 1) % 251]) * chunk)
        assert got in allowed, f"slot {slot}: acked write lost (acked={acked})"


def _serve_fails(rc: int, *args: str | os.PathLike[str]) -> str:
    p = subprocess.run([*COWD, "serve", *map(str, args)], capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == rc, f"rc={p.returncode}\n{err}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.timeout(60)
def test_serve_refuses_bad_setups(serve: Callable[..., Served], tmp_path: Path) -> None:
    """Start-up errors are one line and a non-zero status; a running daemon is untouched."""
    c = make_chain(tmp_path, "qcow2")
    sock = tmp_path / "x.sock"
    run_dir = tmp_path / "runx"
    assert "cannot open" in _serve_fails(1, tmp_path / "missing.qcow2", "--nbd",
                                         f"unix:{sock}", "--run-dir", run_dir)
    assert "--nbd" in _serve_fails(2, c.top, "--nbd", "bogus", "--run-dir", run_dir)
    assert c.base is not None
    assert "parent" in _serve_fails(1, c.top, c.base, "--nbd", f"unix:{sock}",
                                    "--run-dir", run_dir)
    d = serve(c.top, readonly=True)
    assert "already" in _serve_fails(1, c.top, "--nbd", f"unix:{d.sock}", "--run-dir",
                                     run_dir)
    assert "already" in _serve_fails(1, c.top, "--nbd", f"unix:{sock}", "--run-dir",
                                     d.run_dir)
    assert_serves(d, c.oracle())
    d.stop()
    c.check()


# =============================================================================================
# Hostile clients (raw sockets)
# =============================================================================================


@pytest.fixture
def hostile(serve: Callable[..., Served], tmp_path: Path) -> Iterator[tuple[Served, Chain, bytes]]:
    c = make_chain(tmp_path, "qcow2")
    oracle = c.oracle()
    d = serve(c.top)
    yield d, c, oracle
    if d.alive():
        assert_serves(d, None)  # still up and serving after whatever the test did
        d.stop()
        c.check()


@pytest.mark.timeout(60)
def test_hostile_lengths_near_2_32(hostile: tuple[Served, Chain, bytes]) -> None:
    d, c, oracle = hostile
    rss0 = d.rss_kib()
    with RawClient(d.sock) as cl:
        cl.connect(c.name)
        for cmd, length, want in (
            (CMD_READ, 0xFFFFFFFF, {NBD_EINVAL}),
            (CMD_READ, 0xFFFFFE00, {NBD_EINVAL}),
            (CMD_CACHE, 0xFFFFFFFF, {NBD_EINVAL}),
            (CMD_WRITE_ZEROES, 0xFFFFFFFF, {NBD_ENOSPC}),
            (CMD_TRIM, 0xFFFFFFFF, {NBD_EINVAL, NBD_ENOSPC}),
            (CMD_BLOCK_STATUS, 0xFFFFFFFF, {NBD_EINVAL}),  # not negotiated, and too long
        ):
            cl.request(cmd, 0, length, cookie=cmd)
            err, cookie, _ = cl.reply()
            assert cookie == cmd and err in want, (cmd, err)
        cl.request(0x42, 0, 4096, cookie=98)  # an unknown command: EINVAL, and go on
        assert cl.reply()[:2] == (NBD_EINVAL, 98)
        cl.request(CMD_READ, 0, 4096, cookie=99, flags=1 << 15)  # an unknown flag
        assert cl.reply()[:2] == (NBD_EINVAL, 99)
        cl.request(CMD_READ, 0, 4096, cookie=99)
        assert cl.reply(4096) == (0, 99, oracle[:4096])
        # A write header announcing 4 GiB - 1 of payload: refused for that request only, its
        # payload counted down as it arrives and never buffered (RSS checked below); the
        # server neither answers early nor hangs up.
        cl.request(CMD_WRITE, 0, 0xFFFFFFFF, cookie=7, payload=b"\0" * 65536)
        assert not cl.eof_within(1), "the server dropped a client for an oversized write"
    assert_serves(d, oracle)
    assert d.rss_kib() - rss0 < d.memory_bound(64 << 10)


@pytest.mark.timeout(60)
def test_hostile_big_requests_in_range(serve: Callable[..., Served], tmp_path: Path) -> None:
    """On a 6 GiB disk, requests near 2^32 are in range: reads are refused (over the maximum
    block size) without allocating, while zeroing/trimming 4 GiB is legal, is metadata, and
    does not stall another client."""
    size = 6 << 30
    base = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, str(size))
    qemu_io(base, "write -P 0x71 0 1M", f"write -P 0x72 {size - MiB} 1M", fmt="qcow2")
    top = tmp_path / "bigov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    base_sha = sha256(base)
    d = serve(top, prime=False)
    rss0 = d.rss_kib()
    with RawClient(d.sock) as cl, RawClient(d.sock) as other:
        assert cl.connect(top.name) == size
        other.connect(top.name)
        cl.request(CMD_READ, 0, 0xFFFFFFFF, cookie=1)
        err, _, _ = cl.reply()
        assert err in (NBD_EINVAL, NBD_EOVERFLOW), err
        # The maximum block size bounds WRITE_ZEROES unless FAST_ZERO is set; never TRIM.
        cl.request(CMD_WRITE_ZEROES, MiB, 0xFFFF0000, cookie=2)
        assert cl.reply()[:2] == (NBD_EINVAL, 2)
        t0 = time.monotonic()
        cl.request(CMD_WRITE_ZEROES, MiB, 0xFFFF0000, cookie=3, flags=CMD_FLAG_FAST_ZERO)
        cl.request(CMD_TRIM, 1 << 30, 0xFFFF0000, cookie=4)
        other.request(CMD_READ, 0, 4096, cookie=5)
        assert other.reply(4096) == (0, 5, b"\x71" * 4096)
        assert time.monotonic() - t0 < 5, "a 4 GiB zeroing stalled another client"
        assert sorted(cl.reply()[:2] for _ in range(2)) == [(0, 3), (0, 4)]
        cl.request(CMD_READ, size - 4096, 4096, cookie=6)
        assert cl.reply(4096) == (0, 6, b"\x72" * 4096)
        cl.request(CMD_READ, MiB + 0xFFFF0000 - 4096, 4096, cookie=7)
        assert cl.reply(4096) == (0, 7, bytes(4096))
        cl.request(CMD_READ, MiB + 0xFFFF0000, 4096, cookie=8)
        assert cl.reply(4096) == (0, 8, bytes(4096))  # the base had nothing here either
        # A write above the advertised maximum (32 MiB) is NBD_EINVAL for that request only:
        # its payload is read and dropped, and the connection stays in step.
        big = 32 * MiB + 4096
        cl.request(CMD_WRITE, 2 * MiB, big, cookie=9, payload=b"\x99" * big)
        cl.request(CMD_READ, 2 * MiB, 4096, cookie=10)
        assert cl.reply()[:2] == (NBD_EINVAL, 9)
        assert cl.reply(4096) == (0, 10, bytes(4096))  # nothing of it was written
    assert d.rss_kib() - rss0 < d.memory_bound(128 << 10)
    d.stop()
    qemu_check(top)
    assert sha256(base) == base_sha
    qemu_io(top, "read -P 0x71 0 1M", "read -P 0 1M 64M", "read -P 0 3G 1M",
            f"read -P 0 {MiB + 0xFFFF0000 - MiB} 1M", f"read -P 0x72 {size - MiB} 1M",
            fmt="qcow2")


@pytest.mark.timeout(60)
def test_hostile_offsets_wrapping_past_2_64(hostile: tuple[Served, Chain, bytes]) -> None:
    d, c, oracle = hostile
    top = 1 << 64
    with RawClient(d.sock) as cl:
        cl.connect(c.name)
        cases = [
            (CMD_READ, top - 512, 1024, b"", {NBD_EINVAL}),
            (CMD_READ, top - 1, 2, b"", {NBD_EINVAL}),
            (CMD_WRITE, top - 4096, 8192, b"\x55" * 8192, {NBD_EINVAL, NBD_ENOSPC}),
            (CMD_WRITE_ZEROES, top - 4096, 8192, b"", {NBD_EINVAL, NBD_ENOSPC}),
            (CMD_TRIM, top - 4096, 8192, b"", {NBD_EINVAL, NBD_ENOSPC}),
            (CMD_CACHE, top - 4096, 8192, b"", {NBD_EINVAL}),
            (CMD_READ, (1 << 63) + 4096, 4096, b"", {NBD_EINVAL}),
        ]
        for i, (cmd, off, n, payload, want) in enumerate(cases):
            cl.request(cmd, off, n, cookie=100 + i, payload=payload)
            err, cookie, _ = cl.reply()
            assert cookie == 100 + i and err in want, (cmd, off, err)
        cl.request(CMD_FLUSH, top - 1, 0, cookie=7)  # offset is reserved for FLUSH
        assert cl.reply() == (0, 7, b"")
        cl.request(CMD_READ, c.size - 4096, 4096, cookie=8)
        assert cl.reply(4096) == (0, 8, oracle[-4096:])


@pytest.mark.timeout(60)
def test_hostile_option_lengths_and_long_names(hostile: tuple[Served, Chain, bytes]) -> None:
    d, c, _oracle = hostile
    rss0 = d.rss_kib()
    # A 4 GiB option: the server answers TOO_BIG (or just hangs up), promptly.
    for opt in (OPT_GO, OPT_INFO, 0x4242):
        with RawClient(d.sock) as cl:
            cl.handshake()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # hung up early
                cl.send_option(opt, b"\0" * 4096, length=0xFFFFFFFF)
            with contextlib.suppress(EOFError, ConnectionResetError):
                option, rtype, _ = cl.option_reply()
                assert (option, rtype) == (opt, REP_ERR_TOO_BIG)
            assert cl.eof_within(5)
    # Just over what the server buffers: refused, read past, and negotiation goes on.
    with RawClient(d.sock) as cl:
        cl.handshake()
        cl.send_option(OPT_GO, b"\0" * ((64 << 10) + 1))
        option, rtype, _ = cl.option_reply()
        assert option == OPT_GO and rtype & REP_FLAG_ERROR
        assert cl.go(c.name.encode())[0] == c.size  # type: ignore[index]
    # 5000-byte names: an error for GO and INFO, and the same connection can still GO.
    with RawClient(d.sock) as cl:
        cl.handshake()
        name = b"n" * 5000
        assert cl.go(name) in (REP_FLAG_ERROR + 6, REP_FLAG_ERROR + 3, REP_ERR_TOO_BIG)
        cl.send_option(OPT_INFO, struct.pack(">I", len(name)) + name + b"\0\0")
        assert cl.option_reply()[1] & REP_FLAG_ERROR
        assert cl.go(c.name.encode())[0] == c.size  # type: ignore[index]
        cl.request(CMD_DISC, 0, 0)
    # EXPORT_NAME cannot be refused: a 5000-byte (or 4 GiB) name gets a hang-up.
    for n in (5000, 0xFFFFFFFF):
        with RawClient(d.sock) as cl:
            cl.handshake()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # hung up early
                cl.send_option(OPT_EXPORT_NAME, b"n" * 5000, length=n)
            assert cl.eof_within(5)
    with RawClient(d.sock) as cl:  # ABORT is answered and the server closes
        cl.handshake()
        cl.send_option(OPT_ABORT)
        assert cl.option_reply() == (OPT_ABORT, REP_ACK, b"")  # the spec's MUST
        assert cl.eof_within(5)
    assert d.rss_kib() - rss0 < d.memory_bound(32 << 10)


@pytest.mark.timeout(60)
def test_hostile_hangup_with_64_replies_queued(hostile: tuple[Served, Chain, bytes]) -> None:
    d, c, _oracle = hostile
    rss0 = d.rss_kib()
    for round_ in range(20):
        cl = RawClient(d.sock)
        cl.connect(c.name)
        reqs = b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ if i % 4 else CMD_WRITE_ZEROES,
                        i, (i * 65536) % (c.size - 256 << 10), 256 << 10)
            for i in range(64))
        cl.s.sendall(reqs)
        if round_ % 2:  # half of them also leave a write payload unfinished
            cl.request(CMD_WRITE, 0, MiB, cookie=999, payload=b"\0" * 1000)
        cl.close()
    time.sleep(0.5)
    assert d.rss_kib() - rss0 < d.memory_bound(64 << 10)
    counters = d.stats()["nbd"]
    assert isinstance(counters, dict) and counters["connections"] >= 20


@pytest.mark.timeout(90)
def test_hostile_thousand_idle_handshakes(hostile: tuple[Served, Chain, bytes]) -> None:
    """1000 clients connect and say nothing: a well-behaved client still gets served at
    once, and the daemon's memory stays bounded."""
    d, _, oracle = hostile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        if hard != resource.RLIM_INFINITY and hard < 1100:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1100")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    rss0 = d.rss_kib()
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            s.setblocking(False)
            while True:  # a unix socket's full backlog is EAGAIN, not EINPROGRESS
                try:
                    s.connect(str(d.sock))
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the daemon stopped accepting"
                    time.sleep(0.001)
        time.sleep(0.5)
        assert_serves(d, oracle, within_s=3)
        qemu_io(d.uri(), "write -P 0x66 0 64k", "read -P 0x66 0 64k", fmt="raw")
        rss = d.rss_kib()
        assert rss - rss0 < d.memory_bound(32 << 10), \
            f"RSS grew {rss - rss0} KiB for 1000 idle sockets"
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert_serves(d, b"\x66" * 65536 + oracle[65536:], within_s=3)
    counters = d.stats()["nbd"]
    assert isinstance(counters, dict) and counters["handshakes_evicted"] > 0, counters


def _flood(cl: RawClient, requests: Iterator[bytes], limit_bytes: int) -> int:
    """Send until the server stops reading (3 s without progress) or ``limit_bytes``."""
    sent = 0
    cl.s.settimeout(3)
    try:
        for req in requests:
            cl.s.sendall(req)
            sent += len(req)
            if sent >= limit_bytes:
                break
    except TimeoutError:
        pass
    return sent


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cmd", ["write", "read"])
def test_hostile_client_that_never_reads_replies(hostile: tuple[Served, Chain, bytes],
                                                 cmd: str) -> None:
    """Requests pile up unanswered: once the replies fill the socket, the server stops reading
    at its per-connection budget, so memory stays bounded; other clients are served; SIGTERM
    still exits 0 promptly, and acknowledged-or-not, the writes that were made are durable
    and consistent (qemu-img check at teardown)."""
    from cowd.frontends.nbd.server import MAX_INFLIGHT_BYTES
    from cowd.frontends.nbd.wire import MAX_BUFFERED_BYTES

    d, c, oracle = hostile
    rss0 = d.rss_kib()
    cl = RawClient(d.sock)
    cl.connect(c.name)
    header = struct.Struct(">IHHQQI")
    payload = b"\x5c" * MiB
    if cmd == "write":
        reqs = (header.pack(REQUEST_MAGIC, 0, CMD_WRITE, i, MiB + (i * MiB) % (c.size - 2 * MiB),
                            MiB) + payload for i in range(1 << 20))
        limit = 1 << 30
    else:
        reqs = (header.pack(REQUEST_MAGIC, 0, CMD_READ, i, (i * MiB) % (c.size - MiB), MiB)
                for i in range(1 << 20))
        limit = 1 << 20  # 37449 requests, 36 GiB of replies
    sent = _flood(cl, reqs, limit)
    assert sent < limit, "the server never stopped reading"
    time.sleep(0.3)
    grew = (d.rss_kib() - rss0) << 10
    # One connection's budget and buffer, plus what each process of the daemon may grow by.
    assert grew < MAX_INFLIGHT_BYTES + MAX_BUFFERED_BYTES + (d.memory_bound(32 << 10) << 10), \
        grew >> 20
    assert_serves(d, oracle)  # offsets 0 and size - 4096 were not written
    t0 = time.monotonic()
    d.stop(timeout=30)
    took = time.monotonic() - t0
    cl.close()
    assert took < 15, f"shutdown took {took:.1f} s with a stuck client"
    c.check()
