"""The kernel's view of what a test made or left behind, read from sysfs and /proc directly
(not through cowd's own helpers): loop devices by backing file, mounts, processes; and the
page cache, emptied of a test's files and read through concurrently."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
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


def evict_pages(*paths: Path) -> None:
    """Write back and drop the page-cache pages of ``paths`` (dirty pages are not dropped:
    hence the fsync), so that the next reads of them go to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_concurrently(path: str | Path, reads: list[tuple[int, int]], model: bytes | bytearray,
                      threads: int, *, direct: bool = False) -> list[str]:
    """Read ``reads`` (offset, length) from ``path`` in ``threads`` threads at once (so the
    requests queue together on the device), ``direct``: with O_DIRECT into an aligned buffer;
    returns a line for each read whose bytes are not the model's (shorter at its end)."""
    bad: list[str] = []

    def one(share: list[tuple[int, int]]) -> None:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        buf = mmap.mmap(-1, max((n for _, n in share), default=1))
        try:
            for off, n in share:
                got = buf[:os.preadv(fd, [memoryview(buf)[:n]], off)]
                if got != bytes(model[off:off + n]):
                    bad.append(f"read of {n} at {off}: {len(got)} bytes, not the model's")
        finally:
            os.close(fd)
            buf.close()

    ts = [threading.Thread(target=one, args=(reads[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return bad


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the daemon is not our child, but be exact anyway.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False
