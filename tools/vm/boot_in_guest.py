"""Boot a VM from /dev/cowdN: the kernel shim's path, which only exists inside a guest (the
host kernel loads no modules).  Not a test: a nested TCG boot takes ~8-10 minutes.

Layer: tools.  tools/guest.py starts a virtme-ng guest (Debian's kernel, TCG); in it this
script insmods kmod/cowd.ko, makes a qcow2 overlay of tools/mkbase's base in the guest's RAM
and runs ``tools/vm-boot OVERLAY --via kmod`` there: ``cowd attach --via kmod`` gives
/dev/cowdN, and a qemu inside the guest (TCG inside TCG) boots from it.  Back on the host, the
overlay is checked like the tests check the other paths: ``qemu-img check`` clean, the base's
sha256 unchanged, e2fsck -fn clean, and the blob and machine id the inner guest printed are
in the overlay (qemu-img convert -O raw + debugfs).

    .venv/bin/python -m tools.vm.boot_in_guest [--keep DIR]
    .venv/bin/python -m tools.vm.boot_in_guest --bench-trace 2   # boot-trace priming on kmod

``--bench-trace REPS`` runs the boot benchmark's boot-trace measurement through /dev/cowdN in
the guest (``python -m tools.bench boot --trace --paths raw,kmod-off,kmod-trace``): one
recording boot through the shim (the module records the guest's mapped reads), then per
repetition a boot from a raw copy, one of a fresh overlay with ``--no-boot-trace`` and one of
a fresh overlay that loads the trace, the guest's page cache dropped before each.  The base
lives on an ext4 file system of its own on a virtio-blk disk of the guest (a host file), so
that a dropped page cache means reads through a disk (in the guest's RAM it would mean none).
The table and JSON land in --out (default results/bench-boot-kmod.json).

Measured 2026-11-24 on the project machine (load 6-8): 483 s and 653 s in two runs from
starting the inner qemu to its marker (an ~8-20 s boot on the host: nested TCG costs ~30-60x);
each run ~11-14 minutes in all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools import guest
from tools.vm import boot, image

GUEST_TIMEOUT_S = 1800
INNER_DEADLINE_S = 1200
BENCH_DISK_BYTES = 1 << 30  # the guest's disk for --bench-trace: the base and its overlays

SCRIPT = r"""
D=/tmp/g; S={shared}; ROOT={root}
mkdir -p $D && cp $S/base.img $S/initramfs.img $D/
insmod $ROOT/kmod/cowd.ko; echo "CHECK insmod rc=$?"
cowd create --base $D/base.img --overlay qcow -o $D/vm.qcow2 >/dev/null; echo "CHECK create rc=$?"
COWD=$(command -v cowd) PYTHONPATH=$ROOT timeout {timeout} python3 -m tools.vm.vmboot \
    $D/vm.qcow2 --via kmod \
    --deadline {deadline} --run-dir /run/cowd-vm-boot --console-dir $S/console --json \
    >$S/result.json; echo "CHECK vm-boot rc=$?"
sha256sum $D/base.img | cut -d' ' -f1 >$S/base.sha256.after
cp $D/vm.qcow2 $S/vm.qcow2; echo "CHECK copy rc=$?"
"""


BENCH_SCRIPT = r"""
S={shared}; ROOT={root}; M=/tmp/cowd-bench
insmod $ROOT/kmod/cowd.ko; echo "CHECK insmod rc=$?"
mkdir -p $M && mount $(guest_disk 1) $M; echo "CHECK mount rc=$?"
mkdir -p $M/tmp && export COWD=$(command -v cowd) TMPDIR=$M/tmp PYTHONPATH=$ROOT
timeout {timeout} python3 -m tools.bench boot \
    --trace --paths raw,kmod-off,kmod-trace --reps {reps} --deadline {deadline} \
    --out $S/bench-boot.json \
    >$S/table.md; echo "CHECK bench rc=$?"
umount $M; echo "CHECK umount rc=$?"
"""


def bench_trace(work: Path, reps: int, out: Path) -> int:
    """--bench-trace: the boot-trace measurement through /dev/cowdN in one guest."""
    guest.build_module()
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "bench-disk.img"
    with open(disk, "wb") as f:
        f.truncate(BENCH_DISK_BYTES)
    _run("mkfs.ext4", "-q", "-F", disk)
    boots = 1 + 3 * reps
    script = BENCH_SCRIPT.format(shared=work, root=boot.REPO, reps=reps,
                                 timeout=boots * INNER_DEADLINE_S, deadline=INNER_DEADLINE_S)
    res = guest.run(script, rwdirs=[str(work)], timeout=boots * INNER_DEADLINE_S + 600,
                    memory="2G", log=work / "guest.log", disks=[disk])
    if not _steps_ok(res.stdout, work):
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "bench-boot.json", out)
    print((work / "table.md").read_text(), end="")
    print(f"(every boot: {out})")
    return 0


def _steps_ok(stdout: str, work: Path) -> bool:
    """Print the guest script's four CHECK lines; whether all of them passed."""
    checks = [line for line in stdout.splitlines() if line.startswith("CHECK ")]
    print("\n".join(checks))
    if any(not c.endswith("rc=0") for c in checks) or len(checks) != 4:
        print(f"boot_in_guest: the guest's steps failed; its log: {work / 'guest.log'}",
              file=sys.stderr)
        return False
    return True


def _run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in args], capture_output=True, check=True, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    p.add_argument("--bench-trace", type=int, metavar="REPS",
                   help="measure boot-trace priming through /dev/cowdN instead (see above)")
    p.add_argument("--out", type=Path, default=boot.REPO / "results" / "bench-boot-kmod.json")
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cowd-boot-in-guest-"))
    try:
        if args.bench_trace is not None:
            if args.bench_trace < 1:
                print(f"boot_in_guest: --bench-trace: at least 1 repetition "
                      f"(reps={args.bench_trace})", file=sys.stderr)
                return 2
            return bench_trace(work, args.bench_trace, args.out)
        info = image.build(work)
        guest.build_module()
        script = SCRIPT.format(shared=work, root=boot.REPO,
                               timeout=INNER_DEADLINE_S + 60, deadline=INNER_DEADLINE_S)
        res = guest.run(script, rwdirs=[str(work)], timeout=GUEST_TIMEOUT_S, memory="2G",
                        log=work / "guest.log")
        if not _steps_ok(res.stdout, work):
            return 1
        [r] = json.loads((work / "result.json").read_text())
        print(f"{r['marker']}\nboot time through /dev/cowdN (nested TCG): {r['seconds']:.1f} s")
        ov = work / "vm.qcow2"
        _run("qemu-img", "check", ov)
        after = (work / "base.sha256.after").read_text().strip()
        assert after == info.sha256, f"the base changed in the guest ({after})"
        flat = work / "flat.raw"
        _run("qemu-img", "convert", "-O", "raw", ov, flat)
        _run("e2fsck", "-f", "-n", flat)
        blob = _run("debugfs", "-R", "cat /var/lib/cowd/blob-1", flat).stdout
        mid = _run("debugfs", "-R", "cat /etc/machine-id", flat).stdout.decode().strip()
        assert hashlib.sha256(blob).hexdigest() == r["fields"]["sha256"], "blob-1 differs"
        assert mid == r["fields"]["machine-id"], f"machine id {mid} differs"
        print("overlay checked on the host: qemu-img check clean, base unchanged, e2fsck "
              "clean, the guest's blob and machine id are in it")
        return 0
    except (image.BuildError, subprocess.CalledProcessError, AssertionError) as e:
        print(f"boot_in_guest: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
