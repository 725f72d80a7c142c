"""The malformed-image corpus: some 260 hostile images (88 of them truncations), each a
:class:`Case` of :data:`CASES`, and what a forked child does with one (:func:`case_in_child`).
tests/integration/test_corpus.py holds every case to the contract through formats/;
test_reliability_hostile.py runs a sample through ``cowd serve`` and ``cowd attach``.

Small valid images (:data:`SEEDS`) are made by qemu-img / qemu-io at test time (qcow2 v2 and
v3, qcow2 with a backing file and header extensions, qcow v1, VHD dynamic and fixed); the
session fixture :func:`seeds` builds them.  Each case copies one (:func:`materialize`) and
breaks it in one way (a header field, a table entry, an extension, a backing name, a loop in
the backing chain, a truncation).  Nothing binary is committed.

:func:`case_in_child` runs in a child of tests/support/forkserver.py (the server imports this
module by name): ``formats.open_image(path)``, then reading the whole disk (bounded), info()
and check(), once with the format probed and once forced; the answer is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import formats
from formats.base import MAX_CHAIN_DEPTH, HostFile
from formats.errors import FormatError
from tests.support.ondisk import peek, poke, poke_bytes, u64s
from tests.support.peers import qemu_img, qemu_io, qemu_raw, read_all

KiB = 1024
MiB = 1024 * KiB

# Disks up to this size are read whole with support.peers.read_all; larger (mutated size fields)
# are sampled: head, tail and spots in between.
READ_ALL_LIMIT_BYTES = 64 * MiB
SAMPLE_HEAD_BYTES = 8 * MiB
SAMPLE_SPOT_BYTES = 64 * KiB
SAMPLE_SPOTS = 16

SEED_SIZE = 4 * MiB

# ---- on-disk layouts (offsets as in the specs) ------------------------------------------------

# qcow2 (qemu docs/interop/qcow2.txt), big-endian
Q2_MAGIC = 0
Q2_VERSION = 4
Q2_BACKING_FILE_OFFSET = 8
Q2_BACKING_FILE_SIZE = 16
Q2_CLUSTER_BITS = 20
Q2_SIZE = 24
Q2_CRYPT_METHOD = 32
Q2_L1_SIZE = 36
Q2_L1_TABLE_OFFSET = 40
Q2_REFCOUNT_TABLE_OFFSET = 48
Q2_REFCOUNT_TABLE_CLUSTERS = 56
Q2_NB_SNAPSHOTS = 60
Q2_SNAPSHOTS_OFFSET = 64
Q2_INCOMPATIBLE_FEATURES = 72
Q2_REFCOUNT_ORDER = 96
Q2_HEADER_LENGTH = 100
Q2_V2_HEADER_BYTES = 72
Q2_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of L1 / L2 / refcount table entries
Q2_COPIED = 1 << 63
Q2_COMPRESSED = 1 << 62

# qcow v1 (the header of qemu's block/qcow.c), big-endian
Q1_MAGIC = 0
Q1_VERSION = 4
Q1_BACKING_FILE_OFFSET = 8
Q1_BACKING_FILE_SIZE = 16
Q1_SIZE = 24
Q1_CLUSTER_BITS = 32
Q1_L2_BITS = 33
Q1_CRYPT_METHOD = 36
Q1_L1_TABLE_OFFSET = 40
Q1_COMPRESSED = 1 << 63

# VHD (Microsoft's "Virtual Hard Disk Image Format Specification"), big-endian
VHD_FOOTER_BYTES = 512
VHD_COOKIE = 0
VHD_FILE_FORMAT_VERSION = 12
VHD_DATA_OFFSET = 16
VHD_CURRENT_SIZE = 48
VHD_DISK_TYPE = 60
VHD_CHECKSUM = 64
VHD_DYN_HEADER_BYTES = 1024
DYN_COOKIE = 0
DYN_TABLE_OFFSET = 16
DYN_HEADER_VERSION = 24
DYN_MAX_TABLE_ENTRIES = 28
DYN_BLOCK_SIZE = 32
DYN_CHECKSUM = 36


# ---- byte-level helpers (and tests/support/ondisk.py's) ---------------------------------------

def truncate(path: Path, length: int) -> None:
    os.truncate(path, length)


# qcow2 structure finders (on a known-good seed)

def q2_cluster_size(p: Path) -> int:
    return 1 << peek(p, Q2_CLUSTER_BITS, ">I")


def q2_l1(p: Path) -> tuple[int, list[int]]:
    off = peek(p, Q2_L1_TABLE_OFFSET, ">Q")
    return off, u64s(p, off, peek(p, Q2_L1_SIZE, ">I"))


def q2_first_l1_entry(p: Path) -> tuple[int, int]:
    """(file offset of the first non-zero L1 entry, the L2 table's file offset)."""
    off, l1 = q2_l1(p)
    i = next(i for i, e in enumerate(l1) if e & Q2_OFFSET_MASK)
    return off + 8 * i, l1[i] & Q2_OFFSET_MASK


def q2_l2_entry(p: Path, compressed: bool) -> int:
    """File offset of the first data (or compressed) L2 entry in any L2 table."""
    cs = q2_cluster_size(p)
    _off, l1 = q2_l1(p)
    for e in l1:
        l2 = e & Q2_OFFSET_MASK
        if not l2:
            continue
        for i, entry in enumerate(u64s(p, l2, cs // 8)):
            if compressed and entry & Q2_COMPRESSED:
                return l2 + 8 * i
            if not compressed and not entry & Q2_COMPRESSED and entry & Q2_OFFSET_MASK:
                return l2 + 8 * i
    raise AssertionError(f"{p}: no {'compressed' if compressed else 'data'} L2 entry")


def q2_extensions(p: Path) -> list[tuple[int, int, int]]:
    """(file offset, type, length) of each header extension."""
    version = peek(p, Q2_VERSION, ">I")
    pos = Q2_V2_HEADER_BYTES if version == 2 else peek(p, Q2_HEADER_LENGTH, ">I")
    out: list[tuple[int, int, int]] = []
    while True:
        typ, length = peek(p, pos, ">I"), peek(p, pos + 4, ">I")
        if typ == 0:
            return out
        out.append((pos, typ, length))
        pos += 8 + (length + 7) // 8 * 8


Q2_EXT_BACKING_FORMAT = 0xE2792ACA
Q2_EXT_BITMAPS = 0x23852875


def q2_ext(p: Path, typ: int) -> int:
    return next(off for off, t, _n in q2_extensions(p) if t == typ)


def q2_compressed_max_sectors(p: Path) -> None:
    """Set every bit of a compressed entry's sector count (bits x..61, x = 62 - (cb - 8))."""
    at = q2_l2_entry(p, True)
    x = 62 - (peek(p, Q2_CLUSTER_BITS, ">I") - 8)
    poke(p, at, ">Q", peek(p, at, ">Q") | (((1 << 62) - 1) & ~((1 << x) - 1)))


# qcow v1 structure finders

def q1_first_l1_entry(p: Path) -> tuple[int, int]:
    off = peek(p, Q1_L1_TABLE_OFFSET, ">Q")
    i = 0
    while not (e := peek(p, off + 8 * i, ">Q")):
        i += 1
    return off + 8 * i, e


def q1_l2_entry(p: Path, compressed: bool) -> int:
    l1_off = peek(p, Q1_L1_TABLE_OFFSET, ">Q")
    size, cbits, l2bits = peek(p, Q1_SIZE, ">Q"), peek(p, Q1_CLUSTER_BITS, ">B"), \
        peek(p, Q1_L2_BITS, ">B")
    l1_size = -(-size // (1 << (cbits + l2bits)))
    for l2 in u64s(p, l1_off, l1_size):
        if not l2:
            continue
        for i, entry in enumerate(u64s(p, l2, 1 << l2bits)):
            if entry and bool(entry & Q1_COMPRESSED) == compressed:
                return l2 + 8 * i
    raise AssertionError(f"{p}: no {'compressed' if compressed else 'data'} L2 entry")


# VHD helpers: mutate a field, then (unless the case is about checksums) re-seal

def vhd_footer_offsets(p: Path) -> list[int]:
    """Where the footer lives: the end, and for dynamic disks also its copy at offset 0."""
    end = p.stat().st_size - VHD_FOOTER_BYTES
    with open(p, "rb") as f:
        head = f.read(8)
    return [end, 0] if head == b"conectix" and end > 0 else [end]


def vhd_dyn_offset(p: Path) -> int:
    return peek(p, p.stat().st_size - VHD_FOOTER_BYTES + VHD_DATA_OFFSET, ">Q")


def _ones_complement_sum(block: bytes, checksum_at: int) -> int:
    zeroed = block[:checksum_at] + bytes(4) + block[checksum_at + 4 :]
    return ~sum(zeroed) & 0xFFFFFFFF


def vhd_seal(p: Path) -> None:
    """Recompute the footer checksums (both copies) and the dynamic header's."""
    with open(p, "r+b") as f:
        for off in vhd_footer_offsets(p):
            f.seek(off)
            footer = f.read(VHD_FOOTER_BYTES)
            f.seek(off + VHD_CHECKSUM)
            f.write(struct.pack(">I", _ones_complement_sum(footer, VHD_CHECKSUM)))
        f.seek(p.stat().st_size - VHD_FOOTER_BYTES + VHD_DISK_TYPE)
        if struct.unpack(">I", f.read(4))[0] in (3, 4):
            dyn = vhd_dyn_offset(p)
            if dyn + VHD_DYN_HEADER_BYTES <= p.stat().st_size:
                f.seek(dyn)
                header = f.read(VHD_DYN_HEADER_BYTES)
                f.seek(dyn + DYN_CHECKSUM)
                f.write(struct.pack(">I", _ones_complement_sum(header, DYN_CHECKSUM)))


def vhd_footer_field(field_offset: int, fmt: str, value: int | bytes, *, seal: bool = True,
                     copies: str = "both") -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        offs = vhd_footer_offsets(p)
        if copies == "end":
            offs = offs[:1]
        for off in offs:
            poke(p, off + field_offset, fmt, value)
        if seal:
            vhd_seal(p)
    return mutate


def vhd_dyn_field(field_offset: int, fmt: str, value: int | bytes,
                  seal: bool = True) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        poke(p, vhd_dyn_offset(p) + field_offset, fmt, value)
        if seal:
            vhd_seal(p)
    return mutate


def vhd_bat_entry(value: int) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        bat = peek(p, vhd_dyn_offset(p) + DYN_TABLE_OFFSET, ">Q")
        poke(p, bat, ">I", value)
    return mutate


def vhd_bat_entry_self() -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        bat = peek(p, vhd_dyn_offset(p) + DYN_TABLE_OFFSET, ">Q")
        poke(p, bat, ">I", bat // 512)  # block 0 "lives" on top of the BAT itself
    return mutate


# ---- seeds ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedSpec:
    family: str  # the codec under test: qcow2 | qcow | vhd
    top: str  # file name of the image in the seed directory
    build: Callable[[Path], None]
    # A fixed VHD has its only footer at the end; the probe sees the first 4 KiB, so (as in
    # qemu) it opens as raw unless the format is given.
    probeable: bool = True


def _base_raw(d: Path) -> None:
    (d / "base.raw").write_bytes(random.Random(0xBA5E).randbytes(SEED_SIZE))


def _build_qcow2(opts: str, cmds: list[str], backed: bool = False, bitmap: bool = False,
                 top: str = "") -> Callable[[Path], None]:
    def build(d: Path) -> None:
        extra: list[str] = []
        if backed:
            _base_raw(d)
            extra = ["-b", "base.raw", "-F", "raw"]
        qemu_img("create", "-f", "qcow2", "-o", opts, *extra, d / top, str(SEED_SIZE))
        if bitmap:
            qemu_img("bitmap", "--add", d / top, "bm0")
        qemu_io(d / top, *cmds, fmt="qcow2")
    return build


def _build_qcow(cmds: list[str], backed: bool, top: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        extra: list[str] = []
        if backed:
            _base_raw(d)
            extra = ["-b", "base.raw", "-F", "raw"]
        qemu_img("create", "-f", "qcow", *extra, d / top, str(SEED_SIZE))
        qemu_io(d / top, *cmds, fmt="qcow")
    return build


def _build_vhd(subformat: str, top: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat}", d / top,
                 str(SEED_SIZE))
        qemu_io(d / top, "write -P 0x5a 0 64k", "write -P 0x33 1m 8k",
                "write -P 0x44 2100k 4k", fmt="vpc")
    return build


_Q2_WRITES = ["write -P 0x5a 0 192k", "write -P 0x33 1m 64k", "write -z 2m 64k",
              "write -c -P 0x44 3m 64k"]

SEEDS: dict[str, SeedSpec] = {
    "qcow2v3": SeedSpec("qcow2", "v3.qcow2", _build_qcow2("compat=1.1", _Q2_WRITES,
                                                          top="v3.qcow2")),
    "qcow2v2": SeedSpec("qcow2", "v2.qcow2", _build_qcow2(
        "compat=0.10", ["write -P 0x5a 0 128k", "write -c -P 0x44 3m 64k"], top="v2.qcow2")),
    "qcow2backed": SeedSpec("qcow2", "top.qcow2", _build_qcow2(
        "compat=1.1", ["write -P 0x11 64k 64k", "write -P 0x12 3m 4k"], backed=True,
        top="top.qcow2")),
    # 4 KiB clusters, a backing-format and a bitmaps extension, autoclear bit set
    "qcow2ext": SeedSpec("qcow2", "ext.qcow2", _build_qcow2(
        "compat=1.1,cluster_size=4096", ["write -P 0x21 0 64k", "write -c -P 0x22 1m 64k",
                                         "write -z 2m 64k"],
        backed=True, bitmap=True, top="ext.qcow2")),
    "qcow": SeedSpec("qcow", "v1.qcow", _build_qcow(
        ["write -P 0x5a 0 64k", "write -P 0x33 1m 4k", "write -c -P 0x44 3m 4k"],
        backed=False, top="v1.qcow")),
    "qcowbacked": SeedSpec("qcow", "top.qcow", _build_qcow(
        ["write -P 0x11 64k 64k", "write -P 0x12 3m 1536"], backed=True, top="top.qcow")),
    "vhddyn": SeedSpec("vhd", "d.vhd", _build_vhd("dynamic", "d.vhd")),
    "vhdfixed": SeedSpec("vhd", "f.vhd", _build_vhd("fixed", "f.vhd"), probeable=False),
}


@dataclass
class BuiltSeed:
    dir: Path
    top: Path
    sha256: str  # of the disk as qemu-img convert -O raw reads it


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltSeed]:
    out: dict[str, BuiltSeed] = {}
    for name, spec in SEEDS.items():
        d = tmp_path_factory.mktemp(f"seed-{name}")
        spec.build(d)
        raw = qemu_raw(d / spec.top, d, "vpc" if spec.family == "vhd" else spec.family)
        out[name] = BuiltSeed(d, d / spec.top, hashlib.sha256(raw).hexdigest())
    return out


_LANDED: dict[str, bool] = {}


def codec_landed(family: str, seed: BuiltSeed) -> bool:
    """False while the codec is a placeholder whose open() raises NotImplementedError."""
    if family not in _LANDED:
        cls = formats.FORMATS[family]
        f = HostFile(str(seed.top), False)
        try:
            cls.open(str(seed.top), f, False).close()
            _LANDED[family] = True
        except NotImplementedError:
            _LANDED[family] = False
        except Exception:
            _LANDED[family] = True  # landed, and broken on a valid image: the seed case says so
        finally:
            if f.fd >= 0:
                f.close()
    return _LANDED[family]


# ---- cases ------------------------------------------------------------------------------------

Mutation = Callable[[Path], "Path | None"]


@dataclass(frozen=True)
class Case:
    id: str
    seed: str
    mutate: Mutation | None  # gets the copied top image; may return a different top
    must_fail: bool = False  # a FormatError is the only right answer (loops, protocols, ...)
    must_open: bool = False  # must succeed (e.g. a chain exactly at the depth limit)

    @property
    def family(self) -> str:
        return SEEDS[self.seed].family


def field(off: int, fmt: str, value: int | bytes) -> Mutation:
    def mutate(p: Path) -> None:
        poke(p, off, fmt, value)
    return mutate


def field_rel(locate: Callable[[Path], int], fmt: str,
              value: int | bytes | Callable[[int], int]) -> Mutation:
    """Set the field at locate(p); value may be a function of the old value."""
    def mutate(p: Path) -> None:
        at = locate(p)
        v = value(peek(p, at, fmt)) if callable(value) else value
        poke(p, at, fmt, v)
    return mutate


def chained(*muts: Mutation) -> Mutation:
    def mutate(p: Path) -> Path | None:
        top = p
        for m in muts:
            top = m(top) or top
        return top
    return mutate


def cut(length: int | Callable[[int], int]) -> Mutation:
    def mutate(p: Path) -> None:
        size = p.stat().st_size
        truncate(p, length(size) if callable(length) else length)
    return mutate


def qemu_create(fmt: str, name: str, backing: str | None, size: str = "1M") -> Mutation:
    """Replace the case with a fresh image recording ``backing`` (-u: not opened)."""
    def mutate(p: Path) -> Path:
        top = p.parent / name
        args: list[str] = ["create", "-f", fmt, "-u"]
        if backing is not None:
            args += ["-b", backing, "-F", "raw" if fmt == "qcow" else fmt]
        qemu_img(*args, top, size)
        return top
    return mutate


def backing_loop(fmt: str, ext: str) -> Mutation:
    def mutate(p: Path) -> Path:
        a, b = p.parent / f"a.{ext}", p.parent / f"b.{ext}"
        qemu_img("create", "-f", fmt, "-u", "-b", b.name, "-F", fmt, a, "1M")
        qemu_img("create", "-f", fmt, "-u", "-b", a.name, "-F", fmt, b, "1M")
        return a
    return mutate


def backing_self(fmt: str, ext: str) -> Mutation:
    def mutate(p: Path) -> Path:
        s, t = p.parent / f"s.{ext}", p.parent / f"t.{ext}"
        qemu_img("create", "-f", fmt, "-u", "-b", t.name, "-F", fmt, s, "1M")
        s.rename(t)  # now t records itself
        return t
    return mutate


def backing_chain(fmt: str, ext: str, parents: int) -> Mutation:
    """top -> c01 -> ... -> c<parents>: qemu-img makes one image, the rest are renamed copies."""
    def mutate(p: Path) -> Path:
        d = p.parent
        template = d / f"t.{ext}"
        qemu_img("create", "-f", fmt, "-u", "-b", f"c00.{ext}", "-F", fmt, template, "1M")
        body = template.read_bytes()
        old = f"c00.{ext}".encode()
        assert body.count(old) == 1
        for i in range(parents):
            (d / f"c{i:02d}.{ext}").write_bytes(body.replace(old, f"c{i + 1:02d}.{ext}".encode()))
        qemu_img("create", "-f", fmt, d / f"c{parents:02d}.{ext}", "1M")
        template.unlink()
        return d / f"c00.{ext}"
    return mutate


def q2_set_backing_name(name: bytes) -> Mutation:
    """Write a new backing name where the old one was (room enough in cluster 0)."""
    def mutate(p: Path) -> None:
        off = peek(p, Q2_BACKING_FILE_OFFSET, ">Q")
        poke_bytes(p, off, name)
        poke(p, Q2_BACKING_FILE_SIZE, ">I", len(name))
    return mutate


def q1_set_backing_name(name: bytes) -> Mutation:
    """qcow v1 keeps the name right after the header, then the L1 table: move L1 to EOF."""
    def mutate(p: Path) -> None:
        l1_off = peek(p, Q1_L1_TABLE_OFFSET, ">Q")
        size, cbits, l2bits = (peek(p, Q1_SIZE, ">Q"), peek(p, Q1_CLUSTER_BITS, ">B"),
                               peek(p, Q1_L2_BITS, ">B"))
        l1_bytes = 8 * -(-size // (1 << (cbits + l2bits)))
        with open(p, "r+b") as f:
            f.seek(l1_off)
            l1 = f.read(l1_bytes)
            end = f.seek(0, os.SEEK_END)
            new_l1 = (end + 511) // 512 * 512
            f.seek(new_l1)
            f.write(l1)
            f.seek(48)
            f.write(name)
        poke(p, Q1_BACKING_FILE_OFFSET, ">Q", 48)
        poke(p, Q1_BACKING_FILE_SIZE, ">I", len(name))
        poke(p, Q1_L1_TABLE_OFFSET, ">Q", new_l1)
    return mutate


def _truncations(seed: str) -> list[Case]:
    lengths: list[tuple[str, int | Callable[[int], int]]] = [
        ("0", 0), ("1", 1), ("47", 47), ("100", 100), ("511", 511), ("4k+1", 4097),
        ("65k", 65 * KiB), ("third", lambda n: n // 3), ("half", lambda n: n // 2),
        ("-512", lambda n: n - 512), ("-1", lambda n: n - 1),
    ]
    return [Case(f"{seed}-truncate-{name}", seed, cut(n)) for name, n in lengths]


J = 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}'
PROTOCOL_NAMES = [("json", J), ("nbd", "nbd:localhost:10809"),
                  ("http", "http://example.com/disk.img"), ("nbd-unix", "nbd+unix:///x?socket=/s")]

BIG = 1 << 40  # a file offset far past the end of any seed

CASES: list[Case] = [
    # ---- the seeds themselves: must open and read as qemu reads them
    *(Case(f"{name}-valid", name, None, must_open=True) for name in SEEDS),

    # ---- qcow2 header
    Case("qcow2-bad-magic", "qcow2v3", field(Q2_MAGIC, ">4s", b"QFI\xfa")),
    Case("qcow2-version-1", "qcow2v3", field(Q2_VERSION, ">I", 1)),
    Case("qcow2-version-4", "qcow2v3", field(Q2_VERSION, ">I", 4)),
    Case("qcow2-version-0", "qcow2v2", field(Q2_VERSION, ">I", 0)),
    Case("qcow2-cluster-bits-0", "qcow2v2", field(Q2_CLUSTER_BITS, ">I", 0)),
    Case("qcow2-cluster-bits-8", "qcow2v3", field(Q2_CLUSTER_BITS, ">I", 8)),
    Case("qcow2-cluster-bits-22", "qcow2v3", field(Q2_CLUSTER_BITS, ">I", 22)),
    Case("qcow2-cluster-bits-63", "qcow2v3", field(Q2_CLUSTER_BITS, ">I", 63)),
    Case("qcow2-cluster-bits-2^32-1", "qcow2v3", field(Q2_CLUSTER_BITS, ">I", 0xFFFFFFFF)),
    Case("qcow2-size-2^63", "qcow2v3", field(Q2_SIZE, ">Q", 1 << 63)),
    Case("qcow2-size-2^64-1", "qcow2v3", field(Q2_SIZE, ">Q", (1 << 64) - 1)),
    Case("qcow2-size-2^62-v2", "qcow2v2", field(Q2_SIZE, ">Q", 1 << 62)),
    Case("qcow2-size-1TiB", "qcow2v3", field(Q2_SIZE, ">Q", 1 << 40)),
    Case("qcow2-crypt-aes", "qcow2v3", field(Q2_CRYPT_METHOD, ">I", 1)),
    Case("qcow2-crypt-unknown", "qcow2v3", field(Q2_CRYPT_METHOD, ">I", 7)),
    Case("qcow2-l1-size-2^32-1", "qcow2v3", field(Q2_L1_SIZE, ">I", 0xFFFFFFFF)),
    Case("qcow2-l1-size-2^32-2", "qcow2v3", field(Q2_L1_SIZE, ">I", 0xFFFFFFFE)),
    Case("qcow2-l1-size-2^31-1", "qcow2v2", field(Q2_L1_SIZE, ">I", 0x7FFFFFFF)),
    Case("qcow2-l1-size-4Mi+1", "qcow2v3", field(Q2_L1_SIZE, ">I", (4 << 20) + 1)),
    Case("qcow2-l1-size-0", "qcow2v3", field(Q2_L1_SIZE, ">I", 0)),
    Case("qcow2-l1-offset-past-eof", "qcow2v3", field(Q2_L1_TABLE_OFFSET, ">Q", BIG)),
    Case("qcow2-l1-offset-2^64-512", "qcow2v3",
         field(Q2_L1_TABLE_OFFSET, ">Q", (1 << 64) - 512)),
    Case("qcow2-l1-offset-unaligned", "qcow2v3",
         field_rel(lambda p: Q2_L1_TABLE_OFFSET, ">Q", lambda v: v + 8)),
    Case("qcow2-l1-offset-on-header", "qcow2v3", field(Q2_L1_TABLE_OFFSET, ">Q", 0)),
    Case("qcow2-l1-on-refcount-table", "qcow2v3", lambda p: poke(
        p, Q2_L1_TABLE_OFFSET, ">Q", peek(p, Q2_REFCOUNT_TABLE_OFFSET, ">Q"))),
    Case("qcow2-refcount-table-past-eof", "qcow2v3",
         field(Q2_REFCOUNT_TABLE_OFFSET, ">Q", BIG)),
    Case("qcow2-refcount-table-unaligned", "qcow2v3",
         field_rel(lambda p: Q2_REFCOUNT_TABLE_OFFSET, ">Q", lambda v: v + 8)),
    Case("qcow2-refcount-table-on-header", "qcow2v3", field(Q2_REFCOUNT_TABLE_OFFSET, ">Q", 0)),
    Case("qcow2-refcount-clusters-2^32-1", "qcow2v3",
         field(Q2_REFCOUNT_TABLE_CLUSTERS, ">I", 0xFFFFFFFF)),
    Case("qcow2-refcount-clusters-2^20", "qcow2v2",
         field(Q2_REFCOUNT_TABLE_CLUSTERS, ">I", 1 << 20)),
    Case("qcow2-refcount-clusters-0", "qcow2v3", field(Q2_REFCOUNT_TABLE_CLUSTERS, ">I", 0)),
    Case("qcow2-nb-snapshots-2^32-1", "qcow2v3", chained(
        field(Q2_NB_SNAPSHOTS, ">I", 0xFFFFFFFF), field(Q2_SNAPSHOTS_OFFSET, ">Q", 65536))),
    Case("qcow2-snapshots-past-eof", "qcow2v3", chained(
        field(Q2_NB_SNAPSHOTS, ">I", 1), field(Q2_SNAPSHOTS_OFFSET, ">Q", BIG))),
    Case("qcow2-snapshots-unaligned", "qcow2v2", chained(
        field(Q2_NB_SNAPSHOTS, ">I", 1), field(Q2_SNAPSHOTS_OFFSET, ">Q", 65536 + 3))),
    Case("qcow2-incompat-unknown-bit", "qcow2v3",
         field(Q2_INCOMPATIBLE_FEATURES, ">Q", 1 << 63)),
    Case("qcow2-incompat-dirty", "qcow2v3", field(Q2_INCOMPATIBLE_FEATURES, ">Q", 1)),
    Case("qcow2-incompat-corrupt", "qcow2v3", field(Q2_INCOMPATIBLE_FEATURES, ">Q", 2)),
    Case("qcow2-incompat-data-file-no-ext", "qcow2v3",
         field(Q2_INCOMPATIBLE_FEATURES, ">Q", 4)),
    Case("qcow2-incompat-compression-no-field", "qcow2v3",
         field(Q2_INCOMPATIBLE_FEATURES, ">Q", 8)),
    Case("qcow2-refcount-order-7", "qcow2v3", field(Q2_REFCOUNT_ORDER, ">I", 7)),
    Case("qcow2-refcount-order-2^32-1", "qcow2v3", field(Q2_REFCOUNT_ORDER, ">I", 0xFFFFFFFF)),
    Case("qcow2-header-length-2^32-1", "qcow2v3", field(Q2_HEADER_LENGTH, ">I", 0xFFFFFFFF)),
    Case("qcow2-header-length-0", "qcow2v3", field(Q2_HEADER_LENGTH, ">I", 0)),
    Case("qcow2-header-length-103", "qcow2v3", field(Q2_HEADER_LENGTH, ">I", 103)),
    Case("qcow2-header-length-past-cluster", "qcow2v3",
         field(Q2_HEADER_LENGTH, ">I", 65536 + 8)),
    # ---- qcow2 header extensions
    Case("qcow2-ext-length-huge", "qcow2ext",
         field_rel(lambda p: q2_extensions(p)[0][0] + 4, ">I", 0xFFFFFFF0)),
    Case("qcow2-ext-length-past-cluster", "qcow2ext",
         field_rel(lambda p: q2_extensions(p)[0][0] + 4, ">I", 4096)),
    Case("qcow2-ext-bitmaps-length-huge", "qcow2ext",
         field_rel(lambda p: q2_ext(p, Q2_EXT_BITMAPS) + 4, ">I", 0x7FFFFFFF)),
    Case("qcow2-ext-v3-first-length-huge", "qcow2v3",
         field_rel(lambda p: q2_extensions(p)[0][0] + 4, ">I", 0xFFFFFFFF)),
    Case("qcow2-ext-unknown-type", "qcow2ext",
         field_rel(lambda p: q2_extensions(p)[0][0], ">I", 0x12345678)),
    Case("qcow2-ext-backing-format-empty", "qcow2ext",
         field_rel(lambda p: q2_ext(p, Q2_EXT_BACKING_FORMAT) + 4, ">I", 0)),
    Case("qcow2-ext-backing-format-unknown", "qcow2ext",
         field_rel(lambda p: q2_ext(p, Q2_EXT_BACKING_FORMAT) + 8, ">3s", b"zzz")),
    Case("qcow2-ext-backing-format-qcow2-over-raw", "qcow2backed", lambda p: poke_bytes(
        p, q2_ext(p, Q2_EXT_BACKING_FORMAT) + 4, struct.pack(">I", 5) + b"qcow2")),
    # ---- qcow2 tables
    Case("qcow2-l1-entry-past-eof", "qcow2v3",
         field_rel(lambda p: q2_first_l1_entry(p)[0], ">Q", Q2_COPIED | BIG)),
    Case("qcow2-l1-entry-unaligned", "qcow2v3",
         field_rel(lambda p: q2_first_l1_entry(p)[0], ">Q", lambda v: v + 0x200)),
    Case("qcow2-l1-entry-reserved-bits", "qcow2v3",
         field_rel(lambda p: q2_first_l1_entry(p)[0], ">Q", lambda v: v | 0x1FF)),
    Case("qcow2-l1-entry-on-header", "qcow2v3",
         field_rel(lambda p: q2_first_l1_entry(p)[0], ">Q", Q2_COPIED)),
    Case("qcow2-l1-entry-offset-2^56-512", "qcow2ext",
         field_rel(lambda p: q2_first_l1_entry(p)[0], ">Q", Q2_OFFSET_MASK)),
    Case("qcow2-l2-data-past-eof", "qcow2v3",
         field_rel(lambda p: q2_l2_entry(p, False), ">Q", Q2_COPIED | BIG)),
    Case("qcow2-l2-data-unaligned", "qcow2v3",
         field_rel(lambda p: q2_l2_entry(p, False), ">Q", lambda v: v + 0x200)),
    Case("qcow2-l2-data-on-header", "qcow2v2",
         field_rel(lambda p: q2_l2_entry(p, False), ">Q", Q2_COPIED)),
    Case("qcow2-l2-data-reserved-bits", "qcow2ext",
         field_rel(lambda p: q2_l2_entry(p, False), ">Q", lambda v: v | (0x3F << 56))),
    Case("qcow2-l2-compressed-huge-length", "qcow2v3", q2_compressed_max_sectors),
    Case("qcow2-l2-compressed-past-eof", "qcow2v2", field_rel(
        lambda p: q2_l2_entry(p, True), ">Q", Q2_COMPRESSED | (1 << 40))),
    Case("qcow2-l2-compressed-on-header", "qcow2ext", field_rel(
        lambda p: q2_l2_entry(p, True), ">Q", Q2_COMPRESSED | 16)),
    Case("qcow2-refcount-entry-past-eof", "qcow2v3", field_rel(
        lambda p: peek(p, Q2_REFCOUNT_TABLE_OFFSET, ">Q"), ">Q", BIG)),
    Case("qcow2-refcount-entry-unaligned", "qcow2v3", field_rel(
        lambda p: peek(p, Q2_REFCOUNT_TABLE_OFFSET, ">Q"), ">Q", lambda v: v + 24)),
    # ---- qcow2 backing names
    Case("qcow2-backing-size-1024", "qcow2backed",
         q2_set_backing_name(b"a" * 1016 + b"base.raw")),
    Case("qcow2-backing-size-2^32-1", "qcow2backed",
         field(Q2_BACKING_FILE_SIZE, ">I", 0xFFFFFFFF)),
    Case("qcow2-backing-offset-past-eof", "qcow2backed",
         field(Q2_BACKING_FILE_OFFSET, ">Q", BIG)),
    Case("qcow2-backing-offset-2^64-1", "qcow2backed",
         field(Q2_BACKING_FILE_OFFSET, ">Q", (1 << 64) - 1)),
    Case("qcow2-backing-name-nul", "qcow2backed", q2_set_backing_name(b"bas\0.raw")),
    Case("qcow2-backing-name-not-utf8", "qcow2backed", q2_set_backing_name(b"\xff\xfe\xfd.raw")),
    Case("qcow2-backing-name-directory", "qcow2backed", q2_set_backing_name(b".")),
    Case("qcow2-backing-missing", "qcow2backed", q2_set_backing_name(b"gone.raw")),
    *(Case(f"qcow2-backing-protocol-{n}", "qcow2v3", qemu_create("qcow2", "p.qcow2", name),
           must_fail=True) for n, name in PROTOCOL_NAMES),
    Case("qcow2-backing-loop", "qcow2v3", backing_loop("qcow2", "qcow2"), must_fail=True),
    Case("qcow2-backing-self", "qcow2v3", backing_self("qcow2", "qcow2"), must_fail=True),
    Case("qcow2-chain-at-depth-limit", "qcow2v3",
         backing_chain("qcow2", "qcow2", MAX_CHAIN_DEPTH), must_open=True),
    Case("qcow2-chain-too-deep", "qcow2v3", backing_chain("qcow2", "qcow2", MAX_CHAIN_DEPTH + 1),
         must_fail=True),

    # ---- qcow v1
    Case("qcow-bad-magic", "qcow", field(Q1_MAGIC, ">4s", b"QFI\xfa")),
    Case("qcow-version-2", "qcow", field(Q1_VERSION, ">I", 2)),
    Case("qcow-version-0", "qcow", field(Q1_VERSION, ">I", 0)),
    Case("qcow-cluster-bits-8", "qcow", field(Q1_CLUSTER_BITS, ">B", 8)),
    Case("qcow-cluster-bits-17", "qcow", field(Q1_CLUSTER_BITS, ">B", 17)),
    Case("qcow-cluster-bits-255", "qcowbacked", field(Q1_CLUSTER_BITS, ">B", 255)),
    Case("qcow-l2-bits-5", "qcow", field(Q1_L2_BITS, ">B", 5)),
    Case("qcow-l2-bits-255", "qcow", field(Q1_L2_BITS, ">B", 255)),
    Case("qcow-crypt-aes", "qcow", field(Q1_CRYPT_METHOD, ">I", 1)),
    Case("qcow-crypt-unknown", "qcow", field(Q1_CRYPT_METHOD, ">I", 0xFFFFFFFF)),
    Case("qcow-size-2^63", "qcow", field(Q1_SIZE, ">Q", 1 << 63)),
    Case("qcow-size-2^64-1", "qcowbacked", field(Q1_SIZE, ">Q", (1 << 64) - 1)),
    Case("qcow-size-1TiB", "qcowbacked", field(Q1_SIZE, ">Q", 1 << 40)),
    Case("qcow-l1-offset-past-eof", "qcow", field(Q1_L1_TABLE_OFFSET, ">Q", BIG)),
    Case("qcow-l1-offset-2^64-8", "qcow", field(Q1_L1_TABLE_OFFSET, ">Q", (1 << 64) - 8)),
    Case("qcow-l1-offset-on-header", "qcow", field(Q1_L1_TABLE_OFFSET, ">Q", 0)),
    Case("qcow-l1-entry-past-eof", "qcow",
         field_rel(lambda p: q1_first_l1_entry(p)[0], ">Q", BIG)),
    Case("qcow-l1-entry-on-header", "qcow", field_rel(lambda p: q1_first_l1_entry(p)[0], ">Q", 8)),
    Case("qcow-l1-entry-2^64-1", "qcowbacked",
         field_rel(lambda p: q1_first_l1_entry(p)[0], ">Q", (1 << 64) - 1)),
    Case("qcow-l2-data-past-eof", "qcow", field_rel(lambda p: q1_l2_entry(p, False), ">Q", BIG)),
    Case("qcow-l2-data-unaligned", "qcowbacked",
         field_rel(lambda p: q1_l2_entry(p, False), ">Q", lambda v: v + 1)),
    Case("qcow-l2-compressed-all-ones", "qcow",
         field_rel(lambda p: q1_l2_entry(p, True), ">Q", (1 << 64) - 1)),
    Case("qcow-l2-compressed-past-eof", "qcow",
         field_rel(lambda p: q1_l2_entry(p, True), ">Q", Q1_COMPRESSED | (100 << 51) | BIG)),
    Case("qcow-l2-compressed-garbage", "qcow",
         field_rel(lambda p: q1_l2_entry(p, True), ">Q", Q1_COMPRESSED | (200 << 51) | 48)),
    Case("qcow-backing-size-1024", "qcowbacked", q1_set_backing_name(b"b" * 1016 + b"base.raw")),
    Case("qcow-backing-size-2^32-1", "qcowbacked",
         field(Q1_BACKING_FILE_SIZE, ">I", 0xFFFFFFFF)),
    Case("qcow-backing-offset-past-eof", "qcowbacked",
         field(Q1_BACKING_FILE_OFFSET, ">Q", BIG)),
    Case("qcow-backing-name-nul", "qcowbacked", q1_set_backing_name(b"bas\0.raw")),
    Case("qcow-backing-name-not-utf8", "qcowbacked", q1_set_backing_name(b"\xff\xfe.raw")),
    Case("qcow-backing-name-directory", "qcowbacked", q1_set_backing_name(b"..")),
    *(Case(f"qcow-backing-protocol-{n}", "qcow", qemu_create("qcow", "p.qcow", name),
           must_fail=True) for n, name in PROTOCOL_NAMES),
    Case("qcow-backing-loop", "qcow", backing_loop("qcow", "qcow"), must_fail=True),
    Case("qcow-backing-self", "qcow", backing_self("qcow", "qcow"), must_fail=True),
    Case("qcow-chain-at-depth-limit", "qcow", backing_chain("qcow", "qcow", MAX_CHAIN_DEPTH),
         must_open=True),
    Case("qcow-chain-too-deep", "qcow", backing_chain("qcow", "qcow", MAX_CHAIN_DEPTH + 1),
         must_fail=True),

    # ---- VHD footer (re-sealed unless the case is about checksums)
    Case("vhd-dyn-bad-cookie-both", "vhddyn", vhd_footer_field(VHD_COOKIE, ">8s", b"konectix")),
    Case("vhd-dyn-bad-cookie-end", "vhddyn",
         vhd_footer_field(VHD_COOKIE, ">8s", b"konectix", copies="end")),
    Case("vhd-dyn-bad-checksum-both", "vhddyn",
         vhd_footer_field(VHD_CHECKSUM, ">I", 0x12345678, seal=False)),
    Case("vhd-dyn-bad-checksum-end", "vhddyn",
         vhd_footer_field(VHD_CHECKSUM, ">I", 0x12345678, seal=False, copies="end")),
    Case("vhd-fixed-bad-checksum", "vhdfixed",
         vhd_footer_field(VHD_CHECKSUM, ">I", 0x12345678, seal=False)),
    Case("vhd-fixed-bad-cookie", "vhdfixed", vhd_footer_field(VHD_COOKIE, ">8s", b"conectiy")),
    Case("vhd-dyn-version", "vhddyn", vhd_footer_field(VHD_FILE_FORMAT_VERSION, ">I", 0x20000)),
    Case("vhd-dyn-data-offset-past-eof", "vhddyn", vhd_footer_field(VHD_DATA_OFFSET, ">Q", BIG)),
    Case("vhd-dyn-data-offset-unaligned", "vhddyn",
         vhd_footer_field(VHD_DATA_OFFSET, ">Q", 0x201)),
    Case("vhd-dyn-data-offset-0", "vhddyn", vhd_footer_field(VHD_DATA_OFFSET, ">Q", 0)),
    Case("vhd-dyn-data-offset-2^64-2", "vhddyn",
         vhd_footer_field(VHD_DATA_OFFSET, ">Q", (1 << 64) - 2)),
    Case("vhd-dyn-size-2^63", "vhddyn", vhd_footer_field(VHD_CURRENT_SIZE, ">Q", 1 << 63)),
    Case("vhd-dyn-size-2^64-512", "vhddyn",
         vhd_footer_field(VHD_CURRENT_SIZE, ">Q", (1 << 64) - 512)),
    Case("vhd-dyn-size-0", "vhddyn", vhd_footer_field(VHD_CURRENT_SIZE, ">Q", 0)),
    Case("vhd-dyn-size-unaligned", "vhddyn",
         vhd_footer_field(VHD_CURRENT_SIZE, ">Q", SEED_SIZE + 1)),
    Case("vhd-fixed-size-beyond-file", "vhdfixed",
         vhd_footer_field(VHD_CURRENT_SIZE, ">Q", 1 << 40)),
    Case("vhd-dyn-type-differencing-no-parent", "vhddyn", vhd_footer_field(VHD_DISK_TYPE, ">I", 4)),
    Case("vhd-dyn-type-0", "vhddyn", vhd_footer_field(VHD_DISK_TYPE, ">I", 0)),
    Case("vhd-dyn-type-7", "vhddyn", vhd_footer_field(VHD_DISK_TYPE, ">I", 7)),
    Case("vhd-fixed-type-dynamic", "vhdfixed", vhd_footer_field(VHD_DISK_TYPE, ">I", 3)),
    Case("vhd-dyn-type-fixed", "vhddyn", vhd_footer_field(VHD_DISK_TYPE, ">I", 2)),
    # ---- VHD dynamic header and BAT
    Case("vhd-dyn-header-bad-cookie", "vhddyn", vhd_dyn_field(DYN_COOKIE, ">8s", b"cxsparsf")),
    Case("vhd-dyn-header-bad-checksum", "vhddyn",
         vhd_dyn_field(DYN_CHECKSUM, ">I", 0x12345678, seal=False)),
    Case("vhd-dyn-header-version", "vhddyn", vhd_dyn_field(DYN_HEADER_VERSION, ">I", 0x20000)),
    Case("vhd-bat-offset-past-eof", "vhddyn", vhd_dyn_field(DYN_TABLE_OFFSET, ">Q", BIG)),
    Case("vhd-bat-offset-0", "vhddyn", vhd_dyn_field(DYN_TABLE_OFFSET, ">Q", 0)),
    Case("vhd-bat-offset-unaligned", "vhddyn", vhd_dyn_field(DYN_TABLE_OFFSET, ">Q", 0x601)),
    Case("vhd-bat-offset-2^64-4", "vhddyn",
         vhd_dyn_field(DYN_TABLE_OFFSET, ">Q", (1 << 64) - 4)),
    Case("vhd-max-table-entries-2^32-1", "vhddyn",
         vhd_dyn_field(DYN_MAX_TABLE_ENTRIES, ">I", 0xFFFFFFFF)),
    Case("vhd-max-table-entries-2^31", "vhddyn",
         vhd_dyn_field(DYN_MAX_TABLE_ENTRIES, ">I", 1 << 31)),
    Case("vhd-max-table-entries-0", "vhddyn", vhd_dyn_field(DYN_MAX_TABLE_ENTRIES, ">I", 0)),
    Case("vhd-max-table-entries-too-few", "vhddyn",
         vhd_dyn_field(DYN_MAX_TABLE_ENTRIES, ">I", 1)),
    Case("vhd-block-size-0", "vhddyn", vhd_dyn_field(DYN_BLOCK_SIZE, ">I", 0)),
    Case("vhd-block-size-3", "vhddyn", vhd_dyn_field(DYN_BLOCK_SIZE, ">I", 3)),
    Case("vhd-block-size-not-pow2", "vhddyn", vhd_dyn_field(DYN_BLOCK_SIZE, ">I", 3 << 20)),
    Case("vhd-block-size-2^31", "vhddyn", vhd_dyn_field(DYN_BLOCK_SIZE, ">I", 1 << 31)),
    Case("vhd-block-size-2^32-512", "vhddyn",
         vhd_dyn_field(DYN_BLOCK_SIZE, ">I", 0xFFFFFE00)),
    Case("vhd-block-size-512", "vhddyn", vhd_dyn_field(DYN_BLOCK_SIZE, ">I", 512)),
    Case("vhd-bat-entry-past-eof", "vhddyn", vhd_bat_entry(0x7FFFFFFF)),
    Case("vhd-bat-entry-0xfffffffe", "vhddyn", vhd_bat_entry(0xFFFFFFFE)),
    Case("vhd-bat-entry-on-footer-copy", "vhddyn", vhd_bat_entry(0)),
    Case("vhd-bat-entry-on-bat", "vhddyn", vhd_bat_entry_self()),
    Case("vhd-bat-entry-into-footer", "vhddyn", lambda p: vhd_bat_entry(
        p.stat().st_size // 512 - 1)(p)),

    # ---- truncation of every seed at many lengths
    *(c for seed in SEEDS for c in _truncations(seed)),
]


# ---- running one case in a forked, memory-capped child ----------------------------------------

def _bounded_read(img: formats.Image) -> bytes:
    """read_all for ordinary disks; head, tail and evenly spread spots for huge ones."""
    size = img.virtual_size
    if size <= READ_ALL_LIMIT_BYTES:
        return read_all(img)
    h = hashlib.sha256(img.read(0, SAMPLE_HEAD_BYTES))
    for i in range(1, SAMPLE_SPOTS + 1):
        at = min(size - SAMPLE_SPOT_BYTES, size // (SAMPLE_SPOTS + 1) * i) // 512 * 512
        h.update(img.read(at, SAMPLE_SPOT_BYTES))
    h.update(img.read(size - SAMPLE_SPOT_BYTES, SAMPLE_SPOT_BYTES))
    return h.digest()


def _attempt(top: str, fmt: str | None) -> dict[str, Any]:
    stage = "open"
    try:
        img = formats.open_image(top, fmt=fmt)
        try:
            stage = "read"
            data = _bounded_read(img)
            result = {"outcome": "ok", "format": img.format_name,
                      "virtual_size": img.virtual_size,
                      "sha256": hashlib.sha256(data).hexdigest()}
            del data
            stage = "info"
            json.dumps(img.info())  # the contract says JSON-serialisable
            stage = "check"
            img.check()
        finally:
            failed_at, stage = stage, "close"
            img.close_chain()
            stage = failed_at
        return result
    except FormatError as e:
        return {"outcome": "format_error", "stage": stage, "type": type(e).__name__,
                "message": str(e), "field": e.field}
    except BaseException as e:  # the point: catch what should not happen
        try:
            tb = traceback.format_exc(limit=8)
        except BaseException:  # e.g. MemoryError while formatting
            tb = "<traceback unavailable>"
        return {"outcome": "other", "stage": stage, "type": type(e).__name__,
                "message": str(e)[:500], "traceback": tb}


def case_in_child(top: str, forced: str) -> dict[str, Any]:
    return {"probe": _attempt(top, None), "forced": _attempt(top, forced)}


def materialize(case: Case, seeds: dict[str, BuiltSeed], where: Path) -> Path:
    """The case's files in ``where`` (a copy of its seed, broken by the mutation); its top."""
    seed = seeds[case.seed]
    shutil.copytree(seed.dir, where)
    top = where / seed.top.name
    if case.mutate is not None:
        top = case.mutate(top) or top
    return top
