"""cowd/kmod_abi.py against kmod/cowd_uapi.h, as the C compiler reads the header.

A generated C program prints every struct's size, every field's offset, every constant and
ioctl number; each must equal the Python mirror's.  The header must also compile on its own
in user space (it is the ABI the daemon builds against).
"""

from __future__ import annotations

import ctypes
import re
import subprocess

import pytest

from cowd.frontends.kmod import abi
from tests.support import ROOT
from tests.support.peers import need

HEADER = ROOT / "kmod" / "cowd_uapi.h"

CTYPES = {"cowd_version": abi.Version, "cowd_create": abi.Create, "cowd_remove": abi.Remove,
          "cowd_reopen": abi.Reopen, "cowd_stats": abi.Stats}

# C struct -> (python Struct codec, the C field names in the codec's order, header first)
CODECS = {
    "cowd_miss": (abi.MISS, ["hdr.size", "hdr.type", "hdr.version", "cookie", "op", "flags",
                             "offset", "length"]),
    "cowd_remap": (abi.REMAP, ["hdr.size", "hdr.type", "hdr.version", "file", "flags",
                               "guest_offset", "length", "file_offset"]),
    "cowd_invalidate": (abi.INVALIDATE, ["hdr.size", "hdr.type", "hdr.version", "reserved0",
                                         "reserved1", "guest_offset", "length"]),
    "cowd_reply": (abi.REPLY, ["hdr.size", "hdr.type", "hdr.version", "cookie", "result",
                               "reserved0"]),
    "cowd_grant": (abi.GRANT, ["hdr.size", "hdr.type", "hdr.version", "file", "flags",
                               "file_offset", "length"]),
    "cowd_alloc": (abi.ALLOC, ["hdr.size", "hdr.type", "hdr.version", "seq", "file",
                               "pool_left", "guest_offset", "length", "file_offset"]),
    "cowd_ack": (abi.ACK, ["hdr.size", "hdr.type", "hdr.version", "seq", "reserved0"]),
    "cowd_revoke": (abi.REVOKE, ["hdr.size", "hdr.type", "hdr.version", "cookie",
                                 "reserved0"]),
    "cowd_revoked": (abi.REVOKED, ["hdr.size", "hdr.type", "hdr.version", "cookie",
                                   "dropped", "seq"]),
    "cowd_touch": (abi.TOUCH, ["hdr.size", "hdr.type", "hdr.version", "count", "flags",
                               "deferred"]),
    "cowd_touch_rec": (abi.TOUCH_REC, ["t_ns", "file_offset", "length", "reserved0"]),
    "cowd_touch_stop": (abi.TOUCH_STOP, ["hdr.size", "hdr.type", "hdr.version",
                                         "reserved0"]),
}

# Messages the C compiler lays out from the header with these field values, printed as hex:
# the Python codecs must give the same bytes.  (A TOUCH as the kernel builds it: the header,
# then its records right after it.)
C_BYTES = {
    "touch_stop": ("struct cowd_touch_stop m = { .hdr = { sizeof(m), COWD_MSG_TOUCH_STOP, 2 } };",
                   abi.pack_touch_stop()),
    "touch": ("struct { struct cowd_touch t; struct cowd_touch_rec r[2]; } m = "
              "{ { { sizeof(m), COWD_MSG_TOUCH, 2 }, 2, COWD_TOUCH_END, 7 }, "
              "{ { 123456789012ULL, 0x30000ULL, 4096, 0 }, { 5, 0x7fff0000ULL, 65536, 0 } } };",
              abi.TOUCH.pack(abi.TOUCH.size + 2 * abi.TOUCH_REC.size, abi.MSG_TOUCH, 2, 2,
                             abi.TOUCH_END, 7)
              + abi.TOUCH_REC.pack(123456789012, 0x30000, 4096, 0)
              + abi.TOUCH_REC.pack(5, 0x7FFF0000, 65536, 0)),
}


CONSTANTS = {name[len("COWD_"):]: name for name in re.findall(
    r"#define\s+(COWD_[A-Z0-9_]+)\s", HEADER.read_text())
    if not name.endswith("_H") and name not in ("COWD_CTL_NAME", "COWD_DISK_NAME")}
# Header constants the mirror names differently or does not need.
NOT_MIRRORED = {"CREATE_FLAGS", "FILE_FLAGS", "REMOVE_FLAGS", "REMAP_FLAGS", "MISS_FUA",
                "REOPEN_FLAGS"}


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{HEADER}"',
             "int main(void) {"]
    for cname, st in CTYPES.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in st._fields_:
            lines.append(f'printf("off {cname}.{fname} %zu\\n", '
                         f"offsetof(struct {cname}, {fname}));")
    for cname, (_codec, fields) in CODECS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for fname in fields:
            lines.append(f'printf("off {cname}.{fname} %zu\\n", '
                         f"offsetof(struct {cname}, {fname}));")
            lines.append(f'printf("fsize {cname}.{fname} %zu\\n", '
                         f"sizeof(((struct {cname} *)0)->{fname}));")
    for short, cname in CONSTANTS.items():
        lines.append(f'printf("const {short} %llu\\n", (unsigned long long)({cname}));')
    for name, (decl, _want) in C_BYTES.items():
        lines += ["{", decl, f'printf("bytes {name} ");',
                  "for (size_t i = 0; i < sizeof(m); i++) "
                  "printf(\"%02x\", ((unsigned char *)&m)[i]);",
                  'printf(" 0\\n");', "}"]
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_says(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    need("gcc")
    d = tmp_path_factory.mktemp("abi")
    src = d / "abi.c"
    src.write_text(_c_program())
    exe = d / "abi"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.fixture(scope="module")
def c_bytes(c_says: dict[str, int]) -> dict[str, bytes]:
    """The bytes of each C_BYTES message as the C compiler laid it out."""
    return {k.split(" ")[1]: bytes.fromhex(k.split(" ")[2]) for k in c_says
            if k.startswith("bytes ")}


def test_ioctl_structs_match(c_says: dict[str, int]) -> None:
    for cname, st in CTYPES.items():
        assert c_says[f"size {cname}"] == ctypes.sizeof(st), cname
        for fname, *_ in st._fields_:
            assert c_says[f"off {cname}.{fname}"] == getattr(st, fname).offset, (cname, fname)


def test_message_codecs_match(c_says: dict[str, int]) -> None:
    for cname, (codec, fields) in CODECS.items():
        assert c_says[f"size {cname}"] == codec.size, cname
        # Walk the codec's format and check each field's offset and width.
        fmt = codec.format.lstrip("<")
        off = 0
        for ch, fname in zip(fmt, fields, strict=True):
            width = {"I": 4, "H": 2, "Q": 8, "i": 4}[ch]
            assert c_says[f"off {cname}.{fname}"] == off, (cname, fname)
            assert c_says[f"fsize {cname}.{fname}"] == width, (cname, fname)
            off += width


def test_constants_and_ioctls_match(c_says: dict[str, int]) -> None:
    checked = 0
    for short in CONSTANTS:
        if short in NOT_MIRRORED:
            continue
        assert hasattr(abi, short), f"cowd/kmod_abi.py lacks {short}"
        assert c_says[f"const {short}"] == getattr(abi, short), short
        checked += 1
    assert checked >= 30
    # The flag masks the kernel checks against are the union of the mirrored bits.
    assert c_says["const REMAP_FLAGS"] == abi.REMAP_WRITABLE | abi.REMAP_ZERO
    assert c_says["const CREATE_FLAGS"] == abi.CREATE_READONLY | abi.CREATE_TOUCH
    assert c_says["const REOPEN_FLAGS"] == abi.REOPEN_TOUCH
    assert c_says["const FILE_FLAGS"] == abi.FILE_WRITABLE
    assert c_says["const REMOVE_FLAGS"] == abi.REMOVE_FORCE


def test_messages_round_trip() -> None:
    m = abi.pack_remap(2, abi.REMAP_WRITABLE, 1 << 16, 3 << 16, 5 << 16)
    assert abi.REMAP.unpack(m) == (40, abi.MSG_REMAP, 2, 2, abi.REMAP_WRITABLE, 1 << 16,
                                   3 << 16, 5 << 16)
    r = abi.pack_reply(77, -5, payload_bytes=4096, version=1)
    assert abi.REPLY.unpack(r) == (abi.REPLY.size + 4096, abi.MSG_REPLY, 1, 77, -5, 0)
    miss = abi.MISS.pack(40, abi.MSG_MISS, 1, 9, abi.OP_WRITE, 0, 4096, 512)
    assert abi.unpack_misses(miss * 2, version=1) == [(9, abi.OP_WRITE, 4096, 512)] * 2
    with pytest.raises(ValueError, match="unexpected message"):
        abi.unpack_misses(miss)  # a version-1 message on a version-2 channel
    with pytest.raises(ValueError, match="unexpected message"):
        abi.unpack_misses(abi.MISS.pack(40, abi.MSG_REMAP, 1, 9, 0, 0, 0, 0), version=1)
    assert abi.GRANT.unpack(abi.pack_grant(0, 1 << 20, 1 << 18)) == (
        32, abi.MSG_GRANT, 2, 0, 0, 1 << 20, 1 << 18)
    assert abi.ACK.unpack(abi.pack_ack(12)) == (24, abi.MSG_ACK, 2, 12, 0)
    assert abi.REVOKE.unpack(abi.pack_revoke(3)) == (24, abi.MSG_REVOKE, 2, 3, 0)


def test_a_read_mixes_events_and_misses() -> None:
    """What a version-2 read() returns: ALLOC and REVOKED events, then misses, each whole;
    whole and split anywhere, the bytes parse the same way or fail cleanly."""
    alloc = abi.ALLOC.pack(48, abi.MSG_ALLOC, 2, 7, 0, 30, 1 << 16, 2 << 16, 9 << 16)
    revoked = abi.REVOKED.pack(32, abi.MSG_REVOKED, 2, 4, 30, 7)
    miss = abi.MISS.pack(40, abi.MSG_MISS, 2, 9, abi.OP_FLUSH, 0, 0, 0)
    buf = alloc + revoked + miss
    assert abi.unpack_messages(buf) == [
        abi.Alloc(7, 0, 30, 1 << 16, 2 << 16, 9 << 16), abi.Revoked(4, 30, 7),
        abi.Miss(9, abi.OP_FLUSH, 0, 0)]
    for cut in range(1, len(buf)):
        if cut in (48, 80):
            continue
        with pytest.raises(ValueError):
            abi.unpack_messages(buf[:cut])
    with pytest.raises(ValueError, match="unexpected message"):
        abi.unpack_messages(alloc, version=1)  # a version-1 channel has no events
    with pytest.raises(ValueError, match="unexpected message"):
        abi.unpack_misses(alloc)


def test_touch_messages_byte_by_byte(c_bytes: dict[str, bytes]) -> None:
    """TOUCH and TOUCH_STOP as gcc lays them out from the header equal the mirror's bytes,
    and the mirror parses the kernel's TOUCH back to its records."""
    assert set(c_bytes) == set(C_BYTES)
    for name, (_decl, want) in C_BYTES.items():
        assert c_bytes[name] == want, name
    assert abi.pack_touch_stop() == bytes.fromhex("10000000" "0b00" "0200" "0000000000000000")
    (touch,) = abi.unpack_messages(c_bytes["touch"])
    assert touch == abi.Touch([[123456789012, 0x30000, 4096], [5, 0x7FFF0000, 65536]], 7,
                              True)


def test_the_touch_fields_take_reserved_space() -> None:
    """CREATE and REOPEN keep their sizes (an old daemon's structs are still the right
    size), and a daemon that records nothing leaves the new fields zero, as the kernel wants
    of a daemon that does not ask."""
    # the sizes (and so the ioctl numbers) of ABI 2 before recording existed
    assert ctypes.sizeof(abi.Create) == 600 and ctypes.sizeof(abi.Reopen) == 56
    assert (abi.CTL_CREATE, abi.CTL_REOPEN) == (0xC2584301, 0xC0384303)
    assert abi.Create.touch_file.offset == abi.Create.channel_fd.offset + 4
    assert abi.Reopen.touch_bits.offset == abi.Reopen.nr_files.offset + 8
    c = abi.Create(size=ctypes.sizeof(abi.Create), version=2)
    assert bytes(c)[abi.Create.touch_file.offset:] == bytes(32)


def test_the_kernels_recording_bounds_are_the_traces() -> None:
    """The kernel records as many first touches as a trace file holds, in the granules the
    trace format allows, and queues what one drain reads several times over."""
    from cowd.disk import boottrace

    assert abi.MAX_TOUCHES == boottrace.MAX_TRACE_ENTRIES
    assert 1 << abi.MIN_TOUCH_BITS == boottrace.MIN_GRANULE_BYTES
    assert 1 << abi.MAX_TOUCH_BITS == boottrace.MAX_GRANULE_BYTES
    assert abi.TOUCH_QUEUE % abi.TOUCH_BATCH == 0 and abi.TOUCH_QUEUE > abi.TOUCH_BATCH
    # (cowd.c's own bound on one read's records: the daemon's read buffer has room for it)
    batch = re.search(r"#define COWD_TOUCH_BATCH\s+(\d+)", (HEADER.parent / "cowd.c").read_text())
    assert batch and int(batch.group(1)) == abi.TOUCH_BATCH


def _touch(records: list[tuple[int, int, int]], flags: int = 0, deferred: int = 0,
           version: int = 2) -> bytes:
    return abi.TOUCH.pack(abi.TOUCH.size + len(records) * abi.TOUCH_REC.size, abi.MSG_TOUCH,
                          version, len(records), flags, deferred) + \
        b"".join(abi.TOUCH_REC.pack(t, off, n, 0) for t, off, n in records)


def test_a_read_ends_with_touch_records() -> None:
    """A version-2 read with an ALLOC, a miss and a TOUCH of three records parses whole;
    cut anywhere else it fails cleanly; a TOUCH whose size, flags or reserved field is wrong,
    or on a version-1 channel, is refused."""
    alloc = abi.ALLOC.pack(48, abi.MSG_ALLOC, 2, 7, 0, 30, 1 << 16, 2 << 16, 9 << 16)
    miss = abi.MISS.pack(40, abi.MSG_MISS, 2, 9, abi.OP_READ, 0, 0, 4096)
    recs = [(10, 0x10000, 4096), (11, 0x250000, 65536), (11, 0x50000, 512)]
    touch = _touch(recs, deferred=3)
    buf = alloc + miss + touch
    assert len(touch) == 24 + 3 * 24
    msgs = abi.unpack_messages(buf)
    assert msgs[:2] == [abi.Alloc(7, 0, 30, 1 << 16, 2 << 16, 9 << 16),
                        abi.Miss(9, abi.OP_READ, 0, 4096)]
    assert msgs[2] == abi.Touch([list(r) for r in recs], 3, False)
    for cut in range(1, len(buf)):
        if cut in (48, 88):
            continue
        with pytest.raises(ValueError):
            abi.unpack_messages(buf[:cut])
    assert abi.unpack_messages(_touch([], flags=abi.TOUCH_END)) == [abi.Touch([], 0, True)]
    bad = [
        touch[:-24],  # the size says three records, two follow
        _touch(recs, flags=2),  # an unknown flag
        touch[:-4] + b"\1\0\0\0",  # a record's reserved field
        abi.TOUCH.pack(abi.TOUCH.size + 24, abi.MSG_TOUCH, 2, 2, 0, 0) + touch[24:48],
    ]
    for b in bad:
        with pytest.raises(ValueError):
            abi.unpack_messages(b)
    with pytest.raises(ValueError, match="unexpected message"):
        abi.unpack_messages(_touch(recs, version=1), version=1)
    with pytest.raises(ValueError, match="unexpected message"):
        abi.unpack_misses(touch)


def test_the_daemon_looks_for_the_module_where_make_builds_it() -> None:
    """`make -C kmod` leaves kmod/cowd.ko; the channel must look there, wherever the package
    that holds it sits (a move of cowd/frontends/ once sent it to a folder that never had it)."""
    from cowd.frontends.kmod import module

    assert HEADER.parent / "cowd.ko" == module.MODULE_PATH
    assert (HEADER.parent / "cowd.c").exists()


def test_dkms_packages_the_module_at_its_version() -> None:
    """kmod/dkms.conf names the module's own version and every source the build needs."""
    conf = (HEADER.parent / "dkms.conf").read_text()
    src = (HEADER.parent / "cowd.c").read_text()
    dkms_version = re.search(r'^PACKAGE_VERSION="([^"]+)"', conf, re.M)
    module_version = re.search(r'#define COWD_MODULE_VERSION\s+"([^"]+)"', src)
    assert dkms_version and module_version
    assert dkms_version.group(1) == module_version.group(1)
    assert re.search(r'^BUILT_MODULE_NAME\[0\]="cowd"', conf, re.M)
    sources = re.search(r"^DKMS_SOURCES := (.*)$", (HEADER.parent / "Makefile").read_text(),
                        re.M)
    assert sources
    for name in ("Kbuild", "cowd.c", "cowd_uapi.h", "dkms.conf"):
        assert name in sources.group(1).split(), name
