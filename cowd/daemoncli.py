"""Layer: cowd (the top: command line).  The commands that ask about or steer the daemon of a
run dir without attaching anything: ``list``, ``status`` and ``stop``.

They never import the format library or trio (a Python start that skips them is what keeps
these commands quick in an emulated guest).  ``stop`` signals the daemon that owns the run
dir with SIGTERM — the same drain that a service manager's stop does: every disk is flushed
and closed, FUSE/nbd devices released, kernel-shim devices left for a new daemon only while
something holds them open — and waits for the run dir to be free.  The pid is taken from the
pid file only while its flock shows a live owner, and signalled through a pidfd opened before
the lock is checked again, so a pid reused after the daemon exited is never signalled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from .control import DaemonUnavailable, control_path, request
from .errors import CommandFailed
from .rundir import RunDir, holder_pid, pid_file_held, read_state

# `cowd status`'s exit statuses (LSB's for a service's status: 0 running, 3 not running,
# and 1 where a pid file's owner holds the run dir but does not answer).
STATUS_RUNNING = 0
STATUS_DEAD = 1
STATUS_NOT_RUNNING = 3

# How often `cowd stop` looks whether the daemon is gone.
STOP_POLL_S = 0.05


def _ping(run: RunDir) -> dict[str, Any] | None:
    try:
        return request(run.control, "ping", timeout=5.0)
    except DaemonUnavailable:
        return None


def leftovers(run: RunDir) -> list[dict[str, Any]]:
    """What a daemon that no longer runs recorded as attached (its state file), with the
    devices that still exist."""
    out = []
    for rec in read_state(run):
        dev = rec.get("device")
        if isinstance(dev, str) and os.path.exists(dev):
            out.append({"device": dev, "frontend": rec.get("frontend", "?"),
                        "image": rec.get("image", "?"), "readonly": bool(rec.get("readonly")),
                        "size": rec.get("size"), "stale": True})
    return out


def list_cmd(args: argparse.Namespace) -> int:
    run = RunDir.at(args.run_dir)
    try:
        disks = request(control_path(args.run_dir), "list")["disks"]
        stale: list[dict[str, Any]] = []
    except DaemonUnavailable:
        disks = []
        stale = [] if pid_file_held(run.pid_file) else leftovers(run)
    if args.output == "json":
        print(json.dumps(disks + stale, indent=2))
    else:
        if disks:
            print(format_list(disks))
        if stale:
            print(f"no cowd daemon runs in {run.path}; a dead one left these devices:")
            for d in stale:
                print(f"  {d['device']}  {d['frontend']}  {d['image']}")
            print(f"clean them up with `cowd detach DEVICE --run-dir {run.path}` (each), or "
                  "let the next `cowd attach` or `cowd daemon` of this run dir take them over")
    return 0


def status_cmd(args: argparse.Namespace) -> int:
    run = RunDir.at(args.run_dir)
    reply = _ping(run)
    doc: dict[str, Any] = {"run-dir": run.path}
    if reply is not None:
        doc.update(running=True, pid=reply.get("pid"),
                   background=bool(reply.get("exit_when_idle")))
        try:
            doc["disks"] = len(request(run.control, "list", timeout=5.0)["disks"])
        except DaemonUnavailable:
            doc["disks"] = None
        rc = STATUS_RUNNING
        text = (f"cowd daemon running in {run.path} (pid {doc['pid']}, "
                f"{doc['disks']} disk(s){', exits when idle' if doc['background'] else ''})")
    elif pid_file_held(run.pid_file):
        doc.update(running=False, pid=holder_pid(run.pid_file), answering=False)
        rc = STATUS_DEAD
        text = (f"a cowd process holds {run.path} but does not answer (pid "
                f"{doc['pid']}): starting, exiting or stuck")
    else:
        left = leftovers(run)
        doc.update(running=False, pid=None, leftovers=left)
        rc = STATUS_NOT_RUNNING
        text = f"no cowd daemon runs in {run.path}"
        if left:
            text += (f"; a dead daemon left {len(left)} device(s): see `cowd list "
                     f"--run-dir {run.path}`")
    print(json.dumps(doc, indent=2) if args.output == "json" else text)
    return rc


def stop_cmd(args: argparse.Namespace) -> int:
    run = RunDir.at(args.run_dir)
    pid = holder_pid(run.pid_file) if pid_file_held(run.pid_file) else None
    if pid is None:
        raise CommandFailed(f"{run.path}: no cowd daemon is running here")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0  # it exited between the two looks
    try:
        if not pid_file_held(run.pid_file) or holder_pid(run.pid_file) != pid:
            return 0  # it exited, and the pid may be another process's now
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        os.close(pidfd)
    print(f"cowd: stopping the daemon of {run.path} (pid={pid})", file=sys.stderr)
    deadline = time.monotonic() + args.timeout
    while pid_file_held(run.pid_file):
        if time.monotonic() > deadline:
            raise CommandFailed(f"{run.path}: the daemon is still draining after "
                                f"{args.timeout:g} s (pid={pid}, log: {run.log})")
        time.sleep(STOP_POLL_S)
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_list(disks: list[dict[str, Any]]) -> str:
    rows = [("DEVICE", "FRONTEND", "SIZE", "HITS", "MISSES", "HIT%", "IMAGE")]
    for d in disks:
        r = d.get("remap", {})
        ro = " (ro)" if d.get("readonly") else ""
        rows.append((d.get("device") or "-", d["frontend"], _human(d["size"]),
                     str(r.get("hits", 0)), str(r.get("misses", 0)),
                     f"{100 * r.get('hit_rate', 0):.1f}", d["image"] + ro))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  "
                     + row[-1] for row in rows)
