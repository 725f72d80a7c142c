"""Layer: tools (VM root disks).  Builds the bootable base image the VM-boot tests and
`tools/vm-boot` use, offline, from Debian packages already on this machine.

What it makes, in one output directory:

- ``base.img``: a raw ext4 image (no partition table, no bootloader) holding a minimal root
  file system: busybox-static with one symlink per applet, and ``/sbin/init`` =
  ``guest/rootfs-init.sh`` (first-boot work, a marker line, power-off).  It is populated with
  ``mkfs.ext4 -d`` from a staging directory, so no loop device or mount is needed.
- ``initramfs.img``: a gzip'd newc cpio with busybox, ``guest/initramfs-init.sh`` as /init
  and the kernel modules the root disk needs (virtio_pci, virtio_blk, ext4 and their
  dependencies, in ``modprobe --show-depends`` order, copied from /lib/modules/KVER).  Debian's
  own /boot/initrd.img would do too, but it is 30 MB of udev and scripts that TCG takes seconds
  to unpack and run; this one is ~1 MB and mounts root= directly.
- ``base.vhd`` (with ``vhd=True``): the same disk as a dynamic VHD, by
  ``qemu-img convert -O vpc -o subformat=dynamic``.
- ``base.json``: what was built (kernel, its version, sizes, sha256 of the base).

The kernel is Debian's linux-image-amd64, booted by qemu's ``-kernel``/``-initrd``.
Invariant: building never touches anything outside the output directory and a temporary
staging directory inside it, which is removed afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent / "guest"


def newest_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest Debian kernel installed (linux-image-amd64 moves with the archive, so no
    version is written here); ``/boot/vmlinuz`` when there is none (callers say so)."""
    found = sorted(boot.glob("vmlinuz-*-amd64"), key=lambda p: [
        int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", p.name[len("vmlinuz-"):])])
    return found[-1] if found else boot / "vmlinuz"


DEFAULT_KERNEL = newest_kernel()
DEFAULT_BUILD_DIR = Path(__file__).resolve().parent.parent.parent / "build" / "vm"
BUSYBOX = Path("/bin/busybox")
# What the initramfs must load before it can mount root=/dev/vda: the PCI transport, the
# block driver and the file system.  Dependencies come from modprobe.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
MiB = 1 << 20
MIN_SIZE_MIB = 16  # busybox (2 MB) + ext4 journal + room for the boots' writes
MAX_SIZE_MIB = 64 * 1024


class BuildError(Exception):
    """A one-line reason the base could not be built (the tool prints it and exits 1)."""


@dataclass
class BaseInfo:
    base: str
    initramfs: str
    kernel: str
    kernel_version: str
    size_bytes: int
    sha256: str
    vhd: str | None = None
    vhd_sha256: str | None = None


def kernel_version(kernel: Path) -> str:
    """``/boot/vmlinuz-6.1.0-57-amd64`` -> ``6.1.0-57-amd64``."""
    m = re.fullmatch(r"vmlinuz-(.+)", kernel.name)
    if not m:
        raise BuildError(f"{kernel}: cannot tell the kernel version from the file name "
                         "(expected vmlinuz-VERSION)")
    return m.group(1)


def _run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    cmd = [os.fspath(a) for a in args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]}: not installed (tools/install-deps packages.txt)") from None
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        raise BuildError(f"{cmd[0]}: exited {p.returncode}: {last[0]}")
    return p


def module_files(kver: str) -> list[Path]:
    """The .ko files to insmod, dependencies first, each once."""
    moddir = Path("/lib/modules") / kver
    if not moddir.is_dir():
        raise BuildError(f"{moddir}: no modules for kernel {kver} (linux-image-amd64)")
    order: list[Path] = []
    for mod in ROOT_MODULES:
        out = _run("modprobe", "-S", kver, "--show-depends", mod).stdout
        for line in out.splitlines():
            words = line.split()
            if words[:1] == ["builtin"]:
                continue
            if words[:1] != ["insmod"] or len(words) < 2:
                raise BuildError(f"modprobe --show-depends {mod}: unexpected line {line!r}")
            path = Path(words[1])
            if path.suffix != ".ko":
                raise BuildError(f"{path}: compressed modules are not supported "
                                 f"(suffix={path.suffix})")
            if path not in order:
                order.append(path)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]],
               devices: dict[str, tuple[int, int]]) -> bytes:
    """A newc archive of (name, mode, data) entries; symlinks carry the target as data,
    device nodes their (major, minor) in ``devices``."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nm = name.encode() + b"\0"
        major, minor = devices.get(name, (0, 0))
        # c_ino c_mode c_uid c_gid c_nlink c_mtime c_filesize c_devmajor c_devminor
        # c_rdevmajor c_rdevminor c_namesize c_check
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nm), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + nm
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(kver: str, out: Path) -> None:
    dirs = ["bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys"]
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in dirs]
    # The kernel opens /dev/console for /init's stdio before /init can mount devtmpfs.
    entries.append(("dev/console", 0o020600, b""))
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    entries.append(("bin/sh", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, (GUEST_DIR / "initramfs-init.sh").read_bytes()))
    mods = module_files(kver)
    for m in mods:
        entries.append((f"lib/modules/{m.name}", 0o100644, m.read_bytes()))
    entries.append(("etc/modules.order", 0o100644,
                    "".join(f"{m.name}\n" for m in mods).encode()))
    data = _cpio_newc(entries, {"dev/console": (5, 1)})
    out.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))


def _stage_rootfs(stage: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "root", "etc/ssh", "var/log", "var/lib/cowd", "var/tmp"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, stage / "bin/busybox")
    applets = _run(BUSYBOX, "--list-full").stdout.split()
    for path in applets:
        if path in ("bin/busybox", "sbin/init", "linuxrc"):
            continue
        link = stage / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to("/bin/busybox")
    init = stage / "sbin/init"
    shutil.copyfile(GUEST_DIR / "rootfs-init.sh", init)
    init.chmod(0o755)
    (stage / "tmp").chmod(0o1777)
    (stage / "etc/hostname").write_text("cowd-vm\n")
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/os-release").write_text(
        'NAME="cowd test root"\nID=cowd\nPRETTY_NAME="cowd busybox root (tools/mkbase)"\n')


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build(out_dir: Path, size_mib: int = 64, vhd: bool = False,
          kernel: Path = DEFAULT_KERNEL) -> BaseInfo:
    """Build base.img and initramfs.img (and base.vhd) in ``out_dir``; return what was built."""
    if not MIN_SIZE_MIB <= size_mib <= MAX_SIZE_MIB:
        raise BuildError(f"--size: between {MIN_SIZE_MIB} and {MAX_SIZE_MIB} MiB "
                         f"(size={size_mib})")
    if not kernel.is_file():
        raise BuildError(f"{kernel}: no such kernel (linux-image-amd64)")
    if not BUSYBOX.is_file():
        raise BuildError(f"{BUSYBOX}: not installed (busybox-static)")
    kver = kernel_version(kernel)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / ".rootfs-stage"
    shutil.rmtree(stage, ignore_errors=True)
    base = out_dir / "base.img"
    initramfs = out_dir / "initramfs.img"
    try:
        _stage_rootfs(stage)
        tmp = base.with_suffix(".img.tmp")
        with open(tmp, "wb") as f:
            f.truncate(size_mib * MiB)
        _run("mkfs.ext4", "-q", "-F", "-L", "cowdroot", "-E", "root_owner=0:0",
             "-d", stage, tmp)
        tmp.replace(base)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    build_initramfs(kver, initramfs)
    info = BaseInfo(base=str(base), initramfs=str(initramfs), kernel=str(kernel),
                    kernel_version=kver, size_bytes=base.stat().st_size, sha256=sha256(base))
    if vhd:
        out = out_dir / "base.vhd"
        make_vhd(base, out)
        info.vhd, info.vhd_sha256 = str(out), sha256(out)
    (out_dir / "base.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def make_vhd(raw: Path, out: Path) -> None:
    """The raw base as a dynamic VHD (qemu-img rounds the size up to a CHS geometry)."""
    tmp = out.with_suffix(".vhd.tmp")
    _run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, tmp)
    tmp.replace(out)
