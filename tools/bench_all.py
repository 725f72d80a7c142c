"""The benchmark: the same workloads on a plain loop device (on a raw copy of the disk, the
baseline = 1.00) and on every cowd path, with qemu-nbd as the peer, ratios measured in the
same run (not a test; tests/guest/test_bench.py runs its --quick version).

Layer: tools.  A client of the ``cowd`` console script, fio, qemu-nbd, losetup and virtme-ng;
it reuses bench_attach (devices, the copy workload, clean-up), bench_nbd (NBD servers),
benchlib (the fio runner, the header, clean-up) and bench_kmod + guest (the guest section);
bench_report turns the records into tables and plots.

Paths
    loop      ``losetup --direct-io=on`` on a raw copy of the base (the baseline).
    fuse      ``cowd attach OVERLAY --via fuse``: a loop device on the daemon's FUSE file.
    nbd       ``cowd serve OVERLAY --nbd unix:...``, driven by fio's nbd engine (userspace).
    qemu-nbd  the peer: qemu-nbd on the same overlay, the same fio engine.
    kmod      ``cowd attach OVERLAY --via kmod`` (/dev/cowdN, every remap primed) in a
              virtme-ng guest, against a loop device on a raw copy in the same guest
              (``guest-loop``): the host kernel loads no modules.  The guest section boots
              once (tools/guest.py: a Python runtime unpacked into the guest's RAM) and runs
              tools/bench_kmod.py's script: fio 1 MiB sequential read and 4 KiB random read
              QD32, the copy, the kernel's misses per GiB after priming and the priming time
              (``cowd stats --json``); images and the run dir in the guest's RAM.
A path a workload cannot run on is recorded as unavailable with the reason (for instance, the
copy needs a kernel block device, and the host has no nbd driver), never left out.

Workloads (every repetition; each overlay is a qcow2 over a raw base whose every block holds
data)
    copy      mkfs.ext4, then timed: mount, ``cp -a`` a fixed generated tree of small files
              (2000 files, 20 MB), ``sync -f``, umount (bench_attach.copy_workload).
    boot      tools/mkbase + tools/vm-boot (issue 6), when they exist.
    fio       1 MiB sequential read and write at QD1, 4 KiB random read and write at QD1 and
              QD32; on a cold overlay (empty: reads go to the base, every write is a first
              write; a fresh overlay for each write job) and a warm one (every cluster
              allocated beforehand); the loop device has one state.  One pass at most,
              capped at --runtime; page cache dropped before each job (--no-drop-caches).
    verify    4 KiB random writes at QD32 with fio's crc32c verify, read back; cowd's and
              qemu-nbd's overlays then pass ``qemu-img check``.
    latency   (from the fio jobs) clat p50 and p99 per path; for cowd the remap cache hit
              rate, misses per GiB, metadata lookups per request, priming time
              (``cowd stats --json``), daemon CPU per I/O.
    scaling   1, 2, 4, 8, 16 cold overlays of one base served by one ``cowd serve``, one fio
              nbd client each (4 KiB random read, QD32, all at once); qemu-nbd: one process
              per overlay; loop: N loop devices on one raw copy.  Aggregate IOPS, server CPU
              per I/O (/proc/PID/stat), the machine's busy CPU per I/O.

Output in --out-dir (default results/bench): results.json (date, kernel, machine, commit,
parameters, every repetition as flat records, unavailable paths with reasons, the summary),
table.md (also printed), ratios.png, latency.png, scaling.png.  Progress goes to stderr.

    .venv/bin/python -m tools.bench all --quick   # about three minutes (the guest runs
                                                  # beside the host section: a smoke test)
    .venv/bin/python -m tools.bench all           # the full run (about 15 minutes)

Needs root, /dev/fuse, loop devices, fio, qemu-nbd, qemu-img, qemu-io, mkfs.ext4; the guest
section needs virtme-ng (vng) and the Debian kernel.  Clean-up of its own devices, mounts and
processes on success, failure, Ctrl-C or SIGTERM (bench_attach.Bench.cleanup).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowd.frontends.fuse.mount import fuse_problem
from cowd.frontends.nbd.attach import nbd_problem
from tools import bench_kmod, bench_report, benchlib, guest
from tools.bench_attach import COWD, Bench, Device, MiB, Tree, Window, copy_workload, make_tree
from tools.bench_nbd import Server
from tools.benchlib import Interrupted, in_work_dir, quiet, sh

ROOT = Path(__file__).resolve().parent.parent
MKBASE = ROOT / "tools" / "mkbase"
VM_BOOT = ROOT / "tools" / "vm-boot"

HOST_PATHS = ("loop", "fuse", "nbd", "qemu-nbd")
GUEST_PATHS = ("guest-loop", "kmod", "guest-nbd")
FIO_JOBS = {
    "seqread-1M-qd1": benchlib.Job("read", "1M", 1),
    "seqwrite-1M-qd1": benchlib.Job("write", "1M", 1),
    "randread-4k-qd1": benchlib.Job("randread", "4k", 1),
    "randread-4k-qd32": benchlib.Job("randread", "4k", 32),
    "randwrite-4k-qd1": benchlib.Job("randwrite", "4k", 1),
    "randwrite-4k-qd32": benchlib.Job("randwrite", "4k", 32),
}
READ_JOBS = [n for n, j in FIO_JOBS.items() if j.side == "read"]
WRITE_JOBS = [n for n, j in FIO_JOBS.items() if j.side == "write"]
VERIFY_JOB = benchlib.Job("randwrite", "4k", 32)
SCALING_JOB = benchlib.Job("randread", "4k", 32)
WORKLOADS = ("copy", "boot", "fio", "verify", "latency", "scaling")
GUEST_DEADLINE_S = 900  # the whole guest section, boot included; killed after
GUEST_DEADLINE_QUICK_S = 270  # beside the host section (a loaded machine: boot 60-160 s)

Record = dict[str, Any]


def note(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@dataclass
class Params:
    quick: bool
    reps: int
    base_bytes: int
    runtime_s: float
    jobs: list[str]
    verify_bytes: int
    scaling: list[int]
    only: set[str]
    files: int
    tree_bytes: int
    seed: int
    drop_caches: bool
    guest: bool
    guest_base_bytes: int
    guest_runtime_s: int
    guest_reps: int


class Progress:
    """``[step/total elapsed, ~left] what``, on stderr, one line per step."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        spent = time.monotonic() - self.t0
        left = spent / max(1, self.done - 1) * (self.total - self.done + 1) if self.done > 1 \
            else 0.0
        note(f"[{self.done}/{self.total} {_mmss(spent)}, ~{_mmss(left)} left] {what}")

    def result(self, text: str) -> None:
        note(f"    {text}")


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


@dataclass
class Run:
    """One benchmark run: the work dir's Bench, the records and the unavailable paths."""

    bench: Bench
    params: Params
    progress: Progress
    records: list[Record] = field(default_factory=list)
    unavailable: list[Record] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # the host paths this machine has
    started: int = 0  # servers started so far: their sockets' and run dirs' names
    tree: Tree = field(default_factory=lambda: Tree(Path(), 0, 0, 0, 0))  # copy's source
    guest_tree: dict[str, int] = field(default_factory=dict)  # the guest's copy source

    def add(self, rep: int, workload: str, case: str, state: str, path: str,
            figures: dict[str, float], where: str = "host") -> None:
        self.records.append({"rep": rep, "workload": workload, "case": case, "state": state,
                             "path": path, "where": where, **figures})

    def fail(self, rep: int, workload: str, case: str, state: str, path: str, error: str,
             where: str = "host") -> None:
        """A measurement that broke: recorded (the table says 'failed'), the run goes on."""
        note(f"    FAILED: {error}")
        self.records.append({"rep": rep, "workload": workload, "case": case, "state": state,
                             "path": path, "where": where, "error": error})

    def unavailable_path(self, workload: str, path: str, reason: str,
                         where: str = "host") -> None:
        if not any(u["workload"] == workload and u["path"] == path for u in self.unavailable):
            note(f"{workload} on {path}: unavailable: {reason}")
            self.unavailable.append({"workload": workload, "path": path, "where": where,
                                     "reason": reason})

    # ---- devices ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def device(self, path: str, tag: str, warm: bool = False,
               detached: Callable[[Path], None] | None = None) -> Iterator[Device]:
        """A device of ``path`` on a fresh copy / overlay of the base; ``detached`` is
        called with the overlay after the device is gone (cowd and qemu-nbd only)."""
        b = self.bench
        if path in ("loop", "guest-loop"):
            with b.loop_device(tag) as dev:
                yield dev
        elif path in ("fuse", "kmod"):
            with b.cowd_device(tag, warm, detached) as dev:
                yield dev
        else:
            ov = b.overlay(tag, warm)
            try:
                with self.served(path, [ov]) as ([srv], [uri]):
                    if path == "nbd":
                        yield Device(uri, "cowd", srv.run_dir, ov.name)
                    else:
                        yield Device(uri, "server", srv.run_dir, pids=(srv.proc.pid,))
                if detached is not None:
                    detached(ov)
            finally:
                ov.unlink(missing_ok=True)

    @contextlib.contextmanager
    def served(self, path: str, overlays: list[Path]
               ) -> Iterator[tuple[list[Server], list[str]]]:
        """One cowd daemon serving ``overlays`` over NBD, or (qemu-nbd) one server each;
        the servers and every export's URI, in the overlays' order."""
        work = self.bench.work
        servers: list[Server] = []
        # Short names: a unix socket path has 108 bytes (the work dir may be deep already).
        self.started += 1
        tag = str(self.started)
        try:
            if path == "nbd":
                servers.append(Server("cowd", overlays[0], work, images=overlays,
                                      run_dir=work / f"r{tag}", tag=f"-{tag}"))
                self.servers.append(servers[-1])
            else:
                for i, ov in enumerate(overlays):
                    servers.append(Server("qemu-nbd", ov, work, tag=f"-{tag}-{i}"))
                    self.servers.append(servers[-1])
            yield servers, [u for s in servers for u in s.uris]
        finally:
            for s in servers:
                s.stop()
                self.servers.remove(s)

    def cleanup(self) -> list[str]:
        for s in list(self.servers):
            s.stop()
        return self.bench.cleanup()


# ---- workloads ---------------------------------------------------------------------------------

def measure(run: Run, dev: Device, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``fn``'s figures with the window's: daemon CPU, remap cache, machine idle."""
    w = Window(dev)
    return w.close(fn())


def prime_seconds(dev: Device) -> float | None:
    if dev.kind != "cowd":
        return None
    doc = json.loads(sh(*COWD, "stats", "--json", "--run-dir", str(dev.run_dir)))
    value = doc["disks"][dev.disk].get("prime_seconds")
    return float(value) if value is not None else None


def fio_one(run: Run, dev: Device, name: str) -> dict[str, float]:
    job = FIO_JOBS[name]
    run.bench.drop_caches()
    return measure(run, dev, lambda: benchlib.run(
        [dev.path], job, size=run.bench.base.stat().st_size,
        runtime_s=run.params.runtime_s)[0])


def fio_group(run: Run, rep: int, path: str, dev: Device, names: list[str], state: str,
              where: str = "host") -> None:
    prime = prime_seconds(dev)
    for name in names:
        run.progress.step(f"rep {rep}: fio {name} {state or ''} on {path}".replace("  ", " "))
        try:
            r = fio_one(run, dev, name)
        except RuntimeError as e:
            run.fail(rep, "fio", name, state, path, str(e), where)
            continue
        if prime is not None:
            r["prime_s"] = prime
        run.add(rep, "fio", name, state, path, r, where)
        run.progress.result(bench_report.fmt(name, r))


def fio_path(run: Run, rep: int, path: str, where: str = "host") -> None:
    """The six fio jobs on ``path``: once on the loop device, cold and warm on the others."""
    jobs = run.params.jobs
    if path in ("loop", "guest-loop"):
        with run.device(path, f"{path}-fio") as dev:
            fio_group(run, rep, path, dev, jobs, "", where)
        return
    with run.device(path, f"{path}-cold-read") as dev:
        fio_group(run, rep, path, dev, [n for n in jobs if n in READ_JOBS], "cold", where)
    for name in (n for n in jobs if n in WRITE_JOBS):  # a fresh overlay each: first writes
        with run.device(path, f"{path}-cold-{name}") as dev:
            fio_group(run, rep, path, dev, [name], "cold", where)
    with run.device(path, f"{path}-warm", warm=True) as dev:
        fio_group(run, rep, path, dev, jobs, "warm", where)


def copy_path(run: Run, rep: int, path: str, tree: Tree, where: str = "host") -> None:
    run.progress.step(f"rep {rep}: copy on {path}")
    with run.device(path, f"{path}-copy") as dev:
        r = copy_workload(run.bench, dev, tree, f"{path}-copy")
    run.add(rep, "copy", "copy", "", path, r, where)
    run.progress.result(f"{r['seconds']:.2f} s")


def verify_path(run: Run, rep: int, path: str, where: str = "host") -> None:
    run.progress.step(f"rep {rep}: verify on {path}")
    checked: list[str] = []

    def check(ov: Path) -> None:
        p = quiet("qemu-img", "check", "-f", "qcow2", str(ov))
        checked.append("ok" if p.returncode == 0 else
                       f"qemu-img check exit {p.returncode}: {p.stdout.strip()[-200:]}")

    try:
        with run.device(path, f"{path}-verify", detached=check) as dev:
            run.bench.drop_caches()
            r = measure(run, dev, lambda: benchlib.run(
                [dev.path], VERIFY_JOB, size=run.params.verify_bytes, verify=True)[0])
    except RuntimeError as e:
        run.fail(rep, "verify", "verify", "cold", path, str(e), where)
        return
    r["verified"] = 1.0
    if checked:
        r["qemu_img_check_ok"] = 1.0 if checked[0] == "ok" else 0.0
        if checked[0] != "ok":
            run.fail(rep, "verify", "verify", "cold", path, checked[0], where)
            return
    run.add(rep, "verify", "verify", "cold" if path not in ("loop", "guest-loop") else "",
            path, r, where)
    run.progress.result(f"verified {r['verified_bytes'] / 1e6:.0f} MB, "
                        f"{r['MBps']:.0f} MB/s written"
                        + (", qemu-img check clean" if checked else ""))


def scaling_level(run: Run, rep: int, path: str, *, n: int) -> None:
    run.progress.step(f"rep {rep}: scaling {n} x {path}")
    b = run.bench
    size = b.base.stat().st_size
    with contextlib.ExitStack() as stack:
        if path == "loop":
            copy = b.work / "scaling.raw"
            sh("cp", str(b.base), str(copy))
            stack.callback(copy.unlink, missing_ok=True)
            devs = []
            for _ in range(n):
                d = sh("losetup", "--find", "--show", "--direct-io=on", str(copy))
                b.loops.append((d, copy))
                stack.callback(b.release_loop, d, copy)
                devs.append(d)
            dev = Device(devs[0], "loop", b.run_dir)
        else:
            overlays = [b.overlay(f"scale-{i}") for i in range(n)]
            for ov in overlays:
                stack.callback(ov.unlink, missing_ok=True)
            servers, devs = stack.enter_context(run.served(path, overlays))
            dev = Device(devs[0], "server", b.run_dir, pids=tuple(s.proc.pid for s in servers))
        b.drop_caches()
        w = Window(dev)
        per_client = benchlib.run(devs, SCALING_JOB, size=size, runtime_s=run.params.runtime_s)
        r = w.close({})
    ios = sum(c["ios"] for c in per_client)
    r.update({"clients": n, "iops": sum(c["iops"] for c in per_client), "ios": ios,
              "client_iops_min": min(c["iops"] for c in per_client),
              "lat_p99_us": max(c["lat_p99_us"] for c in per_client),
              "machine_cpu_us_per_io": r["machine_busy_cpu_s"] * 1e6 / max(1, ios)})
    if "daemon_cpu_s" in r:
        r["server_cpu_us_per_io"] = r["daemon_cpu_s"] * 1e6 / max(1, ios)
    run.add(rep, "scaling", f"N={n}", "cold" if path != "loop" else "", path, r)
    run.progress.result(f"{r['iops'] / 1e3:.1f}k IOPS together")


# boot: bench_all.py's path -> tools/vm/bench_boot.py's (the boot issue's own benchmark; its
# baseline is qemu on a raw copy of the base, its peer qemu opening the qcow2 overlay itself)
BOOT_PATHS = {"loop": "raw", "fuse": "fuse", "nbd": "nbd", "qemu-nbd": "qemu-qcow2"}


def boot_problem() -> str | None:
    missing = [p.name for p in (MKBASE, VM_BOOT) if not os.access(p, os.X_OK)]
    if missing:
        return (f"tools/{' and tools/'.join(missing)} not in the tree yet (issue 6 builds the "
                "bootable base and the boot helper)")
    try:
        import tools.vm.bench_boot  # noqa: F401
    except ImportError as e:
        return f"tools/vm/bench_boot.py cannot be imported ({e})"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (qemu-system-x86)"
    return None


def boot_paths(run: Run) -> list[str]:
    """The paths booted: all of them, or (--quick) the baseline and cowd's NBD path; the
    others are recorded as not run, with the reason."""
    paths = [x for x in BOOT_PATHS if x in run.paths]
    if run.params.quick:
        for x in paths[:]:
            if x not in ("loop", "nbd"):
                run.unavailable_path("boot", x, "not run in --quick (a TCG boot takes 10-20 s; "
                                     "the full run boots every path)")
                paths.remove(x)
    return paths


def boot_path(run: Run, rep: int, path: str) -> None:
    """One first boot (tools/vm/bench_boot.one_boot: a fresh disk, qemu TCG, time to the
    guest's marker line) with the root disk on ``path``."""
    from tools.vm import bench_boot, image

    run.progress.step(f"rep {rep}: boot on {path} ({BOOT_PATHS[path]})")
    work = run.bench.work / "boot"
    if not (work / "base.img").exists():
        image.build(work)
    r = bench_boot.one_boot(BOOT_PATHS[path], work, work / "base.img", rep)
    figures = {k: float(r[k]) for k in ("seconds", "qemu_seconds", "wall_seconds", "loadavg")}
    run.add(rep, "boot", "boot", "", path, figures)
    run.progress.result(f"{figures['seconds']:.2f} s to the marker "
                        f"(wall {figures['wall_seconds']:.2f} s)")


# ---- the guest section ---------------------------------------------------------------------

def guest_problem() -> str | None:
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    if not os.access(vng, os.X_OK):
        return "virtme-ng (vng) not installed (pip install virtme-ng)"
    try:
        guest.kernel()
    except RuntimeError as e:
        return str(e)
    return None


# bench_kmod's figures -> (fio case, this module's figure)
GUEST_FIO = {"seqread": ("seqread-1M-qd1", "MBps"), "randread": ("randread-4k-qd32", "iops")}


def guest_records(run: Run, out: str, disk_mib: int) -> None:
    """bench_kmod's output (``R rep path what figures`` lines, the ``S`` stats line) as
    records of the guest paths."""
    res = bench_kmod.parse(out)
    st = bench_kmod.stats(out)
    kernel = st.get("kernel") if isinstance(st.get("kernel"), dict) else {}
    for src, path in (("loop", "guest-loop"), ("kmod", "kmod"), ("nbd", "guest-nbd")):
        got = res.get(src, {})
        state = "" if path == "guest-loop" else "cold"
        for what, (case, fig) in GUEST_FIO.items():
            for rep, v in sorted(got.get(f"{what}_{fig}", {}).items()):
                r: dict[str, float] = {fig: v}
                for lat in ("lat_p50_us", "lat_p99_us"):
                    x = got.get(f"{what}_{lat}", {}).get(rep, 0.0)
                    if x > 0:
                        r[lat] = x
                if path == "kmod":
                    if st.get("prime_seconds") is not None:
                        r["prime_s"] = float(st["prime_seconds"])  # type: ignore[arg-type]
                    if st.get("primed_entries") is not None:
                        r["primed_entries"] = float(st["primed_entries"])  # type: ignore[arg-type]
                    misses = got.get("misses", {})
                    if what == "seqread" and rep in misses:
                        r["misses_per_GiB"] = misses[rep] * 1024 / disk_mib
                        r["kernel_misses"] = misses[rep]
                    for k in ("hits", "misses"):
                        if isinstance(kernel, dict) and kernel.get(k) is not None:
                            r[f"kernel_{k}_after_priming"] = float(kernel[k])
                run.add(rep, "fio", case, state, path, r, "guest")
        for rep, v in sorted(got.get("copy_s", {}).items()):
            run.add(rep, "copy", "copy", "", path, {"seconds": v}, "guest")
    run.guest_tree = bench_kmod.tree(out)


def guest_guarded(run: Run) -> None:
    """:func:`run_guest`; an error there marks the guest paths unavailable with it."""
    try:
        run_guest(run)
    except Exception as e:  # in a thread (--quick) nothing else would report it
        first = (str(e).strip().splitlines() or [""])[0]
        for w in ("copy", "fio", "verify"):
            for path in GUEST_PATHS:
                run.unavailable_path(w, path, f"the guest section failed: "
                                     f"{type(e).__name__}: {first}", "guest")


def run_guest(run: Run) -> None:
    """Boot once (tools/guest.py: a Python runtime in the guest's RAM, fast) and run
    bench_kmod's script there: loop on a raw copy against /dev/cowdN on a primed overlay of
    the same data, both in the guest's RAM; its lines become the guest paths' records."""
    p = run.params
    run.progress.step("guest: boot (virtme-ng, TCG) and run loop vs kmod")
    t0 = time.monotonic()
    why = guest_problem()
    out = ""
    if not why:
        try:
            guest.build_module()
        except (RuntimeError, subprocess.CalledProcessError) as e:
            why = f"building kmod/cowd.ko failed: {e}"
    if not why:
        share = Path(tempfile.mkdtemp(prefix="guest-", dir=run.bench.work))
        (share / "h.py").write_text(bench_kmod.HELPER)
        mib = p.guest_base_bytes // MiB
        script = bench_kmod.script(share, mib, p.guest_reps, p.guest_runtime_s,
                                   dirs=1 if p.quick else 20, quick=p.quick)
        deadline = GUEST_DEADLINE_QUICK_S if p.quick else GUEST_DEADLINE_S
        res = guest.run(script, rwdirs=[str(share)], memory="1G" if p.quick else "2G",
                        timeout=deadline, log=share / "guest.log")
        out = res.stdout
        guest_records(run, out, mib)
        if "BENCH-DONE" not in out:
            fail = re.findall(r"^BENCH-FAIL (.*)$", out, re.M)
            tail = (out.strip().splitlines() or ["no output"])[-1][:160]
            why = (f"the guest script failed at {fail[0]}" if fail else
                   f"the guest was killed after {deadline} s" if res.returncode == -9 else
                   f"the guest script did not finish (vng exit {res.returncode})") + \
                f" (last line: {tail})"
    nbd_notes = [n for n in bench_kmod.notes(out) if n.startswith("nbd")]
    for path in GUEST_PATHS:
        reason = why or (f"not run in the guest: {nbd_notes[0]}" if path == "guest-nbd" and
                         nbd_notes else "the guest's step printed no figure (a command failed "
                         "there; its output is in the guest's log)")
        if reason:  # a workload with any case missing (the guest stopped part way) says why
            cases = {"copy": {"copy"}, "fio": {c for c, _f in GUEST_FIO.values()}}
            for w, want in cases.items():
                have = {r["case"] for r in run.records if r["workload"] == w
                        and r["path"] == path and r["where"] == "guest"}
                if want - have:
                    run.unavailable_path(w, path, reason, "guest")
        run.unavailable_path("verify", path, "not run in the guest: it measures reads and the "
                             "copy (tests/guest/test_kmod.py checks /dev/cowdN's bytes against "
                             "qemu-img; the host paths run fio's verify)", "guest")
    run.progress.result(f"guest {'FAILED' if why else 'done'} in "
                        f"{time.monotonic() - t0:.0f} s (kernel {guest.kernel()[0]})"
                        if not why or "kernel" not in why else "guest unavailable")


def guarded(run: Run, rep: int, workload: str, path: str,
            fn: Callable[[int, str], None]) -> None:
    """Run one workload on one path; an error is recorded as a failure and the run goes on
    (an interruption is not an error: it stops the run)."""
    try:
        fn(rep, path)
    except Interrupted:
        raise
    except Exception as e:  # a tool's own error class (tools.vm.boot.BootError) too
        first = str(e).strip().splitlines()[:1] or [""]
        run.fail(rep, workload, workload, "", path, f"{type(e).__name__}: {first[0]}")


# ---- main ----------------------------------------------------------------------------------

def params(args: argparse.Namespace) -> Params:
    q = args.quick
    return Params(
        quick=q, reps=args.reps or (1 if q else 3),
        base_bytes=(args.base_mib or (64 if q else 1024)) * MiB,
        runtime_s=args.runtime or (0.5 if q else 1.5),
        jobs=[n for n in FIO_JOBS if not (q and n.endswith("-qd1") and "4k" in n)],
        verify_bytes=(16 if q else 128) * MiB,
        scaling=[2] if q else [1, 2, 4, 8, 16],
        only=set(args.only.split(",")) if args.only else {*WORKLOADS, "guest"},
        files=args.files, tree_bytes=int(args.tree_mb * 1e6), seed=args.seed,
        drop_caches=not args.no_drop_caches, guest=not args.no_guest,
        guest_base_bytes=(args.guest_base_mib or (8 if q else 128)) * MiB,
        guest_runtime_s=args.guest_runtime or (1 if q else 3),
        guest_reps=args.guest_reps or (1 if q else 2))


def host_paths_available(run: Run) -> list[str]:
    paths = list(HOST_PATHS)
    if why := fuse_problem():
        run.unavailable_path("*", "fuse", why)
        paths.remove("fuse")
    if shutil.which("qemu-nbd") is None:
        run.unavailable_path("*", "qemu-nbd", "qemu-nbd not installed (qemu-utils)")
        paths.remove("qemu-nbd")
    return paths


Step = tuple[int, str, str, int, Callable[[int, str], None]]  # rep, workload, path, steps, fn


def plan(run: Run, tree: Tree) -> list[Step]:
    """Every measurement of the host section in order, with its number of progress steps;
    records why each path a workload does not run on is unavailable."""
    p, paths = run.params, run.paths
    why_no_block = (nbd_problem() or "no kernel NBD client").split(" (")[0]
    for path in ("nbd", "qemu-nbd"):
        run.unavailable_path("copy", path, f"needs a kernel block device; {why_no_block} "
                             "(fio drives this path from userspace)")
    run.unavailable_path("scaling", "fuse", "not measured: scaling is one daemon serving N "
                         "NBD clients (attach gives each overlay its own FUSE file and loop)")
    for w in WORKLOADS:
        if w not in p.only and w != "latency":
            for path in HOST_PATHS if "guest" in p.only else (*HOST_PATHS, *GUEST_PATHS):
                run.unavailable_path(w, path, f"not run (--only {','.join(sorted(p.only))})")
    booted = []
    if why := boot_problem():
        for path in HOST_PATHS:
            run.unavailable_path("boot", path, why)
    else:
        booted = boot_paths(run)
    run.unavailable_path("boot", "kmod", "not run: a boot through /dev/cowdN needs qemu inside "
                         "the virtme-ng guest (TCG inside TCG)", "guest")
    run.unavailable_path("boot", "guest-loop", "not run (the guest's baseline for kmod)",
                         "guest")
    run.unavailable_path("boot", "guest-nbd", "not run: the host section boots through cowd's "
                         "NBD server (qemu's own client)", "guest")
    steps: list[Step] = []
    for rep in range(1, p.reps + 1):
        if "copy" in p.only:
            steps += [(rep, "copy", x, 1, lambda r, x: copy_path(run, r, x, tree))
                      for x in paths if x in ("loop", "fuse")]
        if "fio" in p.only:
            steps += [(rep, "fio", x, len(p.jobs) * (1 if x == "loop" else 2),
                       lambda r, x: fio_path(run, r, x)) for x in paths]
        if "verify" in p.only:
            steps += [(rep, "verify", x, 1, lambda r, x: verify_path(run, r, x))
                      for x in paths]
        if "boot" in p.only:
            steps += [(rep, "boot", x, 1, lambda r, x: boot_path(run, r, x)) for x in booted]
        if "scaling" in p.only:
            steps += [(rep, "scaling", x, 1, functools.partial(scaling_level, run, n=n))
                      for n in p.scaling for x in paths if x != "fuse"]
    return steps


def bench_run(run: Run, tree: Tree) -> None:
    p = run.params
    steps = plan(run, tree)
    guest = p.guest and "guest" in p.only
    run.progress.total = sum(s[3] for s in steps) + (1 if guest else 0)
    # --quick is a smoke test, not a measurement: the guest (TCG, mostly waiting on its boot)
    # runs beside the host section to keep the run near three minutes; the full run keeps
    # them apart so that neither disturbs the other's figures.
    beside = threading.Thread(target=guest_guarded, args=(run,), daemon=True) \
        if guest and p.quick else None
    if beside:
        beside.start()
    try:
        for rep, workload, path, _n, fn in steps:
            guarded(run, rep, workload, path, fn)
    finally:
        if beside:
            beside.join()  # guest.run kills the guest at its deadline
    if guest and not beside:
        guest_guarded(run)
    elif not guest:
        why = ("the guest section was not run (--no-guest)" if not p.guest else
               f"not run (--only {','.join(sorted(p.only))})")
        for w in ("copy", "fio", "verify"):
            for path in GUEST_PATHS:
                run.unavailable_path(w, path, why, "guest")


def problem() -> str | None:
    """Why this machine cannot run the benchmark at all, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts, dropping the page cache)"
    for tool in ("fio", "qemu-img", "qemu-io", "losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make deps installs it)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition, 64 MiB disk, 0.5 s jobs, no 4k QD1 jobs, scaling at "
                    "2 clients only, boots on loop and nbd, an 8 MiB guest disk: about 3 minutes")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (3, quick 1)")
    ap.add_argument("--base-mib", type=int, default=None, help="disk size (1024, quick 64)")
    ap.add_argument("--runtime", type=float, default=None,
                    help="seconds at most per fio job (1.5, quick 0.5)")
    ap.add_argument("--files", type=int, default=2000, help="files in the copied tree")
    ap.add_argument("--tree-mb", type=float, default=20.0, help="the tree's size, MB")
    ap.add_argument("--seed", type=int, default=2006)
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="do not drop the page cache before each job")
    ap.add_argument("--no-guest", action="store_true", help="skip the guest section (kmod)")
    ap.add_argument("--only", default=None, metavar="W,W",
                    help=f"run only these ({','.join((*WORKLOADS, 'guest'))}); the others are "
                    "reported as not run")
    ap.add_argument("--guest-base-mib", type=int, default=None,
                    help="the guest's disk size (128, quick 8; the guest holds it in RAM)")
    ap.add_argument("--guest-reps", type=int, default=None,
                    help="repetitions in the guest (2, quick 1)")
    ap.add_argument("--guest-runtime", type=int, default=None,
                    help="seconds per random-read job in the guest (3, quick 1)")
    ap.add_argument("--dir", default="/var/tmp", help="where to make the work dir")
    ap.add_argument("--out-dir", default=str(ROOT / "results" / "bench"))
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - {*WORKLOADS, "guest"} if args.only else set()
    if unknown:
        ap.error(f"--only: no workload {', '.join(sorted(unknown))} "
                 f"(only={args.only}; choose from {', '.join((*WORKLOADS, 'guest'))})")
    if why := problem():
        note(why)
        return 1
    p = params(args)
    head = benchlib.header()  # the date and the load before the run (the run loads it)
    t0 = time.monotonic()
    runs: list[Run] = []

    def body(work: Path) -> None:
        bench = Bench(work, p.base_bytes, False, p.drop_caches, base_data=True)
        run = Run(bench, p, Progress(0))
        runs.append(run)
        run.paths = host_paths_available(run)
        tree = run.tree = make_tree(work / "tree", p.files, p.tree_bytes, p.seed)
        bench_run(run, tree)

    rc = in_work_dir("bench-", args.dir, body, lambda: runs[0].cleanup() if runs else [], note)
    if rc or not runs:
        return rc
    run = runs[0]
    doc: dict[str, Any] = {
        **head, "loadavg_after": list(os.getloadavg()), "fio": sh("fio", "--version"),
        "qemu_nbd": sh("qemu-nbd", "--version").splitlines()[0],
        "duration_s": round(time.monotonic() - t0, 1),
        "params": {**p.__dict__, "only": sorted(p.only)},
        "paths": list(HOST_PATHS) + list(GUEST_PATHS),
        "workloads": list(WORKLOADS),
        "tree": {"files": p.files, "bytes": p.tree_bytes, "seed": p.seed},
        "guest_tree": run.guest_tree,
        "records": run.records, "unavailable": run.unavailable}
    doc["summary"] = bench_report.summarise(doc)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = bench_report.markdown(doc)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "table.md").write_text(table + "\n")
    plots = bench_report.plots(doc, out)
    print(table)
    note(f"done in {_mmss(time.monotonic() - t0)}: {out / 'results.json'}, "
         f"{out / 'table.md'}, {', '.join(str(x) for x in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
