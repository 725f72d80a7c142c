"""The user-space data path on every core: cold random I/O and scaling, in one run.

Paths, each measured in every repetition, back to back, on the same base:

    loop        ``losetup --direct-io=on`` on the raw base (reads only: the baseline = 1.00)
    qemu-nbd    qemu-nbd on a fresh qcow2 overlay of the base (the peer; one process per
                overlay in the scaling job)
    cowd        ``cowd serve`` on a fresh overlay, connections served in the daemon
    cowd-w      the same with ``--workers auto`` (one worker process per core)

Workloads (fio; the page cache dropped before each job, so every read of the base is cold)

    randread    4 KiB random reads QD32, one pass over the disk at most (no block twice)
    randwrite   4 KiB random writes QD32 on a fresh overlay (64 KiB clusters, qemu-img's
                default), each 4 KiB block written once: the first write to each cluster
                allocates it and copies up the rest of it, the others write in place
    randwrite-sub  the same on a fresh overlay with extended L2 entries (128 KiB clusters of
                32 subclusters of 4 KiB, ``cowd create --extended-l2``), for every path:
                every write is the first write of its subcluster (no copy-up)
    scaling     N = 1, 2, 4, 8, 16 overlays of one base, one fio client each, 4 KiB random
                reads QD32, all at once, for --runtime seconds; IOPS summed over the clients

For every job: IOPS, p99 completion latency, and the server's CPU per I/O — the process and
its children (a cowd daemon's workers), from /proc.  Ratios are taken per repetition (paired:
the same minute of the machine) and the median and spread over the repetitions reported.

Usage: python -m tools.bench scale [--quick] [--size 1G] [--reps 3] [--runtime 10]
                                   [--out results/bench-scale.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools import benchlib
from tools.bench_nbd import Server, drop_caches, sh

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("loop", "qemu-nbd", "cowd", "cowd-w")
JOBS = {"randread": benchlib.Job("randread", "4k", 32),
        "randwrite": benchlib.Job("randwrite", "4k", 32),
        "randwrite-sub": benchlib.Job("randwrite", "4k", 32)}
# qemu-img create -o for a workload's fresh overlays (default: qemu-img's own defaults).
OVERLAY_OPTIONS = {"randwrite-sub": "cluster_size=128k,extended_l2=on"}
SCALING = (1, 2, 4, 8, 16)

Figures = dict[str, float]


@contextlib.contextmanager
def serving(path: str, overlays: list[Path], work: Path, tag: str
            ) -> Iterator[tuple[list[str], list[int]]]:
    """The NBD URIs of ``overlays`` and the server pids, for one path (loop: a loop device
    on the raw base per overlay, no server)."""
    if path == "loop":
        base = work / "base.raw"
        devs = [sh("losetup", "--find", "--show", "--direct-io=on", str(base)).stdout.strip()
                for _ in overlays]
        try:
            yield devs, []
        finally:
            for d in devs:
                benchlib.quiet("losetup", "-d", d)
        return
    servers: list[Server] = []
    try:
        if path == "qemu-nbd":
            for i, ov in enumerate(overlays):
                servers.append(Server("qemu-nbd", ov, work, tag=f"-{tag}-{i}"))
        else:
            extra = ("--workers", "auto") if path == "cowd-w" else ("--workers", "0")
            servers.append(Server("cowd", overlays[0], work, images=overlays,
                                  run_dir=work / f"run-{tag}", tag=f"-{tag}", extra=extra))
        yield [u for s in servers for u in s.uris], [s.proc.pid for s in servers]
    finally:
        for s in servers:
            s.stop()


def fresh_overlays(work: Path, n: int, tag: str, options: str | None = None) -> list[Path]:
    out = []
    for i in range(n):
        ov = work / f"{tag}-{i}.qcow2"
        ov.unlink(missing_ok=True)
        sh("qemu-img", "create", "-q", "-f", "qcow2", *(("-o", options) if options else ()),
           "-b", "base.raw", "-F", "raw", str(ov))
        out.append(ov)
    return out


def cpu(pids: list[int]) -> float:
    return sum(benchlib.tree_cpu_seconds(p) for p in pids)


def one_job(path: str, work: Path, job: benchlib.Job, n: int, size: int, runtime: float,
            time_based: bool, tag: str, options: str | None = None) -> Figures:
    overlays = fresh_overlays(work, n, tag, options)
    try:
        with serving(path, overlays, work, tag) as (targets, pids):
            drop_caches()
            cpu0 = cpu(pids)
            per = benchlib.run(targets, job, size=size, runtime_s=runtime,
                               time_based=time_based)
            cpu1 = cpu(pids)
    finally:
        for ov in overlays:
            ov.unlink(missing_ok=True)
    ios = sum(f["ios"] for f in per)
    out: Figures = {"iops": sum(f["iops"] for f in per),
                    "lat_p99_us": max(f["lat_p99_us"] for f in per), "ios": ios}
    if pids:
        out["server_cpu_us_per_io"] = (cpu1 - cpu0) * 1e6 / max(1.0, ios)
    return out


def one_rep(work: Path, size: int, runtime: float, scaling: tuple[int, ...],
            workloads: tuple[str, ...] = tuple(JOBS)) -> dict[str, dict[str, Figures]]:
    """workload -> path -> figures, for one repetition."""
    out: dict[str, dict[str, Figures]] = {}
    for name, job in JOBS.items():
        if name not in workloads:
            continue
        for path in PATHS:
            if path == "loop" and job.rw != "randread":
                continue  # a loop device on the base has no copy-on-write to measure
            print(f"  {name} on {path} ...", file=sys.stderr, flush=True)
            out.setdefault(name, {})[path] = one_job(path, work, job, 1, size, runtime,
                                                     False, f"{name}",
                                                     OVERLAY_OPTIONS.get(name))
    for n in scaling:
        name = f"scaling-{n}"
        for path in PATHS:
            print(f"  {name} on {path} ...", file=sys.stderr, flush=True)
            out.setdefault(name, {})[path] = one_job(path, work, JOBS["randread"], n, size,
                                                     runtime, True, f"s{n}")
    return out


def summarise(reps: list[dict[str, dict[str, Figures]]]) -> dict[str, dict[str, Any]]:
    """Per workload and path: median IOPS, p99, CPU per I/O; ratios paired by repetition
    against loop and against qemu-nbd (median, min, max)."""
    table: dict[str, dict[str, Any]] = {}
    for name in reps[0]:
        row: dict[str, Any] = {}
        for path in reps[0][name]:
            figs = [r[name][path] for r in reps]
            cell: dict[str, Any] = {
                "iops": statistics.median(f["iops"] for f in figs),
                "lat_p99_us": statistics.median(f["lat_p99_us"] for f in figs)}
            if "server_cpu_us_per_io" in figs[0]:
                cell["server_cpu_us_per_io"] = statistics.median(
                    f["server_cpu_us_per_io"] for f in figs)
            for peer in ("loop", "qemu-nbd"):
                if peer == path or peer not in reps[0][name]:
                    continue
                ratios = [r[name][path]["iops"] / r[name][peer]["iops"] for r in reps
                          if r[name][peer]["iops"]]
                cell[f"vs_{peer}"] = [statistics.median(ratios), min(ratios), max(ratios)]
            row[path] = cell
        table[name] = row
    return table


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Scale benchmark, {doc['date']}, {doc['machine']}, kernel {doc['kernel']}, "
             f"commit {doc['commit']}, load {doc['loadavg'][0]:.2f} at the start, "
             f"{doc['size'] >> 20} MiB disk, {doc['workers']} workers for cowd-w, "
             f"median of {doc['reps']} (min-max of the paired ratios)", "",
             "| workload | path | IOPS | x loop | x qemu-nbd | p99 ms | server CPU us/IO |",
             "|---|---|---|---|---|---|---|"]

    def ratio(cell: dict[str, Any], key: str) -> str:
        r = cell.get(key)
        return f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})" if r else "-"

    for name, row in doc["summary"].items():
        for path, cell in row.items():
            cpu_s = cell.get("server_cpu_us_per_io")
            lines.append(f"| {name} | {path} | {cell['iops']:.0f} | {ratio(cell, 'vs_loop')} | "
                         f"{ratio(cell, 'vs_qemu-nbd')} | {cell['lat_p99_us'] / 1000:.2f} | "
                         f"{'-' if cpu_s is None else f'{cpu_s:.1f}'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small and short (a smoke test)")
    ap.add_argument("--size", default=None, help="disk size (default 1G, quick 128M)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--runtime", type=float, default=None,
                    help="seconds per job at most (default 10, quick 2)")
    ap.add_argument("--scaling", default=None,
                    help="comma-separated overlay counts (default 1,2,4,8,16; quick 2)")
    ap.add_argument("--workloads", default=",".join(JOBS),
                    help=f"comma-separated, of {', '.join(JOBS)} (default: all; the scaling "
                    "job is --scaling's)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench-scale.json"))
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_scale: needs root (loop devices, dropping the page cache)",
              file=sys.stderr)
        return 1
    size = benchlib.parse_size(args.size or ("128M" if args.quick else "1G"))
    reps = args.reps or (1 if args.quick else 3)
    runtime = args.runtime or (2.0 if args.quick else 10.0)
    scaling_arg = args.scaling if args.scaling is not None else \
        ("2" if args.quick else ",".join(map(str, SCALING)))
    scaling = tuple(int(x) for x in scaling_arg.split(",") if x)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = [w for w in workloads if w not in JOBS]
    if unknown:
        print(f"bench_scale: --workloads: unknown {unknown[0]!r} (known: {', '.join(JOBS)})",
              file=sys.stderr)
        return 2
    results = []
    head = benchlib.header()  # the date and the load before the run (the run loads it)
    with benchlib.scratch_dir("cowd-scale-", keep=args.dir) as work:
        with open(work / "base.raw", "wb") as f:
            chunk = os.urandom(1 << 20)
            for i in range(size >> 20):
                f.write(chunk[i % 7:] + chunk[:i % 7])
        for i in range(reps):
            print(f"rep {i + 1}/{reps}", file=sys.stderr, flush=True)
            results.append(one_rep(work, size, runtime, scaling, workloads))
    cores = len(os.sched_getaffinity(0))
    doc = {**head, "loadavg_after": list(os.getloadavg()), "size": size, "reps": reps,
           "runtime_s": runtime, "workers": cores if cores > 1 else 0, "repetitions": results,
           "summary": summarise(results)}
    benchlib.write_json(args.out, doc)
    print(markdown(doc))
    return 0



if __name__ == "__main__":
    sys.exit(main())
