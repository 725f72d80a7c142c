"""The FUSE-over-io_uring half of the FUSE codec (cowd/frontends/fuse/protocol.py), no I/O:
INIT accepts the kernel's FUSE_OVER_IO_URING offer only when offered, wanted and backed by a
ring the adapter made; the ring structures have the sizes of linux/fuse.h (6.14+:
struct fuse_uring_req_header 288 bytes, fuse_uring_ent_in_out 32, fuse_uring_cmd_req 24, which
must fit the 80 command bytes of a 128-byte SQE)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cowd.frontends.fuse import protocol as F
from cowd.frontends.fuse.protocol import FuseFs, FuseOptions
from cowd.frontends.fuse.ring import possible_cpus
from cowd.frontends.fuse.uring import SQE_CMD_BYTES

OFFER = F.FUSE_INIT_EXT | F.FUSE_MAX_PAGES | F.FUSE_ASYNC_READ
OFFER2 = F.FUSE_OVER_IO_URING_FLAGS2


def init_reply(fs: FuseFs, flags: int, flags2: int) -> tuple[int, int]:
    """(flags, flags2) of INIT's reply to a 7.45 kernel offering ``flags``/``flags2``."""
    body = F.INIT_IN.pack(7, 45, 128 << 10, flags, flags2) + bytes(44)
    data = F.IN_HEADER.pack(F.IN_HEADER.size + len(body), F.FUSE_INIT, 1, 0, 0, 0, 1, 0, 0) \
        + body
    out = fs.handle(F.parse_request(memoryview(data)))
    assert out is not None
    length, err, _unique = F.OUT_HEADER.unpack_from(out)
    assert err == 0 and length == len(out)
    f = F.INIT_OUT.unpack_from(out, F.OUT_HEADER.size)
    return f[3], f[10]


@dataclass
class Case:
    offered: bool
    ring: bool
    wanted: bool

    @property
    def accepted(self) -> bool:
        return self.offered and self.ring and self.wanted


@pytest.mark.parametrize("case", [Case(o, r, w) for o in (False, True) for r in (False, True)
                                  for w in (False, True)])
def test_init_accepts_io_uring_only_when_offered_wanted_and_ready(case: Case) -> None:
    fs = FuseFs(FuseOptions(io_uring=case.wanted), uid=0, gid=0, now=1.0)
    fs.uring_ready = case.ring
    flags, flags2 = init_reply(fs, OFFER, OFFER2 if case.offered else 0)
    assert fs.uring_offered == case.offered
    assert fs.negotiated is not None and fs.negotiated.io_uring == case.accepted
    assert bool(flags2 & F.FUSE_OVER_IO_URING_FLAGS2) == case.accepted
    # flags2 counts only with FUSE_INIT_EXT, which is answered only when it is needed.
    assert bool(flags & F.FUSE_INIT_EXT) == case.accepted
    assert flags2 & ~F.FUSE_OVER_IO_URING_FLAGS2 == 0


def test_flags2_without_init_ext_is_no_offer() -> None:
    fs = FuseFs(FuseOptions(), uid=0, gid=0, now=1.0)
    fs.uring_ready = True
    _flags, flags2 = init_reply(fs, OFFER & ~F.FUSE_INIT_EXT, OFFER2)
    assert flags2 == 0 and not fs.uring_offered


def test_ring_structure_sizes() -> None:
    assert F.FUSE_OVER_IO_URING_FLAGS2 == (1 << 41) >> 32
    assert F.URING_ENT_IN_OUT.size == 32
    assert F.URING_REQ_HEADER_BYTES == 128 + 128 + 32
    assert F.URING_CMD_REQ.size == 24 <= SQE_CMD_BYTES
    assert F.IN_HEADER.size <= F.FUSE_URING_IN_OUT_HEADER_SZ
    # Every per-opcode header a data request carries fits the op area.
    for st in (F.READ_IN, F.WRITE_IN, F.FSYNC_IN, F.FALLOCATE_IN, F.LSEEK_IN, F.SETATTR_IN):
        assert st.size <= F.FUSE_URING_OP_IN_OUT_SZ


def test_possible_cpus_parses_kernel_cpu_lists() -> None:
    assert possible_cpus("0\n") == 1
    assert possible_cpus("0-1\n") == 2
    assert possible_cpus("0-3,8-11\n") == 8
    assert possible_cpus("0,2,4-5") == 4
