"""Crash consistency of `cowd serve`: SIGKILL during a write storm, and power cuts rebuilt
from a record of every change the daemon made to the overlay (tests/support/reliability.py).

Oracles nobody here wrote: qemu-img check (qcow2: no corruption; leaks allowed, then
``cowd check --repair`` must leave it clean), qemu-img convert (qcow2) and libvhdi's
vhdimount (differencing VHD) for the bytes, held sector by sector against the journal of
the libnbd writer (tools/stress.py): every durable write reads back, no sector reads as
anything but its old contents or a write sent to it.  The long version is
``tools/stress.py crash --iterations 50``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.peers import missing_tool
from tests.support.reliability import (
    SYSTEM_PYTHON,
    crash_iteration,
    load_run,
    make_setup,
    power_cut_image,
    stress,
)

pytestmark = pytest.mark.qemu

# Iterations per format in CI; every third also rebuilds two power-cut images.
CI_ITERATIONS = 8


def _need_peers(fmt: str) -> None:
    import subprocess

    tools = ["qemu-img", "nbdsh"] + (["vhdimount", "fusermount3"] if fmt == "vhd" else [])
    reason = missing_tool(*tools)
    if reason:
        pytest.skip(reason)
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("python3-libnbd not installed for /usr/bin/python3 (make check installs it)")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("fmt", "workers", "kill_workers"), [
    ("qcow2", 0, False), ("vhd", 0, False),
    ("qcow2", 2, False),  # the daemon killed under its workers (they die with it)
    ("qcow2", 2, True),  # every worker killed; the daemon starts new ones and stops cleanly
    ("vhd", 2, True),
    # An extended-L2 overlay, half the writes whole 4 KiB subclusters: the workers write
    # those themselves and have them adopted in batches; the daemon killed under them.
    ("qcow2-ext", 2, False),
], ids=["qcow2", "vhd", "qcow2-2-workers", "qcow2-workers-killed", "vhd-workers-killed",
        "qcow2-extended-l2-2-workers"])
def test_sigkill_during_write_storm(tmp_path: Path, fmt: str, workers: int,
                                    kill_workers: bool) -> None:
    ext = fmt == "qcow2-ext"
    fmt = "qcow2" if ext else fmt
    _need_peers(fmt)
    s = make_setup(tmp_path, fmt, create_args=("--extended-l2",) if ext else ())
    rnd = random.Random(0xC0D + len(fmt) + workers + kill_workers + ext)
    for it in range(CI_ITERATIONS):
        fig = crash_iteration(s, it, rnd, power_cut=it % 3 == 2 and not workers,
                              workers=workers, kill_workers=kill_workers,
                              align_share=0.5 if ext else 0.0)
        assert fig["writes_acked"] > 0
    # Not vacuous: the storms had writes made durable by flush and FUA, and writes the kill
    # left unacknowledged; the power cuts dropped pieces of unsynced writes.
    assert sum(f["writes_durable"] for f in s.figures) > 100
    assert sum(f["writes_sent"] - f["writes_acked"] for f in s.figures) > 0
    if not workers:  # the write recorder wraps the daemon's own writes, not its workers'
        assert sum(f["power_cut"]["pieces_dropped"] for f in s.figures
                   if "power_cut" in f) > 0


# Seconds of the 8 x 64 load in CI (tools/stress.py long: 300).
CI_LOAD_SECONDS = 60.0
# The daemon's resident memory must stay below this, and grow by less than
# RSS_GROWTH_KIB over the second half of the run (MAX_INFLIGHT_BYTES per connection bounds
# what a client can make it hold; 8 connections x 64 x <= 64 KiB is 32 MiB).
RSS_LIMIT_KIB = 256 << 10
RSS_GROWTH_KIB = 32 << 10


@pytest.mark.timeout(CI_LOAD_SECONDS + 120)
@pytest.mark.parametrize("workers", [0, 2], ids=["in-daemon", "2-workers"])
def test_load_8_connections_64_in_flight(tmp_path: Path, workers: int) -> None:
    """8 libnbd connections, each with 64 reads and writes in flight, against a shadow
    model: every read equals the model, the final disk (through the daemon and through
    qemu-img after a clean stop) equals it, the overlay is clean, memory stays bounded.
    With two workers the connections are spread over them: every cross-worker invalidation
    is exercised by the shadow model."""
    _need_peers("qcow2")
    doc = load_run(tmp_path, CI_LOAD_SECONDS, workers=workers)
    assert doc["mismatches"] == 0 and doc["errors"] == 0, doc
    assert doc["max_in_flight"] >= 8 * 64 - 8, doc  # really 512 requests in flight
    assert doc["reads"] > 1000 and doc["writes"] > 1000, doc
    assert doc["qemu_readback_matches_model"] and doc["leaks_after_clean_stop"] == 0, doc
    assert doc["rss_kib_max"] < RSS_LIMIT_KIB * (1 + workers), doc
    assert doc["rss_kib_end"] - doc["rss_kib_mid"] < RSS_GROWTH_KIB * (1 + workers), doc


# ---- the oracle itself can fail ------------------------------------------------------------


def _journal(lines: list[str]) -> object:
    return stress.Journal.parse(lines)


def test_oracle_catches_lost_misplaced_and_stale_sectors() -> None:
    old = random.Random(3).randbytes(16 * 512)
    lines = ["S 8192", "W 1 0 2 0", "A 1", "F 1", "FA 1",  # seq 1: durable
             "W 3 0 1 0", "A 3", "F 2", "FA 2",  # overwrites seq 1's first sector, durable
             "W 2 1024 1 0", "A 2",  # acked, never flushed
             "W 4 2048 1 1", "A 4",  # FUA: durable at once
             "W 5 4096 1 0", "X connection"]  # never acknowledged
    j = _journal(lines)
    good = bytearray(old)
    good[0:512] = stress.stamp(3, 0)
    good[512:1024] = stress.stamp(1, 512)
    good[2048:2560] = stress.stamp(4, 2048)
    assert stress.verify(bytes(good), old, j) == []
    alt = bytearray(good)
    alt[1024:1536] = stress.stamp(2, 1024)  # an unflushed write may show
    alt[4096:4608] = stress.stamp(5, 4096)  # so may an unacknowledged one
    assert stress.verify(bytes(alt), old, j) == []
    cases = {
        "lost durable": (512, old[512:1024]),
        "lost FUA": (2048, old[2048:2560]),
        "stale (overwritten by durable)": (0, stress.stamp(1, 0)),
        "misplaced": (1536, stress.stamp(2, 1024)),
        "torn": (512, stress.stamp(1, 512)[:300] + old[812:1024]),
        "never sent": (3072, stress.stamp(9, 3072)),
    }
    for what, (at, data) in cases.items():
        bad = bytearray(good)
        bad[at:at + 512] = data
        assert stress.verify(bytes(bad), old, j), f"the oracle missed a {what} sector"


def test_power_cut_model_keeps_synced_and_drops_only_unsynced() -> None:
    before = bytes(4096)
    events = [("W", 0, 1024, b"\x01" * 1024), ("B", 0, 0, b""), ("E", 0, 0, b""),
              ("W", 1024, 1024, b"\x02" * 1024), ("B", 0, 0, b""), ("W", 2048, 512, b"\x03" * 512)]
    seen = set()
    for seed in range(40):
        img, _ = power_cut_image(before, events, random.Random(seed))
        assert img[:1024] == b"\x01" * 1024  # synced before the last completed sync began
        seen.add((img[1024:1536], img[2048:2560]))
    assert len(seen) == 4  # unsynced pieces both kept and dropped
