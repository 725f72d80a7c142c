"""Format-library benchmark: cowd's qcow2 and VHD codecs beside ``qemu-img bench``.

Layer: tools (a benchmark, not a test; it imports ``formats`` and nothing from ``cowd``).

What it measures, each figure over ``--reps`` repetitions (median and min-max reported):

- *Resolve throughput*: ``Image.resolve(guest_offset, unit)`` once per lookup unit over a
  fully allocated image made by qemu (``qemu-img create`` + ``qemu-io -c "write ..."``), in
  lookups per second.  The units: qcow2, one per 64 KiB cluster; VHD (dynamic, 2 MiB
  blocks), once per 4 KiB and once per block.  *Cold*: the page cache dropped (root only),
  the image freshly opened, one pass; *warm*: further passes over the same open image.
  Opening the image is timed apart ("open, cold").  Beside it: ``Image.read`` of 4 KiB at
  the same offsets (resolve + pread, the whole read path), cold and warm.
- *First-write allocation throughput*: 4 KiB writes, each into a fresh cluster of an empty
  overlay, ending with one ``flush`` that is counted in the rate (its share is reported
  too).  qcow2: an overlay made by ``formats.create_overlay`` over a raw base, one write at
  the start of every 64 KiB cluster (each copies up 60 KiB from the base).  VHD: a
  differencing VHD over a dynamic base (its cluster is a 4 KiB granule, so every 4 KiB write
  takes a fresh granule) and, for the same kind of image qemu can write, an empty dynamic VHD
  from ``qemu-img create -f vpc`` (a 2 MiB block is allocated every 512 writes).  Sequential
  and random order (random: a seeded shuffle of the same offsets).
- *The peer*: ``qemu-img bench`` on the same kind of image, QD1 (``-d 1``, as the library is
  synchronous): reads ``-s 4096 -S <unit>`` (one 4 KiB read per lookup unit; cold after a
  cache drop, then warm) with ``-t writeback``; first writes ``-w -s 4096 -S <unit>
  --flush-interval=<count>`` (the run ends with a flush, as cowd's does) on a fresh overlay
  made the same way as cowd's, with ``-t writeback`` (buffered, like cowd's pwrite) and ``-t
  none`` (O_DIRECT).  ``qemu-img bench`` steps sequentially only, so random-order rows have
  no peer; qemu cannot write a differencing VHD, so those rows are set beside qemu's dynamic
  VHD.  Ratios are cowd / qemu-img per repetition (higher is better for cowd); a resolve is
  only the lookup, so resolve / qemu-read says how far the metadata path is from being
  the bottleneck, not that cowd reads faster.

Output: a Markdown table on stdout and JSON (date, kernel, machine, commit, parameters and
every repetition of every figure) in ``results/bench-formats.json``.  Images live in a
temporary directory under /var/tmp that is removed at the end.

Usage: python -m tools.bench formats [--quick] [--size 256M] [--reps 3] [--out FILE]
                                    [--no-drop-caches]
       python -m tools.bench formats --convert [...]   (tools/bench_convert.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import formats
from formats import Kind
from tools import benchlib

ROOT = benchlib.ROOT

IO_BYTES = 4096  # every read and write of the benchmark is 4 KiB
QCOW2_CLUSTER_BYTES = 64 << 10  # qemu-img's and cowd's default qcow2 cluster size
# qemu-io is given the fixture's data in pieces of this size (one huge request would make
# it allocate a buffer the size of the disk).
QEMU_IO_CHUNK_BYTES = 64 << 20
# Writes per VHD first-write run: 4 KiB granules are many (65536 in 256 MiB) and qemu with
# O_DIRECT takes ~0.2 ms each here, so the VHD runs take the first (sequential) or a
# random sample (random order) of this many granules.
VHD_MAX_WRITES = 16384
QUICK_VHD_MAX_WRITES = 2048
# A warm pass repeats the offsets until at least this many operations were timed (for
# qemu-img bench too: it wraps to offset 0 at the end of the disk), so that small images
# still give a measurable interval.
WARM_MIN_OPS = 65536
QUICK_WARM_MIN_OPS = 8192
# qemu-img bench prints its run time in milliseconds: a shorter run is reported as this,
# and its repetition is flagged "coarse" in the JSON.
QEMU_TIME_FLOOR_S = 0.0005
SEED = 0xC0D


# ---- helpers ------------------------------------------------------------------------------


def sh(*args: str | os.PathLike[str], timeout: float = 600) -> str:
    p = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(p.args)} exited {p.returncode}: "
                           f"{p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


class Caches:
    """Drops the OS page cache before cold runs, where allowed (root) and not disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and os.geteuid() == 0
        if self.enabled:
            try:
                self.drop()
            except OSError:
                self.enabled = False

    def drop(self) -> None:
        if self.enabled:
            benchlib.drop_caches()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)(?:I?B)?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 256M, 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def virtual_size(path: Path, fmt: str) -> int:
    return int(json.loads(sh("qemu-img", "info", "-f", fmt, "--output=json", path))
               ["virtual-size"])


def qemu_io_fill(path: Path, fmt: str, size: int, pattern: int) -> None:
    """Allocate every byte of ``path`` through qemu (non-zero data, so nothing is elided)."""
    cmds: list[str] = []
    for off in range(0, size, QEMU_IO_CHUNK_BYTES):
        n = min(QEMU_IO_CHUNK_BYTES, size - off)
        cmds += ["-c", f"write -q -P {pattern:#x} {off} {n}"]
    sh("qemu-io", "-f", fmt, *cmds, path)


def qemu_bench(path: Path, fmt: str, *, count: int, step: int, cache: str,
               write: bool) -> tuple[float, bool]:
    """Run ``qemu-img bench``; (operations per second, whether the time was too short to
    read at qemu's millisecond resolution)."""
    args: list[str | os.PathLike[str]] = [
        "qemu-img", "bench", "-f", fmt, "-s", str(IO_BYTES), "-S", str(step), "-c", str(count),
        "-d", "1", "-t", cache]
    if write:
        args += ["-w", "--pattern=0xab", f"--flush-interval={count}"]
    out = sh(*args, path)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"qemu-img bench printed no run time: {out!r}")
    seconds = float(m.group(1))
    return count / max(seconds, QEMU_TIME_FLOOR_S), seconds < QEMU_TIME_FLOOR_S * 20


# ---- figures ------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured quantity, every repetition of it."""

    key: str
    image: str
    what: str
    unit: str
    reps: list[float] = field(default_factory=list)
    coarse: list[bool] = field(default_factory=list)  # qemu time below its resolution
    peer: str | None = None  # key of the qemu-img figure it is set beside
    mode: str = ""  # qemu-img figures: how qemu ran, for the table
    note: str = ""

    def add(self, value: float, coarse: bool = False) -> None:
        self.reps.append(value)
        self.coarse.append(coarse)

    @property
    def median(self) -> float:
        return statistics.median(self.reps)

    def as_json(self) -> dict[str, object]:
        return {"key": self.key, "image": self.image, "what": self.what, "unit": self.unit,
                "reps": self.reps, "coarse": self.coarse, "median": self.median,
                "min": min(self.reps), "max": max(self.reps), "peer": self.peer,
                "mode": self.mode, "note": self.note}


class Results:
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}

    def fig(self, key: str, image: str, what: str, unit: str, *, peer: str | None = None,
            mode: str = "", note: str = "") -> Figure:
        f = self.figures.get(key)
        if f is None:
            f = self.figures[key] = Figure(key, image, what, unit, peer=peer, mode=mode,
                                           note=note)
        return f

    def add_ratios(self) -> None:
        """cowd / qemu-img for every figure that has a peer, repetition by repetition."""
        for f in list(self.figures.values()):
            if f.peer is None:
                continue
            q = self.figures[f.peer]
            self.fig(f"{f.key}/{f.peer}", f.image, f"{f.what} / {q.what}", "ratio").reps = [
                c / p for c, p in zip(f.reps, q.reps, strict=True)]


# ---- the fixtures ---------------------------------------------------------------------------


@dataclass
class Fixtures:
    work: Path
    base_raw: Path  # raw base for qcow2 overlays
    full_qcow2: Path  # fully allocated qcow2 (qemu-made)
    full_vhd: Path  # fully allocated dynamic VHD (qemu-made); also the differencing base
    size: int
    vhd_size: int  # qemu rounds a VHD up to its CHS geometry
    vhd_block: int
    label: str  # the disk size for people


def make_fixtures(work: Path, size: int) -> Fixtures:
    base_raw = work / "base.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", base_raw, str(size))
    qemu_io_fill(base_raw, "raw", size, 0x5A)
    full_qcow2 = work / "full.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={QCOW2_CLUSTER_BYTES}",
       full_qcow2, str(size))
    qemu_io_fill(full_qcow2, "qcow2", size, 0x6B)
    full_vhd = work / "full.vhd"
    sh("qemu-img", "create", "-q", "-f", "vpc", full_vhd, str(size))
    vhd_size = virtual_size(full_vhd, "vpc")
    qemu_io_fill(full_vhd, "vpc", vhd_size, 0x7C)
    img = formats.open_image(str(full_vhd))
    try:
        assert isinstance(img, formats.VhdImage)
        vhd_block = img.block_size
    finally:
        img.close_chain()
    return Fixtures(work, base_raw, full_qcow2, full_vhd, size, vhd_size, vhd_block,
                    f"{size >> 20} MiB")


# ---- resolve and read -----------------------------------------------------------------------


def _passes(n: int, warm_min_ops: int) -> int:
    return max(1, math.ceil(warm_min_ops / n))


def time_pass(offsets: Sequence[int], op: Callable[[int], object], passes: int = 1) -> float:
    """Seconds for ``passes`` passes of ``op`` over ``offsets``."""
    t0 = time.perf_counter()
    for _ in range(passes):
        for off in offsets:
            op(off)
    return time.perf_counter() - t0


def bench_lookups(res: Results, caches: Caches, path: Path, fmt: str, image: str, tag: str,
                  unit: int, unit_name: str, warm_min_ops: int) -> None:
    """Resolve and 4 KiB read, cold and warm, once per ``unit`` bytes; qemu-img reads beside."""
    vsize = virtual_size(path, fmt)
    offsets = range(0, vsize - IO_BYTES + 1, unit)
    n = len(offsets)
    passes = _passes(n, warm_min_ops)
    label = f"{image}, per {unit_name} ({n} lookups)"

    # qemu-img bench first: the peer's reads, cold then warm (cache=writeback, QD1).
    caches.drop()
    q_cold, coarse = qemu_bench(path, fmt, count=n, step=unit, cache="writeback", write=False)
    res.fig(f"{tag}.qemu.read.cold", label, "qemu-img bench 4 KiB reads, cold",
            "reads/s", mode="cold").add(q_cold, coarse)
    q_warm, coarse = qemu_bench(path, fmt, count=n * passes, step=unit, cache="writeback",
                                write=False)
    res.fig(f"{tag}.qemu.read.warm", label, "qemu-img bench 4 KiB reads, warm",
            "reads/s", mode="warm").add(q_warm, coarse)

    # Resolve: cold (fresh open after a cache drop, one pass) and warm.
    caches.drop()
    t0 = time.perf_counter()
    img = formats.open_image(str(path))
    t_open = time.perf_counter() - t0
    try:
        def resolve(off: int) -> object:
            return img.resolve(off, unit)

        cold = time_pass(offsets, resolve)
        warm = time_pass(offsets, resolve, passes)
        for off in offsets:  # untimed: the numbers are for a fully allocated image
            ext = img.resolve(off, unit)
            if ext.kind is not Kind.DATA or ext.length <= 0:
                raise RuntimeError(f"{path}: fixture not fully allocated at {off}: {ext}")
    finally:
        img.close_chain()
    res.fig(f"{tag}.open.cold", label, "cowd open, cold", "ms").add(t_open * 1e3)
    res.fig(f"{tag}.resolve.cold", label, "cowd resolve, cold", "lookups/s",
            peer=f"{tag}.qemu.read.cold").add(n / cold)
    res.fig(f"{tag}.resolve.warm", label, "cowd resolve, warm", "lookups/s",
            peer=f"{tag}.qemu.read.warm").add(n * passes / warm)

    # Read 4 KiB (resolve + pread): the same, on a fresh open after another drop.
    caches.drop()
    img = formats.open_image(str(path))
    try:
        def read(off: int) -> object:
            return img.read(off, IO_BYTES)

        cold = time_pass(offsets, read)
        warm = time_pass(offsets, read, passes)
    finally:
        img.close_chain()
    res.fig(f"{tag}.read.cold", label, "cowd 4 KiB read, cold", "reads/s",
            peer=f"{tag}.qemu.read.cold").add(n / cold)
    res.fig(f"{tag}.read.warm", label, "cowd 4 KiB read, warm", "reads/s",
            peer=f"{tag}.qemu.read.warm").add(n * passes / warm)


# ---- first writes ---------------------------------------------------------------------------

_PAYLOAD = b"\xab" * IO_BYTES


@dataclass
class WriteCase:
    tag: str
    image: str  # for people
    fmt: str  # qemu's name
    make: Callable[[Path], None]  # create an empty overlay at this path
    step: int  # one 4 KiB write per step bytes (a fresh cluster each)
    seq_offsets: list[int]  # guest offsets, sequential order
    all_offsets: range  # the population random order samples from
    peer_tag: str  # whose qemu-img figures the rows are set beside
    qemu: bool  # run qemu-img bench on this kind of image


def cowd_writes(path: Path, offsets: Sequence[int]) -> tuple[float, float]:
    """(seconds for the writes and the final flush, seconds of the flush)."""
    img = formats.open_image(str(path), True)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            img.write(off, _PAYLOAD)
        t1 = time.perf_counter()
        img.flush()
        t2 = time.perf_counter()
    finally:
        img.close_chain()
    return t2 - t0, t2 - t1


def verify_writes(path: Path, fmt: str, offsets: Sequence[int]) -> None:
    """Untimed: the first and last written blocks read back through a fresh open, and qemu
    accepts a written qcow2."""
    img = formats.open_image(str(path))
    try:
        for off in (offsets[0], offsets[-1]):
            if img.read(off, IO_BYTES) != _PAYLOAD:
                raise RuntimeError(f"{path}: write at {off} did not read back")
    finally:
        img.close_chain()
    if fmt == "qcow2":
        sh("qemu-img", "check", "-q", "-f", "qcow2", path)


def bench_writes(res: Results, caches: Caches, case: WriteCase, work: Path, rep: int) -> None:
    n = len(case.seq_offsets)
    label = f"{case.image} ({n} writes of 4 KiB)"
    rnd = random.Random(SEED + rep)
    orders = {
        "seq": case.seq_offsets,
        "rand": rnd.sample(case.all_offsets, n),  # distinct: every write is a first write
    }
    for order, offsets in orders.items():
        ov = work / f"{case.tag}-{order}.{case.fmt}"
        case.make(ov)
        caches.drop()
        total, flush = cowd_writes(ov, offsets)
        verify_writes(ov, case.fmt, offsets)
        ov.unlink()
        what = "sequential" if order == "seq" else "random order"
        peer = f"{case.peer_tag}.qemu.write.writeback" if order == "seq" else None
        res.fig(f"{case.tag}.write.{order}", label, f"cowd first writes, {what}, + flush",
                "writes/s", peer=peer).add(n / total)
        res.fig(f"{case.tag}.write.{order}.flush", label,
                f"cowd final flush ({what})", "ms").add(flush * 1e3)
        if order == "seq":
            none = res.fig(f"{case.tag}.write.seq.vs_none", label,
                           "cowd first writes, sequential, + flush", "writes/s",
                           peer=f"{case.peer_tag}.qemu.write.none",
                           note="the same figure, set beside qemu-img -t none")
            none.add(n / total)
    if not case.qemu:
        return
    for cache in ("writeback", "none"):
        ov = work / f"{case.tag}-qemu-{cache}.{case.fmt}"
        case.make(ov)
        caches.drop()
        rate, coarse = qemu_bench(ov, case.fmt, count=n, step=case.step, cache=cache,
                                  write=True)
        verify_writes(ov, case.fmt, case.seq_offsets)
        ov.unlink()
        res.fig(f"{case.tag}.qemu.write.{cache}", label,
                f"qemu-img bench first writes, sequential, + flush (-t {cache})",
                "writes/s", mode=f"-t {cache}").add(rate, coarse)


def write_cases(fx: Fixtures, vhd_max_writes: int) -> list[WriteCase]:
    def qcow2_overlay(path: Path) -> None:
        formats.create_overlay(str(path), str(fx.base_raw), "qcow2",
                               cluster_size=QCOW2_CLUSTER_BYTES)

    def vhd_differencing(path: Path) -> None:
        formats.create_overlay(str(path), str(fx.full_vhd), "vhd")

    def vhd_dynamic(path: Path) -> None:
        sh("qemu-img", "create", "-q", "-f", "vpc", path, str(fx.size))

    qcow2_all = range(0, fx.size, QCOW2_CLUSTER_BYTES)
    vhd_all = range(0, fx.vhd_size - IO_BYTES + 1, IO_BYTES)
    vhd_seq = list(vhd_all[:vhd_max_writes])
    return [
        WriteCase("qcow2-overlay", f"qcow2 overlay over raw, {fx.label}", "qcow2",
                  qcow2_overlay, QCOW2_CLUSTER_BYTES, list(qcow2_all), qcow2_all,
                  "qcow2-overlay", True),
        WriteCase("vhd-dynamic", f"empty dynamic VHD, {fx.label}", "vpc", vhd_dynamic,
                  IO_BYTES, vhd_seq, vhd_all, "vhd-dynamic", True),
        WriteCase("vhd-differencing", f"differencing VHD over dynamic, {fx.label}", "vpc",
                  vhd_differencing, IO_BYTES, vhd_seq, vhd_all, "vhd-dynamic", False),
    ]


# ---- report ---------------------------------------------------------------------------------


def fmt_value(v: float, unit: str) -> str:
    if unit == "ratio":
        return f"{v:.2f}"
    if unit == "ms":
        return f"{v:.2f} ms"
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def fmt_fig(f: Figure) -> str:
    med = fmt_value(f.median, f.unit)
    if len(f.reps) == 1:
        return med + (" (coarse)" if any(f.coarse) else "")
    lo, hi = fmt_value(min(f.reps), f.unit), fmt_value(max(f.reps), f.unit)
    return f"{med} ({lo}-{hi})" + (" (coarse)" if any(f.coarse) else "")


def markdown(doc: dict[str, object], res: Results) -> str:
    p = doc["params"]
    load = doc["loadavg"]
    assert isinstance(p, dict) and isinstance(load, dict)
    lines = [
        f"Format benchmark, {doc['date']}, {doc['machine']}, kernel {doc['kernel']}, "
        f"commit {doc['commit']}; {p['size_bytes'] >> 20} MiB images, median of {p['reps']} "
        f"(min-max), page cache dropped for cold runs: "
        f"{'yes' if doc['cache_dropped'] else 'no'}; load average before/after "
        f"{load['before'][0]:.2f}/{load['after'][0]:.2f}.",
        "",
        "| image | figure | cowd | qemu-img bench (QD1) | cowd / qemu-img |",
        "|---|---|---|---|---|",
    ]
    shown_image = None
    for f in res.figures.values():
        if f.key.split(".")[1] == "qemu" or f.unit == "ratio" or f.key.endswith(".vs_none"):
            continue
        image = f.image if f.image != shown_image else ""
        shown_image = f.image
        peer_cells = ["-", "-"]
        peers = [f.peer] if f.peer else []
        vs_none = res.figures.get(f"{f.key}.vs_none")
        if vs_none is not None and vs_none.peer:
            peers.append(vs_none.peer)
        if peers:
            qs, rs = [], []
            for pk in peers:
                q = res.figures[pk]
                qs.append(f"{fmt_fig(q)} {q.unit} ({q.mode})")
                src = f if pk == f.peer else vs_none
                assert src is not None
                r = res.figures[f"{src.key}/{pk}"]
                rs.append(fmt_fig(r) + (f" vs {q.mode}" if len(peers) > 1 else ""))
            peer_cells = ["; ".join(qs), "; ".join(rs)]
        elif ".write.rand" in f.key and not f.key.endswith(".flush"):
            peer_cells = ["- (qemu-img bench steps sequentially)", "-"]
        lines.append(f"| {image} | {f.what} ({f.unit}) | {fmt_fig(f)} | {peer_cells[0]} | "
                     f"{peer_cells[1]} |")
    lines += [
        "",
        "Resolve = Image.resolve once per lookup unit (metadata only); read = Image.read of "
        "4 KiB at the same offsets; qemu-img bench reads 4 KiB at the same offsets "
        "(-S unit, -t writeback). First writes: one 4 KiB write per fresh cluster "
        "(qcow2: 64 KiB cluster, VHD: 4 KiB), one flush at the end counted in the rate; "
        "qemu-img bench -w --flush-interval=count. Differencing-VHD rows are set beside "
        "qemu's dynamic VHD (qemu cannot write differencing VHDs).",
    ]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "--convert" in given:  # the convert mode: tools/bench_convert.py, its own flags
        from tools import bench_convert

        return bench_convert.main([a for a in given if a != "--convert"])
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--convert", action="store_true",
                    help="measure cowd convert against qemu-img convert instead "
                    "(tools/bench_convert.py; --help after it for its flags)")
    ap.add_argument("--quick", action="store_true",
                    help="one repetition of small images (a smoke run, under 30 s)")
    ap.add_argument("--size", type=parse_size, default=None,
                    help="disk size of every image (default 256M, quick 32M)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench-formats.json")
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="never drop the page cache (cold = freshly opened only)")
    args = ap.parse_args(argv)
    size = args.size or ((32 << 20) if args.quick else (256 << 20))
    reps = args.reps or (1 if args.quick else 3)
    warm_min_ops = QUICK_WARM_MIN_OPS if args.quick else WARM_MIN_OPS
    vhd_max_writes = QUICK_VHD_MAX_WRITES if args.quick else VHD_MAX_WRITES
    if size < 4 << 20 or size % QCOW2_CLUSTER_BYTES:
        ap.error("--size must be a multiple of 64 KiB and at least 4 MiB")
    if reps < 1:
        ap.error("--reps must be at least 1")
    if benchlib.missing_tool("bench_formats", "qemu-img", "qemu-io"):
        return 1

    caches = Caches(not args.no_drop_caches)
    head = benchlib.header("formats")
    res = Results()
    started = time.monotonic()
    with benchlib.scratch_dir("cowd-bench-formats-") as work:
        print(f"bench_formats: making {size >> 20} MiB images in {work} ...", file=sys.stderr,
              flush=True)
        fx = make_fixtures(work, size)
        cases = write_cases(fx, vhd_max_writes)
        for rep in range(reps):
            print(f"bench_formats: repetition {rep + 1}/{reps} ...", file=sys.stderr,
                  flush=True)
            bench_lookups(res, caches, fx.full_qcow2, "qcow2", f"qcow2, {fx.label}", "qcow2",
                          QCOW2_CLUSTER_BYTES, "64 KiB cluster", warm_min_ops)
            bench_lookups(res, caches, fx.full_vhd, "vpc", f"dynamic VHD, {fx.label}",
                          "vhd-4k", IO_BYTES, "4 KiB", warm_min_ops)
            bench_lookups(res, caches, fx.full_vhd, "vpc", f"dynamic VHD, {fx.label}",
                          "vhd-block", fx.vhd_block, f"{fx.vhd_block >> 20} MiB block",
                          warm_min_ops)
            for case in cases:
                bench_writes(res, caches, case, work, rep)
    res.add_ratios()

    doc: dict[str, object] = {
        "benchmark": "bench-formats",
        **head,
        "python": platform.python_version(),
        "qemu_img": sh("qemu-img", "--version").splitlines()[0],
        "cache_dropped": caches.enabled,
        # Other work on the machine skews every figure (qemu's thread-pool AIO most): the
        # 1/5/15-minute load averages before and after the run say how quiet it was.
        "loadavg": {"before": head["loadavg"], "after": os.getloadavg()},
        "workdir": str(work),
        "elapsed_s": round(time.monotonic() - started, 2),
        "params": {"size_bytes": size, "vhd_size_bytes": fx.vhd_size,
                   "vhd_block_bytes": fx.vhd_block, "reps": reps, "quick": args.quick,
                   "io_bytes": IO_BYTES, "qcow2_cluster_bytes": QCOW2_CLUSTER_BYTES,
                   "vhd_max_writes": vhd_max_writes, "warm_min_ops": warm_min_ops,
                   "seed": SEED},
        "figures": [f.as_json() for f in res.figures.values()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc, res))
    print(f"\nbench_formats: JSON in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
