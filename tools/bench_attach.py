"""The user's real path, ``cowd attach --via fuse`` (a loop device on the daemon's FUSE file),
against a plain loop device on a raw copy of the same base, in the same run (not a test;
pytest does not collect it).

Layer: tools.  A client of the ``cowd`` console script, as a user runs it; from the rest of
the tree it takes only tools.benchlib (fio, the page cache, CPU counters, clean-up).

Both devices stand on one base, an empty raw file (2 GiB; --quick 128 MiB):

- loop: ``losetup --find --show --direct-io=on`` on a copy of the base made by ``cp`` (so as
  sparse as the base: a first write to a block allocates it in the host file system, as a
  first write to a cluster allocates it in the overlay; ``--full-copy`` writes every block).
- cowd: ``cowd create --base base.raw --overlay qcow -o OV``, then ``cowd attach OV --via fuse
  --run-dir RUN`` with RUN a private run dir inside the work dir (never /run/cowd).

Every repetition gets a fresh copy and a fresh overlay for each workload:

copy
    ``mkfs.ext4 -q``, then the timed window: mount, ``cp -a`` a generated tree of small files
    in, ``sync -f`` the mount, umount (seconds; dm-userspace, 2006: loop 1 s, its qcow path
    10 s).  The tree (default 2000 files, 20 MB, seeded random sizes in nested directories) is
    made once per run and read into the page cache before each window, so the window measures
    the device, not the source.  Mounted with ``noinit_itable``, so that ext4's background
    inode-table zeroing (mkfs leaves it lazy) never lands inside one path's window and not the
    other's.
fio
    fio, libaio, direct=1 on the block device, page cache dropped before each job (unless
    --no-drop-caches): 1 MiB sequential read and write at QD1, 4 KiB random read and write at
    QD32.  Each job touches every byte at most once (fio's --size is the whole device, runs
    end at --runtime seconds or after one pass, whichever is first), so cowd's buffered
    reads of its overlay never hit a page cache the loop device's direct I/O cannot have.
    Writes run on a fresh copy / fresh overlay each (cold: the first write to a 64 KiB
    cluster allocates it, the copy-on-write cost; the JSON and the table say which share of
    cowd's write requests allocated).  Reads run on a device filled beforehand by one untimed
    1 MiB sequential pass, so both read real data (the base is empty: without the fill they
    would read holes).  Why 2 GiB: on 512 MiB the loop device ends a 1 MiB pass in 0.3 s,
    and 3 s of 4 KiB random writes on cowd land mostly in clusters they already allocated
    (most of its 8192 clusters are taken within the first second): a rewrite benchmark, not a
    copy-on-write one.

Reported: medians over --reps (default 3) with the min-max of the per-repetition ratios cowd /
loop (time ratio for copy: lower is better; throughput ratio for fio: higher is better), the
daemon's CPU seconds (utime+stime from /proc/PID/stat, PID from the run dir's pid file) during
the timed window, cowd's remap cache hit rate over the same window (the disk's counters in
``cowd stats --json``), the machine's idle share (the machines are shared), and in the JSON the
bytes the block device itself read and wrote in the window (/sys/block/X/stat), which must be
alike on both paths.  JSON with date, kernel, machine, commit and every repetition goes to
--out; the table to stdout.

Clean-up, on success, failure, Ctrl-C or SIGTERM: it unmounts only its own mountpoints,
``cowd detach``es only its own devices (then, if the daemon in its run dir does not go,
SIGTERM/SIGKILL to that pid and a detach of the loop devices backed by files in its work
dir), ``losetup -d`` only loop devices whose backing file is in its work dir, and removes the
work dir once nothing is mounted under it.  Never ``losetup -D``, ``umount -a``, pkill.

    .venv/bin/python -m tools.bench attach           # 3 repetitions, 2 GiB
    .venv/bin/python -m tools.bench attach --quick   # 1 repetition, 128 MiB base: under a minute

Needs root, /dev/fuse, loop devices, fio, mkfs.ext4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowd.frontends.fuse.mount import fuse_problem
from cowd.rundir import pid_file_held
from tools import benchlib
from tools.benchlib import (
    HZ,
    drop_caches,
    idle_ticks,
    in_work_dir,
    quiet,
    sh,
    signals_deferred,
)

ROOT = Path(__file__).resolve().parent.parent
COWD = benchlib.cowd_command()

MiB = 1 << 20
LOOP_DEV = re.compile(r"/dev/loop[0-9]+")

# name: (fio rw, block size, iodepth)
FIO_JOBS = {
    "seqread-1M-qd1": ("read", "1M", 1),
    "randread-4k-qd32": ("randread", "4k", 32),
    "seqwrite-1M-qd1": ("write", "1M", 1),
    "randwrite-4k-qd32": ("randwrite", "4k", 32),
}
READ_JOBS = [n for n, (rw, _, _) in FIO_JOBS.items() if "read" in rw]
WRITE_JOBS = [n for n in FIO_JOBS if n not in READ_JOBS]
WORKLOADS = ["copy", *FIO_JOBS]
PATHS = ("loop", "cowd")


def note(text: str) -> None:
    print(f"bench_attach: {text}", file=sys.stderr, flush=True)


# ---- the source tree ---------------------------------------------------------------------------

@dataclass
class Tree:
    path: Path
    files: int
    dirs: int
    bytes: int
    seed: int


def make_tree(root: Path, files: int, total_bytes: int, seed: int) -> Tree:
    """A fixed tree: the same ``seed`` gives the same names, sizes and bytes.  Sizes are
    log-normal (median about half the mean, a long tail of larger files, every 50th file
    empty), scaled so they add up to ``total_bytes``; files spread over three levels of
    directories (8 x 4 x 3 leaves and the directories above them)."""
    rng = random.Random(seed)
    dirs = [root]
    for a in range(8):
        top = root / f"d{a}"
        dirs.append(top)
        for b in range(4):
            mid = top / f"s{b}"
            dirs.append(mid)
            dirs += [mid / f"leaf{c}" for c in range(3)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    weights = [0.0 if i % 50 == 49 else rng.lognormvariate(0.0, 1.2) for i in range(files)]
    scale = total_bytes / sum(weights)
    written = 0
    for i, w in enumerate(weights):
        size = int(w * scale)
        where = dirs[rng.randrange(len(dirs))]
        (where / f"f{i:05d}.dat").write_bytes(rng.randbytes(size))
        written += size
    return Tree(root, files, len(dirs), written, seed)


def warm_tree(tree: Path) -> None:
    """Read every file once so the copy's source comes from the page cache."""
    for dirpath, _dirs, names in os.walk(tree):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                while f.read(1 << 20):
                    pass


# ---- the kernel's view, for clean-up by name ----------------------------------------------------

def backing_file(dev: str) -> str | None:
    try:
        text = Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text()
    except OSError:
        return None
    return text.rstrip("\n")


def loops_under(directory: Path) -> list[str]:
    """Loop devices whose backing file the kernel names inside ``directory``."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        path = backing_file(name)
        if path is not None and path.startswith(f"{directory}/"):
            found.append(f"/dev/{name}")
    return found


def mounts_under(directory: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below ``directory``, deepest last."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            where = left.split()[4].replace("\\040", " ")
            if where == str(directory) or where.startswith(f"{directory}/"):
                out.append((where, right.split()[0]))
    return out


def lock_holder(pid_file: Path) -> int | None:
    """The pid that holds the run dir's flock, or None when nobody does."""
    if not pid_file_held(pid_file):
        return None
    with contextlib.suppress(ValueError, OSError):
        return int(Path(pid_file).read_text())
    return None


# ---- devices -----------------------------------------------------------------------------------

@dataclass
class Device:
    """What a workload runs on: a block device (``path``) or, for fio only, an NBD export
    (``path`` is its URI).  ``kind`` "cowd" is served by the daemon of ``run_dir`` (through
    FUSE + loop or NBD), "server" by the processes ``pids`` (qemu-nbd), "loop" by the kernel
    alone."""

    path: str
    kind: str  # "loop", "cowd" or "server"
    run_dir: Path
    disk: str = ""  # cowd's disk name (the overlay's file name)
    pids: tuple[int, ...] = ()  # kind "server": the server processes

    @property
    def is_block(self) -> bool:
        return not self.path.startswith("nbd")

    def daemon_pid(self) -> int | None:
        return lock_holder(self.run_dir / "cowd.pid") if self.kind == "cowd" else None

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of what serves the device, 0 for the kernel."""
        pid = self.daemon_pid()
        pids = (pid,) if pid else self.pids
        total = 0.0
        for p in pids:
            with contextlib.suppress(OSError):
                total += benchlib.tree_cpu_seconds(p)  # a daemon's workers included
        return total

    def counters(self) -> dict[str, int]:
        """The disk's remap cache lookups and its requests so far."""
        if self.kind != "cowd":
            return {}
        doc = json.loads(sh(*COWD, "stats", "--json", "--run-dir", str(self.run_dir)))
        disk = doc["disks"][self.disk]
        remap, ops = disk["remap"], disk["ops"]
        # Requests the worker processes did themselves (reads and in-place writes of mapped
        # clusters, first writes into lent clusters) besides those the daemon's Disk did.
        w = {k: int(v) for k, v in (disk.get("workers") or {}).items()
             if isinstance(v, int | float)}
        return {"hits": int(remap["hits"]), "misses": int(remap["misses"]),
                "requests": int(remap["requests"]),
                "metadata_lookups": int(remap["metadata_lookups"]),
                "reads": int(ops["reads"]) + w.get("reads_local", 0),
                "writes": int(ops["writes"]) + w.get("writes_local", 0)
                + w.get("writes_lent", 0),
                "writes_in_place": int(ops["writes_in_place"]) + w.get("writes_local", 0)}


class Bench:
    """Owns the work dir and everything made in it; :meth:`cleanup` undoes all of it."""

    def __init__(self, work: Path, base_bytes: int, full_copy: bool, drop: bool,
                 base_data: bool = False, dio: bool = True, via: str = "fuse"):
        """``base_data``: a base with data in every block (a cheap pattern, each MiB
        different) instead of an empty one; ``dio``: the loop device's direct I/O is
        required (off where the backing file system has none: the guest's tmpfs);
        ``via``: cowd attach's frontend."""
        self.work = work
        self.run_dir = work / "run"
        self.base = work / "base.raw"
        self.full_copy = full_copy
        self.drop = drop
        self.dio = dio
        self.via = via
        self.mounts: list[Path] = []
        self.loops: list[tuple[str, Path]] = []  # (device, its backing file)
        self.attached: list[str] = []
        with open(self.base, "wb") as f:
            f.truncate(base_bytes)
            if base_data:
                chunk = random.Random(base_bytes).randbytes(MiB)
                for i in range(base_bytes // MiB):
                    f.write(chunk[i % 4093:] + chunk[: i % 4093])

    def drop_caches(self) -> None:
        if self.drop:
            drop_caches()

    @contextlib.contextmanager
    def device(self, kind: str, tag: str) -> Iterator[Device]:
        if kind == "loop":
            with self.loop_device(tag) as dev:
                yield dev
        else:
            with self.cowd_device(tag) as dev:
                yield dev

    @contextlib.contextmanager
    def loop_device(self, tag: str) -> Iterator[Device]:
        copy = self.work / f"{tag}.raw"
        sh("cp", f"--sparse={'never' if self.full_copy else 'auto'}", str(self.base), str(copy))
        dev = sh("losetup", "--find", "--show", f"--direct-io={'on' if self.dio else 'off'}",
                 str(copy))
        self.loops.append((dev, copy))
        try:
            dio = Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip()
            if self.dio and dio != "1":
                raise RuntimeError(f"{dev}: direct I/O not in effect (dio={dio})")
            yield Device(dev, "loop", self.run_dir)
        finally:
            self.release_loop(dev, copy)
            copy.unlink(missing_ok=True)

    def release_loop(self, dev: str, backing: Path) -> None:
        with signals_deferred():
            if backing_file(dev) == str(backing):  # still ours, not a reused name
                p = quiet("losetup", "-d", dev)
                if p.returncode != 0:
                    note(f"losetup -d {dev}: {p.stderr.strip()}")
                    return
            self.loops.remove((dev, backing))

    def overlay(self, tag: str, warm: bool = False) -> Path:
        """A fresh qcow2 overlay of the base: empty (cold: every write is a first write) or,
        ``warm``, with every cluster allocated (written by qemu-io, 64 MiB at a time)."""
        ov = self.work / f"{tag}.qcow2"
        ov.unlink(missing_ok=True)
        sh(*COWD, "create", "--base", str(self.base), "--overlay", "qcow", "-o", str(ov))
        if warm:
            size, step = self.base.stat().st_size, 64 * MiB
            cmds = [a for off in range(0, size, step)
                    for a in ("-c", f"write -q -P 0x5a {off} {min(step, size - off)}")]
            sh("qemu-io", "-f", "qcow2", *cmds, str(ov))
        return ov

    @contextlib.contextmanager
    def cowd_device(self, tag: str, warm: bool = False,
                    detached: Callable[[Path], None] | None = None) -> Iterator[Device]:
        """``detached``: called with the overlay once it is detached (to check it)."""
        ov = self.overlay(tag, warm)
        benchlib.forget_boot_trace(ov)
        try:
            out = sh(*COWD, "attach", str(ov), "--via", self.via, "--run-dir",
                     str(self.run_dir))
            if self.via == "fuse" and not LOOP_DEV.fullmatch(out):
                raise RuntimeError(f"cowd attach printed {out!r}, not a loop device")
            self.attached.append(out)
            try:
                yield Device(out, "cowd", self.run_dir, ov.name)
            finally:
                self.detach(out)
            if detached is not None:
                detached(ov)
        finally:
            ov.unlink(missing_ok=True)

    def detach(self, dev: str) -> None:
        with signals_deferred():
            p = quiet(*COWD, "detach", dev, "--run-dir", str(self.run_dir))
            if p.returncode != 0:
                note(f"cowd detach {dev}: {p.stderr.strip()}")
                return  # cleanup() takes the daemon down
            self.attached.remove(dev)

    @contextlib.contextmanager
    def mounted(self, dev: str, tag: str) -> Iterator[Path]:
        where = self.work / f"mnt-{tag}"
        where.mkdir(exist_ok=True)
        self.mounts.append(where)  # before mount: an interrupted mount may still have happened
        try:
            sh("mount", "-o", "noinit_itable", dev, str(where))
            yield where
        finally:
            self.umount(where)

    def umount(self, where: Path) -> None:
        with signals_deferred():
            if mounts_under(where):
                p = quiet("umount", str(where))
                if p.returncode != 0:
                    note(f"umount {where}: {p.stderr.strip()}; detaching it lazily")
                    quiet("umount", "-l", str(where))
            if not mounts_under(where):
                self.mounts.remove(where)

    def cleanup(self) -> list[str]:
        """Undo whatever is left; returns what could not be undone."""
        for where in reversed(list(self.mounts)):
            self.umount(where)
        for dev in list(self.attached):
            self.detach(dev)
        pid = lock_holder(self.run_dir / "cowd.pid")
        if pid is not None:  # our daemon (our private run dir) did not go: make it go
            note(f"stopping the daemon of {self.run_dir} (pid={pid})")
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + 30
                while lock_holder(self.run_dir / "cowd.pid") == pid and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                if lock_holder(self.run_dir / "cowd.pid") is None:
                    break
        for dev in loops_under(self.work):  # ours: backed by a file in our work dir
            quiet("losetup", "-d", dev)
        for point, fstype in reversed(mounts_under(self.work)):
            if fstype == "fuse.cowd" or Path(point) in self.mounts:
                quiet("umount", "-l", point)
        left = [f"loop device {d}" for d in loops_under(self.work)]
        left += [f"mount {w} ({t})" for w, t in mounts_under(self.work)]
        return left


# ---- workloads ---------------------------------------------------------------------------------

def block_io(dev: str) -> tuple[int, int]:
    """Bytes read and written through block device ``dev`` so far (/sys/block/X/stat
    counts 512-byte sectors whatever the device's block size)."""
    f = Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()
    return int(f[2]) * 512, int(f[6]) * 512


class Window:
    """Daemon CPU, remap cache and machine idle over one timed window."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.stats0 = dev.counters()  # first: the stats request's CPU is outside the window
        self.cpu0, self.idle0 = dev.cpu_s(), idle_ticks()
        self.io0 = block_io(dev.path) if dev.is_block else (0, 0)

    def close(self, out: dict[str, float]) -> dict[str, float]:
        cpu1, stats1, idle1 = self.dev.cpu_s(), self.dev.counters(), idle_ticks()
        if self.dev.is_block:
            # What the block device itself saw: the same work on every path, or the figures
            # lie.
            io1 = block_io(self.dev.path)
            out["device_read_MB"] = (io1[0] - self.io0[0]) / 1e6
            out["device_written_MB"] = (io1[1] - self.io0[1]) / 1e6
        busy = idle1[1] - self.idle0[1] - (idle1[0] - self.idle0[0])
        out["machine_idle_pct"] = 100.0 * (idle1[0] - self.idle0[0]) / max(
            1, idle1[1] - self.idle0[1])
        out["machine_busy_cpu_s"] = busy / HZ
        if self.dev.kind != "loop":
            out["daemon_cpu_s"] = cpu1 - self.cpu0
        if self.dev.kind == "cowd":
            d = {k: stats1[k] - self.stats0[k] for k in stats1}
            out["cache_hits"], out["cache_misses"] = d["hits"], d["misses"]
            out["hit_rate"] = d["hits"] / max(1, d["hits"] + d["misses"])
            out["requests"] = d["reads"] + d["writes"]
            out["metadata_lookups"] = d["metadata_lookups"]
            # A write request that allocated a cluster (copy-on-write) rather than only
            # writing clusters the overlay already had.
            out["writes"] = d["writes"]
            out["allocating_writes"] = d["writes"] - d["writes_in_place"]
            if d["writes"]:
                out["allocating_share"] = out["allocating_writes"] / d["writes"]
        return out


def copy_workload(bench: Bench, dev: Device, tree: Tree, tag: str) -> dict[str, float]:
    sh("mkfs.ext4", "-q", "-F", dev.path)
    bench.drop_caches()
    warm_tree(tree.path)
    w = Window(dev)
    t0 = time.perf_counter()
    with bench.mounted(dev.path, tag) as mnt:
        sh("cp", "-a", str(tree.path), str(mnt / "tree"))
        sh("sync", "-f", str(mnt))
    seconds = time.perf_counter() - t0  # umount returned: the file system is on the device
    return w.close({"seconds": seconds})


def fio(dev: str, rw: str, bs: str, qd: int, runtime_s: float | None) -> dict[str, float]:
    """One fio job on one block device, over the whole device (one pass at most)."""
    [out] = benchlib.run([dev], benchlib.Job(rw, bs, qd), runtime_s=runtime_s)
    return out


def fio_job(bench: Bench, dev: Device, name: str, runtime_s: float) -> dict[str, float]:
    rw, bs, qd = FIO_JOBS[name]
    bench.drop_caches()
    w = Window(dev)
    r = w.close(fio(dev.path, rw, bs, qd, runtime_s))
    if "daemon_cpu_s" in r:
        r["daemon_cpu_s_per_GiB"] = r["daemon_cpu_s"] / max(r["bytes"] / (1 << 30), 1e-9)
    return r


Rep = dict[str, dict[str, dict[str, float]]]  # workload -> path -> figure -> value


def one_rep(bench: Bench, tree: Tree, runtime_s: float, rep: int, reps: int) -> Rep:
    out: Rep = {w: {} for w in WORKLOADS}
    for kind in PATHS:
        with bench.device(kind, f"{kind}-copy") as dev:
            note(f"rep {rep}/{reps}: copy on {kind} ({dev.path})")
            r = copy_workload(bench, dev, tree, f"{kind}-copy")
            out["copy"][kind] = r
            note(f"rep {rep}/{reps}: copy on {kind}: {r['seconds']:.2f} s")
        with bench.device(kind, f"{kind}-read") as dev:
            note(f"rep {rep}/{reps}: filling {dev.path} ({kind}) for the read jobs")
            fill = fio(dev.path, "write", "1M", 1, None)
            for name in READ_JOBS:
                r = fio_job(bench, dev, name, runtime_s)
                r["fill_MBps"] = fill["MBps"]
                out[name][kind] = r
                note(f"rep {rep}/{reps}: {name} on {kind}: {_fmt(name, r)}")
        for name in WRITE_JOBS:
            with bench.device(kind, f"{kind}-{name}") as dev:
                out[name][kind] = r = fio_job(bench, dev, name, runtime_s)
                note(f"rep {rep}/{reps}: {name} on {kind}: {_fmt(name, r)}")
    return out


def metric(workload: str) -> str:
    if workload == "copy":
        return "seconds"
    return "MBps" if FIO_JOBS[workload][1] == "1M" else "iops"


def _fmt(workload: str, r: dict[str, float]) -> str:
    m = metric(workload)
    return {"seconds": f"{r[m]:.2f} s", "MBps": f"{r[m]:.0f} MB/s",
            "iops": f"{r[m] / 1e3:.1f}k IOPS"}[m]


# ---- summary -----------------------------------------------------------------------------------

def summarise(reps: list[Rep]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for w in WORKLOADS:
        m = metric(w)
        loop = [r[w]["loop"][m] for r in reps]
        cowd = [r[w]["cowd"][m] for r in reps]
        ratios = [c / lo for c, lo in zip(cowd, loop, strict=True)]
        cpu_key = "daemon_cpu_s" if w == "copy" else "daemon_cpu_s_per_GiB"
        out[w] = {
            "metric": m, "better": "lower" if w == "copy" else "higher",
            "loop": statistics.median(loop), "cowd": statistics.median(cowd),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "ratios": ratios,
            "cowd_cpu_key": cpu_key,
            "cowd_cpu": statistics.median(r[w]["cowd"][cpu_key] for r in reps),
            "cowd_hit_rate": statistics.median(r[w]["cowd"]["hit_rate"] for r in reps),
            "cowd_allocating_share": statistics.median(
                r[w]["cowd"].get("allocating_share", 0.0) for r in reps),
            "machine_idle_pct": statistics.median(
                r[w][k]["machine_idle_pct"] for r in reps for k in PATHS),
        }
    return out


def markdown(doc: dict[str, Any]) -> str:
    tree = doc["tree"]
    rows = [f"cowd attach (FUSE + loop) against a plain loop device, {doc['date']}, "
            f"{doc['machine']}, kernel {doc['kernel']}, commit {doc['commit']}; "
            f"{doc['params']['base_bytes'] >> 20} MiB base, copy tree {tree['files']} files "
            f"{tree['bytes'] / 1e6:.1f} MB; median of {doc['params']['reps']} "
            f"(min-max of the per-run ratios); page cache "
            f"{'dropped' if doc['cache_dropped'] else 'NOT dropped'} before each job",
            "",
            "| workload | loop | cowd | cowd / loop (min-max) | daemon CPU | "
            "cowd remap hit rate | cowd writes that allocated | machine idle |",
            "|---|---|---|---|---|---|---|---|"]
    for w, s in doc["summary"].items():
        what = ("copy: mount, cp -a, sync, umount (time, lower is better)" if w == "copy"
                else f"fio {w} ({'MB/s' if s['metric'] == 'MBps' else 'IOPS'}, "
                     "higher is better)")
        cpu = (f"{s['cowd_cpu']:.2f} s" if w == "copy" else f"{s['cowd_cpu']:.2f} s/GiB")
        rows.append(f"| {what} | {_fmt(w, {s['metric']: s['loop']})} | "
                    f"{_fmt(w, {s['metric']: s['cowd']})} | {s['ratio']:.2f} "
                    f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | {cpu} | "
                    f"{s['cowd_hit_rate']:.3f} | {100 * s['cowd_allocating_share']:.0f}% | "
                    f"{s['machine_idle_pct']:.0f}% |")
    return "\n".join(rows)


# ---- main --------------------------------------------------------------------------------------

def problem() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if why := fuse_problem():
        return why
    for tool in ("fio", "mkfs.ext4", "mount", "umount", "cp", "sync"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make deps installs it)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition, 128 MiB base, 1 s fio jobs (the same tree): under a minute")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--base-mib", type=int, default=None, help="base size (2048, quick 128)")
    ap.add_argument("--files", type=int, default=2000, help="files in the copied tree")
    ap.add_argument("--tree-mb", type=float, default=20.0, help="the tree's size, MB")
    ap.add_argument("--seed", type=int, default=2006)
    ap.add_argument("--runtime", type=float, default=None,
                    help="seconds at most per fio job (3, quick 1)")
    ap.add_argument("--full-copy", action="store_true",
                    help="the loop device's raw copy with every block written (cp --sparse=never)")
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="do not drop the page cache before each job")
    ap.add_argument("--dir", default="/var/tmp", help="where to make the work dir")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench-attach.json"))
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    base_bytes = (args.base_mib or (128 if args.quick else 2048)) * MiB
    tree_bytes = int(args.tree_mb * 1e6)
    runtime_s = args.runtime or (1.0 if args.quick else 3.0)
    why = problem()
    if why:
        note(why)
        return 1

    head = benchlib.header()  # the date and the load before the run (the run loads it)
    benches: list[Bench] = []
    reps_out: list[Rep] = []
    trees: list[Tree] = []

    def body(work: Path) -> None:
        tree = make_tree(work / "tree", args.files, tree_bytes, args.seed)
        trees.append(tree)
        bench = Bench(work, base_bytes, args.full_copy, not args.no_drop_caches)
        benches.append(bench)
        for i in range(1, reps + 1):
            reps_out.append(one_rep(bench, tree, runtime_s, i, reps))

    rc = in_work_dir("bench-attach-", args.dir, body,
                     lambda: benches[0].cleanup() if benches else [], note)
    if rc:
        return rc
    work, tree = benches[0].work, trees[0]

    doc: dict[str, Any] = {
        **head, "loadavg_after": list(os.getloadavg()), "fio": sh("fio", "--version"),
        "workdir": str(work),
        "params": {"quick": args.quick, "reps": reps, "base_bytes": base_bytes,
                   "runtime_s": runtime_s, "full_copy": args.full_copy},
        "tree": {"files": tree.files, "dirs": tree.dirs, "bytes": tree.bytes,
                 "seed": tree.seed},
        "cache_dropped": not args.no_drop_caches,
        "repetitions": reps_out, "summary": summarise(reps_out)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
