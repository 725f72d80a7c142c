"""What the benchmarks' smoke tests share (tests/integration/test_bench_attach.py,
tests/guest/test_bench.py): whether the machine can run them, that a run left nothing behind
(as the kernel sees it, tests/support/host.py), and the forced clean-up after a failed one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from cowd.frontends.fuse.mount import fuse_problem
from tests.support import ROOT
from tests.support.host import loops_under, mounts_under, processes_naming
from tests.support.peers import missing_tool


def tool_env() -> dict[str, str]:
    """The environment for ``python -m tools.X`` from any directory: the repository's root on
    PYTHONPATH (the tests run the tools in their tmp_path)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def bench_problem() -> str | None:
    return fuse_problem() or missing_tool("fio", "losetup", "mkfs.ext4", "mount", "umount")


def assert_nothing_left(tmp: Path, work_prefix: str) -> None:
    """After a run in ``tmp``: no loop device, mount or process of it is left, and no work
    directory (``work_prefix``...) in it."""
    assert loops_under(tmp) == [], "loop devices left behind"
    assert mounts_under(tmp) == [], "mounts left behind"
    assert processes_naming(tmp) == [], "processes left behind"
    assert [p.name for p in tmp.iterdir() if p.name.startswith(work_prefix)] == [], \
        "work directory left behind"


def force_cleanup(tmp: Path) -> None:
    """Only after a failure: take down what a broken run left in ``tmp`` (ours by path)."""
    for pid in processes_naming(tmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for point in reversed(mounts_under(tmp)):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for dev in loops_under(tmp):
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
