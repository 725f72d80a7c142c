"""The NBD server's preallocated buffers for connections that back a kernel device
(``NbdServer(device=True)``: what serves ``cowd attach --via nbd``), driven by qemu-io.

A device connection makes its resident buffers when it is created and serves every request
of at most DEVICE_MAX_REQUEST_BYTES from them, allocating nothing (``device_buffer_fallbacks``
stays 0) however many requests pass; a larger request (the kernel is kept below the bound by
the attach path's queue limits, qemu is not) is still served, from a fresh buffer, and
counted.  Oracle: qemu-io's own pattern checks (``read -P``) over the server while it runs,
then qemu-img's view of the overlay after the disk is closed against a model.

The whole attach path (/dev/nbdN, its queue limits, under a memory cgroup) is tested in a
guest: tests/integration/test_memory_pressure.py's nbd cases, run by
tests/guest/test_memory_pressure.py.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from cowd.disk import Disk, ImagePool
from cowd.frontends.nbd.server import (
    DEVICE_BUFFERS,
    DEVICE_MAX_REQUEST_BYTES,
    DEVICE_SLAB_BYTES,
    NbdServer,
    open_nbd_listeners,
)
from cowd.remap import RemapCache
from tests.support.peers import missing_tool, qemu_img, run

pytestmark = [pytest.mark.qemu]

KiB = 1 << 10
MiB = 1 << 20
DISK_BYTES = 8 * MiB


async def _qemu_io(uri: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = await trio.to_thread.run_sync(
        functools.partial(run, *args, uri, check=False, timeout=120))
    out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    assert p.returncode == 0 and "error" not in out.lower() and "fail" not in out.lower(), out
    return out


@pytest.mark.timeout(120)
async def test_device_connections_serve_from_preallocated_buffers(tmp_path: Path) -> None:
    if missing_tool("qemu-img", "qemu-io"):
        pytest.skip(str(missing_tool("qemu-img", "qemu-io")))
    rng = random.Random(14)
    base = tmp_path / "base.raw"
    model = bytearray(rng.randbytes(DISK_BYTES))
    base.write_bytes(model)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", base, top)
    disk = await Disk.open(str(top), pool=ImagePool(), cache=RemapCache(max_entries=1 << 12))
    server = NbdServer({"d": disk}, device=True)
    sock = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///d?socket={sock}"
    listeners = await open_nbd_listeners([("unix", str(sock), 0)])
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, server.handle, listeners)
            # Writes and reads of every size up to the bound (a request's payload or its
            # reply fills one buffer), more of them than there are buffers.
            cmds = []
            for i in range(3 * DEVICE_BUFFERS):
                n = rng.choice([512, 4 * KiB, 64 * KiB, DEVICE_MAX_REQUEST_BYTES,
                                rng.randrange(1, DEVICE_MAX_REQUEST_BYTES // 512) * 512])
                off = rng.randrange(0, (DISK_BYTES - n) // 512) * 512
                pattern = i % 250 + 1
                cmds += [f"write -P {pattern} {off} {n}", f"read -P {pattern} {off} {n}"]
                model[off:off + n] = bytes([pattern]) * n
            await _qemu_io(uri, *cmds)
            assert server.counters["device_buffer_fallbacks"] == 0, server.counters
            # While a connection is open, its buffers are counted; afterwards no longer.
            async with await trio.open_unix_socket(str(sock)) as client:
                with trio.fail_after(10):
                    assert await client.receive_some(8) == b"NBDMAGIC"  # the greeting
                assert server.counters["device_buffer_bytes"] == \
                    DEVICE_BUFFERS * DEVICE_SLAB_BYTES
            # Larger than a buffer: served all the same, and counted.
            await _qemu_io(uri, f"write -P 7 0 {MiB}", f"read -P 7 0 {MiB}")
            model[0:MiB] = bytes([7]) * MiB
            assert server.counters["device_buffer_fallbacks"] == 2, server.counters
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked()
            assert server.counters["device_buffer_bytes"] == 0, server.counters
            nursery.cancel_scope.cancel()
    finally:
        await disk.close()
    out = tmp_path / "out.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", top, out)
    assert out.read_bytes() == model
