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

Needs root (cowd attach), /dev/fuse, loop devices, qemu-system-x86, linux-image-amd64.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools import benchlib
from tools.vm import boot, image

REPO = boot.REPO
PATHS = ("raw", "qemu-qcow2", "nbd", "fuse")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def one_boot(path: str, work: Path, base: Path, rep: int) -> dict[str, Any]:
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
        via = {"qemu-qcow2": "qemu", "nbd": "nbd", "fuse": "fuse"}[path]
    run_dir = work / f"{path}-{rep}.run"
    plan = boot.BootPlan(images=[disk], via=via, run_dir=run_dir,
                         initrd=where / "initramfs.img")
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
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"path": path, "rep": rep, "seconds": res.seconds,
            "qemu_seconds": res.total_seconds, "wall_seconds": wall,
            "qemu_cpu_seconds": res.qemu_cpu_seconds, "loadavg": os.getloadavg()[0]}


def summarize(boots: list[dict[str, Any]], reps: int) -> list[dict[str, Any]]:
    by = {(b["path"], b["rep"]): b for b in boots}
    rows = []
    for path in PATHS:
        secs = [by[path, r]["seconds"] for r in range(reps)]
        ratios = [by[path, r]["seconds"] / by["raw", r]["seconds"] for r in range(reps)]
        rows.append({"path": path, "median_seconds": statistics.median(secs),
                     "median_wall_seconds": statistics.median(
                         by[path, r]["wall_seconds"] for r in range(reps)),
                     "median_qemu_cpu_seconds": statistics.median(
                         by[path, r]["qemu_cpu_seconds"] for r in range(reps)),
                     "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


WHAT = {"raw": "qemu, raw copy of the base (baseline)",
        "qemu-qcow2": "qemu opens the qcow2 overlay itself",
        "nbd": "cowd serve + qemu's NBD client",
        "fuse": "cowd attach --via fuse (/dev/loopN)"}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| root disk | boot to marker | / raw | with cowd start+stop | qemu CPU |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {WHAT[r['path']]} | {r['median_seconds']:.2f} s | "
                   f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                   f"{r['median_wall_seconds']:.2f} s | {r['median_qemu_cpu_seconds']:.2f} s |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one repetition")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench-boot.json")
    args = p.parse_args()
    reps = 1 if args.quick else args.reps
    if reps < 1:
        print(f"bench_boot: --reps: at least 1 (reps={reps})", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cowd-bench-boot-"))
    boots: list[dict[str, Any]] = []
    try:
        info = image.build(work)
        base = Path(info.base)
        for rep in range(reps):
            for path in PATHS:
                b = one_boot(path, work, base, rep)
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
    rows = summarize(boots, reps)
    doc = {**benchlib.header(),
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "kernel_host": platform.release(), "cpu": _cpu_model(),
           "cpus": os.cpu_count(), "guest_kernel": str(boot.DEFAULT_KERNEL),
           "reps": reps, "summary": rows, "boots": boots}
    benchlib.write_json(args.out, doc, indent=2)
    print(f"{doc['date']}, commit {doc['commit']}, {doc['cpus']} x {doc['cpu']}, "
          f"median of {reps}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
