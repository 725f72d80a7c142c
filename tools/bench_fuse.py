"""Benchmark of the FUSE frontend's mount options (not a test; pytest does not collect it).

A loop device (``--direct-io=on``) on the FUSE file of a fresh qcow2 overlay over a raw base,
against a plain loop device (``--direct-io=on``) on a raw copy of the same base, in the same
run: fio 1 MiB sequential read (QD1), 4 KiB random read (QD32) and 4 KiB random write (QD32,
the overlay is new for every run so every first write to a cluster allocates).  Page cache
dropped before every job.  Prints a table of medians and their ratio to the plain loop
device, and writes every figure as JSON.

    .venv/bin/python -m tools.bench fuse --size-mib 1024 --runs 3 --out /tmp/fuse_bench.json
    .venv/bin/python -m tools.bench fuse --configs default,no-direct-io   # a subset
    .venv/bin/python -m tools.bench fuse --configs io-uring,dev-fuse --enable-uring

``io-uring`` serves over FUSE-over-io_uring (the run fails if the kernel did not take it),
``dev-fuse`` the same options over /dev/fuse reads; ``--enable-uring`` sets the fuse module's
``enable_uring`` to Y for the run and puts the old value back after it.

The server is set up as the daemon sets up `cowd attach --via fuse`: with ``--workers``
worker processes (default auto, as the daemon's: one per core, none on a single core) that
serve the FUSE file too, through clones of /dev/fuse or ring queues of their own, and the
daemon's view of the disk gated for them.  Server CPU counts the daemon and its workers.

It needs root, /dev/fuse, loop devices, fio and qemu-img; the ``pyfuse3`` configuration
needs pyfuse3 (``pip install '.[bench]'``; make venv installs it).  It creates and removes only its
own loop devices (by name) and its own mounts, under a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cowd.frontends.fuse.protocol import FuseOptions
from tools import benchlib
from tools.benchlib import HZ, children, cpu_ticks, drop_caches, idle_ticks

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-direct-io": {"direct_io": False},
    "no-parallel-writes": {"parallel_direct_writes": False},
    "max-background-12": {"max_background": 12},
    "max-background-256": {"max_background": 256},
    "requests-128k": {"max_write_bytes": 128 << 10, "max_read_bytes": 128 << 10},
    "writeback-cache": {"direct_io": False, "writeback_cache": True},
    "workers-4": {"max_workers": 4},
    "io-uring": {"io_uring": True},
    "dev-fuse": {"io_uring": False},
    "pyfuse3": {"pyfuse3": True},
}

JOBS = {
    "seqread_1m_qd1": benchlib.Job("read", "1M", 1),
    "randread_4k_qd32": benchlib.Job("randread", "4k", 32),
    "randwrite_4k_qd32": benchlib.Job("randwrite", "4k", 32),
}


def sh(*args: str, check: bool = True) -> str:
    p = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.returncode} {p.stderr.strip()}")
    return p.stdout.strip()


def fio(dev: str, job: str, runtime_s: float) -> tuple[float, int]:
    """(MB/s for sequential jobs, IOPS for random ones; I/Os completed)."""
    [f] = benchlib.run([dev], JOBS[job], runtime_s=runtime_s, time_based=True, ramp_s=0.5)
    return (f["MBps"] if job.startswith("seq") else f["iops"]), int(f["ios"])


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.readinto(_WARM_BUF):
                pass


_WARM_BUF = bytearray(8 << 20)


def run_jobs(file: str, runtime_s: float, warm_paths: list[Path] | None,
             dio: bool = True, pid: int | None = None) -> dict[str, float]:
    """fio on a loop device on ``file``.  Cold (page cache dropped before each job) unless
    ``warm_paths`` are given: then those files are read into the page cache instead."""
    dev = sh("losetup", "--find", "--show", f"--direct-io={'on' if dio else 'off'}", file)
    try:
        got = Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip()
        if got != ("1" if dio else "0"):
            raise RuntimeError(f"{dev}: direct I/O setting not in effect (dio={got})")
        res = {}
        for job in JOBS:
            if warm_paths is None:
                drop_caches()
            else:
                warm(warm_paths)
            c0 = server_ticks(pid) if pid else 0
            i0, t0 = idle_ticks()
            res[job], ios = fio(dev, job, runtime_s)
            i1, t1 = idle_ticks()
            res[f"{job}_machine_idle_pct"] = 100.0 * (i1 - i0) / max(1, t1 - t0)
            if pid:
                res[f"{job}_server_cpu_us_per_io"] = \
                    (server_ticks(pid) - c0) / HZ * 1e6 / max(1, ios)
        return res
    finally:
        sh("losetup", "-d", dev, check=False)


def server_ticks(pid: int) -> int:
    """CPU ticks of the server and its live children (its worker processes)."""
    return cpu_ticks(pid) + sum(cpu_ticks(c) for c in children(pid))


# ---- the served side (a child process) -----------------------------------------------------

def serve(image: str, mnt: str, opts: dict[str, Any]) -> None:
    import trio

    from cowd.disk import Disk, ImagePool
    from cowd.remap import RemapCache
    from cowd.workers import wire as W
    from cowd.workers.host import WorkerPool

    opts = dict(opts)
    workers = int(opts.pop("workers", 0))
    if opts.get("pyfuse3"):
        workers = 0

    async def main() -> None:
        from contextlib import AsyncExitStack

        disk = await Disk.open(image, pool=ImagePool(), cache=RemapCache())
        await disk.prime()
        try:
            async with trio.open_nursery() as nursery:
                # As the daemon does for `cowd attach --via fuse` (daemon.py, attacher.py).
                pool = WorkerPool(workers, nursery) if workers else None
                if pool is not None:
                    await pool.start()
                async with AsyncExitStack() as stack:
                    if opts.get("pyfuse3"):
                        await _pyfuse3_serve(stack, nursery, mnt, disk)
                    else:
                        from cowd.frontends.fuse.server import mount_fuse
                        fe = await mount_fuse(stack, nursery, mnt, {},
                                              FuseOptions(**opts, uring_workers=workers))
                        if opts.get("io_uring") and fe.ring is None:
                            print(f"no io_uring: {fe.uring_reason}", flush=True)
                            return
                        if pool is None:
                            fe.add_disk("disk", disk)
                        else:
                            await pool.serve_fuse(fe)
                            served = pool.add_disk("disk", disk, W.SCOPE_DEVICE,
                                                   publish=False)
                            fe.add_disk("disk", pool.gated(served))
                            served.fuse_ino = fe.fs.by_name["disk"].ino
                            pool.publish(served)
                    print("ready", flush=True)
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                        async for _ in sigs:
                            break
                if pool is not None:
                    await pool.forget_disk(disk)
                    await pool.stop()
                nursery.cancel_scope.cancel()
        finally:
            await disk.close()

    trio.run(main)


async def _pyfuse3_serve(stack: Any, nursery: Any, mnt: str, disk: Any) -> None:
    """The same Disk behind pyfuse3, for comparison (no fallocate: pyfuse3 has none)."""
    import errno
    import stat

    import pyfuse3

    class Ops(pyfuse3.Operations):
        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            e = pyfuse3.EntryAttributes()
            e.st_ino = inode
            e.attr_timeout = e.entry_timeout = 1.0
            if inode == pyfuse3.ROOT_INODE:
                e.st_mode = stat.S_IFDIR | 0o755
            else:
                e.st_mode = stat.S_IFREG | 0o600
                e.st_size = disk.size
            return e

        async def lookup(self, parent: int, name: bytes, ctx: Any = None
                         ) -> pyfuse3.EntryAttributes:
            if name != b"disk":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(2)

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            n = max(0, min(size, disk.size - off))
            return await disk.read(off, n)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            await disk.write(off, buf)
            return len(buf)

        async def fsync(self, fh: int, datasync: bool) -> None:
            await disk.flush()

    opts = set(pyfuse3.default_options)
    pyfuse3.init(Ops(), mnt, opts)
    stack.callback(pyfuse3.close, unmount=True)
    nursery.start_soon(pyfuse3.main)


# ---- the harness -------------------------------------------------------------------------------

def one_run(work: Path, base: Path, name: str, opts: dict[str, Any], runtime_s: float,
            warm_paths: list[Path] | None, workers: int = 0) -> dict[str, float]:
    top = work / "top.qcow2"
    top.unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    p = subprocess.Popen([sys.executable, "-m", "tools.bench_fuse", "--serve", str(top),
                          str(mnt), json.dumps({**opts, "workers": workers})],
                         stdout=subprocess.PIPE, text=True,
                         cwd=benchlib.ROOT)  # -m finds the tools package in the cwd
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{name}: server did not start ({line.strip() or 'no output'})")
        return run_jobs(str(mnt / "disk"), runtime_s, warm_paths, pid=p.pid)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", nargs=3, metavar=("IMAGE", "MNT", "OPTS"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="/tmp/fuse_bench.json")
    ap.add_argument("--warm", action="store_true",
                    help="images in the page cache instead of dropped caches; adds a "
                         "buffered loop (direct-io=off, warm) baseline")
    ap.add_argument("--workers", default="auto", metavar="N|auto",
                    help="worker processes beside the server, as the daemon's --workers "
                    "(default auto: one per core, none on a single core)")
    ap.add_argument("--enable-uring", action="store_true",
                    help="set the fuse module's enable_uring to Y for the run (restored after)")
    a = ap.parse_args()
    if a.serve:
        serve(a.serve[0], a.serve[1], json.loads(a.serve[2]))
        return
    param = Path("/sys/module/fuse/parameters/enable_uring")
    old = param.read_text().strip() if a.enable_uring and param.exists() else None
    if a.enable_uring and old is None:
        raise SystemExit(f"--enable-uring: {param} is missing (no FUSE-over-io_uring here)")
    try:
        if old is not None:
            param.write_text("Y")
        _bench(a)
    finally:
        if old is not None:
            param.write_text(old)


def _bench(a: argparse.Namespace) -> None:
    head = benchlib.header()
    cores = len(os.sched_getaffinity(0))
    workers = (cores if cores > 1 else 0) if a.workers == "auto" else int(a.workers)
    head["workers"] = workers
    print(f"worker processes beside the server: {workers}", flush=True)
    names = a.configs.split(",")
    results: dict[str, list[dict[str, float]]] = {"loop": [], **{n: [] for n in names}}
    if a.warm:
        results["loop-buffered-warm"] = []
    with tempfile.TemporaryDirectory(prefix="fuse-bench-") as d:
        work = Path(d)
        base = work / "base.raw"
        sh("sh", "-c", f"head -c {a.size_mib}M /dev/urandom > {base}")
        copy = work / "copy.raw"
        for r in range(a.runs):
            sh("cp", "--sparse=never", str(base), str(copy))
            results["loop"].append(run_jobs(str(copy), a.runtime, None))
            print(f"run {r} loop {results['loop'][-1]}", flush=True)
            if a.warm:
                results["loop-buffered-warm"].append(
                    run_jobs(str(copy), a.runtime, [copy], dio=False))
                print(f"run {r} loop-buffered-warm {results['loop-buffered-warm'][-1]}",
                      flush=True)
            sh("cp", "--sparse=never", str(base), str(copy))
            for n in names:
                t0 = time.time()
                results[n].append(one_run(work, base, n, CONFIGS[n], a.runtime,
                                          [base] if a.warm else None, workers))
                print(f"run {r} {n} {results[n][-1]} ({time.time() - t0:.0f} s)", flush=True)
    med = {n: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
           for n, runs in results.items() if runs}
    benchlib.write_json(a.out, {**head, "runs": results, "medians": med,
                                "defaults": asdict(FuseOptions())})
    loop = med["loop"]
    print(f"| config | {' | '.join(JOBS)} |")
    print(f"|---|{'---|' * len(JOBS)}")
    print(f"| loop on raw copy = 1.0 | {loop['seqread_1m_qd1']:.0f} MB/s | "
          f"{loop['randread_4k_qd32'] / 1e3:.1f}k IOPS | "
          f"{loop['randwrite_4k_qd32'] / 1e3:.1f}k IOPS |")
    for n in ([*names, "loop-buffered-warm"] if a.warm else names):
        cells = [f"{med[n][j] / loop[j]:.2f}" for j in JOBS]
        cpu = [f"{med[n].get(f'{j}_server_cpu_us_per_io', 0):.0f}" for j in JOBS]
        print(f"| {n} | {' | '.join(cells)} | server CPU us/IO {'/'.join(cpu)} |")
    every = [r for rs in results.values() for r in rs]
    idle = [f"{statistics.median(r[f'{j}_machine_idle_pct'] for r in every):.0f}" for j in JOBS]
    print(f"machine idle % during jobs (median): {'/'.join(idle)}")


if __name__ == "__main__":
    main()
