"""Simulated power loss for the qcow2 writers' tests (test_qcow2_write.py, test_qcow2_lend.py):
record every pwrite and fdatasync of one image file, rebuild the file as a crash at a given
point would leave it, and check that no flushed data is lost nor garbage shown."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from formats import HostFile
from tests.support.peers import qemu_img, qemu_raw


class IoLog:
    """Records every pwrite (split into 512-byte sectors: each may land on its own), every
    fdatasync (a barrier for its file) and the workload's own markers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: str):
        self.path = path
        self.events: list[tuple[Any, ...]] = []
        orig_pwrite, orig_sync = HostFile.pwrite, HostFile.sync

        def pwrite(f: HostFile, off: int, data: bytes | bytearray | memoryview) -> None:
            if f.path == path:
                self.sectors(off, bytes(data))
            orig_pwrite(f, off, data)

        def sync(f: HostFile) -> None:
            orig_sync(f)
            if f.path == path:
                self.events.append(("s",))

        monkeypatch.setattr(HostFile, "pwrite", pwrite)
        monkeypatch.setattr(HostFile, "sync", sync)

    def sectors(self, off: int, b: bytes) -> None:
        """Log a write of ``b`` at ``off`` (also one made behind HostFile's back)."""
        pos = 0
        while pos < len(b):
            n = min(len(b) - pos, 512 - (off + pos) % 512)
            self.events.append(("w", off + pos, b[pos : pos + n]))
            pos += n


def record_flush(flushed: list[bytes], writes: list[tuple[int, int, bytes]]) -> None:
    """A flush completed: append to ``flushed`` the guest disk it made durable (the last one
    and every write issued since)."""
    m = bytearray(flushed[-1])
    for fi, woff, wdata in writes:
        if fi == len(flushed) - 1:
            m[woff : woff + len(wdata)] = wdata
    flushed.append(bytes(m))


def crash_image(initial: bytes, events: list[tuple[Any, ...]], cut: int,
                r: random.Random) -> bytes:
    last_sync = max((i for i in range(cut) if events[i][0] == "s"), default=-1)
    img = bytearray(initial)
    for i, ev in enumerate(events[:cut]):
        if ev[0] != "w" or (i > last_sync and r.random() < 0.5):
            continue
        off, data = ev[1], ev[2]
        if off + len(data) > len(img):
            img.extend(bytes(off + len(data) - len(img)))
        img[off : off + len(data)] = data
    return bytes(img)


def check_crash_points(tmp_path: Path, initial: bytes, events: list[tuple[Any, ...]],
                       writes: list[tuple[int, int, bytes]], flushed: list[bytes],
                       r: random.Random, max_cuts: int = 50) -> None:
    """Crash at up to ``max_cuts`` points of ``events`` (every sync, every marker, some at
    random): qemu-img check finds leaks at worst, and every sector shows what the last
    completed flush made durable or a write issued after it.  ``writes``: (index into
    ``flushed`` of the last flush before it, guest offset, data), in the order of the log's
    ("op", i) markers; ``flushed``: the guest disk after each ("flushed", i) marker."""
    size = len(flushed[0])
    cuts = sorted({r.randrange(len(events) + 1) for _ in range(30)}
                  | {i + 1 for i, e in enumerate(events) if e[0] == "s"}
                  | {i for i, e in enumerate(events) if e[0] in ("flushed", "op")})
    cuts = cuts[:: max(1, len(cuts) // max_cuts)]
    crashed = tmp_path / "crashed.qcow2"
    for cut in cuts:
        crashed.write_bytes(crash_image(initial, events, cut, r))
        rc = qemu_img("check", crashed, check=False).returncode
        assert rc in (0, 3), f"cut {cut}/{len(events)}: qemu-img check rc={rc}"
        got = qemu_raw(crashed, tmp_path)
        done = max((e[1] for e in events[:cut] if e[0] == "flushed"), default=0)
        issued = max((e[1] for e in events[:cut] if e[0] == "op"), default=-1)
        allowed: dict[int, list[bytes]] = {}
        for fi, woff, wdata in writes[: issued + 1]:
            # Writes not yet covered by a completed flush may or may not show.
            if fi >= done:
                for p in range(0, len(wdata), 512):
                    allowed.setdefault(woff + p, []).append(wdata[p : p + 512])
        base_view = flushed[done]
        for sec in range(0, size, 512):
            g = got[sec : sec + 512]
            if g != base_view[sec : sec + 512]:
                assert g in allowed.get(sec, []), (
                    f"cut {cut}/{len(events)}: sector {sec} shows neither flushed nor "
                    "later-written data")
