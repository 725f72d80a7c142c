#!/usr/bin/env python3
"""Layer: tools (reliability clients and their oracle; nothing in cowd/ or formats/ imports
this).  Used by tests/integration/test_reliability*.py (short runs) and run by hand for the README's
figures (long runs, ``--long``).

Three parts:

*Self-identifying sectors.*  Every 512-byte sector a writer sends carries a header (magic,
the write's sequence number, the sector's own guest offset) and a filler derived from that
header (SHAKE-128), so any sector read back names the write it came from and whether it
landed where it was sent: :func:`stamp_sectors`, :func:`decode_sector`.

*The write storm and its journal* (:func:`writer`, run under ``/usr/bin/python3``, whose
``nbd`` module is libnbd's binding).  One libnbd connection keeps DEPTH writes in flight at
random offsets (sector-aligned, 1-64 sectors, most in a hot region so writes overlap and
clusters are rewritten), some with FUA, and a flush every few writes.  Every step is one
line in the journal, written in the order the client saw it: ``W seq off nsect fua`` when a
write is sent, ``A seq`` / ``E seq errno`` when it completes, ``F fid`` / ``FA fid`` /
``FE fid errno`` for flushes.  The journal is line-buffered and the writer is never the
process that is killed, so it is complete.

*The oracle* (:func:`verify`).  A write W is *durable* once it is acknowledged with FUA, or
a flush sent after its acknowledgement is acknowledged.  W *certainly precedes* D if W was
acknowledged before D was sent.  After a crash, a sector may show the contents of any write
sent to it, except writes that certainly precede a durable write to it; it may show its old
contents only if no durable write covers it.  Anything else — a lost durable write, a sector
of another offset, a torn or foreign sector — is a failure.

Run ``tools/stress.py crash --format qcow2 --iterations 50`` (and ``--format vhd``) or
``tools/stress.py long --load-seconds 300`` for the long runs (or ``python -m tools.stress``
from the repository's root); each prints a JSON summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

SECTOR = 512
# The block --align-share's writes are whole multiples of (a 4 KiB subcluster, extended L2).
ALIGN_BYTES = 4096
MAGIC = b"COWDSTRS"
_HDR = struct.Struct(">8sQQ")  # magic, seq, guest offset of this sector
FILLER_BYTES = SECTOR - _HDR.size


def stamp(seq: int, guest_offset: int) -> bytes:
    hdr = _HDR.pack(MAGIC, seq, guest_offset)
    return hdr + hashlib.shake_128(hdr).digest(FILLER_BYTES)


def stamp_sectors(seq: int, guest_offset: int, nsect: int) -> bytes:
    return b"".join(stamp(seq, guest_offset + i * SECTOR) for i in range(nsect))


def decode_sector(data: bytes) -> tuple[int, int] | None:
    """(seq, guest offset) of a well-formed stamped sector, else None (torn or foreign)."""
    if len(data) != SECTOR or data[:8] != MAGIC:
        return None
    _, seq, off = _HDR.unpack_from(data)
    if data != stamp(seq, off):
        return None
    return seq, off


# ---- the journal and the oracle ----------------------------------------------------------


@dataclass
class WriteRec:
    seq: int
    off: int
    nsect: int
    fua: bool
    sent: int  # position in the journal
    acked: int | None = None
    failed: int | None = None  # errno


@dataclass
class Journal:
    writes: dict[int, WriteRec] = field(default_factory=dict)
    flushes: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # sent, acked
    flush_errors: int = 0
    write_errors: int = 0
    end: str = ""

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Journal:
        j = cls()
        for pos, line in enumerate(lines):
            p = line.split()
            if not p:
                continue
            tag = p[0]
            if tag == "W":
                seq = int(p[1])
                j.writes[seq] = WriteRec(seq, int(p[2]), int(p[3]), p[4] == "1", pos)
            elif tag == "A":
                j.writes[int(p[1])].acked = pos
            elif tag == "E":
                j.writes[int(p[1])].failed = int(p[2])
                j.write_errors += 1
            elif tag == "F":
                j.flushes[int(p[1])] = (pos, None)
            elif tag == "FA":
                j.flushes[int(p[1])] = (j.flushes[int(p[1])][0], pos)
            elif tag == "FE":
                j.flush_errors += 1
            elif tag == "X":
                j.end = " ".join(p[1:])
        return j

    def durable_at(self) -> dict[int, int]:
        """seq -> journal position from which the write is durable (acked ones only)."""
        acked_flushes = sorted(sent for sent, acked in self.flushes.values() if acked is not None)
        out: dict[int, int] = {}
        import bisect

        for w in self.writes.values():
            if w.acked is None:
                continue
            if w.fua:
                out[w.seq] = w.acked
                continue
            i = bisect.bisect_right(acked_flushes, w.acked)
            if i < len(acked_flushes):
                out[w.seq] = acked_flushes[i]
        return out

    def counts(self) -> dict[str, int]:
        acked = sum(1 for w in self.writes.values() if w.acked is not None)
        return {"writes_sent": len(self.writes), "writes_acked": acked,
                "writes_durable": len(self.durable_at()),
                "flushes_acked": sum(1 for _, a in self.flushes.values() if a is not None),
                "write_errors": self.write_errors, "flush_errors": self.flush_errors}


def verify(image: bytes, old: bytes, journal: Journal, limit: int = 10) -> list[str]:
    """Problems with ``image`` (the disk read back after a crash) given its ``old`` contents
    before the storm and the storm's journal; empty when every rule holds."""
    if len(image) != len(old):
        return [f"disk size {len(image)} != {len(old)}"]
    durable = journal.durable_at()
    # sector -> seqs written there (the journal has few writes per sector)
    at: dict[int, list[WriteRec]] = {}
    for w in journal.writes.values():
        for i in range(w.nsect):
            at.setdefault(w.off + i * SECTOR, []).append(w)
    problems: list[str] = []
    for s in range(0, len(image), SECTOR):
        got = image[s:s + SECTOR]
        ws = at.get(s, [])
        durables = [w for w in ws if w.seq in durable]
        if got == old[s:s + SECTOR]:
            if durables:
                d = max(durables, key=lambda w: w.sent)
                problems.append(f"sector {s}: shows its old contents but write seq={d.seq} "
                                f"to it was durable")
        else:
            dec = decode_sector(got)
            if dec is None:
                problems.append(f"sector {s}: neither its old contents nor a written sector")
            elif dec[1] != s:
                problems.append(f"sector {s}: holds the sector written to offset {dec[1]} "
                                f"(seq={dec[0]})")
            else:
                sent = next((w for w in ws if w.seq == dec[0]), None)
                if sent is None:
                    problems.append(f"sector {s}: seq={dec[0]} was never sent to it")
                else:
                    for d in durables:
                        if sent.acked is not None and sent.acked < d.sent:
                            problems.append(f"sector {s}: shows seq={sent.seq}, which was "
                                            f"overwritten by durable seq={d.seq}")
                            break
        if len(problems) >= limit:
            problems.append("...")
            break
    return problems


def apply_sure(old: bytes, journal: Journal) -> bytes:
    """``old`` with every acknowledged write applied in acknowledgement order (what a clean
    run must read back)."""
    img = bytearray(old)
    for w in sorted((w for w in journal.writes.values() if w.acked is not None),
                    key=lambda w: w.acked or 0):
        img[w.off:w.off + w.nsect * SECTOR] = stamp_sectors(w.seq, w.off, w.nsect)
    return bytes(img)


# ---- the writer (libnbd, /usr/bin/python3) -----------------------------------------------


def writer(uri: str, journal_path: str, *, seconds: float, seed: int, seq0: int,
           depth: int = 16, hot_bytes: int = 8 << 20, flush_every: int = 24,
           fua_share: float = 0.05, max_sectors: int = 64, align_share: float = 0.0) -> int:
    """The write storm (see the module docstring).  Returns 0; a connection that dies (the
    daemon was killed) ends the storm normally, with ``X`` and the reason in the journal.
    ``align_share``: the share of writes made whole 4 KiB blocks (an extended-L2 overlay's
    subclusters: the writes a cowd worker does itself and has adopted)."""
    import nbd  # libnbd's binding: /usr/bin/python3 only

    rnd = random.Random(seed)
    out = open(journal_path, "w", buffering=1)  # noqa: SIM115 (closed below)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    hot = min(hot_bytes, size)
    inflight: set[int] = set()
    seq = seq0
    fid = 0
    since_flush = 0
    reason = "time"

    def done(kind: str, ident: int) -> object:
        def cb(err: object) -> int:
            e = getattr(err, "value", 0)
            if kind == "w":
                out.write(f"A {ident}\n" if not e else f"E {ident} {e}\n")
            else:
                out.write(f"FA {ident}\n" if not e else f"FE {ident} {e}\n")
            inflight.discard(ident if kind == "w" else -ident)
            return 1
        return cb

    out.write(f"S {size}\n")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            while len(inflight) < depth:
                if since_flush >= flush_every:
                    since_flush = 0
                    fid += 1
                    out.write(f"F {fid}\n")
                    inflight.add(-fid)
                    h.aio_flush(completion=done("f", fid))
                    continue
                seq += 1
                since_flush += 1
                span = hot if rnd.random() < 0.8 else size
                nsect = rnd.randint(1, max_sectors)
                off = rnd.randrange(0, max(1, span // SECTOR - nsect)) * SECTOR
                if rnd.random() < align_share:
                    off -= off % ALIGN_BYTES
                    nsect = max(1, nsect * SECTOR // ALIGN_BYTES) * ALIGN_BYTES // SECTOR
                nsect = min(nsect, (size - off) // SECTOR)
                fua = rnd.random() < fua_share
                data = stamp_sectors(seq, off, nsect)
                out.write(f"W {seq} {off} {nsect} {int(fua)}\n")
                inflight.add(seq)
                h.aio_pwrite(data, off, completion=done("w", seq),
                             flags=nbd.CMD_FLAG_FUA if fua else 0)
            h.poll(-1)
        while inflight:
            h.poll(-1)
        h.flush()
        out.write("FINAL\n")
        h.shutdown()
    except nbd.Error as e:
        reason = f"connection: {e}"
    out.write(f"X {reason}\n")
    out.close()
    return 0


# ---- the load client (libnbd, /usr/bin/python3) ------------------------------------------


def load(uri: str, model_path: str, *, seconds: float, seed: int, conns: int = 8,
         depth: int = 64, max_bytes: int = 64 << 10) -> dict[str, object]:
    """``conns`` connections, each with ``depth`` reads and writes in flight, against a
    shadow model of the disk (its initial contents read from ``model_path``).  A range with
    a write in flight is neither read nor written by anyone else until the write completes,
    so every read must equal the model exactly.  Returns counters and mismatches."""
    import nbd

    rnd = random.Random(seed)
    with open(model_path, "rb") as f:
        model = bytearray(f.read())
    handles = []
    for _ in range(conns):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    size = handles[0].get_size()
    assert size == len(model), (size, len(model))
    busy_w: dict[int, tuple[int, int]] = {}  # cookie key -> write range in flight
    busy_r: dict[int, tuple[int, int]] = {}
    counters = {"reads": 0, "writes": 0, "flushes": 0, "bytes": 0, "mismatches": 0,
                "errors": 0, "max_in_flight": 0}
    mismatches: list[str] = []
    key = 0

    def overlaps(a: int, n: int, ranges: Iterable[tuple[int, int]]) -> bool:
        return any(a < o + m and o < a + n for o, m in ranges)

    def read_cb(k: int, off: int, n: int, buf: object) -> object:
        def cb(err: object) -> int:
            busy_r.pop(k, None)
            if getattr(err, "value", 0):
                counters["errors"] += 1
                return 1
            data = buf.to_bytearray()  # type: ignore[attr-defined]
            if data != model[off:off + n]:
                counters["mismatches"] += 1
                if len(mismatches) < 5:
                    first = next(i for i in range(n) if data[i] != model[off + i])
                    mismatches.append(f"read {off}+{n}: first difference at {off + first}")
            return 1
        return cb

    def write_cb(k: int) -> object:
        def cb(err: object) -> int:
            busy_w.pop(k, None)
            if getattr(err, "value", 0):
                counters["errors"] += 1
            return 1
        return cb

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for h in handles:
            tries = 0
            while h.aio_in_flight() < depth and tries < depth:
                tries += 1
                n = rnd.randint(1, max_bytes // SECTOR) * SECTOR
                off = rnd.randrange(0, (size - n) // SECTOR + 1) * SECTOR
                key += 1
                r = rnd.random()
                if r < 0.01:
                    h.aio_flush()
                    counters["flushes"] += 1
                elif r < 0.5:
                    if overlaps(off, n, busy_w.values()):
                        continue
                    buf = nbd.Buffer(n)
                    busy_r[key] = (off, n)
                    h.aio_pread(buf, off, completion=read_cb(key, off, n, buf))
                    counters["reads"] += 1
                else:
                    if overlaps(off, n, busy_w.values()) or overlaps(off, n, busy_r.values()):
                        continue
                    data = rnd.randbytes(n)
                    model[off:off + n] = data
                    busy_w[key] = (off, n)
                    h.aio_pwrite(data, off, completion=write_cb(key))
                    counters["writes"] += 1
                counters["bytes"] += n
        counters["max_in_flight"] = max(counters["max_in_flight"],
                                        sum(h.aio_in_flight() for h in handles))
        rl, wl = [], []
        by_fd = {}
        for h in handles:
            fd = h.aio_get_fd()
            by_fd[fd] = h
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(fd)
        r_ready, w_ready, _ = select.select(rl, wl, [], 1.0)
        for fd in r_ready:
            by_fd[fd].aio_notify_read()
        for fd in w_ready:
            if by_fd[fd].aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
                by_fd[fd].aio_notify_write()
    for h in handles:
        while h.aio_in_flight():
            h.poll(-1)
    for h in handles:
        h.flush()
        h.shutdown()
    # Finally every byte, one more time, through a fresh connection.
    h = nbd.NBD()
    h.connect_uri(uri)
    step = 4 << 20
    for pos in range(0, size, step):
        n = min(step, size - pos)
        if h.pread(n, pos) != model[pos:pos + n]:
            counters["mismatches"] += 1
            mismatches.append(f"final read {pos}+{n} differs from the model")
    h.shutdown()
    with open(model_path + ".final", "wb") as out:
        out.write(model)
    return {**counters, "seconds": seconds, "conns": conns, "depth": depth,
            "mismatch_examples": mismatches}


# ---- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writer", help="the write storm (needs libnbd's python3 binding)")
    w.add_argument("uri")
    w.add_argument("journal")
    w.add_argument("--seconds", type=float, default=5.0)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--seq0", type=int, default=0)
    w.add_argument("--depth", type=int, default=16)
    w.add_argument("--hot-bytes", type=int, default=8 << 20)
    w.add_argument("--align-share", type=float, default=0.0,
                   help="the share of writes made whole 4 KiB blocks (default 0)")
    ld = sub.add_parser("load", help="N connections x D in flight against a shadow model")
    ld.add_argument("uri")
    ld.add_argument("model", help="a raw file with the disk's initial contents")
    ld.add_argument("--seconds", type=float, default=60.0)
    ld.add_argument("--seed", type=int, default=1)
    ld.add_argument("--conns", type=int, default=8)
    ld.add_argument("--depth", type=int, default=64)
    for name in ("crash", "long"):
        c = sub.add_parser(name, help="the long runs for the README (venv python)")
        c.add_argument("--format", choices=("qcow2", "vhd", "both"), default="both")
        c.add_argument("--iterations", type=int, default=50)
        c.add_argument("--load-seconds", type=float, default=300.0)
        c.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    if a.cmd == "writer":
        return writer(a.uri, a.journal, seconds=a.seconds, seed=a.seed, seq0=a.seq0,
                      depth=a.depth, hot_bytes=a.hot_bytes, align_share=a.align_share)
    if a.cmd == "load":
        print(json.dumps(load(a.uri, a.model, seconds=a.seconds, seed=a.seed, conns=a.conns,
                              depth=a.depth)))
        return 0
    if not __package__:
        # Run as a file (tools/stress.py crash): the long runs live in the tests' support
        # package, which Python finds from the repository's root: run as the module there.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        os.execve(sys.executable, [sys.executable, "-m", "tools.stress",
                                   *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "PYTHONPATH": path})
    from tests.support import reliability as rh

    return rh.long_run(a)


if __name__ == "__main__":
    sys.exit(main())
