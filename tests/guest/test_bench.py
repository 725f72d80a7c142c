"""Smoke test of tools/bench.py: a --quick run gives every workload figures or an explicit
reason, well-formed JSON, table and plots, and leaves nothing behind.

Not a timing test: no figure is compared with a bound.  It checks that the benchmark runs end
to end on the real paths (a loop device, cowd attach --via fuse, cowd serve and qemu-nbd under
fio's nbd engine, the virtme-ng guest), that each workload has a positive figure on some path
or every path unavailable with a reason, that every fio job has a figure on every host path in
both overlay states with a ratio to the loop device, that in the guest the loop device and
/dev/cowdN (the kernel shim) both have the copy and both fio jobs, kmod with its priming time
and misses per GiB, that the verify pass read back what it wrote, that every Markdown table
row has its header's number of cells and every footnote exists, that the plots are PNG files,
and that no loop device, mount, process or work directory of the run is left.  The kernel's
view (sysfs, /proc) is read by
tests/support/bench.py's helpers, not by the benchmark's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bench import assert_nothing_left, bench_problem, force_cleanup, tool_env
from tests.support.peers import missing_tool

SCRIPT = [sys.executable, "-m", "tools.bench", "all"]

WORKLOADS = ("copy", "boot", "fio", "verify", "latency", "scaling")
HOST_PATHS = ("loop", "fuse", "nbd", "qemu-nbd")
QUICK_JOBS = ("seqread-1M-qd1", "seqwrite-1M-qd1", "randread-4k-qd32", "randwrite-4k-qd32")
RUN_TIMEOUT_S = 330  # bench_all.py's guest deadline in --quick is 270 s


def _problem() -> str | None:
    return bench_problem() or missing_tool("qemu-nbd", "qemu-img", "qemu-io")


pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(RUN_TIMEOUT_S + 60),
              pytest.mark.skipif(_problem() is not None, reason=_problem() or "")]


def test_quick_run_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [*SCRIPT, "--quick", "--no-drop-caches", "--dir", str(tmp_path),
           "--out-dir", str(out)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                           cwd=tmp_path, stdin=subprocess.DEVNULL,
                           env=tool_env())
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}"
        assert_nothing_left(tmp_path, "bench-")
    finally:
        force_cleanup(tmp_path)
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert re.search(r"\[\d+/\d+ \d+:\d\d, ~\d+:\d\d left\] rep 1: fio", p.stderr)

    doc = json.loads((out / "results.json").read_text())
    for key in ("date", "kernel", "machine", "commit", "fio", "qemu_nbd"):
        assert isinstance(doc[key], str) and doc[key], key
    assert doc["params"]["quick"] is True and doc["params"]["reps"] == 1
    records, unavailable = doc["records"], doc["unavailable"]
    for u in unavailable:
        assert u["reason"].strip() and u["path"] and u["workload"], u

    # every workload: figures on some path, or a reason on every path
    for w in WORKLOADS:
        s = doc["summary"]["workloads"][w]
        if s["figures"] == 0:
            assert s["unavailable"], f"{w}: neither figures nor a reason"
    # every (workload, host path): a record or a reason (never silently left out)
    for w in ("copy", "boot", "fio", "verify", "scaling"):
        for path in HOST_PATHS:
            mine = [r for r in records if r["workload"] == w and r["path"] == path]
            why = [u for u in unavailable if u["path"] == path and u["workload"] in (w, "*")]
            assert mine or why, (w, path)
            for r in mine:
                assert "error" in r or r.get("seconds", r.get("iops", 0)) > 0, r
    for path in ("guest-loop", "kmod", "guest-nbd"):
        for w in ("copy", "fio", "verify"):
            assert any(r["path"] == path and r["workload"] == w for r in records) or any(
                u["path"] == path and u["workload"] == w for u in unavailable), (w, path)
    # the guest (the kernel shim and the kernel's nbd client work there): the fio jobs and
    # the copy on loop, kmod and cowd's NBD server under the kernel's client, kmod with its
    # priming time and the kernel's misses per GiB after priming.  What the guest did not
    # reach before its deadline (a TCG guest on a loaded machine: its boot alone took 60-160
    # s) must say so; anything else missing is a failure.
    guest = [r for r in records if r["where"] == "guest" and "error" not in r]
    for path in ("guest-loop", "kmod", "guest-nbd"):
        got = {(r["workload"], r["case"]): r for r in guest if r["path"] == path}
        for want, fig in ((("fio", "seqread-1M-qd1"), "MBps"),
                          (("fio", "randread-4k-qd32"), "iops"), (("copy", "copy"), "seconds")):
            if want in got:
                assert got[want][fig] > 0, (path, want, got[want])
                continue
            [why] = [u["reason"] for u in unavailable
                     if u["path"] == path and u["workload"] == want[0]]
            assert "killed after" in why, (path, want, why)
    for r in guest:
        if r["path"] == "kmod" and r["case"] == "seqread-1M-qd1":
            assert r["prime_s"] >= 0 and r["primed_entries"] > 0, r
            assert r["misses_per_GiB"] >= 0, r

    # fio: every quick job on every host path, cold and warm, with a ratio and latencies
    rows = {(r["case"], r["state"]): r for r in doc["summary"]["rows"]
            if r["workload"] == "fio" and r["where"] == "host"}
    for job in QUICK_JOBS:
        for state in ("cold", "warm"):
            row = rows[job, state]
            assert row["paths"]["loop"]["median"] > 0
            for path in HOST_PATHS[1:]:
                cell = row["paths"][path]
                assert cell.get("median", 0) > 0 and cell["ratio"] > 0, (job, state, path, cell)
                assert cell["ratio_min"] <= cell["ratio"] <= cell["ratio_max"]
                assert cell["lat_p99_us"] >= cell["lat_p50_us"] > 0, (job, state, path)
            for path in ("fuse", "nbd"):
                assert 0 <= row["paths"][path]["hit_rate"] <= 1
                assert row["paths"][path]["daemon_cpu_us_per_io"] > 0
    cold_writes = [r for r in records if r["workload"] == "fio" and r["state"] == "cold"
                   and r["path"] in ("fuse", "nbd") and "write" in r["case"]]
    assert cold_writes and all(r["writes"] > 0 for r in cold_writes)

    # verify read back every byte it wrote, and the overlays are clean
    for path in HOST_PATHS:
        [v] = [r for r in records if r["workload"] == "verify" and r["path"] == path]
        assert "error" not in v, v
        assert v["verified_bytes"] >= doc["params"]["verify_bytes"], v
        if path != "loop":
            assert v["qemu_img_check_ok"] == 1.0, v

    # scaling: each level on the loop device, cowd and qemu-nbd, all clients counted
    for n in doc["params"]["scaling"]:
        for path in ("loop", "nbd", "qemu-nbd"):
            [r] = [r for r in records if r["workload"] == "scaling" and r["case"] == f"N={n}"
                   and r["path"] == path]
            assert r["clients"] == n and r["iops"] > 0 and r["client_iops_min"] > 0, r

    # tables: every row as wide as its header; every footnote defined
    table = (out / "table.md").read_text()
    assert table.strip() == p.stdout.strip()
    lines = table.splitlines()
    width = 0
    for i, line in enumerate(lines):
        if line.startswith("| "):
            cells = line.count(" | ") + 1
            if lines[i + 1].startswith("|---"):
                width = cells
            assert cells == width, line
    notes = {int(n) for n in re.findall(r"^\[(\d+)\] ", table, re.M)}
    used = {int(n) for n in re.findall(r"(?:n/a|failed) \[(\d+)\]", table)}
    assert used and used <= notes, (used, notes)
    assert "| copy " in table and "| fio seqread-1M-qd1 cold |" in table
    assert "### Scaling" in table and "### Where the time goes" in table

    for name in ("ratios.png", "latency.png", "scaling.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
