"""``cowd attach --via nbd``: the kernel's own NBD client reading a disk this daemon serves.

On the host (no nbd driver): the client's half of the handshake (cowd/frontends/nbd/attach.py)
against the real server (cowd/frontends/nbd/server.py) over a socketpair, then raw
transmission requests on the same socket, as the kernel would send them, with the written
bytes read back by qemu-img; the codec fed one byte at a time; a refused export and a bad
greeting; the refusal of ``--via nbd`` where there is no nbd.

In a guest of Debian's kernel (one boot, :mod:`tools.guest`): modprobe nbd; attach a qcow2
overlay of a patterned raw base; compare the whole device with the base; ``cowd list`` says
nbd; mkfs.ext4 (32 MiB of the 64) + mount + copy a tree + umount, detach refused while
mounted; a direct write at 40 MiB and a discard at 48 MiB; a differencing VHD over a VHD base
attached beside it (a second device of the same daemon), then the first detached, the VHD
read and written and detached (the daemon exits); SIGKILL of the daemon while a process holds
its device open, then a new attach (which cleans up) works on another device and the held one
is released once it is closed; no device left connected; dmesg clean.  On the host
afterwards: qemu-img convert of the overlays, debugfs rdump of the tree, libvhdi for the VHD,
qemu-img check / cowd check, the base's sha256 unchanged.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from cowd.disk import Disk, ImagePool
from cowd.frontends.nbd import attach as N
from cowd.frontends.nbd import protocol as P
from cowd.frontends.nbd import wire as W
from cowd.frontends.nbd.server import NbdServer
from cowd.remap import RemapCache
from tests.support.guest import (
    SHELL,
    parse_checks,
    patterned_base,
    raw_of,
    skip_without_guest,
    small_tree,
)
from tests.support.peers import COWD, libvhdi_raw, qemu_check, qemu_img, qemu_raw
from tools import guest

MiB = 1 << 20


# ---- host: the client handshake against the real server ---------------------------------------

@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Path, NbdServer]]:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    disk = await Disk.open(str(img), pool=ImagePool(), cache=RemapCache(max_entries=1024))
    try:
        yield img, NbdServer({"d.qcow2": disk})
    finally:
        await disk.close()


async def _recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        assert chunk, "server closed the connection"
        buf += chunk
    return buf


async def test_handshake_then_kernel_style_requests(
        served: tuple[Path, NbdServer], tmp_path: Path) -> None:
    """After our GO the socket is in transmission: simple WRITE / FLUSH / READ / DISC
    requests (what the kernel sends) are answered, and qemu reads the write in the image."""
    img, server = served
    ours, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    payload = random.Random(3).randbytes(64 << 10)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle,
                               trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
            client = trio.socket.from_stdlib_socket(client_end)
            got = await N.negotiate(trio.SocketStream(client), "d.qcow2")
            assert got.size_bytes == 4 * MiB
            for flag in (W.NBD_FLAG_HAS_FLAGS, W.NBD_FLAG_SEND_FLUSH, W.NBD_FLAG_SEND_TRIM):
                assert got.transmission_flags & flag
            assert not got.transmission_flags & W.NBD_FLAG_SEND_DF  # no structured replies
            assert not got.transmission_flags & W.NBD_FLAG_READ_ONLY
            req = struct.Struct(">IHHQQI")
            await client.send(req.pack(W.NBD_REQUEST_MAGIC, 0, W.NBD_CMD_WRITE, 1, MiB,
                                       len(payload)) + payload)
            await client.send(req.pack(W.NBD_REQUEST_MAGIC, 0, W.NBD_CMD_FLUSH, 2, 0, 0))
            replies = {}
            for _ in range(2):
                magic, error, cookie = struct.unpack(">IIQ", await _recv_exactly(client, 16))
                assert magic == W.NBD_SIMPLE_REPLY_MAGIC
                replies[cookie] = error
            assert replies == {1: 0, 2: 0}
            await client.send(req.pack(W.NBD_REQUEST_MAGIC, 0, W.NBD_CMD_READ, 3, MiB - 512,
                                       1024))
            head = await _recv_exactly(client, 16)
            assert struct.unpack(">IIQ", head) == (W.NBD_SIMPLE_REPLY_MAGIC, 0, 3)
            assert await _recv_exactly(client, 1024) == bytes(512) + payload[:512]
            await client.send(req.pack(W.NBD_REQUEST_MAGIC, 0, W.NBD_CMD_DISC, 4, 0, 0))
            assert await client.recv(16) == b""  # the server ends the connection
            client.close()
    disk = server.disks["d.qcow2"]
    await disk.close()
    raw = qemu_raw(img, tmp_path)
    assert raw[MiB:MiB + len(payload)] == payload
    assert raw[:MiB] == bytes(MiB) and raw[MiB + len(payload):] == bytes(3 * MiB - len(payload))
    qemu_check(img)


def _feed(data: bytes, one_byte: bool) -> list[bytes]:
    if not data:
        return []
    return [data[i:i + 1] for i in range(len(data))] if one_byte else [data]


def _pump(hs: N.ClientHandshake, srv: P.ServerConnection, one_byte: bool) -> None:
    """Run the client codec against the server codec in memory until GO is acknowledged."""
    for _ in range(100):
        for chunk in _feed(srv.data_to_send(), one_byte):
            hs.receive_data(chunk)
        if hs.result is not None:
            return
        for chunk in _feed(hs.data_to_send(), one_byte):
            srv.receive_data(chunk)
            while srv.next_event() is not P.NEED_DATA:
                pass
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("one_byte", [False, True])
def test_handshake_codec_whole_and_byte_by_byte(one_byte: bool) -> None:
    export = W.ExportInfo("disk", 12 * MiB, can_trim=True, description="x" * 300)
    srv = P.ServerConnection({"disk": export})
    hs = N.ClientHandshake("disk")
    _pump(hs, srv, one_byte)
    assert hs.result == N.Negotiated(12 * MiB, export.transmission_flags(False))
    assert srv.export == export and not srv.structured  # the server is in transmission


def test_handshake_refusals() -> None:
    srv = P.ServerConnection({"disk": W.ExportInfo("disk", MiB)})
    hs = N.ClientHandshake("other")
    with pytest.raises(N.HandshakeError, match=r"export 'other' refused: .*reply=0x8"):
        _pump(hs, srv, False)
    with pytest.raises(N.HandshakeError, match="not a newstyle server"):
        N.ClientHandshake("x").receive_data(struct.pack(">QQH", W.NBDMAGIC, 0x420281861253, 0))
    with pytest.raises(N.HandshakeError, match="not fixed-newstyle"):
        N.ClientHandshake("x").receive_data(struct.pack(">QQH", W.NBDMAGIC, W.IHAVEOPT, 0))
    hs = N.ClientHandshake("x")
    hs.receive_data(struct.pack(">QQH", W.NBDMAGIC, W.IHAVEOPT, 1))
    with pytest.raises(N.HandshakeError, match=r"option reply too long \(length=99999\)"):
        hs.receive_data(struct.pack(">QIII", W.NBD_REP_MAGIC, W.NBD_OPT_GO, W.NBD_REP_INFO,
                                    99999))
    hs = N.ClientHandshake("x")
    hs.receive_data(struct.pack(">QQH", W.NBDMAGIC, W.IHAVEOPT, 1))
    with pytest.raises(N.HandshakeError, match="without NBD_INFO_EXPORT"):
        hs.receive_data(struct.pack(">QIII", W.NBD_REP_MAGIC, W.NBD_OPT_GO, W.NBD_REP_ACK, 0))
    with pytest.raises(N.HandshakeError, match="closed the connection"):
        N.ClientHandshake("x").receive_data(b"")


def test_ioctl_numbers_match_the_header() -> None:
    """The ioctl numbers are _IO(0xab, n) as in linux/nbd.h (read from the installed header
    when there is one)."""
    header = Path("/usr/include/linux/nbd.h")
    if not header.exists():
        pytest.skip("no /usr/include/linux/nbd.h (linux-libc-dev)")
    found = dict(re.findall(r"#define\s+(NBD_\w+)\s+_IO\(\s*0xab,\s*(\d+)\s*\)",
                            header.read_text()))
    for name in ("NBD_SET_SOCK", "NBD_SET_BLKSIZE", "NBD_SET_SIZE", "NBD_DO_IT",
                 "NBD_CLEAR_SOCK", "NBD_DISCONNECT", "NBD_SET_FLAGS", "NBD_SET_TIMEOUT"):
        assert getattr(N, name) == (0xAB << 8) | int(found[name]), name


def test_refusal_without_nbd(tmp_path: Path) -> None:
    """Where the kernel has no nbd (this host), --via nbd is one line naming nbd."""
    if os.path.isdir("/sys/module/nbd") and os.path.exists("/dev/nbd0"):
        pytest.skip("this kernel has nbd loaded: nothing to refuse")
    problem = N.nbd_problem()
    assert problem is not None and "nbd" in problem and "\n" not in problem
    base = tmp_path / "b.img"
    base.write_bytes(bytes(MiB))
    p = subprocess.run([*COWD, "attach", str(base), "--via", "nbd", "--run-dir",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr  # the machine lacks something: not a usage error
    assert p.stderr.strip() == f"cowd: --via nbd: {problem}"
    assert not (tmp_path / "run").exists()
    assert N.free_devices() == []
    assert N.clear_stale(99, None) is None  # no such device: nothing to clear


# ---- the guest: the kernel's nbd client ---------------------------------------------------------

BASE_BYTES = 64 * MiB
GUEST_TIMEOUT_S = 900

SCRIPT = r"""
D=/tmp/g; S={shared}; RUN=/run/cowd-nbd
mkdir -p $D && cp $S/base.img $S/ov[1345].qcow2 $S/base.vhd $S/ov2.vhd $D/
{shell}modprobe nbd nbds_max=4; check modprobe $?
t attach
dev=$(timeout 300 cowd attach $D/ov1.qcow2 --via nbd --run-dir $RUN); check attach $? "$dev"
cowd list --run-dir $RUN | grep "$dev" | grep -q nbd; check list_nbd $?
timeout 120 cmp $dev $D/base.img; check read_base $?
t mkfs
timeout 120 mkfs.ext4 -q -E nodiscard $dev 32M; check mkfs $?
mkdir -p $D/mnt && timeout 60 mount $dev $D/mnt; check mount $?
timeout 300 cp -a $S/tree $D/mnt/tree && timeout 120 sync; check copy_tree $?
timeout 120 diff -r $S/tree $D/mnt/tree; check tree_same $?
! timeout 60 cowd detach $dev --run-dir $RUN 2> $S/refused.txt; check detach_refused_mounted $? \
  "$(cat $S/refused.txt)"
timeout 60 umount $D/mnt; check umount $?
timeout 60 dd if=$S/payload of=$dev bs=64k seek=640 oflag=direct status=none && \
  timeout 60 cmp -n 1048576 -i 0:41943040 $S/payload $dev; check write_direct $?
timeout 60 blkdiscard -o 50331648 -l 1048576 $dev && \
  timeout 60 cmp -n 1048576 -i 50331648:0 $dev /dev/zero; check discard_zero $?
t vhd
dev2=$(timeout 300 cowd attach $D/ov2.vhd --via nbd --run-dir $RUN); check attach_vhd $? "$dev2"
[ "$dev2" != "$dev" ]; check second_device $? "$dev2"
timeout 120 cowd detach $dev --run-dir $RUN; check detach $?
[ ! -e /sys/block/${{dev#/dev/}}/pid ]; check released $?
timeout 120 cmp $dev2 $D/base.img; check read_vhd $?
timeout 60 dd if=$S/payload of=$dev2 bs=64k seek=3 oflag=direct status=none && \
  timeout 60 cmp -n 1048576 -i 0:196608 $S/payload $dev2; check write_vhd $?
timeout 120 cowd detach $dev2 --run-dir $RUN; check detach_vhd $?
for i in $(seq 100); do [ -e $RUN/cowd.pid ] && sleep 0.1; done
[ ! -e $RUN/cowd.pid ]; check daemon_exited $?
t kill
dev3=$(timeout 300 cowd attach $D/ov3.qcow2 --via nbd --run-dir $RUN); check attach3 $? "$dev3"
sleep 600 < $dev3 & holder=$!
old=$(cat $RUN/cowd.pid); kill -9 $old; check killed $? "pid=$old"
for i in $(seq 100); do kill -0 $old 2>/dev/null || break; sleep 0.1; done
n3=${{dev3#/dev/}}
echo "after kill: $n3 pid=$(cat /sys/block/$n3/pid 2>/dev/null) size=$(cat /sys/block/$n3/size)"
dev4=$(timeout 300 cowd attach $D/ov4.qcow2 --via nbd --run-dir $RUN 2> $S/attach4.txt)
check attach_after_kill $? "$dev4 (was $dev3) $(tr '\n' ' ' < $S/attach4.txt)"
[ -n "$dev4" ] && [ "$dev4" != "$dev3" ]; check not_reused $? "$dev4"
timeout 60 dd if=$S/payload of=$dev4 bs=64k seek=16 oflag=direct status=none && \
  timeout 60 cmp -n 1048576 -i 0:1048576 $S/payload $dev4 && \
  timeout 60 cmp -n 1048576 $dev4 $D/base.img; check write_after_kill $?
kill $holder; wait $holder 2>/dev/null
for i in $(seq 100); do [ -e /sys/block/$n3/pid ] || break; sleep 0.1; done
[ ! -e /sys/block/$n3/pid ] && [ "$(cat /sys/block/$n3/size)" = 0 ]; check stuck_released $? \
  "pid=$(cat /sys/block/$n3/pid 2>/dev/null) size=$(cat /sys/block/$n3/size)"
timeout 120 cowd detach $dev4 --run-dir $RUN; check detach4 $?
for i in $(seq 100); do [ -e $RUN/cowd.pid ] && sleep 0.1; done
t term
dev5=$(timeout 300 cowd attach $D/ov5.qcow2 --via nbd --run-dir $RUN); check attach5 $? "$dev5"
timeout 60 dd if=$S/payload of=$dev5 bs=64k seek=32 oflag=direct status=none; check write5 $?
pid5=$(cat $RUN/cowd.pid); kill -TERM $pid5; check term_sent $? "pid=$pid5"
for i in $(seq 600); do kill -0 $pid5 2>/dev/null || break; sleep 0.1; done
! kill -0 $pid5 2>/dev/null; check term_exited $?
n5=${{dev5#/dev/}}
for i in $(seq 100); do [ -e /sys/block/$n5/pid ] || break; sleep 0.1; done
[ ! -e /sys/block/$n5/pid ]; check term_released $? "pid=$(cat /sys/block/$n5/pid 2>/dev/null)"
! ls /sys/block/nbd*/pid 2>/dev/null; check none_connected $? "$(ls /sys/block/nbd*/pid 2>&1)"
dmesg > $S/dmesg.txt
! grep -E "WARNING|BUG|Oops|general protection|INFO: task" $S/dmesg.txt; check dmesg_clean $?
cp $D/ov1.qcow2 $D/ov3.qcow2 $D/ov4.qcow2 $D/ov5.qcow2 $D/ov2.vhd $S/ && \
  cp $D/base.img $S/base.after
check copy_back $?
t end
echo GUEST-DONE
"""


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    ver = skip_without_guest("debugfs", "vhdimount")
    if not list((Path("/lib/modules") / ver).rglob("nbd.ko*")):
        pytest.skip(f"kernel {ver} has no nbd module")
    d = tmp_path_factory.mktemp("nbdattach")
    rng = random.Random(7)
    base = d / "base.img"
    sha = patterned_base(base, BASE_BYTES, rng)
    for n in (1, 3, 4, 5):
        subprocess.run([*COWD, "create", "--base", str(base), "-o", str(d / f"ov{n}.qcow2")],
                       check=True, capture_output=True)
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
             str(base), str(d / "base.vhd"))
    subprocess.run([*COWD, "create", "--base", str(d / "base.vhd"), "--overlay", "vhd",
                    "-o", str(d / "ov2.vhd")], check=True, capture_output=True)
    (d / "payload").write_bytes(rng.randbytes(MiB))
    small_tree(d / "tree", rng, dirs=4, files=30)
    res = guest.run(SCRIPT.format(shell=SHELL, shared=d), rwdirs=[str(d)], timeout=GUEST_TIMEOUT_S,
                    memory="1G", log=d / "guest.log")
    return d, parse_checks(res.stdout), sha


GUEST_CHECKS = [
    "modprobe", "attach", "list_nbd", "read_base", "mkfs", "mount", "copy_tree", "tree_same",
    "detach_refused_mounted", "umount", "write_direct", "discard_zero", "attach_vhd",
    "second_device", "detach", "released", "read_vhd", "write_vhd", "detach_vhd",
    "daemon_exited", "attach3", "killed",
    "attach_after_kill", "not_reused", "write_after_kill", "stuck_released", "detach4",
    "attach5", "write5", "term_sent", "term_exited", "term_released", "none_connected",
    "dmesg_clean", "copy_back",
]

@pytest.mark.parametrize("name", GUEST_CHECKS)
@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(GUEST_TIMEOUT_S + 120)
def test_in_guest(guest_run: tuple[Path, dict[str, str], str], name: str) -> None:
    d, checks, _ = guest_run
    tail = "\n".join((d / "guest.log").read_text().splitlines()[-40:])
    assert name in checks, f"the guest never got to {name}; its output ends:\n{tail}"
    assert checks[name].startswith("ok"), f"{name}: {checks[name]}\n{tail}"


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(GUEST_TIMEOUT_S + 120)
def test_devices_were_nbd(guest_run: tuple[Path, dict[str, str], str]) -> None:
    _, checks, _ = guest_run
    for name in ("attach", "attach_vhd", "attach3", "attach_after_kill"):
        assert re.search(r"/dev/nbd\d+", checks[name]), (name, checks[name])
    assert "in use" in checks["detach_refused_mounted"]


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(GUEST_TIMEOUT_S + 120)
def test_overlay_bytes(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """ov1 as qemu reads it: the tree (debugfs), the direct write at 40 MiB, zeroes at 48 MiB,
    the base from 52 MiB on; ov4: the write made after the SIGKILL, the base elsewhere; the
    base file unchanged; every qcow2 checks clean."""
    d, _, sha = guest_run
    base = (d / "base.img").read_bytes()
    payload = (d / "payload").read_bytes()
    ov1 = raw_of(d, "ov1.qcow2")
    assert ov1[40 * MiB:41 * MiB] == payload
    assert ov1[48 * MiB:49 * MiB] == bytes(MiB)
    assert ov1[52 * MiB:] == base[52 * MiB:]
    out = d / "tree-out"
    out.mkdir(exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump /tree {out}", str(d / "ov1.qcow2.raw")],
                   check=True, capture_output=True)
    p = subprocess.run(["diff", "-r", str(d / "tree"), str(out / "tree")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:]
    ov4 = raw_of(d, "ov4.qcow2")
    assert ov4[MiB:2 * MiB] == payload
    assert ov4[:MiB] == base[:MiB] and ov4[2 * MiB:] == base[2 * MiB:]
    for name in ("ov1.qcow2", "ov4.qcow2"):
        qemu_check(d / name)
    # ov3's daemon was killed: its allocations that no flush published may leak (allowed).
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(d / "ov3.qcow2")],
                       capture_output=True, text=True)
    assert p.returncode in (0, 3), p.stdout + p.stderr
    assert raw_of(d, "ov3.qcow2") == base  # nothing was written through it
    assert hashlib.sha256((d / "base.after").read_bytes()).hexdigest() == sha
    assert hashlib.sha256(base).hexdigest() == sha


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(GUEST_TIMEOUT_S + 120)
def test_vhd_bytes(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """The VHD overlay holds the payload at 192 KiB and the base elsewhere (libvhdi), and
    cowd check finds it clean."""
    d, _, _ = guest_run
    base = (d / "base.img").read_bytes()
    payload = (d / "payload").read_bytes()
    ov2 = libvhdi_raw(d / "ov2.vhd", d)
    assert ov2[196608:196608 + MiB] == payload
    assert ov2[:196608] == base[:196608] and ov2[196608 + MiB:] == base[196608 + MiB:]
    p = subprocess.run([*COWD, "check", str(d / "ov2.vhd")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_sigterm_flushes_before_exit(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """A write acknowledged through /dev/nbdN and never flushed by anyone, then SIGTERM to the
    daemon: it disconnects the device, flushes and exits, and the overlay (qemu-img reading
    it) holds the write, with no leak and no corruption."""
    d, checks, _ = guest_run
    assert checks.get("term_exited", "").startswith("ok"), checks.get("term_exited")
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(d / "ov5.qcow2")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    base = (d / "base.img").read_bytes()
    ov5 = raw_of(d, "ov5.qcow2")
    assert ov5[2 * MiB:3 * MiB] == (d / "payload").read_bytes()
    assert ov5[:2 * MiB] == base[:2 * MiB] and ov5[3 * MiB:] == base[3 * MiB:]
