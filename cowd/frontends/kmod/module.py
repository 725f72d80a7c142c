"""Layer: cowd frontend for the kernel shim: the module and its control device.

Loading the shim (``modprobe``, else ``insmod`` of the module built in this checkout), the
calls on ``/dev/cowd-ctl`` that create, take over and remove devices, which ABI version
this daemon speaks to the loaded module, and what a device is made with (the remap granule,
the chain's files as fresh descriptions, what the kernel records for the boot trace).  The
channel of one device — misses in, remaps out — is :mod:`cowd.frontends.kmod.channel`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ...errors import CommandFailed, DiskError
from . import abi

if TYPE_CHECKING:  # the CLI imports this module (kmod_problem, remove_device): not the disks
    from ...disk import ChainFile, Disk

# Where `make -C kmod` leaves the module: kmod/ at the top of the checkout.
MODULE_PATH = Path(__file__).resolve().parents[3] / "kmod" / "cowd.ko"
MODULE_WAIT_S = 10.0
# COWD_KMOD_ABI=1 makes this daemon speak the version-1 ABI (no pool): what an old daemon
# does, for the tests of the kernel's compatibility and for measurements without the pool.
ABI_ENV = "COWD_KMOD_ABI"
# Largest remap granule the kernel takes; the smallest cluster above it is cut down to it.
MAX_GRANULE_BYTES = 1 << abi.MAX_CLUSTER_BITS
DEFAULT_GRANULE_BYTES = 64 << 10


def module_problem() -> str | None:
    """Why ``--via kmod`` cannot work here (after trying to load the module), or None."""
    if os.path.exists(abi.CTL_PATH):
        return None
    err = load_module()
    if err is not None:
        return err
    return None if os.path.exists(abi.CTL_PATH) else f"{abi.CTL_PATH} did not appear"


def load_module() -> str | None:
    """Load the shim: ``modprobe cowd`` if installed, else ``insmod`` of the module built in
    this checkout (``make -C kmod``).  Returns why it failed, or None."""
    release = os.uname().release
    modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/sbin:/usr/sbin")
    if modprobe is not None:
        p = subprocess.run([modprobe, "-q", "cowd"], capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        if p.returncode == 0:
            return _wait_for_ctl()
    if not MODULE_PATH.exists():
        return (f"the kernel shim is not loaded and not built ({MODULE_PATH} absent; "
                f"run `make -C kmod` against the headers of {release})")
    insmod = shutil.which("insmod") or shutil.which("insmod", path="/sbin:/usr/sbin")
    modinfo = shutil.which("modinfo") or shutil.which("modinfo", path="/sbin:/usr/sbin")
    if insmod is None or modinfo is None:
        return "insmod/modinfo not found (Debian package kmod)"
    p = subprocess.run([modinfo, "-F", "vermagic", str(MODULE_PATH)], capture_output=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    built_for = (p.stdout.decode(errors="replace").split() or ["?"])[0]
    if built_for != release:
        return (f"{MODULE_PATH} is built for kernel {built_for}; this kernel is {release} "
                f"(and cannot load it: run `make -C kmod KVER={release}` with its headers)")
    p = subprocess.run([insmod, str(MODULE_PATH)], capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        msg = p.stderr.decode(errors="replace").strip().splitlines()
        why = msg[-1] if msg else f"exit status {p.returncode}"
        return f"insmod {MODULE_PATH} failed on kernel {release}: {why}"
    return _wait_for_ctl()


def _wait_for_ctl() -> str | None:
    deadline = time.monotonic() + MODULE_WAIT_S
    while not os.path.exists(abi.CTL_PATH):
        if time.monotonic() > deadline:
            return f"module loaded but {abi.CTL_PATH} did not appear in {MODULE_WAIT_S:g} s"
        time.sleep(0.05)
    return None


def checked_ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg, True)
    except OSError as e:
        raise DiskError(e.errno or errno.EIO, f"{abi.CTL_PATH}: {what}: {e.strerror}") from e


def ctl_call(request: int, arg: ctypes.Structure, what: str) -> None:
    fd = os.open(abi.CTL_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        checked_ioctl(fd, request, arg, what)
    finally:
        os.close(fd)


def module_version(version: int = abi.ABI_VERSION) -> tuple[int, int, str]:
    """(ABI version, feature bits for ``version``, module version) of the loaded shim."""
    v = abi.Version(size=ctypes.sizeof(abi.Version), version=version)
    ctl_call(abi.CTL_VERSION, v, "version")
    return v.abi_version, v.features, v.module_version.decode()


def module_features(version: int) -> int:
    """The loaded module's feature bits for a channel of ``version`` (0 if it refuses it)."""
    try:
        return module_version(version)[1]
    except DiskError as e:
        if e.errno == errno.EINVAL:
            return 0
        raise


def channel_version() -> int:
    """The ABI version this daemon speaks to the loaded module: ours, unless the module is
    older (it refuses our version) or COWD_KMOD_ABI asks for an older one."""
    want = os.environ.get(ABI_ENV, "")
    if want.isdigit() and abi.ABI_MIN_VERSION <= int(want) <= abi.ABI_VERSION:
        return int(want)
    try:
        module_version(abi.ABI_VERSION)
    except DiskError as e:
        if e.errno == errno.EINVAL:
            return abi.ABI_MIN_VERSION  # a module that knows only version 1
        raise
    return abi.ABI_VERSION


def remove_device(index: int, force: bool = False) -> None:
    r = abi.Remove(size=ctypes.sizeof(abi.Remove), version=abi.ABI_VERSION, index=index,
                   flags=abi.REMOVE_FORCE if force else 0)
    try:
        ctl_call(abi.CTL_REMOVE, r, f"remove cowd{index}")
    except DiskError as e:
        if e.errno == errno.EBUSY:
            raise CommandFailed(f"/dev/cowd{index}: in use (a mounted file system?); "
                             "unmount it first") from e
        raise


def kmod_problem() -> str | None:
    """Why `--via kmod` cannot work here (after trying to load the module), or None."""
    if os.geteuid() != 0:
        return "the kernel shim needs root"
    return module_problem()


# ---- what a device is made with ---------------------------------------------------------------

def granule_for(disk: Disk) -> int:
    """The remap granularity: the smallest cluster in the chain (whole clusters of every layer
    are contiguous in their file), at least 512 B and at most 2 MiB."""
    sizes = [layer.image.cluster_size for layer in disk.layers if layer.image.cluster_size > 0]
    g = min(sizes) if sizes else DEFAULT_GRANULE_BYTES
    return max(512, min(g, MAX_GRANULE_BYTES))


def chain_files(disk: Disk) -> list[ChainFile]:
    """Every host file of the chain that can hold data, the writable ones first."""
    files = disk.files()
    files.sort(key=lambda f: not f.writable)
    if len(files) > abi.MAX_FILES:
        raise CommandFailed(f"{disk.path}: the chain has {len(files)} files; the kernel shim "
                         f"takes at most {abi.MAX_FILES} (files={len(files)})")
    return files


def fresh_fds(files: list[ChainFile], readonly: bool) -> list[int]:
    """New open file descriptions of ``files`` for the kernel to keep.  Not the daemon's own:
    its image locks (qemu's OFD byte locks, cowd/imagelock.py) live on those, and a lock on a
    description the kernel holds would outlive a killed daemon and lock out the next one."""
    fds: list[int] = []
    try:
        for f in files:
            mode = os.O_RDWR if f.writable and not readonly else os.O_RDONLY
            fds.append(os.open(f"/proc/self/fd/{f.fd}", mode | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class TouchPlan(NamedTuple):
    """What the kernel records for the boot trace: first reads of ``files[file]`` in
    granules of 2^``bits`` bytes."""

    file: int
    bits: int


def touch_plan(disk: Disk, files: list[ChainFile], version: int) -> TouchPlan | str:
    """What to ask the kernel to record for the disk's boot trace, or why nothing."""
    trace = disk.trace
    if not trace.recording:
        return f"the disk records no boot trace ({trace.state})"
    if version < 2:
        return f"the channel speaks ABI {version}"
    if not module_features(version) & abi.FEAT_TOUCH:
        return "the loaded module cannot record (no COWD_FEAT_TOUCH: an older module)"
    index = next((i for i, f in enumerate(files) if f is disk.trace_file), None)
    if index is None:
        return "the base's file is not one the kernel reads"
    bits = trace.granule.bit_length() - 1
    if 1 << bits != trace.granule or not abi.MIN_TOUCH_BITS <= bits <= abi.MAX_TOUCH_BITS:
        return f"the kernel takes no such granule (granule={trace.granule})"
    granules = -(-os.fstat(disk.trace_file.fd).st_size >> bits)
    if granules > abi.MAX_TOUCH_GRANULES:
        return (f"the base has more granules than the kernel's bitmap holds (granules="
                f"{granules}, max={abi.MAX_TOUCH_GRANULES})")
    return TouchPlan(index, bits)
