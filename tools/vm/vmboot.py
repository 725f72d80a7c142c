"""tools/vm-boot OVERLAY... [--via nbd|fuse|kmod|qemu] [--memory MiB] [--parallel N]: boot a
VM (qemu-system-x86_64, TCG) from each overlay once, with the root disk served by cowd, and
print the base's marker line and the boot time (qemu start to the marker).  Exits 1 if any
boot did not reach its marker before the deadline, 2 on bad usage.

    tools/mkbase                                   # build/vm/base.img + initramfs.img
    ov=$(cowd create --base build/vm/base.img --overlay qcow)
    tools/vm-boot "$ov"                            # cowd serve + qemu's NBD client
    tools/vm-boot "$ov" --via fuse                 # cowd attach --via fuse -> /dev/loopN
    tools/vm-boot "$ov" --via qemu                 # qemu opens the qcow2 itself
    tools/vm-boot vm*.qcow2 --parallel 2           # one daemon, every overlay an export

Paths and their invariants: tools/vm/boot.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from tools.vm import boot


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(prog="vm-boot", description="boot a VM from cowd disks and "
                                "print the boot time")
    p.add_argument("images", nargs="+", type=Path, metavar="OVERLAY")
    p.add_argument("--via", choices=boot.VIAS, default="nbd",
                   help="nbd: cowd serve + qemu's NBD client (default); fuse: cowd attach "
                   "--via fuse (/dev/loopN); kmod: cowd attach --via kmod (/dev/cowdN); "
                   "qemu: qemu opens the image itself, no cowd")
    p.add_argument("--memory", type=int, default=boot.DEFAULT_MEMORY_MIB, metavar="MiB",
                   help=f"guest memory (default {boot.DEFAULT_MEMORY_MIB})")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="boots at a time (default 1)")
    p.add_argument("--deadline", type=float, default=boot.DEFAULT_DEADLINE_S, metavar="S",
                   help=f"per boot (default {boot.DEFAULT_DEADLINE_S:.0f} s)")
    p.add_argument("--kernel", type=Path, default=boot.DEFAULT_KERNEL)
    p.add_argument("--initrd", type=Path,
                   help="default: initramfs.img beside the first image, else build/vm's")
    p.add_argument("--run-dir", type=Path,
                   help="cowd's run dir (default: a fresh temporary directory)")
    p.add_argument("--console-dir", type=Path, help="write each boot's console log here")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--allow-backing-outside", action="store_true",
                   help="let cowd open a base outside the overlay's directory tree (cowd "
                   "refuses it by default; passed on as $COWD_ALLOW_BACKING_OUTSIDE=1)")
    args = p.parse_args()
    if args.allow_backing_outside:
        os.environ["COWD_ALLOW_BACKING_OUTSIDE"] = "1"  # cowd serve, attach and its daemon
    signal.signal(signal.SIGTERM, _interrupt)
    plan = boot.BootPlan(images=args.images, via=args.via, kernel=args.kernel,
                         initrd=args.initrd, memory_mib=args.memory,
                         deadline_s=args.deadline, parallel=args.parallel,
                         run_dir=args.run_dir, console_dir=args.console_dir)

    def say(res: boot.BootResult) -> None:
        if args.json:
            return
        if res.ok:
            print(f"{res.image}: {res.marker}", flush=True)
            print(f"{res.image}: boot time {res.seconds:.2f} s via {res.via} "
                  f"(qemu exited after {res.total_seconds:.2f} s)", flush=True)
        else:
            print(f"vm-boot: {res.image}: {res.reason} (via {res.via}); console tail:",
                  file=sys.stderr)
            for line in res.console.strip().splitlines()[-15:]:
                print(f"  | {line}", file=sys.stderr)

    try:
        results = boot.run_plan(plan, say)
    except boot.BootError as e:
        print(f"vm-boot: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vm-boot: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps([r.as_json() for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
