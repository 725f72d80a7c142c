"""A cowd command killed at a chosen moment: with SIGKILL, just before its N-th change to a
file (pwrite, fdatasync/fsync, ftruncate, fallocate).  A kill at a random wall-clock time
lands mostly in Python's start-up when a command takes a fraction of a second; counting
the changes first and then killing before a random one of them reaches every phase of the
command (copy, flush, the metadata switch, the frees) as often as it has changes.

``killed_main(argv)``: argv = N cowd-args...  N = 0 counts instead: the command runs whole
and the number of changes it made is printed on stderr as ``killpoints: <count>``.
Run it as ``python -c 'from tests.support.killpoints import killed_main; ...'`` (see
:func:`command`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COUNT_PREFIX = "killpoints: "
RUN_TIMEOUT_S = 300  # one run of an image command on a test-sized image


def command(kill_at: int, *cowd_args: str) -> list[str]:
    """The argv that runs ``cowd cowd_args`` killed before change ``kill_at`` (0: count)."""
    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from "
            "tests.support.killpoints import killed_main; sys.exit(killed_main(sys.argv[2:]))",
            str(ROOT), str(kill_at), *cowd_args]


def count_changes(*cowd_args: str, cwd: str | os.PathLike[str] | None = None) -> int:
    """Run ``cowd cowd_args`` whole (it must succeed) and count its changes to files."""
    p = subprocess.run(command(0, *cowd_args), cwd=cwd, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S)
    assert p.returncode == 0, (cowd_args, p.stderr)
    return count_from(p.stderr)


def kill_points(changes: int, count: int, seed: int = 0xC0D) -> list[int]:
    """``count`` of the points 1..``changes`` (all of them when fewer), drawn at random."""
    return sorted(random.Random(seed).sample(range(1, changes + 1), min(count, changes)))


def run_killed(point: int, *cowd_args: str, cwd: str | os.PathLike[str] | None = None) -> None:
    """Run ``cowd cowd_args`` killed before its change ``point``; it must die of it."""
    p = subprocess.run(command(point, *cowd_args), cwd=cwd, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT_S)
    assert p.returncode == -9, (cowd_args, point, p.returncode, p.stderr)


def count_from(stderr: str) -> int:
    for line in stderr.splitlines():
        if line.startswith(COUNT_PREFIX):
            return int(line[len(COUNT_PREFIX):])
    raise AssertionError(f"no change count in: {stderr!r}")


def killed_main(argv: list[str]) -> int:
    kill_at = int(argv[0])
    import formats.base as fb

    seen = [0]

    def step() -> None:
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(real: Any) -> Any:
        def call(*args: Any) -> Any:
            step()
            return real(*args)
        return call

    os.pwrite = wrap(os.pwrite)
    os.fdatasync = wrap(os.fdatasync)
    os.fsync = wrap(os.fsync)
    os.ftruncate = wrap(os.ftruncate)
    real_fallocate = fb.fallocate
    wrapped = wrap(real_fallocate)
    for mod in list(sys.modules.values()):  # the codecs bound it at import
        if getattr(mod, "fallocate", None) is real_fallocate:
            mod.fallocate = wrapped  # type: ignore[attr-defined]
    from cowd.cli import main

    rc = main(argv[1:])
    if not kill_at:
        print(f"{COUNT_PREFIX}{seen[0]}", file=sys.stderr)
    return rc
