"""Convert benchmark: ``cowd convert`` beside ``qemu-img convert`` on the same image, paired in
one run (``python -m tools.bench formats --convert``, or ``python -m tools.bench convert``).

Layer: tools (a benchmark, not a test).

The image (made by qemu-img and qemu-io, as a user's would be): a raw base of ``--size``
(default 1 GiB) whose first three quarters hold data and the rest a hole, and a qcow2 overlay
over it holding a fifth of the disk as data, a tenth as zero clusters and a twentieth more
data near the end.  Each repetition converts it to raw and to qcow2, with cowd and with
qemu-img, in two pairings of the same durability:

- *unsafe*: ``cowd convert -t unsafe`` against ``qemu-img convert`` (whose default cache mode
  for convert is ``unsafe``): the output is left in the page cache;
- *writeback*: ``cowd convert`` (its default flushes the output before it returns) against
  ``qemu-img convert -t writeback`` (which flushes at the end too).

Before every timed run the outputs are deleted and the machine's dirty pages written back
(``sync``), so that one run's writeback does not land in the next; the source stays in the
page cache for both (read once before the first repetition).  Within a repetition the order
of cowd and qemu-img alternates.  cowd runs as a user's install does: with its bytecode
compiled (a first, untimed run writes it; $PYTHONDONTWRITEBYTECODE is dropped for cowd).
The figure is throughput (virtual bytes per second of wall time, process start included),
and the ratio cowd / qemu-img per repetition (higher is better for cowd); medians of
``--reps`` (default 5, at least 3) repetitions, with min and max.  The first repetition's
outputs are compared with ``qemu-img compare``.

Output: a Markdown table on stdout and JSON (date, commit, machine, load averages before and
after, every repetition) in ``results/bench-convert.json``.  Images live in a temporary
directory under /var/tmp that is removed at the end.

Usage: python -m tools.bench formats --convert [--quick] [--size 1G] [--reps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools import benchlib

ROOT = benchlib.ROOT

DEFAULT_SIZE = 1 << 30  # the figure: a 1 GiB image
QUICK_SIZE = 64 << 20
DEFAULT_REPS = 5
MIN_REPS = 3  # a median of fewer says nothing
# qemu-io is given the fixture's data in pieces of this size (one huge request would make
# it allocate a buffer the size of the piece).
QEMU_IO_CHUNK_BYTES = 64 << 20
# Every run is bounded: a stuck convert must not hang the benchmark.
RUN_TIMEOUT_S = 600.0

OUTPUT_FORMATS = {"raw": "raw", "qcow2": "qcow2"}  # cowd's -O -> qemu-img's -O
# pairing -> (cowd's flags, qemu-img's flags): the same durability on both sides
PAIRINGS = {
    "unsafe": (["-t", "unsafe"], []),
    "writeback": ([], ["-t", "writeback"]),
}


@dataclass
class Pair:
    """One figure: the two sides' seconds per repetition."""

    key: str  # "<format>.<pairing>"
    cowd_s: list[float] = field(default_factory=list)
    qemu_s: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [q / c for c, q in zip(self.cowd_s, self.qemu_s, strict=True)]


def sh(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
    p = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}: "
                           f"{p.stderr.strip()}")


def fill(path: Path, fmt: str, start: int, length: int, pattern: int) -> None:
    cmds: list[str] = []
    pos = start
    while pos < start + length:
        n = min(QEMU_IO_CHUNK_BYTES, start + length - pos)
        cmds += ["-c", f"write -P {pattern} {pos} {n}"]
        pos += n
    sh("qemu-io", "-f", fmt, *cmds, path)


def make_image(work: Path, size: int) -> Path:
    base, top = work / "base.raw", work / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "raw", base, str(size))
    fill(base, "raw", 0, size * 3 // 4 // 65536 * 65536, 0x11)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", top)
    mib = 1 << 20
    fill(top, "qcow2", size // 10 // mib * mib, size // 5 // mib * mib, 0x22)
    zero_at = size * 4 // 10 // mib * mib
    sh("qemu-io", "-c", f"write -z {zero_at} {size // 10 // mib * mib}", top)
    fill(top, "qcow2", size * 9 // 10 // mib * mib, size // 20 // mib * mib, 0x33)
    return top


def cowd_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's install has its bytecode
    return env


def timed(args: list[str], env: dict[str, str] | None, out: Path) -> float:
    if out.exists():
        out.unlink()
    os.sync()  # the last run's writeback must not land in this one
    t0 = time.monotonic()
    sh(*args, env=env)
    return time.monotonic() - t0


def run(top: Path, work: Path, reps: int) -> list[Pair]:
    cowd = benchlib.cowd_command()
    env = cowd_env()
    pairs = {f"{fmt}.{mode}": Pair(f"{fmt}.{mode}") for fmt in OUTPUT_FORMATS
             for mode in PAIRINGS}
    # Untimed: the source into the page cache, cowd's bytecode written.
    sh(*cowd, "convert", "-t", "unsafe", "-O", "raw", top, work / "warm.raw", env=env)
    (work / "warm.raw").unlink()
    for rep in range(reps):
        print(f"bench_convert: repetition {rep + 1}/{reps} ...", file=sys.stderr, flush=True)
        for fmt, qfmt in OUTPUT_FORMATS.items():
            for mode, (cflags, qflags) in PAIRINGS.items():
                pair = pairs[f"{fmt}.{mode}"]
                ours, theirs = work / f"cowd.{fmt}", work / f"qemu.{fmt}"
                cmd_c = [*cowd, "convert", *cflags, "-O", fmt, str(top), str(ours)]
                cmd_q = ["qemu-img", "convert", *qflags, "-O", qfmt, str(top), str(theirs)]
                if rep % 2:
                    q = timed(cmd_q, None, theirs)
                    c = timed(cmd_c, env, ours)
                else:
                    c = timed(cmd_c, env, ours)
                    q = timed(cmd_q, None, theirs)
                pair.cowd_s.append(c)
                pair.qemu_s.append(q)
                if rep == 0:
                    sh("qemu-img", "compare", "-q", "-f", fmt, "-F", qfmt, ours, theirs)
                ours.unlink()
                theirs.unlink()
    return list(pairs.values())


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(doc: dict[str, object], pairs: list[Pair], size: int) -> str:
    gib = size / (1 << 30)
    load = doc["loadavg"]
    assert isinstance(load, dict)
    lines = [
        f"cowd convert vs qemu-img convert, {size >> 20} MiB qcow2 overlay over a raw base "
        f"({doc['date']}, commit {doc['commit']}, 1/5/15-min load before "
        f"{load['before']}, after {load['after']})",
        "",
        "| output, durability | cowd GiB/s | qemu-img GiB/s | cowd / qemu-img (min-max) |",
        "|---|---|---|---|",
    ]
    for p in pairs:
        c = statistics.median(p.cowd_s)
        q = statistics.median(p.qemu_s)
        r = stats(p.ratios())
        lines.append(f"| {p.key.replace('.', ', ')} | {gib / c:.2f} | {gib / q:.2f} | "
                     f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run: {QUICK_SIZE >> 20} MiB, {MIN_REPS} repetitions")
    ap.add_argument("--size", type=benchlib.parse_size, default=None,
                    help="virtual size of the image (default 1G)")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"repetitions (default {DEFAULT_REPS}, at least {MIN_REPS})")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench-convert.json")
    args = ap.parse_args(argv)
    size = args.size or (QUICK_SIZE if args.quick else DEFAULT_SIZE)
    reps = args.reps or (MIN_REPS if args.quick else DEFAULT_REPS)
    if reps < MIN_REPS:
        ap.error(f"--reps must be at least {MIN_REPS} (a median of fewer says nothing)")
    if size < 16 << 20 or size % (1 << 20):
        ap.error("--size must be whole MiB and at least 16 MiB")
    if benchlib.missing_tool("bench_convert", "qemu-img", "qemu-io"):
        return 1
    load_before = [round(x, 2) for x in os.getloadavg()]
    head = benchlib.header()
    started = time.monotonic()
    with benchlib.scratch_dir("cowd-bench-convert-") as work:
        print(f"bench_convert: making a {size >> 20} MiB image in {work} ...",
              file=sys.stderr, flush=True)
        top = make_image(work, size)
        pairs = run(top, work, reps)
    doc: dict[str, object] = {
        "benchmark": "bench-convert",
        **head,
        "python": platform.python_version(),
        "qemu_img": subprocess.run(["qemu-img", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0],
        "loadavg": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "elapsed_s": round(time.monotonic() - started, 2),
        "params": {"size_bytes": size, "reps": reps, "quick": args.quick,
                   "pairings": {k: {"cowd": c, "qemu-img": q}
                                for k, (c, q) in PAIRINGS.items()}},
        "figures": [{"key": p.key, "cowd_s": p.cowd_s, "qemu_s": p.qemu_s,
                     "ratio": stats(p.ratios()), "ratios": p.ratios()} for p in pairs],
    }
    benchlib.write_json(args.out, doc)
    print(markdown(doc, pairs, size))
    print(f"\nbench_convert: JSON in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
