"""What the benchmarks' smoke tests share (tests/integration/test_bench_attach.py,
tests/guest/test_bench.py): whether the machine can run them, the kernel's view of what a run
left behind (read from sysfs and /proc directly, not through the benchmark's own helpers),
and the forced clean-up after a failed run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from cowd.frontends.fuse.mount import fuse_problem
from tests.support import ROOT
from tests.support.peers import missing_tool


def tool_env() -> dict[str, str]:
    """The environment for ``python -m tools.X`` from any directory: the repository's root on
    PYTHONPATH (the tests run the tools in their tmp_path)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def bench_problem() -> str | None:
    return fuse_problem() or missing_tool("fio", "losetup", "mkfs.ext4", "mount", "umount")


def loops_under(directory: Path) -> list[str]:
    found = []
    for name in os.listdir("/sys/block"):
        with contextlib.suppress(OSError):
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().rstrip("\n")
            if backing.startswith(f"{directory}/"):
                found.append(f"/dev/{name}")
    return found


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


def force_cleanup(tmp: Path) -> None:
    """Only after a failure: take down what a broken run left in ``tmp`` (ours by path)."""
    for pid in processes_naming(tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in reversed(mounts_under(tmp)):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for dev in loops_under(tmp):
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
