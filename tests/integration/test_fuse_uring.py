"""`cowd attach --via fuse` with the FUSE file served over io_uring (FUSE_OVER_IO_URING, Linux
6.14+ with the fuse module's ``enable_uring=Y``), and the /dev/fuse fallback where the kernel
does not offer it (``enable_uring=N``) or it is off (``--fuse-io-uring=off``, the default;
here set through its environment variable, which the daemon `cowd attach` starts inherits).

Oracles: fio's own verify pass through the loop device on the FUSE file; after `cowd detach`,
``qemu-img check`` of the overlay, the device's bytes (read through the FUSE file before the
detach) equal to ``qemu-img convert`` of the overlay, and fio's ``--verify_only`` of the same
job over that converted image.  That the ring served is ``cowd stats``' count:
``io_uring.active``, every queue registered by the daemon or by one worker process, every
READ and WRITE of the fio run taken from the ring, and, where the daemon has workers (one
per core), their own ring counters (``workers[i].worker.fuse.ring_requests``) covering those
requests; the fallback's reason is the one ``cowd stats`` and the log give.

The kernel parameter is global: each test sets it before its daemon mounts (the kernel reads
it at the mount's INIT) and puts the old value back in a finally block, whatever failed.
Needs root, /dev/fuse, loop devices, fio and qemu-img; the ring test needs a kernel with
``/sys/module/fuse/parameters/enable_uring`` (this project's host kernel has it; the 6.1 guest
kernel does not) and skips with that reason elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowd.frontends.fuse.ring import ENABLE_URING_PARAM
from tests.support.attach import Env, attach_problem
from tests.support.peers import missing_tool, qemu_check, qemu_img, qemu_io, run

MiB = 1 << 20
DISK_BYTES = 64 * MiB
FIO_BYTES = 48 * MiB
FIO_TIMEOUT_S = 300


def _problem() -> str | None:
    return attach_problem() or missing_tool("fio", "qemu-io")


def _ring_problem() -> str | None:
    if not os.path.exists(ENABLE_URING_PARAM):
        return (f"{ENABLE_URING_PARAM} is missing: this kernel has no FUSE-over-io_uring "
                f"(Linux 6.14+ with CONFIG_FUSE_IO_URING)")
    return None


@contextlib.contextmanager
def enable_uring(value: str | None) -> Iterator[None]:
    """The fuse module's enable_uring set to ``value`` (None or a missing parameter: left
    alone), and its old value back afterwards, however the body ends."""
    param = Path(ENABLE_URING_PARAM)
    if value is None or not param.exists():
        yield
        return
    old = param.read_text().strip()
    param.write_text(value)
    try:
        yield
    finally:
        param.write_text(old)
        assert param.read_text().strip() == old


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Env.under(tmp_path) as e:
        yield e


def make_overlay(tmp: Path) -> Path:
    """A raw base with a pattern in its first and last MiBs, and a fresh qcow2 over it."""
    base = tmp / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, str(DISK_BYTES))
    qemu_io(base, "write -P 0x5a 0 1M", f"write -P 0xa5 {DISK_BYTES - MiB} 1M", fmt="raw")
    ov = tmp / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ov)
    return ov


def fio_job(name: str) -> list[str]:
    # Random 64 KiB writes at queue depth 8 (so several ring entries are busy at once), then
    # fio reads back and checks every block; end_fsync sends an FSYNC through the file.
    return [f"--name={name}", "--rw=randwrite", "--bs=64k", f"--size={FIO_BYTES}",
            "--verify=crc32c", "--verify_fatal=1", "--randseed=1515", "--iodepth=8",
            "--verify_state_save=0", "--end_fsync=1"]


FUSE_COUNTERS = ("reads", "writes", "fsyncs", "errors", "protocol_errors", "ring_requests",
                 "ring_errors")


def all_fuse_stats(env: Env) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The daemon's FUSE stats, and each worker process's (its own counters and rings)."""
    doc = env.stats()
    fuse, links = doc["fuse"], doc.get("workers") or []
    assert isinstance(fuse, dict) and isinstance(links, list)
    workers = [link["worker"] for link in links]  # what each process said of itself
    return fuse, workers


def totals(fuse: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, int]:
    """FUSE_COUNTERS summed over the daemon and its workers (ring_requests: the daemon's
    ring's and the workers')."""
    out = {k: int(fuse.get(k, 0)) for k in FUSE_COUNTERS}
    for k in ("ring_requests", "ring_errors"):
        out[k] = int(fuse["io_uring"].get(k, 0))
    for w in workers:
        for k in FUSE_COUNTERS:
            out[k] += int(w["fuse"].get(k, 0))
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


Stats = tuple[dict[str, Any], list[dict[str, Any]]]


def write_verify_compare(env: Env, tmp: Path, ov: Path, name: str
                         ) -> tuple[Stats, Stats, str]:
    """Attach ``ov``, run fio's write+verify through the device, read the whole device back,
    detach; then the overlay must check clean, convert to the bytes the device showed, and
    hold every block fio wrote.  Returns the FUSE stats (all_fuse_stats) before and after
    fio, and the text of `cowd stats` after it."""
    dev = env.attach(ov, "--via", "fuse")
    before = all_fuse_stats(env)
    p = run("fio", *fio_job(name), f"--filename={dev}", "--ioengine=libaio", "--direct=1",
            timeout=FIO_TIMEOUT_S, check=False)
    assert p.returncode == 0, p.stdout.decode(errors="replace")[-3000:] + env.log()
    seen = tmp / "device.raw"
    run("dd", f"if={dev}", f"of={seen}", "bs=1M", "iflag=direct", "status=none")
    after = all_fuse_stats(env)
    text = env.cowd("stats").stdout
    env.detach(dev)
    qemu_check(ov)
    raw = tmp / "converted.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, raw)
    assert os.path.getsize(seen) == DISK_BYTES
    assert sha256_of(seen) == sha256_of(raw)
    with open(raw, "rb") as f:  # the base's pattern past fio's range came through untouched
        f.seek(DISK_BYTES - MiB)
        assert f.read(MiB) == b"\xa5" * MiB
    p = run("fio", *fio_job(name), f"--filename={raw}", "--ioengine=psync", "--verify_only",
            timeout=FIO_TIMEOUT_S, check=False)
    assert p.returncode == 0, p.stdout.decode(errors="replace")[-3000:]
    return before, after, text


@pytest.mark.root
@pytest.mark.skipif(_problem() is not None, reason=_problem() or "")
@pytest.mark.skipif(_ring_problem() is not None, reason=_ring_problem() or "")
def test_attach_via_fuse_over_io_uring(env: Env, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COWD_FUSE_IO_URING", "auto")  # (off by default)
    ov = make_overlay(tmp_path)
    with enable_uring("Y"):
        (fuse0, workers0), (fuse, workers), text = write_verify_compare(env, tmp_path, ov,
                                                                        "ring")
    before, after = totals(fuse0, workers0), totals(fuse, workers)
    ring = fuse["io_uring"]
    assert ring["active"] is True and ring["reason"] == "", ring
    # Every queue is served: by the daemon (no workers) or by every worker process, each
    # with all of its entries registered.
    rings = [ring, *(r for w in workers for r in w["fuse_ring"])]
    served = sorted({q for r in rings for q in r["served_queues"]})
    assert ring["queues"] >= 1 and served == list(range(ring["queues"])), rings
    if workers:
        assert ring["served_queues"] == [], ring
        assert all(r["served_queues"] == served for w in workers for r in w["fuse_ring"])
    for r in rings:
        assert r["entries_alive"] == len(r["served_queues"]) * r["entries_per_queue"], r
    assert ring["uring_workers"] == len(workers), ring
    # Every READ and WRITE of the fio run (and of the read-back) came from the ring.
    data = (after["reads"] + after["writes"]) - (before["reads"] + before["writes"])
    assert data >= FIO_BYTES // (1 << 20) * 2  # 64 KiB writes and reads of 48 MiB at least
    assert after["ring_requests"] - before["ring_requests"] >= data, (before, after)
    if workers:
        # The worker processes served them (the daemon keeps no queue when each worker
        # takes one or more), each counting its own.
        by_worker = [int(w["fuse"].get("ring_requests", 0)) - int(w0["fuse"].get(
            "ring_requests", 0)) for w, w0 in zip(workers, workers0, strict=True)]
        assert sum(by_worker) >= data, (by_worker, data)
        print("ring requests by worker", by_worker, "of", data)
        assert all(w["fuse_ring"] for w in workers), workers
        assert ring["ring_requests"] == 0, ring
        assert f"each served by {len(workers)} worker processes" in text, text
    assert after["fsyncs"] > before["fsyncs"]
    assert after["errors"] == 0 and after["protocol_errors"] == 0
    assert after["ring_errors"] == 0
    assert "serving over io_uring" in env.log()


@pytest.mark.root
@pytest.mark.skipif(_problem() is not None, reason=_problem() or "")
def test_attach_via_fuse_falls_back_to_dev_fuse(env: Env, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--fuse-io-uring=auto where enable_uring=N (or a kernel without the parameter):
    requests are read from /dev/fuse, with the same bytes, and stats and log say why."""
    monkeypatch.setenv("COWD_FUSE_IO_URING", "auto")
    ov = make_overlay(tmp_path)
    with enable_uring("N"):
        (fuse0, workers0), (fuse, workers), text = write_verify_compare(env, tmp_path, ov,
                                                                        "fallback")
    before, after = totals(fuse0, workers0), totals(fuse, workers)
    ring = fuse["io_uring"]
    assert ring["active"] is False, ring
    expect = ("enable_uring is N" if os.path.exists(ENABLE_URING_PARAM)
              else "this kernel has no FUSE-over-io_uring")
    assert expect in ring["reason"], ring
    assert "ring_requests" not in ring
    assert all(not w["fuse_ring"] for w in workers), workers
    assert after["ring_requests"] == 0
    assert "served over /dev/fuse reads" in text, text
    assert after["reads"] > before["reads"] and after["writes"] > before["writes"]
    assert f"serving through /dev/fuse reads: {ring['reason']}" in env.log()


@pytest.mark.root
@pytest.mark.skipif(_problem() is not None, reason=_problem() or "")
@pytest.mark.parametrize("setting", ["off", None], ids=["off", "default"])
def test_turned_off_while_the_kernel_offers_it(env: Env, tmp_path: Path, setting: str | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """COWD_FUSE_IO_URING=off, or nothing (--fuse-io-uring's default is off), for the daemon
    attach starts: the offer is declined, /dev/fuse serves, and `cowd stats` says so in its
    text too."""
    if setting is None:
        monkeypatch.delenv("COWD_FUSE_IO_URING", raising=False)
    else:
        monkeypatch.setenv("COWD_FUSE_IO_URING", setting)
    base = tmp_path / "small.raw"
    qemu_img("create", "-q", "-f", "raw", base, str(4 * MiB))
    qemu_io(base, "write -P 0x33 0 4M", fmt="raw")
    with enable_uring("Y"):
        dev = env.attach(base, "--via", "fuse", "--readonly")
        try:
            with open(dev, "rb") as f:
                assert f.read() == b"\x33" * (4 * MiB)
            fuse, workers = all_fuse_stats(env)
            text = env.cowd("stats").stdout
        finally:
            env.detach(dev)
    reason = "off (--fuse-io-uring=auto to use it)"
    assert fuse["io_uring"] == {"active": False, "reason": reason}
    assert f"served over /dev/fuse reads ({reason})" in text
    # Read by the daemon's session or a worker's (each has its session before attach
    # returns, so the workers may well have read them all).
    assert totals(fuse, workers)["reads"] > 0
