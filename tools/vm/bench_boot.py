"""The boot benchmark: a VM's first boot from a cowd disk against the same boot from a raw
copy of the base (and against qemu booting the qcow2 overlay itself), in the same run (not a
test; pytest does not collect it).

Layer: tools.  Uses tools/vm (image: the base; boot: the boots), which runs the ``cowd``
console script as a user would.

The workload is tools/mkbase's base: qemu-system-x86_64 -accel tcg, 1 vCPU, Debian's kernel
with the small initramfs, ext4 root on virtio-blk; the guest's init makes a machine id and
host keys, writes a 1 MiB blob and a log line, syncs, prints its marker and powers off.  The
figure is the time from starting qemu to the marker (``vm-boot``'s boot time).  Paths, each
boot on a fresh disk (a first boot, as dm-userspace measured: Fedora from LVM 26 s, from its
qcow overlay 27 s):

- raw: qemu opens a fresh ``cp`` of the raw base (format=raw): the baseline, 1.0.
- qemu-qcow2: qemu opens a fresh qcow2 overlay itself (format=qcow2): what qemu's own
  copy-on-write costs.
- nbd: ``cowd serve`` + qemu's NBD client on a fresh overlay.
- fuse: ``cowd attach --via fuse`` (/dev/loopN) on a fresh overlay; ``cowd detach`` after.

Repetitions take the paths in turn (round robin), so a noisy stretch of the shared machine
hits every path alike.  Reported: the median time to the marker and, per path, the median and
min-max of the per-repetition ratios to raw; the wall time of the whole boot including cowd's
start and stop (serve, attach, detach) apart; qemu's own CPU time (user + system), which a
loaded machine disturbs less than wall time.  JSON (date, machine, commit, load, every boot)
to --out, a Markdown table to stdout.

    .venv/bin/python -m tools.bench boot               # 5 repetitions (~4 min)
    .venv/bin/python -m tools.bench boot --quick       # 1 repetition
    .venv/bin/python -m tools.bench boot --trace --reps 3   # boot-trace priming (issue 16)

``--trace``: raw against nbd and fuse each with and without the boot trace
(cowd/disk/boottrace.py), the page cache dropped (``drop_caches`` 1) before every boot; one
recording boot first (not counted) leaves ``base.img.cowd-trace``, which every traced boot
loads; the share of each boot's base reads that the trace covered and that were prefetched
before the guest asked comes from the line the daemon logs when it closes the disk.
``--paths raw,kmod-off,kmod-trace`` does the same through /dev/cowdN (the recording boot then
goes through the kernel shim too, whose module records the guest's mapped reads); the shim
loads only in a guest: ``python -m tools.vm.boot_in_guest --bench-trace REPS`` runs it there.

Needs root (cowd attach), /dev/fuse, loop devices, qemu-system-x86, linux-image-amd64.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools import benchlib
from tools.vm import boot, image

REPO = boot.REPO
PATHS = ("raw", "qemu-qcow2", "nbd", "fuse", "kmod")
# The paths a plain run boots (kmod needs the kernel shim: inside a guest, --paths).
DEFAULT_PATHS = ("raw", "qemu-qcow2", "nbd", "fuse")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def one_boot(path: str, work: Path, base: Path, rep: int,
             cowd_extra: Sequence[str] = (), label: str | None = None,
             drop: int = 0, deadline_s: float = boot.DEFAULT_DEADLINE_S) -> dict[str, Any]:
    """One first boot on a fresh disk over ``base`` through ``path`` (one of PATHS).  The disk
    is made beside the base (cowd refuses a backing file outside the overlay's directory
    tree) and removed afterwards; initramfs.img must be beside the base (tools/mkbase puts it
    there).  tools/bench_all.py calls this too: keep the keys it reads (seconds, qemu_seconds,
    wall_seconds, loadavg)."""
    if path not in PATHS:
        raise boot.BootError(f"bench_boot: unknown path {path!r} (expected one of {PATHS})")
    where = base.parent
    if path == "raw":
        disk = where / f"raw-{rep}.img"
        shutil.copyfile(base, disk)
        via = "qemu"
    else:
        disk = where / f"{path}-{rep}.qcow2"
        disk.unlink(missing_ok=True)
        subprocess.run([*boot.cowd_command(), "create", "--base", str(base), "--overlay",
                        "qcow", "-o", str(disk)], check=True, capture_output=True)
        via = {"qemu-qcow2": "qemu", "nbd": "nbd", "fuse": "fuse", "kmod": "kmod"}[path]
    if drop:
        # Cold: the disk just made (and the base it was copied from) leaves the page cache.
        benchlib.drop_caches(drop)
    run_dir = work / f"{label or path}-{rep}.run"
    plan = boot.BootPlan(images=[disk], via=via, run_dir=run_dir,
                         initrd=where / "initramfs.img", serve_extra=list(cowd_extra),
                         attach_extra=list(cowd_extra), deadline_s=deadline_s)
    start = time.monotonic()
    try:
        [res] = boot.run_plan(plan)
    finally:
        wall = time.monotonic() - start
        disk.unlink(missing_ok=True)
    if not res.ok:
        # the work dir goes with the run: keep the whole console where the error says
        fd, saved = tempfile.mkstemp(prefix=f"cowd-boot-failed-{path}-{rep}-",
                                     suffix=".console.txt")
        with os.fdopen(fd, "w") as f:
            f.write(res.console)
        tail = "\n".join(res.console.splitlines()[-20:])
        raise boot.BootError(f"{path} repetition {rep}: {res.reason} (console: {saved})\n"
                             f"{tail}")
    trace = _trace_at_close(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"path": label or path, "rep": rep, "seconds": res.seconds,
            "qemu_seconds": res.total_seconds, "wall_seconds": wall,
            "qemu_cpu_seconds": res.qemu_cpu_seconds, "loadavg": os.getloadavg()[0],
            "boot_trace": trace}


def _trace_at_close(run_dir: Path) -> dict[str, Any] | None:
    """The disk's boot-trace figures that the daemon logged when it closed the disk
    (cowd/disk/boottrace.py), from `cowd serve`'s log or the attach daemon's."""
    for name in ("serve.log", "cowd.log"):
        with contextlib.suppress(OSError):
            for line in (run_dir / name).read_text(errors="replace").splitlines():
                if "boot trace at close: " in line:
                    doc: dict[str, Any] = json.loads(line.split("boot trace at close: ", 1)[1])
                    return doc
    return None


def summarize(boots: list[dict[str, Any]], reps: int,
              paths: Sequence[str] = PATHS) -> list[dict[str, Any]]:
    by = {(b["path"], b["rep"]): b for b in boots}
    rows = []
    for path in paths:
        secs = [by[path, r]["seconds"] for r in range(reps)]
        ratios = [by[path, r]["seconds"] / by["raw", r]["seconds"] for r in range(reps)]
        rows.append({"path": path, "median_seconds": statistics.median(secs),
                     "median_wall_seconds": statistics.median(
                         by[path, r]["wall_seconds"] for r in range(reps)),
                     "median_qemu_cpu_seconds": statistics.median(
                         by[path, r]["qemu_cpu_seconds"] for r in range(reps)),
                     "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "min_seconds": min(secs), "max_seconds": max(secs)})
        traces = [by[path, r]["boot_trace"] for r in range(reps)
                  if by[path, r].get("boot_trace")]
        if traces:
            rows[-1]["boot_trace"] = {
                k: statistics.median(t[k] or 0 for t in traces)
                for k in ("entries", "base_granules_read", "covered", "covered_share",
                          "prefetched", "prefetched_before_read",
                          "prefetched_before_read_share")}
    return rows


# --trace: the boot-trace priming measurement (issue 16).  Every boot on a fresh overlay of
# the same base with the page cache dropped first; "-off" boots with --no-boot-trace, "-trace"
# boots load the trace one recording boot (not counted) left beside the base.
TRACE_PATHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "raw": ("raw", ()),
    "nbd-off": ("nbd", ("--no-boot-trace",)),
    "nbd-trace": ("nbd", ()),
    "fuse-off": ("fuse", ("--no-boot-trace",)),
    "fuse-trace": ("fuse", ()),
    "kmod-off": ("kmod", ("--no-boot-trace",)),
    "kmod-trace": ("kmod", ()),
}
DEFAULT_TRACE_PATHS = ("raw", "nbd-off", "nbd-trace", "fuse-off", "fuse-trace")


WHAT = {"raw": "qemu, raw copy of the base (baseline)",
        "qemu-qcow2": "qemu opens the qcow2 overlay itself",
        "nbd": "cowd serve + qemu's NBD client",
        "fuse": "cowd attach --via fuse (/dev/loopN)",
        "kmod": "cowd attach --via kmod (/dev/cowdN)",
        "nbd-off": "cowd serve + NBD, --no-boot-trace",
        "nbd-trace": "cowd serve + NBD, trace loaded",
        "fuse-off": "cowd attach --via fuse, --no-boot-trace",
        "fuse-trace": "cowd attach --via fuse, trace loaded",
        "kmod-off": "cowd attach --via kmod, --no-boot-trace",
        "kmod-trace": "cowd attach --via kmod, trace loaded"}


def _loads(loadavg: object) -> str:
    """1/5/15-minute load averages as the table's header line shows them."""
    assert isinstance(loadavg, list)
    return "/".join(f"{x:.2f}" for x in loadavg)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| root disk | boot to marker | / raw | with cowd start+stop | qemu CPU |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {WHAT[r['path']]} | {r['median_seconds']:.2f} s | "
                   f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                   f"{r['median_wall_seconds']:.2f} s | {r['median_qemu_cpu_seconds']:.2f} s |")
    return "\n".join(out)


def trace_table(rows: list[dict[str, Any]]) -> str:
    """--trace: boot time median (min-max), ratio to raw, and the trace's figures."""
    out = ["| root disk | boot to marker, median (min-max) | / raw, median (min-max) | "
           "base granules read | traced | prefetched before read |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        bt = r.get("boot_trace")
        figs = (f"{bt['base_granules_read']:.0f} | {100 * bt['covered_share']:.1f}% | "
                f"{100 * bt['prefetched_before_read_share']:.1f}% "
                f"({bt['prefetched_before_read']:.0f} of {bt['prefetched']:.0f} prefetched)"
                if bt else "- | - | -")
        out.append(f"| {WHAT[r['path']]} | {r['median_seconds']:.2f} s "
                   f"({r['min_seconds']:.2f}-{r['max_seconds']:.2f}) | "
                   f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                   f"{figs} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one repetition")
    p.add_argument("--trace", action="store_true",
                   help="boot-trace priming: raw against nbd and fuse with and without the "
                   "trace, the page cache dropped before every boot, after one recording "
                   "boot")
    p.add_argument("--paths", metavar="P,P,...",
                   help="the paths to boot, raw first (default: "
                   f"{','.join(DEFAULT_PATHS)}; with --trace {','.join(DEFAULT_TRACE_PATHS)}; "
                   "kmod, kmod-off and kmod-trace need the kernel shim loaded: "
                   "python -m tools.vm.boot_in_guest --bench-trace runs them in a guest)")
    p.add_argument("--deadline", type=float, default=boot.DEFAULT_DEADLINE_S, metavar="S",
                   help=f"per boot (default {boot.DEFAULT_DEADLINE_S:.0f} s; a boot nested in "
                   "a guest takes longer)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench-boot.json")
    args = p.parse_args()
    reps = 1 if args.quick else args.reps
    if reps < 1:
        print(f"bench_boot: --reps: at least 1 (reps={reps})", file=sys.stderr)
        return 2
    known = TRACE_PATHS if args.trace else PATHS
    paths = (args.paths.split(",") if args.paths else
             list(DEFAULT_TRACE_PATHS if args.trace else DEFAULT_PATHS))
    if paths[:1] != ["raw"] or any(x not in known for x in paths):
        print(f"bench_boot: --paths: raw first, then any of {', '.join(known)} "
              f"(paths={args.paths})", file=sys.stderr)
        return 2
    head = benchlib.header()  # the date and load before the run
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work = Path(tempfile.mkdtemp(prefix="cowd-bench-boot-"))
    boots: list[dict[str, Any]] = []
    try:
        info = image.build(work)
        base = Path(info.base)
        if args.trace:
            # Recorded through the first cowd path's frontend (the kernel's own recording
            # for kmod), like the boots that load it.
            rec_via = next((TRACE_PATHS[x][0] for x in paths if x != "raw"), "nbd")
            rec = one_boot(rec_via, work, base, 0, label="record", drop=1,
                           deadline_s=args.deadline)
            trace = base.with_name(base.name + ".cowd-trace")
            if not trace.exists():
                raise boot.BootError(f"{trace}: the recording boot left no trace")
            print(f"recording boot: {rec['seconds']:.2f} s, trace "
                  f"{rec['boot_trace'] and rec['boot_trace']['saved']}",
                  file=sys.stderr, flush=True)
        for rep in range(reps):
            for path in paths:
                if args.trace:
                    via, extra = TRACE_PATHS[path]
                    b = one_boot(via, work, base, rep, extra, label=path, drop=1,
                                 deadline_s=args.deadline)
                else:
                    b = one_boot(path, work, base, rep, deadline_s=args.deadline)
                boots.append(b)
                print(f"rep {rep} {path}: {b['seconds']:.2f} s to the marker "
                      f"(wall {b['wall_seconds']:.2f} s, qemu CPU "
                      f"{b['qemu_cpu_seconds']:.2f} s, load {b['loadavg']:.2f})",
                      file=sys.stderr, flush=True)
    except (boot.BootError, image.BuildError) as e:
        print(f"bench_boot: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_boot: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(boots, reps, paths)
    doc = {**head, "loadavg_after": list(os.getloadavg()), "date": started,
           "ended": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "kernel_host": platform.release(), "cpu": _cpu_model(),
           "cpus": os.cpu_count(), "guest_kernel": str(boot.DEFAULT_KERNEL),
           "reps": reps, "trace": args.trace, "summary": rows, "boots": boots}
    benchlib.write_json(args.out, doc, indent=2)
    print(f"{doc['date']} to {doc['ended']}, commit {doc['commit']}, {doc['cpus']} x "
          f"{doc['cpu']}, load {_loads(head['loadavg'])} before, "
          f"{_loads(doc['loadavg_after'])} after, "
          f"median of {reps}")
    print(trace_table(rows) if args.trace else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
