"""tools/mkbase [-o DIR] [--size MiB] [--vhd] [--kernel PATH]: build the bootable base image
for VM boots from a cowd disk (tools/vm/image.py says what is in it), offline, from Debian
packages on this machine (busybox-static, linux-image-amd64, e2fsprogs, qemu-utils).

Writes DIR/base.img (raw ext4), DIR/initramfs.img, DIR/base.json and with --vhd DIR/base.vhd
(default DIR: build/vm).  Then, e.g.:

    ov=$(cowd create --base build/vm/base.img --overlay qcow)
    tools/vm-boot "$ov" --via nbd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.vm import image


def main() -> int:
    p = argparse.ArgumentParser(prog="mkbase", description="build a small bootable base image "
                                "(raw ext4, busybox root, first-boot init) for cowd VM boots")
    p.add_argument("-o", "--output", type=Path, default=image.DEFAULT_BUILD_DIR,
                   help=f"output directory (default {image.DEFAULT_BUILD_DIR})")
    p.add_argument("--size", type=int, default=64, metavar="MiB",
                   help="size of the raw image in MiB (default 64)")
    p.add_argument("--vhd", action="store_true",
                   help="also write base.vhd, the same disk as a dynamic VHD")
    p.add_argument("--kernel", type=Path, default=image.DEFAULT_KERNEL,
                   help=f"the kernel whose modules go into the initramfs "
                   f"(default {image.DEFAULT_KERNEL})")
    args = p.parse_args()
    try:
        info = image.build(args.output, args.size, args.vhd, args.kernel)
    except image.BuildError as e:
        print(f"mkbase: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mkbase: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{info.base}  ({info.size_bytes >> 20} MiB raw ext4, sha256 {info.sha256[:16]}...)")
    print(f"{info.initramfs}  (for {info.kernel})")
    if info.vhd:
        print(f"{info.vhd}  (dynamic VHD of the same disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
