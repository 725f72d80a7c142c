"""Smoke test of tools/bench_tls.py: a --quick run measures every workload, for both servers
and every TLS mode, writes well-formed JSON and a table, and leaves no process or work
directory behind.  Not a timing test: the figures only have to be there and positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bench import assert_nothing_left, tool_env
from tests.support.peers import missing_tool
from tools import bench_tls, tlscreds

pytestmark = pytest.mark.qemu


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    problem = tlscreds.tls_tools_problem() or missing_tool("qemu-nbd", "nbdcopy")
    if problem:
        pytest.skip(problem)
    out = tmp_path / "bench-tls.json"
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, "-m", "tools.bench", "tls", "--quick", "--size", "32M",
                        "--out", str(out), "--dir", str(work)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=tool_env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    doc = json.loads(out.read_text())
    for key in ("date", "kernel", "machine", "commit", "idle_percent", "load_average"):
        assert doc[key] is not None, key
    [rep] = doc["repetitions"]
    for w in bench_tls.WORKLOADS:
        for kind in bench_tls.SERVERS:
            for mode in bench_tls.MODES:
                fig = rep[w][kind][mode]
                assert fig["MBps"] > 0 and fig["cpu_s_per_GiB"] >= 0, (w, kind, mode, fig)
    summary = doc["summary"]
    assert set(summary) == {f"{w}.{m}" for w in bench_tls.WORKLOADS for m in ("x509", "psk")}
    for row in summary.values():
        assert row["cowd.tls/plain"] > 0 and row["cowd/qemu-nbd.tls"] > 0, row
    assert "| read-1M | x509 |" in p.stdout and "| randread-4k-qd32 | psk |" in p.stdout
    # --dir keeps the work directory: everything else of the run must be gone.
    assert_nothing_left(tmp_path, "cowd-bench-tls-")
