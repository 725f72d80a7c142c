"""tools/vm/bench_boot.py's command line: the paths a run boots are checked before anything
is built or booted (one line, exit status 2), raw first, trace paths only with --trace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools.vm import bench_boot


@pytest.mark.parametrize("args, says", [
    (["--paths", "nbd"], "raw first"),
    (["--paths", "raw,kmod-trace"], "raw first, then any of raw, qemu-qcow2, nbd, fuse, kmod"),
    (["--trace", "--paths", "raw,kmod"], "kmod-off, kmod-trace"),
    (["--reps", "0"], "at least 1"),
])
def test_bad_paths_are_refused_before_any_boot(args: list[str], says: str) -> None:
    p = subprocess.run([sys.executable, "-m", "tools.vm.bench_boot", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_every_trace_path_names_a_frontend_and_a_description() -> None:
    for path, (via, _extra) in bench_boot.TRACE_PATHS.items():
        assert via in bench_boot.PATHS and path in bench_boot.WHAT
    assert set(bench_boot.DEFAULT_TRACE_PATHS) <= set(bench_boot.TRACE_PATHS)
    assert set(bench_boot.DEFAULT_PATHS) <= set(bench_boot.PATHS)
