"""The memory-pressure cases the host cannot run, run in one guest boot.

``tests/integration/test_memory_pressure.py``'s ``daemon-too`` case puts cowd's daemon and its
workers into the memory cgroup of the writers whose dirty pages it must write back; only a
daemon with PR_SET_IO_FLUSHER survives that, and setting the flag needs CAP_SYS_RESOURCE,
which the project's host root lacks.  So the case is collected only where root has it, and
this test boots one virtme-ng guest of Debian's kernel (tools/guest.py), where root has every
capability, and runs that same pytest case inside: cgroup v2 with the memory controller, FUSE,
a loop device, fio, qemu-img, and the images on an ext4 file system on a scratch disk (their
page cache must be reclaimable by writeback to a real device: tmpfs pages are not).  The same
boot and the same pytest run also take the ``--via nbd`` cases (``daemon-too`` and
``writers``), which need the kernel's nbd driver that the host lacks: /dev/nbdN served by a
worker whose buffers were made up front, under the same limit.

Oracle: the inner test's own (fio's verify through the device, then ``--verify_only`` of the
overlay as qemu-img converts it, ``qemu-img check``, every cowd process carrying the flag's
task flags, the cgroup having hit its limit; for nbd also the device's queue limits and no
buffer allocated beyond the preallocated ones); here its pytest summary must say that all
three cases passed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from tests.support.guest import SHELL, parse_checks, skip_without_guest
from tools import guest

GUEST_TIMEOUT_S = 1500
SCRATCH_BYTES = 2 << 30  # sparse on the host: ext4 for the test's images

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(GUEST_TIMEOUT_S + 120)]

SCRIPT = r"""
{shell}modprobe fuse 2>/dev/null; modprobe loop 2>/dev/null
modprobe nbd nbds_max=2; check nbd $?
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || \
  echo +memory > /sys/fs/cgroup/cgroup.subtree_control
grep -qw memory /sys/fs/cgroup/cgroup.subtree_control; check memory_cgroup $?
dev=$(guest_disk 1); check scratch_disk $? "$dev"
mkfs.ext4 -q -F "$dev" && mkdir -p /tmp/p && mount "$dev" /tmp/p; check mount $?
# pytest and its plugins from the host's virtualenv (over the guest's root file system), and
# the one part of the standard library the guest's Python leaves out that pytest imports
mkdir -p /tmp/stdlib-extra && ln -sfn {stdlib}/unittest /tmp/stdlib-extra/unittest
export PYTHONPATH="$PYTHONPATH:/tmp/stdlib-extra:{site}"
timeout {inner_s} python3 -m pytest -p no:cacheprovider -q -rA --basetemp=/tmp/p/t \
  tests/integration/test_memory_pressure.py -k "daemon-too or nbd" > {out}/pytest.txt 2>&1
check pytest $? "$(tail -1 {out}/pytest.txt)"
umount /tmp/p; check umount $?
"""


def test_daemon_in_the_limited_cgroup_in_a_guest(tmp_path: Path) -> None:
    skip_without_guest("fio")
    scratch = tmp_path / "scratch.img"
    with open(scratch, "wb") as f:
        f.truncate(SCRATCH_BYTES)
    [site] = guest._site_dirs()
    script = SCRIPT.format(shell=SHELL, site=site, stdlib=sysconfig.get_paths()["stdlib"],
                           out=tmp_path, inner_s=GUEST_TIMEOUT_S - 300)
    res = guest.run(script, rwdirs=[str(tmp_path)], disks=[scratch],
                    timeout=GUEST_TIMEOUT_S, memory="1G", log=tmp_path / "guest.log")
    checks = parse_checks(res.stdout)
    report = (tmp_path / "pytest.txt").read_text(errors="replace") \
        if (tmp_path / "pytest.txt").exists() else "(no pytest output)"
    tail = "\n".join(res.stdout.splitlines()[-30:])
    for name in ("nbd", "memory_cgroup", "scratch_disk", "mount", "pytest", "umount"):
        assert checks.get(name, "").startswith("ok"), f"{name}: {checks.get(name)}\n{tail}\n" \
            f"{report[-4000:]}"
    for case in ("fuse-daemon-too", "nbd-daemon-too", "nbd-writers"):
        assert "PASSED tests/integration/test_memory_pressure.py::" \
               f"test_fio_verify_through_the_device_under_a_memory_limit[{case}]" \
               in report, report[-4000:]
    assert "3 passed" in report.splitlines()[-1], report[-4000:]
    for line in report.splitlines():
        if "memory pressure (" in line:
            print(line)
