"""Boot-trace priming end to end (cowd/disk/boottrace.py): the real `cowd serve`, read by
libnbd (nbdsh) in a known order, served in the daemon and from two worker processes.

The first overlay's reads of the base must come back as the trace file's order; a second
overlay of the same base loads it and prefetches, and its bytes still equal qemu's reading
of its chain (``qemu-img convert``); a corrupt trace, a trace of a changed base and
``--no-boot-trace`` are each checked for what is logged, shown and written."""

from __future__ import annotations

import mmap
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cowd.disk.boottrace import (
    TRACE_GRANULE_BYTES,
    BaseIdentity,
    decode,
    encode,
    read_trace,
    write_trace,
)
from tests.support import nbdserve
from tests.support.attach import Env, attach_problem
from tests.support.nbdserve import Served, nbdsh
from tests.support.peers import COWD, qemu_img, qemu_io, qemu_raw, run

pytestmark = pytest.mark.qemu

MiB = 1 << 20
G = TRACE_GRANULE_BYTES
SIZE = 8 * MiB
# Base granules read in this order, all outside what the overlay holds (its first 64 KiB,
# 1000000..1070000, 192 KiB zeroed, 512 KiB discarded): the trace must keep the order.
ORDER = [96, 32, 66, 48, 120, 5]

Serve = Callable[..., Served]
# The NBD server tests' daemon fixture: in the daemon, and from two worker processes.
serve = nbdserve.serve


def _base(tmp: Path) -> Path:
    base = tmp / "base.raw"
    base.write_bytes(random.Random(7).randbytes(SIZE))
    return base


def _overlay(tmp: Path, name: str) -> Path:
    top = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    qemu_io(top, "write -P 0x5a 0 64k", "write -P 0x33 1000000 70000", "write -z 192k 64k",
            "discard 512k 128k", fmt="qcow2")
    return top


def _read_in_order(d: Served, order: list[int]) -> None:
    # 4 KiB in the middle of each granule, then its end: one first touch per granule.
    script = "h = connect(NAME)\nfor i in ORDER:\n" \
             "    h.pread(4096, i * G + 8192)\n    h.pread(512, i * G + G - 512)\n"
    nbdsh(script, NAME=d.names[0], ORDER=order, G=G, SOCK=str(d.sock))


def _convert(d: Served, tmp: Path, name: str) -> bytes:
    out = tmp / f"{name}.out"
    qemu_img("convert", "-f", "raw", "-O", "raw", d.uri(), out)
    return out.read_bytes()


def _identity(base: Path) -> BaseIdentity:
    with open(base, "rb") as f:
        return BaseIdentity.of_fd(f.fileno())


def _trace(base: Path) -> list[int]:
    granule, indices = read_trace(str(base) + ".cowd-trace", _identity(base))
    assert granule == G
    return indices


def _boot_trace(d: Served) -> dict[str, object]:
    bt = d.disk_stats()["boot_trace"]
    assert isinstance(bt, dict)
    return bt


def _wait_prefetched(d: Served, deadline_s: float = 20) -> dict[str, object]:
    end = time.monotonic() + deadline_s
    while True:
        bt = _boot_trace(d)
        if bt["prefetch"] != "running" or time.monotonic() > end:
            return bt
        time.sleep(0.1)


def _record(serve: Serve, tmp: Path, base: Path) -> None:
    top = _overlay(tmp, "first.qcow2")
    d = serve(top)
    assert _boot_trace(d)["state"] == "no trace yet"
    _read_in_order(d, ORDER)
    d.stop()
    assert _trace(base) == ORDER


def test_trace_records_first_touch_order_and_second_overlay_prefetches(
        serve: Serve, tmp_path: Path) -> None:
    base = _base(tmp_path)
    _record(serve, tmp_path, base)
    mtime = base.stat().st_mtime_ns

    top = _overlay(tmp_path, "second.qcow2")
    d = serve(top)
    bt = _wait_prefetched(d)
    assert (bt["state"], bt["entries"], bt["prefetch"]) == ("loaded", len(ORDER), "done")
    assert bt["prefetched"] == len(ORDER)
    assert _convert(d, tmp_path, "second") == qemu_raw(top, tmp_path, "qcow2")
    bt = _boot_trace(d)
    # Every traced granule was read, after its prefetch; the base granules the overlay
    # does not hide were all read (the trace covers only ORDER of them).
    assert bt["covered"] == len(ORDER)
    assert bt["prefetched_before_read"] == len(ORDER)
    assert bt["base_granules_read"] > len(ORDER)
    text = run(*COWD, "stats", "--run-dir", d.run_dir).stdout.decode()
    assert f"boot trace: loaded, {len(ORDER)} entries" in text, text
    d.stop()
    # A loaded trace is kept: it is the first boot's.
    assert _trace(base) == ORDER
    assert base.stat().st_mtime_ns == mtime


def test_corrupt_trace_is_ignored_and_replaced(serve: Serve, tmp_path: Path) -> None:
    base = _base(tmp_path)
    _record(serve, tmp_path, base)
    path = Path(str(base) + ".cowd-trace")
    raw = bytearray(path.read_bytes())
    raw[50] ^= 0xFF
    path.write_bytes(raw)

    top = _overlay(tmp_path, "third.qcow2")
    d = serve(top)
    bt = _boot_trace(d)
    assert bt["state"] == "ignored: checksum mismatch"
    assert (bt["entries"], bt["prefetched"], bt["prefetch"]) == (0, 0, "not started")
    assert _convert(d, tmp_path, "third") == qemu_raw(top, tmp_path, "qcow2")
    log = d.stop()
    assert log.count("boot trace ignored: checksum mismatch") == 1, log
    # This boot's first touches replaced it: a valid trace of every base granule read.
    assert len(_trace(base)) == _expected_base_granules(top, tmp_path)


def _expected_base_granules(top: Path, tmp: Path) -> int:
    """Base granules that a whole-disk read reaches through ``top`` (qemu-img map)."""
    import json

    out = run("qemu-img", "map", "--output=json", "-f", "qcow2", top).stdout
    grans: set[int] = set()
    for e in json.loads(out):
        if e["data"] and e["depth"] == 1:
            grans.update(range(e["start"] // G, (e["start"] + e["length"] - 1) // G + 1))
    return len(grans)


def test_trace_of_a_changed_base_is_stale(serve: Serve, tmp_path: Path) -> None:
    base = _base(tmp_path)
    _record(serve, tmp_path, base)
    st = base.stat()
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    top = _overlay(tmp_path, "fourth.qcow2")
    d = serve(top)
    bt = _boot_trace(d)
    assert str(bt["state"]).startswith("ignored: stale: the base changed"), bt
    assert bt["prefetched"] == 0
    assert _convert(d, tmp_path, "fourth") == qemu_raw(top, tmp_path, "qcow2")
    log = d.stop()
    assert log.count("boot trace ignored: stale") == 1, log


def test_no_boot_trace_writes_nothing(serve: Serve, tmp_path: Path) -> None:
    base = _base(tmp_path)
    top = _overlay(tmp_path, "off.qcow2")
    d = serve(top, extra=("--no-boot-trace",))
    assert _boot_trace(d)["state"] == "off (--no-boot-trace)"
    _read_in_order(d, ORDER)
    assert _convert(d, tmp_path, "off") == qemu_raw(top, tmp_path, "qcow2")
    assert _boot_trace(d)["base_granules_read"] == 0
    d.stop()
    assert not Path(str(base) + ".cowd-trace").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "cowd-trace" in p.name) == []


def test_a_disk_without_a_base_traces_nothing(serve: Serve, tmp_path: Path) -> None:
    base = _base(tmp_path)
    d = serve(base)
    assert _boot_trace(d)["state"] == "no base: a disk of one layer"
    _read_in_order(d, ORDER)
    d.stop()
    assert not Path(str(base) + ".cowd-trace").exists()


def test_decode_of_the_written_file_checks_identity(serve: Serve, tmp_path: Path) -> None:
    base = _base(tmp_path)
    _record(serve, tmp_path, base)
    data = Path(str(base) + ".cowd-trace").read_bytes()
    st = base.stat()
    assert decode(data, BaseIdentity(st.st_size, st.st_mtime_ns, st.st_ino))[1] == ORDER


# ---- the FUSE path: `cowd attach --via fuse`, read through /dev/loopN ------------------------


def _dd_direct(dev: str, order: list[int]) -> None:
    """Read 4 KiB of each granule of ``order`` from the device with O_DIRECT (no kernel
    read-ahead: each read is one FUSE READ), in that order."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        for i in order:
            assert os.preadv(fd, [buf], i * G + 8192) == 4096
    finally:
        os.close(fd)


@pytest.mark.root
@pytest.mark.skipif(attach_problem() is not None, reason=attach_problem() or "")
def test_fuse_attach_records_and_prefetches(tmp_path: Path) -> None:
    base = _base(tmp_path)
    first = _overlay(tmp_path, "fuse1.qcow2")
    with Env.under(tmp_path) as env:
        dev = env.attach(first, "--via", "fuse")
        _dd_direct(dev, ORDER)
        env.detach(dev)
        # The kernel and udev may probe the new device (its first and last sectors)
        # before the reads above: the trace holds ORDER in order, maybe among those.
        assert [i for i in _trace(base) if i in ORDER] == ORDER
        probed = set(_trace(base)) - set(ORDER)

        second = _overlay(tmp_path, "fuse2.qcow2")
        dev = env.attach(second, "--via", "fuse")
        end = time.monotonic() + 20
        while True:
            bt = next(iter(env.stats()["disks"].values()))["boot_trace"]  # type: ignore[union-attr]
            if bt["prefetch"] != "running" or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert (bt["state"], bt["prefetch"]) == ("loaded", "done"), bt
        assert bt["prefetched"] == len(ORDER) + len(probed)
        _dd_direct(dev, ORDER)
        with open(dev, "rb") as f:
            got = f.read()
        assert got == qemu_raw(second, tmp_path, "qcow2")
        text = env.cowd("stats").stdout
        assert f"boot trace: loaded, {len(ORDER) + len(probed)} entries" in text, text
        bt = next(iter(env.stats()["disks"].values()))["boot_trace"]  # type: ignore[union-attr]
        assert bt["prefetched_before_read"] >= len(ORDER), bt
        env.detach(dev)


def test_write_trace_is_atomic_and_read_trace_follows_no_symlink(tmp_path: Path) -> None:
    base = _base(tmp_path)
    ident = _identity(base)
    path = str(base) + ".cowd-trace"
    write_trace(path, encode(ident, G, [3, 1, 2]))
    write_trace(path, encode(ident, G, [4]))  # replaces it
    assert read_trace(path, ident) == (G, [4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.raw", "base.raw.cowd-trace"]
    link = tmp_path / "link.raw.cowd-trace"
    link.symlink_to(path)
    with pytest.raises(OSError):
        read_trace(str(link), ident)
