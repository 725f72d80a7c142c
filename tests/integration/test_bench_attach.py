"""Smoke test of tools/bench_attach.py: a --quick run produces every figure, and an
interrupted run leaves nothing behind.

Not a timing test: no figure is compared with a bound.  It checks that the benchmark runs end
to end on the real path (cowd attach --via fuse, the kernel's loop driver, ext4, fio), that
every workload has a positive figure for the plain loop device and for cowd in every
repetition and in the summary (with the ratio, the daemon's CPU and the remap cache hit rate),
that the Markdown table has a row for each, and that the work directory, its loop devices,
mounts and daemon are gone afterwards — also after a Ctrl-C while cowd's device is attached.
The kernel's view (sysfs, /proc) is read here directly, not through the benchmark's helpers.
Needs root, /dev/fuse, loop devices, fio and mkfs.ext4; skips with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.bench import assert_nothing_left, bench_problem, force_cleanup, tool_env

SCRIPT = [sys.executable, "-m", "tools.bench", "attach"]

WORKLOADS = ("copy", "seqread-1M-qd1", "randread-4k-qd32", "seqwrite-1M-qd1",
             "randwrite-4k-qd32")
METRIC = {"copy": "seconds", "seqread-1M-qd1": "MBps", "seqwrite-1M-qd1": "MBps",
          "randread-4k-qd32": "iops", "randwrite-4k-qd32": "iops"}


pytestmark = [pytest.mark.root, pytest.mark.timeout(170),
              pytest.mark.skipif(bench_problem() is not None, reason=bench_problem() or "")]


def bench_cmd(tmp: Path, out: Path) -> list[str]:
    # No cache drop: a smoke run must not slow down whatever else runs on the machine.
    return [*SCRIPT, "--quick", "--no-drop-caches", "--dir", str(tmp),
            "--out", str(out)]


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench-attach.json"
    try:
        p = subprocess.run(bench_cmd(tmp_path, out), capture_output=True, text=True,
                           timeout=150, cwd=tmp_path, stdin=subprocess.DEVNULL, env=tool_env())
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        assert_nothing_left(tmp_path, "bench-attach-")
    finally:
        force_cleanup(tmp_path)

    doc = json.loads(out.read_text())
    for key in ("date", "kernel", "machine", "commit", "fio"):
        assert doc[key], key
    assert doc["params"]["reps"] == 1 and doc["params"]["quick"] is True
    assert doc["cache_dropped"] is False
    assert doc["tree"]["files"] == 2000 and doc["tree"]["bytes"] > 19_000_000
    assert not Path(doc["workdir"]).exists()

    [rep] = doc["repetitions"]
    assert sorted(rep) == sorted(WORKLOADS)
    for w in WORKLOADS:
        for path in ("loop", "cowd"):
            assert rep[w][path][METRIC[w]] > 0, (w, path, rep[w][path])
        cowd = rep[w]["cowd"]
        assert cowd["daemon_cpu_s"] > 0, (w, cowd)
        assert cowd["cache_hits"] + cowd["cache_misses"] > 0, (w, cowd)
        assert 0 < cowd["hit_rate"] <= 1, (w, cowd)
        if w == "copy":  # the whole tree went down to each device in the window
            for path in ("loop", "cowd"):
                assert rep[w][path]["device_written_MB"] * 1e6 >= doc["tree"]["bytes"], path
        else:
            assert cowd["bytes"] > 0 and rep[w]["loop"]["bytes"] > 0, w
            side = "device_read_MB" if "read" in w else "device_written_MB"
            assert cowd[side] > 0 and rep[w]["loop"][side] > 0, w
            if "read" in w:
                assert cowd["writes"] == 0, w
            else:  # a fresh overlay: its first writes allocate
                assert 0 < cowd["allocating_writes"] <= cowd["writes"], w

    assert sorted(doc["summary"]) == sorted(WORKLOADS)
    for w, s in doc["summary"].items():
        assert s["metric"] == METRIC[w]
        for key in ("loop", "cowd", "ratio", "ratio_min", "ratio_max", "cowd_cpu",
                    "cowd_hit_rate"):
            assert isinstance(s[key], float | int) and s[key] > 0, (w, key, s[key])
        assert s["ratio_min"] <= s["ratio"] <= s["ratio_max"], w
        assert s["better"] == ("lower" if w == "copy" else "higher")

    table = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| workload | loop | cowd | cowd / loop")
    assert len(table) == 1 + len(WORKLOADS)  # the header, then one row per workload
    assert table[1].startswith("| copy: mount, cp -a, sync, umount")
    for w in WORKLOADS[1:]:
        assert sum(f"fio {w} " in line for line in table) == 1, w


def test_ctrl_c_while_attached_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "bench-attach.json"
    # Its own session, so that the SIGINT goes to its process group as a terminal's would.
    p = subprocess.Popen(bench_cmd(tmp_path, out), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, start_new_session=True, env=tool_env())
    seen: list[str] = []
    try:
        assert p.stderr is not None
        for line in p.stderr:
            seen.append(line)
            if "copy on cowd (/dev/loop" in line:
                break
        else:
            pytest.fail(f"never reached cowd's copy: exit {p.wait()}\n{''.join(seen)}")
        time.sleep(0.3)  # into mkfs, mount or the copy: cowd's device is attached
        os.killpg(p.pid, signal.SIGINT)
        _stdout, rest = p.communicate(timeout=120)
        log = "".join(seen) + rest
        assert p.returncode == 130, f"exit {p.returncode}\n{log}"
        assert "interrupted" in rest and "left behind" not in rest, log
        assert "Traceback" not in log, log
        assert not out.exists()
        assert_nothing_left(tmp_path, "bench-attach-")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        force_cleanup(tmp_path)
