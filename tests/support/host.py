"""The kernel's view of what a test made or left behind, read from sysfs and /proc directly
(not through cowd's own helpers): loop devices by backing file, mounts, processes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def loops_under(directory: Path) -> list[str]:
    """Loop devices whose backing file the kernel names inside ``directory``."""
    found = []
    for name in sorted(os.listdir("/sys/block")):
        with contextlib.suppress(OSError):
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().rstrip("\n")
            if backing.startswith(f"{directory}/"):
                found.append(f"/dev/{name}")
    return found


def mounted_at(path: Path) -> list[str]:
    """fstype of every mount at ``path``, bottom first."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(path):
                out.append(right.split()[0])
    return out


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(directory) or p.startswith(f"{directory}/")]


def processes_naming(directory: Path) -> list[int]:
    """Processes whose command line names a path in ``directory`` (the daemon's --run-dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if str(directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the daemon is not our child, but be exact anyway.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False
