"""The NBD protocol as a client writes it, from the numbers in the protocol document
(NetworkBlockDevice/nbd doc/proto.md), written out independently of cowd's codec
(cowd/frontends/nbd/wire.py) so that the codec's tests do not check it against itself: the
spec's constants, encoders of the client's messages and parsers of the server's replies.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 2**31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR + 1, ERR + 2, ERR + 3
REP_ERR_TLS_REQD = ERR + 5
REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN, REP_ERR_BLOCK_SIZE_REQD, REP_ERR_TOO_BIG = (
    ERR + 6, ERR + 7, ERR + 8, ERR + 9)
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

KiB = 1024
MiB = 1024 * KiB

# Transmission flag bits by name (bit numbers from the spec).
TF = {"has_flags": 0, "read_only": 1, "flush": 2, "fua": 3, "rotational": 4, "trim": 5,
      "write_zeroes": 6, "df": 7, "multi_conn": 8, "resize": 9, "cache": 10, "fast_zero": 11}


def tflags(*names: str) -> int:
    return sum(1 << TF[n] for n in names)


# ---- client-side encoders --------------------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def opt_header(option: int, length: int) -> bytes:
    return IHAVEOPT + struct.pack(">II", option, length)


def info_data(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_data(name: str, queries: Sequence[str | bytes]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode() if isinstance(q, str) else q
        out += struct.pack(">I", len(qb)) + qb
    return out


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 0x1122,
        data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def client_flags(fixed: bool = True, no_zeroes: bool = True) -> bytes:
    return struct.pack(">I", (1 if fixed else 0) | (2 if no_zeroes else 0))


# ---- server-reply parsers --------------------------------------------------------------------


def parse_option_replies(buf: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(buf):
        magic, option, rtype, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == REP_MAGIC, hex(magic)
        pos += 20
        out.append((option, rtype, buf[pos:pos + length]))
        pos += length
        assert pos <= len(buf)
    return out


def parse_structured(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, cookie, payload) for each structured chunk in buf."""
    out = []
    pos = 0
    while pos < len(buf):
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", buf, pos)
        assert magic == STRUCT_MAGIC, hex(magic)
        pos += 20
        out.append((flags, rtype, cookie, buf[pos:pos + length]))
        pos += length
    assert pos == len(buf)
    return out


