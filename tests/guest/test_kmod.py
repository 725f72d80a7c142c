"""The kernel shim (kmod/) in a guest: one boot of Debian's kernel under virtme-ng (TCG),
several checks inside, the results verified on the host with real peers (issue 5).

The host kernel cannot load modules, so :mod:`tools.guest` boots the kernel whose headers the
module was built against, with the host's filesystem as the guest's root.  The images are made
here, copied into the guest's RAM, served there through ``cowd attach --via kmod``, and copied
back; then qemu-img checks them, qemu-img convert reads them, debugfs reads the file tree out
of the overlay, and the base's sha256 is compared with the one taken before.

In the guest: ``cowd attach --via kmod`` loads the module (insmod of kmod/cowd.ko) and attaches
a qcow2 overlay of a raw base (patterned data); compare every
byte of /dev/cowdN with the base (mapped reads, after priming no round trip to the daemon);
mkfs.ext4, mount, copy a tree, sync, compare, umount; detach; fio with verify (random 4 KiB
writes at QD32, each a first write: the copy-on-write path, done in the kernel from the
daemon's allocation pool) on a second overlay, plus discard and write-zeroes; a differencing
VHD over a VHD base, served by a daemon that speaks the version-1 ABI (an old daemon: no
pool); SIGKILL the daemon under a writer that fsyncs each record (its first writes allocated
from the pool), a new daemon takes the device over, the writer finishes; a 16-entry table
whose 4-cluster pool runs dry under fio verify (refills and write misses) and a whole-disk
read through evictions; rmmod; no WARN or BUG in dmesg.

Boot-trace recording in the kernel (COWD_FEAT_TOUCH): an overlay of a base of its own is
read with O_DIRECT at known granules in a known order (mapped reads: the daemon answers no
miss), detached, and the trace it leaves beside the base decodes to those granules in that
order; a second overlay of the base loads that trace and prefetches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cowd.disk import boottrace
from tests.support.guest import (
    SHELL,
    parse_checks,
    patterned_base,
    raw_of,
    skip_without_guest,
    small_tree,
)
from tests.support.peers import libvhdi_raw, qemu_img
from tools import guest

MiB = 1 << 20
BASE_BYTES = 64 * MiB
RECORD = 64 << 10  # the SIGKILL writer's record size
RECORDS = 200
PAUSE_AT = 40  # the record whose fsync waits for the SIGKILL
GUEST_TIMEOUT_S = 1500
SMALL_TABLE = 16  # ov5's kernel remap table bound (clusters): 1 MiB of a 64 MiB disk
DEAD_S = 3  # ov5's daemon timeout: its misses fail this long after its daemon dies
# patterned_base writes 1 MiB of data every 4 MiB and leaves holes between: the holes are
# ZERO remaps (no file read, nothing to trace), so reading all of ov1 traces these granules.
DATA_GRANULES = BASE_BYTES // (4 * MiB) * (MiB // (64 << 10))
# Boot-trace recording: tbase.img (random data throughout: no holes), read through tov1.qcow2
# at these 64 KiB granules
# ("granule:count", in this order; 120 twice: recorded once), then 4 KiB inside granule 150
# and granule 199.  Outside PROBED (the first and last 2 MiB, where the partition scan and
# udev's blkid probes read) the trace must be exactly TRACE_ORDER.
TRACE_BASE_BYTES = 16 * MiB
TRACE_GRANULE = 64 << 10
TRACE_READS = "37:1 120:1 100:2 40:1 64:1 120:1"
TRACE_ORDER = [37, 120, 100, 101, 40, 64, 150, 199]
PROBED = 2 * MiB // TRACE_GRANULE

SCRIPT = r"""
D=/tmp/g; S={shared}; RUN=/run/cowd-test
# cowd attach waits 50 s for the daemon it starts; under TCG on a loaded host a Python start
# (the daemon's, then its workers') can take longer: a second attach waits for the same one.
att() {{ timeout 600 cowd attach "$@" || {{ sleep 5; timeout 600 cowd attach "$@"; }}; }}
mkdir -p $D && cp $S/base.img $S/ov[123567].qcow2 $S/base.vhd $S/ov4.vhd $S/tbase.img \
  $S/tov[12].qcow2 $D/
{shell}! grep -q "^cowd " /proc/modules; check not_loaded $?
t attach
dev=$(att $D/ov1.qcow2 --via kmod --run-dir $RUN); check attach $? "$dev"
grep -q "^cowd " /proc/modules; check attach_loaded_module $?
timeout 120 cmp $dev $D/base.img; check read_base $?
cowd stats --run-dir $RUN --json > $S/stats-read.json; check stats $?
t mkfs
timeout 120 mkfs.ext4 -q -E nodiscard $dev; check mkfs $?
mkdir -p $D/mnt && timeout 60 mount $dev $D/mnt; check mount $?
timeout 300 cp -a $S/tree $D/mnt/tree && timeout 120 sync; check copy_tree $?
timeout 120 diff -r $S/tree $D/mnt/tree; check tree_same $?
timeout 60 umount $D/mnt; check umount $?
timeout 120 cowd detach $dev --run-dir $RUN; check detach $?
t fio
dev2=$(att $D/ov2.qcow2 --via kmod --run-dir $RUN); check attach2 $? "$dev2"
timeout 300 fio --name=verify --filename=$dev2 --rw=randwrite --bs=4k --iodepth=32 \
  --ioengine=libaio --direct=1 --size=16M --offset=8M --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --randrepeat=1 --output=$S/fio.txt >/dev/null; check fio_verify $?
cowd stats --run-dir $RUN --json > $S/stats-fio.json
timeout 60 blkdiscard -o 0 -l 1048576 $dev2 && \
  timeout 60 cmp -n 1048576 $dev2 /dev/zero; check discard_zero $?
timeout 60 blkdiscard -z -o 2097152 -l 1048576 $dev2 && \
  timeout 60 cmp -n 1048576 -i 2097152:0 $dev2 /dev/zero; check write_zeroes $?
timeout 60 cmp -n 1048576 -i 4194304:4194304 $dev2 $D/base.img; check untouched_base_range $?
dev6=$(att $D/ov6.qcow2 --via kmod --run-dir $RUN --kmod-pool 4)
check attach_small_pool $? "$dev6"
timeout 300 fio --name=dry --filename=$dev6 --rw=randwrite --bs=4k --iodepth=32 \
  --ioengine=libaio --direct=1 --size=4M --offset=32M --verify=crc32c --do_verify=1 \
  --verify_fatal=1 --randrepeat=1 --output=$S/fio-dry.txt >/dev/null; check pool_dry_fio $?
cowd stats --run-dir $RUN --json > $S/stats-dry.json
timeout 120 cowd detach $dev6 --run-dir $RUN; check detach6 $?
t trace
dev8=$(att $D/tov1.qcow2 --via kmod --run-dir $RUN); check attach_trace $? "$dev8"
command -v udevadm >/dev/null && timeout 60 udevadm settle
rc=0
for r in {trace_reads}; do
  timeout 60 dd if=$dev8 of=/dev/null bs=64k skip=${{r%:*}} count=${{r#*:}} iflag=direct \
    status=none || rc=1
done
timeout 60 dd if=$dev8 of=/dev/null bs=4k skip=$((150 * 16 + 3)) count=1 iflag=direct \
  status=none || rc=1
timeout 60 dd if=$dev8 of=/dev/null bs=64k skip=199 count=1 iflag=direct status=none || rc=1
check trace_reads $rc
cowd stats --run-dir $RUN --json > $S/stats-trace1.json; check trace_stats $?
timeout 120 cowd detach $dev8 --run-dir $RUN; check detach_trace $?
cp $D/tbase.img.cowd-trace $S/; check trace_written $?
dev9=$(att $D/tov2.qcow2 --via kmod --run-dir $RUN); check attach_traced $? "$dev9"
for i in $(seq 150); do  # the prefetch runs beside the attach: wait for it to finish
  cowd stats --run-dir $RUN --json > $S/stats-trace2.json
  python3 -c 'import json, sys
sys.exit(json.load(open(sys.argv[1]))["disks"]["tov2.qcow2"]["boot_trace"]["prefetch"] != "done")' \
    $S/stats-trace2.json && break
  sleep 0.2
done
python3 -c 'import json, sys
sys.exit(json.load(open(sys.argv[1]))["disks"]["tov2.qcow2"]["boot_trace"]["prefetch"] != "done")' \
  $S/stats-trace2.json; check trace_prefetched $?
timeout 120 cowd detach $dev9 --run-dir $RUN; check detach_traced $?
timeout 120 cowd detach $dev2 --run-dir $RUN; check detach2 $?
t vhd
for i in $(seq 50); do [ -e $RUN/cowd.pid ] && sleep 0.2; done
dev4=$(COWD_KMOD_ABI=1 att $D/ov4.vhd --via kmod --run-dir $RUN)
check attach_vhd $? "$dev4"
timeout 120 cmp $dev4 $D/base.img; check read_vhd $?
timeout 60 dd if=$S/payload of=$dev4 bs=64k seek=3 oflag=direct status=none && \
  timeout 60 cmp -n 1048576 -i 0:196608 $S/payload $dev4; check write_vhd $?
cowd stats --run-dir $RUN --json > $S/stats-v1.json
timeout 120 cowd detach $dev4 --run-dir $RUN; check detach_vhd $?
t kill
for i in $(seq 50); do [ -e $RUN/cowd.pid ] && sleep 0.2; done
dev3=$(att $D/ov3.qcow2 --via kmod --run-dir $RUN); check attach3 $? "$dev3"
python3 {writer} $dev3 {records} {record} $S/acked.txt {pause_at} $S/paused $S/go \
  > $S/writer.txt 2>&1 &
wpid=$!
while kill -0 $wpid 2>/dev/null && [ ! -e $S/paused ]; do sleep 0.2; done
cowd stats --run-dir $RUN --json > $S/stats-prekill.json
old=$(cat $RUN/cowd.pid); kill -9 $old; check killed $? "pid=$old acked=$(wc -l < $S/acked.txt)"
sleep 1; touch $S/go
(timeout 900 cowd daemon --run-dir $RUN > $S/daemon2.txt 2>&1 &)
timeout 900 tail --pid=$wpid -f /dev/null; wait $wpid; check writer $? "$(tail -1 $S/writer.txt)"
for i in $(seq 600); do  # the new daemon took the device over before it answers
  cowd status --run-dir $RUN >/dev/null 2>&1 && break; sleep 0.2
done
cowd stats --run-dir $RUN --json > $S/stats-takeover.json
timeout 120 cowd detach $dev3 --run-dir $RUN; check detach3 $?
t evict
for i in $(seq 50); do [ -e $RUN/cowd.pid ] && sleep 0.2; done
dev5=$(att $D/ov5.qcow2 --via kmod --run-dir $RUN --kmod-entries {entries} \
  --kmod-timeout {dead_s}); check attach_small_table $? "$dev5"
timeout 300 cmp $dev5 $D/base.img; check read_evicting $?
timeout 60 dd if=$S/payload of=$dev5 bs=64k seek=128 oflag=direct conv=fsync status=none && \
  timeout 60 cmp -n 1048576 -i 0:8388608 $S/payload $dev5; check write_evicting $?
cowd stats --run-dir $RUN --json > $S/stats-evict.json
t dead
old=$(cat $RUN/cowd.pid); kill -9 $old; check killed5 $? "pid=$old"
t0=$(date +%s.%N)
timeout 120 dd if=$dev5 of=/dev/null bs=64k skip=900 count=16 iflag=direct status=none \
  2> $S/eio.txt; rc=$?
t1=$(date +%s.%N)
[ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q "Input/output error" $S/eio.txt
check eio_after_timeout $? "rc=$rc after=$(awk "BEGIN {{ print $t1 - $t0 }}") $(head -1 $S/eio.txt)"
(timeout 900 cowd daemon --run-dir $RUN > $S/daemon3.txt 2>&1 &)
# `cowd status` exits 0 only once a daemon answers, and the new one answers after its takeover
# (`cowd list` would show the dead daemon's device at once).
for i in $(seq 600); do
  cowd status --run-dir $RUN >/dev/null 2>&1 && break; sleep 0.2
done
timeout 120 cmp -n 1048576 -i 0:8388608 $S/payload $dev5 && \
  timeout 120 cmp -n 8388608 $dev5 $D/base.img && \
  timeout 120 cmp -i 9437184:9437184 $dev5 $D/base.img; check served_again $?
timeout 120 cowd detach $dev5 --run-dir $RUN; check detach5 $?
t rmmod
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e $RUN/cowd.pid ] && sleep 1; done
rmmod cowd; check rmmod $?
t dkms
# The README's setup for a kernel that loads modules: DKMS builds and installs the module for
# the running kernel (into the guest's writable /usr, /var and /lib), modprobe finds it there.
if command -v dkms >/dev/null; then
  timeout 1200 make -s -C kmod dkms-install KVER=$(uname -r) > $S/dkms.txt 2>&1
  check dkms_install $? "$(tail -1 $S/dkms.txt)"
  timeout 60 modprobe cowd && [ -e /dev/cowd-ctl ]; check dkms_modprobe $? "$(modinfo -n cowd)"
  case "$(modinfo -n cowd)" in */updates/dkms/cowd.ko*) true;; *) false;; esac
  check dkms_module_path $?
  dev7=$(att $D/ov7.qcow2 --via kmod --run-dir $RUN); check attach_dkms $? "$dev7"
  timeout 120 cmp $dev7 $D/base.img; check read_dkms $?
  timeout 120 cowd detach $dev7 --run-dir $RUN; check detach_dkms $?
  for i in 1 2 3 4 5 6 7 8 9 10; do [ -e $RUN/cowd.pid ] && sleep 1; done
  rmmod cowd; check rmmod_dkms $?
else
  echo "CHECK dkms_install fail dkms is not installed (it is in packages.txt)"
fi
dmesg > $S/dmesg.txt
! grep -E "WARNING|BUG|Oops|general protection|INFO: task" $S/dmesg.txt
check dmesg_clean $?
cp $D/ov[12356].qcow2 $D/ov4.vhd $S/ && cp $D/base.img $S/base.after
check copy_back $?
t end
echo GUEST-DONE
"""

WRITER = r'''
"""Write RECORDS records of RECORD bytes, each fsynced, to the device; log each acknowledged
one.  Each record is its index repeated, so any stale or torn record shows.  Record PAUSE_AT
is written, then the writer waits (PAUSED exists) until GO exists before its fsync: the
daemon is killed there, with the kernel's allocation of that record reported to it and not
flushed."""
import mmap, os, sys, time
dev, n, size, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pause_at, paused, go = int(sys.argv[5]), sys.argv[6], sys.argv[7]
fd = os.open(dev, os.O_WRONLY)
direct = os.open(dev, os.O_WRONLY | os.O_DIRECT)  # the paused record reaches the device
buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT wants
failed_flushes = 0
with open(log, "a") as acked:
    for i in range(n):
        for attempt in range(3):
            rec = i.to_bytes(8, "little") * (size // 8)
            if i == pause_at and attempt == 0:
                buf[:] = rec
                os.pwrite(direct, buf, i * size)
                open(paused, "w").close()
                while not os.path.exists(go):
                    time.sleep(0.05)
            else:
                os.pwrite(fd, rec, i * size)
            try:
                os.fsync(fd)
                break
            except OSError as e:  # the flush after a takeover may report lost writes
                failed_flushes += 1
                print(f"record {i}: fsync failed ({e}); writing it again", flush=True)
                # records before i were acknowledged by earlier flushes; i is rewritten
        else:
            raise SystemExit(f"record {i}: fsync kept failing")
        acked.write(f"{i}\n")
        acked.flush()
print(f"wrote {n} records, {failed_flushes} failed flushes")
'''


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    skip_without_guest("make", "modinfo", "fio", "debugfs")
    guest.build_module()
    d = tmp_path_factory.mktemp("kmod")
    rng = random.Random(5)
    base = d / "base.img"
    sha = patterned_base(base, BASE_BYTES, rng)
    subprocess.run([sys.executable, "-m", "cowd.cli", "create", "--base", str(base),
                    "-o", str(d / "ov1.qcow2")], check=True, capture_output=True)
    for n in (2, 3, 5, 6, 7):
        shutil.copy(d / "ov1.qcow2", d / f"ov{n}.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on",
             str(base), str(d / "base.vhd"))  # force_size: no rounding to a CHS geometry
    subprocess.run([sys.executable, "-m", "cowd.cli", "create", "--base", str(d / "base.vhd"),
                    "--overlay", "vhd", "-o", str(d / "ov4.vhd")], check=True,
                   capture_output=True)
    (d / "payload").write_bytes(rng.randbytes(MiB))
    small_tree(d / "tree", rng, dirs=8, files=40)
    (d / "writer.py").write_text(WRITER)
    (d / "tbase.img").write_bytes(random.Random(8).randbytes(TRACE_BASE_BYTES))
    subprocess.run([sys.executable, "-m", "cowd.cli", "create", "--base", str(d / "tbase.img"),
                    "-o", str(d / "tov1.qcow2")], check=True, capture_output=True)
    shutil.copy(d / "tov1.qcow2", d / "tov2.qcow2")
    script = SCRIPT.format(shell=SHELL, shared=d, writer=d / "writer.py", records=RECORDS,
                           record=RECORD, pause_at=PAUSE_AT,
                           entries=SMALL_TABLE, dead_s=DEAD_S, trace_reads=TRACE_READS)
    res = guest.run(script, rwdirs=[str(d)], timeout=GUEST_TIMEOUT_S, memory="1G",
                    log=d / "guest.log")
    return d, parse_checks(res.stdout), sha


GUEST_CHECKS = [
    "not_loaded", "attach", "attach_loaded_module", "read_base", "stats", "mkfs", "mount",
    "copy_tree", "tree_same", "umount", "detach", "attach2", "fio_verify", "discard_zero",
    "write_zeroes", "untouched_base_range", "attach_small_pool", "pool_dry_fio", "detach6",
    "attach_trace", "trace_reads", "trace_stats", "detach_trace", "trace_written",
    "attach_traced", "trace_prefetched", "detach_traced", "detach2", "attach_vhd",
    "read_vhd", "write_vhd", "detach_vhd", "attach3", "killed",
    "writer", "detach3", "attach_small_table", "read_evicting", "write_evicting", "killed5",
    "eio_after_timeout", "served_again", "detach5", "rmmod", "dkms_install", "dkms_modprobe",
    "dkms_module_path", "attach_dkms", "read_dkms", "detach_dkms", "rmmod_dkms",
    "dmesg_clean", "copy_back",
]


pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(GUEST_TIMEOUT_S + 120)]


@pytest.mark.parametrize("name", GUEST_CHECKS)
def test_in_guest(guest_run: tuple[Path, dict[str, str], str], name: str) -> None:
    d, checks, _ = guest_run
    tail = "\n".join((d / "guest.log").read_text().splitlines()[-40:])
    assert name in checks, f"the guest never got to {name}; its output ends:\n{tail}"
    assert checks[name].startswith("ok"), f"{name}: {checks[name]}\n{tail}"


def test_devices_were_kmod(guest_run: tuple[Path, dict[str, str], str]) -> None:
    _, checks, _ = guest_run
    for name in ("attach", "attach2", "attach3", "attach_vhd", "attach_small_table"):
        assert re.search(r"/dev/cowd\d+$", checks[name]), (name, checks[name])


def test_primed_reads_stay_in_the_kernel(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """After priming, reading the whole disk made no round trip to the daemon."""
    d, _, _ = guest_run
    stats = json.loads((d / "stats-read.json").read_text())
    (disk,) = [v for v in stats["disks"].values() if v.get("frontend") == "kmod"]
    k = disk["kmod"]["kernel"]
    assert disk["kmod"]["primed_entries"] >= BASE_BYTES // (64 << 10)
    assert k["mapped_read_bytes"] >= BASE_BYTES
    assert k["misses"] == 0, k
    assert k["hits"] >= BASE_BYTES // (64 << 10)
    # ... and yet the boot trace saw every granule of the base's data read: the kernel
    # reported each one's first read (COWD_FEAT_TOUCH), once.
    touch, trace = disk["kmod"]["touch"], disk["boot_trace"]
    assert touch["state"] == "recording", touch
    assert trace["base_granules_read"] == DATA_GRANULES, trace
    assert touch["records"] == DATA_GRANULES and touch["deferred"] == 0, touch


def _kmod_stats(d: Path, name: str, image: str) -> dict[str, Any]:
    """The kmod figures of ``image`` in the saved ``cowd stats --json`` output ``name``."""
    stats = json.loads((d / name).read_text())
    return dict(stats["disks"][image]["kmod"])


def test_first_writes_allocated_in_the_kernel(
        guest_run: tuple[Path, dict[str, str], str]) -> None:
    """fio's 4096 random first writes over 16 MiB (256 clusters): every cluster was taken
    from the pool, copied up and written in the kernel, with no write miss; the daemon
    adopted every ALLOC and acknowledged it; one pool grant at attach covered them all."""
    d, _, _ = guest_run
    k = _kmod_stats(d, "stats-fio.json", "ov2.qcow2")
    kernel, pool = k["kernel"], k["pool"]
    assert k["abi"] == 2 and pool["on"], pool
    assert kernel["pool_allocs"] == 256, kernel
    assert k["ops"]["write_misses"] == 0, k["ops"]
    assert pool["adopted"] == 256 and pool["adopt_failed"] is None, pool
    assert kernel["unacked"] == 0 and kernel["pool_grants"] == pool["refills"] == 1, kernel


def test_an_old_daemon_keeps_the_old_abi(
        guest_run: tuple[Path, dict[str, str], str]) -> None:
    """COWD_KMOD_ABI=1: the daemon spoke version 1 to the version-2 module (the VHD checks
    above passed through it); the kernel granted nothing and reported nothing."""
    d, _, _ = guest_run
    k = _kmod_stats(d, "stats-v1.json", "ov4.vhd")
    assert k["abi"] == 1 and not k["pool"]["on"], k["pool"]
    assert k["kernel"]["pool_grants"] == 0 == k["kernel"]["pool_allocs"]
    assert k["ops"]["write_misses"] > 0
    # nor recorded anything: a version-1 channel has no TOUCH
    assert k["touch"]["state"] == "off: the channel speaks ABI 1", k["touch"]
    assert k["touch"]["records"] == 0


def test_pool_ran_dry_and_the_disk_went_on(
        guest_run: tuple[Path, dict[str, str], str]) -> None:
    """ov6's pool is 4 clusters (--kmod-pool 4): fio's first writes over 64 clusters ran it
    dry again and again; writes then missed (the daemon allocated them), the pool grew and
    was refilled, and fio's verify passed (checked in the guest); the overlay reads as the
    base outside what fio wrote and checks clean (no leak: the unused pool was given back)."""
    d, _, _ = guest_run
    k = _kmod_stats(d, "stats-dry.json", "ov6.qcow2")
    kernel, pool = k["kernel"], k["pool"]
    # It started at 4 and may have grown (each write miss doubles it, up to 4 times that).
    assert 4 <= pool["target_clusters"] <= 16, pool
    assert kernel["pool_allocs"] > 0 and pool["refills"] > 1, (kernel, pool)
    assert kernel["pool_fallbacks"] > 0 and k["ops"]["write_misses"] > 0, (kernel, k["ops"])
    ov6 = raw_of(d, "ov6.qcow2")
    base = (d / "base.img").read_bytes()
    assert ov6[:32 * MiB] == base[:32 * MiB] and ov6[36 * MiB:] == base[36 * MiB:]


def test_base_unchanged(guest_run: tuple[Path, dict[str, str], str]) -> None:
    d, _, sha = guest_run
    assert hashlib.sha256((d / "base.after").read_bytes()).hexdigest() == sha
    assert hashlib.sha256((d / "base.img").read_bytes()).hexdigest() == sha


@pytest.mark.parametrize("name", ["ov1.qcow2", "ov2.qcow2", "ov3.qcow2", "ov4.vhd",
                                  "ov5.qcow2", "ov6.qcow2"])
def test_overlays_check_clean(guest_run: tuple[Path, dict[str, str], str], name: str) -> None:
    d, _, _ = guest_run
    if name.endswith(".vhd"):  # qemu-img cannot check VHDs; the peer reading is libvhdi's
        cmd = [sys.executable, "-m", "cowd.cli", "check", str(d / name)]
    else:
        cmd = ["qemu-img", "check", "-f", "qcow2", str(d / name)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if name in ("ov3.qcow2", "ov5.qcow2") and p.returncode == 3:
        # The killed daemon's allocations that no flush published are leaks: allowed, and
        # cowd check --repair frees them.
        subprocess.run([sys.executable, "-m", "cowd.cli", "check", "--repair", str(d / name)],
                       capture_output=True, check=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_tree_in_overlay(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """The tree written through /dev/cowdN is in the qcow2 overlay, as qemu reads it."""
    d, _, _ = guest_run
    raw_of(d, "ov1.qcow2")
    out = d / "tree-out"
    out.mkdir(exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump /tree {out}", str(d / "ov1.qcow2.raw")],
                   check=True, capture_output=True)
    p = subprocess.run(["diff", "-r", str(d / "tree"), str(out / "tree")], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout[-2000:]


def test_acknowledged_records_survive_sigkill(
        guest_run: tuple[Path, dict[str, str], str]) -> None:
    """Every record the writer saw fsynced (before, during and after the daemon was killed
    and a new one took the device over) reads back from the overlay, whole.  A flush that
    cannot vouch for writes completed before the kill (their new clusters' metadata died with
    the daemon) must fail rather than succeed: the writer rewrites that record."""
    d, checks, _ = guest_run
    acked = [int(x) for x in (d / "acked.txt").read_text().split()]
    assert acked == list(range(RECORDS)), "the writer did not finish every record"
    assert "acked=" in checks["killed"]
    raw = raw_of(d, "ov3.qcow2")
    for i in acked:
        rec = raw[i * RECORD:(i + 1) * RECORD]
        assert rec == i.to_bytes(8, "little") * (RECORD // 8), f"record {i} lost or torn"
    after = _kmod_stats(d, "stats-takeover.json", "ov3.qcow2")
    assert after["kernel"]["takeovers"] == 1
    assert after["touch"]["state"] == "recording", after["touch"]  # asked for at REOPEN
    # The records up to the kill were first writes allocated in the kernel, the last one
    # reported and not flushed: its fsync failed after the takeover and it was written again.
    before = _kmod_stats(d, "stats-prekill.json", "ov3.qcow2")
    assert before["kernel"]["pool_allocs"] >= PAUSE_AT + 1 and before["pool"]["on"], before
    assert before["kernel"]["alloc_msgs"] >= PAUSE_AT + 1, before
    assert re.search(r"record 40: fsync failed", (d / "writer.txt").read_text())


def test_small_table_evicts_and_stays_correct(
        guest_run: tuple[Path, dict[str, str], str]) -> None:
    """A disk with more clusters than its kernel table holds: the whole-disk read (compared
    with the base in the guest) went through misses and evictions, the table never grew past
    its bound, and the overlay holds the payload written through it (qemu-img reading)."""
    d, _, _ = guest_run
    km = _kmod_stats(d, "stats-evict.json", "ov5.qcow2")
    k = km["kernel"]
    assert k["max_entries"] == SMALL_TABLE, k
    assert k["entries"] <= SMALL_TABLE, k
    assert km["primed_entries"] <= SMALL_TABLE
    clusters = BASE_BYTES // (64 << 10)
    assert k["misses"] >= (clusters - SMALL_TABLE) // 16, k  # read-ahead: 16 clusters a miss
    assert k["expiries"] >= clusters - 2 * SMALL_TABLE, k
    ov5 = raw_of(d, "ov5.qcow2")
    base = (d / "base.img").read_bytes()
    assert ov5[8 * MiB:9 * MiB] == (d / "payload").read_bytes()
    assert ov5[:8 * MiB] == base[:8 * MiB] and ov5[9 * MiB:] == base[9 * MiB:]


def test_dead_daemon_fails_misses_after_its_timeout(
        guest_run: tuple[Path, dict[str, str], str]) -> None:
    """With its daemon killed, a read that misses the table failed with EIO once the
    device's timeout passed (not at once, not never); a new daemon then took the device over
    and served it again (checked in the guest: served_again)."""
    _, checks, _ = guest_run
    m = re.search(r"after=([\d.]+)", checks["eio_after_timeout"])
    assert m, checks["eio_after_timeout"]
    assert DEAD_S - 1.5 <= float(m.group(1)) <= DEAD_S + 30, checks["eio_after_timeout"]


def test_fio_and_vhd_data(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """Outside what fio wrote and discarded, ov2 reads as the base (qemu-img); the VHD overlay
    holds the payload at 192 KiB and the base elsewhere (libvhdi)."""
    d, _, _ = guest_run
    base = (d / "base.img").read_bytes()
    ov2 = raw_of(d, "ov2.qcow2")
    assert ov2[:MiB] == bytes(MiB)
    assert ov2[2 * MiB:3 * MiB] == bytes(MiB)
    assert ov2[4 * MiB:8 * MiB] == base[4 * MiB:8 * MiB]
    assert ov2[24 * MiB:] == base[24 * MiB:]
    ov4 = libvhdi_raw(d / "ov4.vhd", d)  # qemu reads a differencing VHD without its parent
    payload = (d / "payload").read_bytes()
    assert ov4[196608:196608 + MiB] == payload
    assert ov4[:196608] == base[:196608]
    assert ov4[196608 + MiB:] == base[196608 + MiB:]


def test_guest_tool_finds_kernel() -> None:
    ver, vmlinuz = guest.kernel()
    assert os.path.exists(vmlinuz) and ver in vmlinuz


def test_kmod_reads_make_the_boot_trace(guest_run: tuple[Path, dict[str, str], str]) -> None:
    """The granules read through /dev/cowdN (mapped reads: no miss, no daemon read of the
    base) are the trace left beside the base, in first-touch order, each once; `cowd stats`
    showed them recorded before the detach; a second overlay of the base loaded the trace
    (its identity matched the base in the guest) and prefetched every traced granule."""
    d, _, _ = guest_run
    granule, order = boottrace.decode((d / "tbase.img.cowd-trace").read_bytes(), None)
    assert granule == TRACE_GRANULE
    last = TRACE_BASE_BYTES // TRACE_GRANULE
    probed = [g for g in order if g < PROBED or g >= last - PROBED]
    assert [g for g in order if g not in probed] == TRACE_ORDER, order
    assert len(order) == len(set(order))
    first = json.loads((d / "stats-trace1.json").read_text())["disks"]["tov1.qcow2"]
    k = first["kmod"]
    assert k["kernel"]["misses"] == 0 and k["ops"]["data_replies"] == 0, k
    assert k["touch"]["state"] == "recording" and k["touch"]["records"] == len(order), k
    assert first["boot_trace"]["base_granules_read"] == len(order), first["boot_trace"]
    second = json.loads((d / "stats-trace2.json").read_text())["disks"]["tov2.qcow2"]
    bt = second["boot_trace"]
    assert bt["state"] == "loaded" and bt["entries"] == len(order), bt
    assert bt["prefetch"] == "done" and bt["prefetched"] >= len(TRACE_ORDER), bt
    assert second["kmod"]["touch"]["state"] == "recording", second["kmod"]
