"""Layer: cowd (beside the composition root).  How a disk becomes a block device the user can
mkfs and mount — ``cowd attach`` — and the background daemon's lifecycle: its run directory,
pid file, start-up, clean-up after a killed daemon, and exit when it serves nothing.

Theory of operation
-------------------
The run directory (``/run/cowd``, ``$COWD_RUN_DIR`` or ``--run-dir``) holds::

    cowd.pid       the owner's pid, flock()ed exclusively for as long as it owns the directory
    control.sock   the daemon's control socket (JSON lines, cowd/control.py)
    cowd.log       the background daemon's log (stdout and stderr)
    fuse/          the FUSE mount: one file per attached disk (cowd/frontends/fuse/)
    attached.json  what is attached (name, image, device), rewritten after every change
    start.lock     taken by a CLI while it starts a daemon, so two CLIs start only one

Ownership is the flock on ``cowd.pid``, not the file's existence: the kernel drops the lock
when its holder dies, even by SIGKILL, so a lock that can be taken means that nothing owns the
directory and whatever is in it is stale.  A daemon (``cowd daemon``, started by ``cowd
attach``, or ``cowd serve``) takes it before anything else; ``cowd detach`` takes it to clean
up after a dead daemon.

``cowd attach IMAGE`` (the CLI) asks the control socket; if no daemon answers it takes
``start.lock``, asks again, and otherwise starts ``cowd daemon`` in a new session with its
output in ``cowd.log``, and waits until the control socket answers (the daemon binds it only
when it is ready).  It then sends ``attach``.  The daemon opens the Disk (sharing parents
through its ImagePool), primes it, adds it to the FUSE mount (mounted at the first attach) and
runs ``losetup --find --show --direct-io=on RUN/fuse/NAME``: the daemon runs losetup, not the
CLI, so the daemon knows every loop device it made and can take them down itself at shutdown.
The reply names ``/dev/loopN``.  The loop driver then reads and writes the FUSE file with
direct I/O, which the FUSE frontend turns into Disk calls; discards and write-zeroes arrive as
fallocate.

``cowd detach DEVICE|IMAGE`` asks the daemon, which refuses if the loop device is in use (an
exclusive open fails: a mounted file system), else flushes the Disk, runs ``losetup -d``,
waits for the kernel to release the FUSE file, removes it from the mount and closes the Disk
(which flushes again and writes whatever metadata the codec keeps).  A daemon started by
attach exits when it serves nothing: it stops taking requests, unmounts its FUSE directory and
removes its socket and pid file; the CLI waits for that before returning.

What cowd touches: a loop device only if its backing file is the FUSE file of the attachment
(sysfs ``backing_file`` and the backing file's device and inode from LOOP_GET_STATUS64); a mount
only if it is the ``fuse.cowd`` mount at RUN/fuse; a process only through its own control
socket.  After a daemon died (SIGKILL, OOM) its FUSE mount is dead (the kernel answers
ENOTCONN): :func:`cleanup_stale`, run with the pid lock held, detaches the loop devices whose
backing file lies in that dead mount — before unmounting it, since a loop device's
``backing_file`` no longer names the directory once its mount is detached — then lazily
unmounts it and removes the stale socket.  A stale loop device still in use (a file system on
it still mounted) is detached anyway: the kernel then only marks it auto-clear, and it goes
away when that file system is unmounted; its I/O fails meanwhile, as it already did.

``--via nbd`` (cowd/frontends/nbd/attach.py): the daemon serves the Disk with its NBD server over a
socketpair, negotiates the other end itself and gives it to the kernel's nbd driver on a free
``/dev/nbdN`` (NBD_SET_SOCK is the claim; NBD_DO_IT runs in a thread of its own until the
device is disconnected).  Detach: refused while the device is held exclusively, else fsync,
NBD_DISCONNECT, wait for DO_IT, NBD_CLEAR_SOCK, close the Disk.  When the daemon dies its end
of the socketpair closes and the kernel lets the device go at its last close; one still held
open (a mounted file system) keeps showing the dead thread as its pid, and the cleanup sends it
NBD_CLEAR_SOCK (only devices the dead daemon recorded, only while they show its thread).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import control
from ..control import DaemonUnavailable
from ..disk import Disk
from ..errors import RequestError, UsageError
from ..frontends.fuse.mount import fuse_problem, mounts_at, unmount_stale
from ..frontends.fuse.protocol import FuseOptions
from ..frontends.fuse.server import FuseFrontend, mount_fuse
from ..frontends.kmod import abi
from ..frontends.kmod.channel import (
    DEFAULT_DAEMON_TIMEOUT_MS,
    DEFAULT_MAX_ENTRIES,
    KmodDevice,
    module_problem,
    remove_device,
)
from ..frontends.nbd.attach import NbdDevice, clear_stale, device_index
from ..frontends.nbd.server import NbdServer

log = logging.getLogger("cowd.attach")

# ---- names and bounds ----------------------------------------------------------------------------

PID_FILE = "cowd.pid"
LOG_FILE = "cowd.log"
FUSE_DIR = "fuse"
STATE_FILE = "attached.json"
START_LOCK = "start.lock"


# How long the CLI waits for a daemon it started to answer on its control socket.
START_TIMEOUT_S = 30.0
# How long a starting daemon waits for the previous owner of the run dir (one that is still
# unmounting after it decided to exit) to let go of the pid file.
PID_WAIT_S = 20.0
# How long `cowd detach` waits for an exiting daemon to be gone.
EXIT_WAIT_S = 60.0
# A daemon started by attach that gets no disk this soon exits again.
STARTUP_IDLE_S = 30.0
# After its last disk is detached the daemon exits this soon (time to send the reply).
EXIT_AFTER_REPLY_S = 0.1
# losetup attach/detach must finish this soon.
LOSETUP_TIMEOUT_S = 60.0
# After `losetup -d` the kernel closes the FUSE file asynchronously; wait this long for it.
RELEASE_TIMEOUT_S = 10.0
# A control request that opens, primes or flushes a disk may take long on a big image.
ATTACH_REQUEST_TIMEOUT_S = 600.0
# How often the CLI tries again when the daemon it asked was just exiting.
ATTACH_ATTEMPTS = 3

_LOOP_NAME = re.compile(r"loop[0-9]+")

# linux/loop.h
LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device lo_inode lo_rdevice lo_offset lo_sizelimit lo_number
# lo_encrypt_type lo_encrypt_key_size lo_flags lo_file_name[64] lo_crypt_name[64]
# lo_encrypt_key[32] lo_init[2]
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


# ---- the run directory and its owner -------------------------------------------------------------

@dataclass(frozen=True)
class RunDir:
    path: str

    @classmethod
    def at(cls, path: str) -> RunDir:
        return cls(os.path.abspath(path))

    @property
    def control(self) -> str:
        return control.control_path(self.path)

    @property
    def pid_file(self) -> str:
        return os.path.join(self.path, PID_FILE)

    @property
    def log(self) -> str:
        return os.path.join(self.path, LOG_FILE)

    @property
    def fuse_dir(self) -> str:
        return os.path.join(self.path, FUSE_DIR)

    @property
    def state(self) -> str:
        return os.path.join(self.path, STATE_FILE)

    @property
    def start_lock(self) -> str:
        return os.path.join(self.path, START_LOCK)

    def make(self) -> None:
        os.makedirs(self.path, mode=0o755, exist_ok=True)


class PidFile:
    """Ownership of a run directory: an exclusive flock on its pid file (see the module
    docstring).  ``release`` removes the file, then drops the lock."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # The previous owner may have unlinked the file between our open and our flock:
            # the lock would then be on a dead inode that nobody else can see.  Start over.
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return True

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def holder_pid(pid_file: str) -> int | None:
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def is_owned(pid_file: str) -> bool:
    """True while some process holds the pid file's lock (a live daemon)."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def take_run_dir(run: RunDir, wait_s: float) -> PidFile:
    """Own ``run`` (create it if needed), waiting up to ``wait_s`` for a previous owner."""
    run.make()
    pid = PidFile(run.pid_file)
    deadline = trio.current_time() + wait_s
    while not pid.try_acquire():
        if trio.current_time() >= deadline:
            holder = holder_pid(run.pid_file)
            raise UsageError(f"{run.path}: a cowd daemon is already running here "
                             f"(pid={holder if holder is not None else '?'})")
        await trio.sleep(0.05)
    return pid


@contextlib.contextmanager
def file_lock(path: str, timeout_s: float) -> Iterator[None]:
    """An exclusive flock on ``path`` for the duration (the CLI's start lock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UsageError(f"{path}: another cowd command holds this lock "
                                     f"(waited {timeout_s:.0f} s)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def write_state(run: RunDir, entries: list[dict[str, Any]]) -> None:
    tmp = run.state + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, run.state)


def read_state(run: RunDir) -> list[dict[str, Any]]:
    try:
        with open(run.state, encoding="utf-8") as f:
            doc = json.load(f)
    except (FileNotFoundError, ValueError):
        return []
    return [e for e in doc if isinstance(e, dict)] if isinstance(doc, list) else []


# ---- loop devices --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoopInfo:
    device: str  # /dev/loopN
    backing_file: str  # as the kernel names it (sysfs); "/NAME" once its mount is detached
    backing_dev: int  # st_dev of the backing file; 0 if the kernel could not stat it
    backing_ino: int
    dio: bool
    read_only: bool


def loop_name(device: str) -> str | None:
    """'loopN' for /dev/loopN (symlinks resolved), else None."""
    name = os.path.basename(os.path.realpath(device))
    return name if _LOOP_NAME.fullmatch(name) else None


def _sysfs(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def loop_info(device: str) -> LoopInfo | None:
    """What ``device`` is bound to, or None if it is no bound loop device.  Blocking, and it
    makes the kernel stat the backing file: never call it in the thread that serves that
    file."""
    name = loop_name(device)
    if name is None:
        return None
    base = f"/sys/block/{name}"
    try:
        backing = _sysfs(f"{base}/loop/backing_file")
        dio = _sysfs(f"{base}/loop/dio").strip() == "1"
        ro = _sysfs(f"{base}/ro").strip() == "1"
    except FileNotFoundError:
        return None
    if backing.endswith("\n"):
        backing = backing[:-1]
    dev = ino = 0
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            buf = bytearray(LOOP_INFO64.size)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
            dev, ino = LOOP_INFO64.unpack(buf)[:2]
        except OSError:
            pass  # ENXIO: unbound in the meantime
        finally:
            os.close(fd)
    return LoopInfo(f"/dev/{name}", backing, dev, ino, dio, ro)


def loops_backed_under(directory: str) -> list[LoopInfo]:
    """Bound loop devices whose backing file the kernel names inside ``directory``."""
    prefix = directory.rstrip("/") + "/"
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            if not _LOOP_NAME.fullmatch(name):
                continue
            try:
                backing = _sysfs(f"/sys/block/{name}/loop/backing_file").rstrip("\n")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if backing.startswith(prefix):
                info = loop_info(f"/dev/{name}")
                if info is not None and info.backing_file.startswith(prefix):
                    found.append(info)
    return found


def is_busy(device: str) -> bool:
    """True if something holds ``device`` exclusively (a mounted file system, a holder such as
    device-mapper, another exclusive opener).  A plain open by some process is not seen."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


async def _losetup(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        with trio.fail_after(LOSETUP_TIMEOUT_S):
            return await trio.run_process(args, capture_stdout=True, capture_stderr=True,
                                          check=False, stdin=subprocess.DEVNULL)
    except trio.TooSlowError:
        raise UsageError(f"{' '.join(args)}: did not finish within "
                         f"{LOSETUP_TIMEOUT_S:.0f} s") from None


async def losetup_attach(path: str, readonly: bool) -> str:
    args = ["losetup", "--find", "--show", "--direct-io=on"]
    if readonly:
        args.append("--read-only")
    args.append(path)
    p = await _losetup(args)
    if p.returncode != 0:
        raise UsageError(f"losetup: {_last_line(p.stderr)} (file={path})")
    dev = p.stdout.decode(errors="replace").strip()
    if loop_name(dev) is None:
        raise UsageError(f"losetup: unexpected output (stdout={dev!r})")
    return dev


async def losetup_detach(device: str) -> None:
    p = await _losetup(["losetup", "-d", device])
    if p.returncode != 0:
        raise UsageError(f"losetup -d {device}: {_last_line(p.stderr)}")


# ---- which frontend ------------------------------------------------------------------------------

FRONTENDS = ("kmod", "nbd", "fuse")


def kmod_problem() -> str | None:
    """Why `--via kmod` cannot work here (after trying to load the module), or None."""
    if os.geteuid() != 0:
        return "the kernel shim needs root"
    return module_problem()


def nbd_problem() -> str | None:
    """Why `--via nbd` cannot work here, or None (cowd loads no nbd module itself)."""
    if os.geteuid() != 0:
        return "the kernel's nbd client needs root"
    if not os.path.isdir("/sys/module/nbd"):
        modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/sbin:/usr/sbin")
        if modprobe is None:
            return "the kernel has no nbd driver (no /sys/module/nbd, no modprobe)"
        try:
            rc = subprocess.run([modprobe, "-n", "nbd"], capture_output=True, timeout=10,
                                stdin=subprocess.DEVNULL).returncode
        except (OSError, subprocess.TimeoutExpired):
            rc = 1
        if rc != 0:
            return "the kernel has no nbd driver (no /sys/module/nbd; modprobe -n nbd failed)"
        return "the nbd module is not loaded (modprobe nbd; cowd loads no modules)"
    if not os.path.exists("/dev/nbd0"):
        return "nbd is loaded but there is no /dev/nbd0 (nbds_max=0?)"
    return None


_PROBLEMS: dict[str, Callable[[], str | None]] = {
    "kmod": kmod_problem, "nbd": nbd_problem, "fuse": fuse_problem}


def choose_frontend(via: str) -> tuple[str, str | None]:
    """The frontend to attach through and, for ``auto``, a note saying which it took and why
    the ones before it were unavailable.  An explicit choice that cannot work, or ``auto``
    with nothing usable, is a one-line UsageError."""
    if via != "auto":
        if via not in _PROBLEMS:
            raise UsageError(f"--via: expected auto, kmod, nbd or fuse (via={via!r})")
        problem = _PROBLEMS[via]()
        if problem is not None:
            raise UsageError(f"--via {via}: {problem}")
        return via, None
    reasons: list[str] = []
    for name in FRONTENDS:
        problem = _PROBLEMS[name]()
        if problem is None:
            why = f" ({'; '.join(reasons)})" if reasons else ""
            return name, f"--via auto: using {name}{why}"
        reasons.append(f"{name}: {problem}")
    raise UsageError("--via auto: no way to attach a disk on this machine ("
                     + "; ".join(reasons) + ")")


# ---- cleaning up after a dead daemon -------------------------------------------------------------

@dataclass
class Cleanup:
    """What :func:`cleanup_stale` did."""

    loops: list[tuple[str, str, bool]] = field(default_factory=list)  # (device, name, was busy)
    kmod: list[tuple[str, str, str]] = field(default_factory=list)  # (device, image, outcome)
    nbd: list[tuple[str, str, str]] = field(default_factory=list)  # (device, image, outcome)
    unmounted: int = 0
    socket_removed: bool = False
    state: list[dict[str, Any]] = field(default_factory=list)  # the dead daemon's records

    def __bool__(self) -> bool:
        return bool(self.loops or self.kmod or self.nbd or self.unmounted
                    or self.socket_removed)

    def lines(self, run: RunDir) -> list[str]:
        out = []
        for dev, name, busy in self.loops:
            image = next((e.get("image") for e in self.state if e.get("name") == name), None)
            what = f"{dev} ({image or name})"
            if busy:
                out.append(f"detached {what}; it is still in use (a mounted file system?) and "
                           "goes away when that is unmounted")
            else:
                out.append(f"detached {what}")
        for dev, image, outcome in self.kmod + self.nbd:
            out.append(f"{outcome} {dev} ({image})")
        if self.unmounted:
            out.append(f"unmounted the dead FUSE mount {run.fuse_dir}")
        if self.socket_removed:
            out.append(f"removed the stale control socket {run.control}")
        return out


def _remove_stale_kmod(done: Cleanup) -> None:
    for rec in done.state:
        index = rec.get("index")
        if rec.get("frontend") != "kmod" or not isinstance(index, int):
            continue
        dev = f"/dev/cowd{index}"
        if not os.path.exists(dev):
            continue
        try:
            remove_device(index)
            outcome = "removed"
        except (UsageError, RequestError) as e:
            outcome = f"could not remove ({e}):"
        done.kmod.append((dev, str(rec.get("image")), outcome))


def _clear_stale_nbd(done: Cleanup) -> None:
    """NBD_CLEAR_SOCK on the dead daemon's /dev/nbdN that are still claimed by its dead
    thread (held open by something else); the others the kernel released already."""
    for rec in done.state:
        device, tid = rec.get("device"), rec.get("tid")
        if rec.get("frontend") != "nbd" or not isinstance(device, str):
            continue
        index = device_index(device)
        if index is None:
            continue
        outcome = clear_stale(index, tid if isinstance(tid, int) else None)
        if outcome is not None:
            log.info("stale: %s %s", outcome, device)
            done.nbd.append((device, str(rec.get("image")), outcome))


def _exists(path: str) -> bool:
    return os.path.lexists(path)  # the run dir is local: no need for a thread


async def _mount_is_dead(path: str) -> bool:
    def probe() -> int:
        try:
            os.statvfs(path)  # always a request (stat may be answered from the cache)
        except OSError as e:
            return e.errno or 0
        return 0

    with trio.move_on_after(10):
        return await trio.to_thread.run_sync(probe, abandon_on_cancel=True) == errno.ENOTCONN
    return False  # a live mount that does not answer


async def cleanup_stale(run: RunDir, keep_kmod: bool = False) -> Cleanup:
    """Undo what a dead daemon left in ``run``.  The caller owns the pid file (so no live
    daemon serves ``run``); anything that does not look like a dead cowd's is refused.
    Kernel-shim devices are removed unless in use, or, with ``keep_kmod`` (a new daemon
    starting, which takes them over), left alone."""
    done = Cleanup(state=read_state(run))
    if not keep_kmod:
        _remove_stale_kmod(done)
    _clear_stale_nbd(done)
    fuse_dir = run.fuse_dir
    await trio.lowlevel.checkpoint()
    mounts = mounts_at(fuse_dir)
    if mounts:
        fstype, source = mounts[-1]
        if fstype != "fuse.cowd":
            raise UsageError(f"{fuse_dir}: something else is mounted here (type={fstype}); "
                             "not touching it")
        if not await _mount_is_dead(fuse_dir):
            raise UsageError(f"{fuse_dir}: a live cowd FUSE mount that no daemon of this run "
                             f"dir owns (source={source}); not touching it")
        # Loop devices first: once the mount is detached, their backing_file no longer
        # names this directory and they could not be told from anyone else's.
        for info in await trio.to_thread.run_sync(loops_backed_under, fuse_dir):
            busy = await trio.to_thread.run_sync(is_busy, info.device)
            await losetup_detach(info.device)
            name = info.backing_file[len(fuse_dir) + 1:]
            log.info("stale: detached %s (%s)%s", info.device, name,
                     ", still in use: auto-clear" if busy else "")
            done.loops.append((info.device, name, busy))
        while await unmount_stale(fuse_dir):
            done.unmounted += 1
            log.info("stale: unmounted the dead FUSE mount %s", fuse_dir)
        with contextlib.suppress(OSError):
            if not mounts_at(fuse_dir):
                os.rmdir(fuse_dir)
    if _exists(run.control):
        control.clear_stale_socket(run.control)  # refuses a live one
        done.socket_removed = True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run.state)
    return done


# ---- the daemon's side ---------------------------------------------------------------------------

@dataclass(eq=False)
class Attachment:
    name: str  # the file's name in the FUSE mount
    image: str  # absolute path as the user gave it
    realpath: str
    disk: Disk
    frontend: str
    file: str  # RUN/fuse/NAME
    device: str  # /dev/loopN
    rdev: int  # the device's st_rdev
    backing: tuple[int, int]  # (st_dev, st_ino) of the file the loop device reads
    readonly: bool
    attached_at: float = field(default_factory=time.time)
    kmod: KmodDevice | None = None  # frontend "kmod": /dev/cowdN and its channel
    nbd: NbdDevice | None = None  # frontend "nbd": /dev/nbdN and its DO_IT thread

    def record(self) -> dict[str, Any]:
        rec = {"name": self.name, "image": self.image, "device": self.device,
               "frontend": self.frontend, "readonly": self.readonly, "file": self.file,
               "attached_at": round(self.attached_at, 3)}
        if self.kmod is not None:
            rec["index"] = self.kmod.index
        if self.nbd is not None and self.nbd.tid:
            rec["tid"] = self.nbd.tid[0]  # what sysfs shows as the device's pid
        return rec


OpenDisk = Callable[[str, bool], Awaitable[Disk]]


class Attacher:
    """The daemon's attach/detach/list handlers and the FUSE mount they share.

    Contract: one attach or detach runs at a time (``op_lock``), shielded from cancellation and
    bounded by deadlines, so a shutdown never interrupts one half-way; shutdown takes
    ``op_lock`` too (:meth:`quiesce`).  Teardown, registered on the daemon's exit stack, runs in
    this order: ``losetup -d`` every device (:meth:`_detach_all`), unmount the FUSE
    directory and drain it (the frontend's own close), close the Disks (:meth:`_close_all`).
    """

    def __init__(self, run: RunDir, stack: AsyncExitStack, nursery: trio.Nursery,
                 open_disk: OpenDisk, name_taken: Callable[[str], bool],
                 after_change: Callable[[], bool],
                 fuse_options: FuseOptions | None = None):
        self.run = run
        self.stack = stack
        self.nursery = nursery
        self.open_disk = open_disk
        self.name_taken = name_taken
        self.after_change = after_change  # returns True when the daemon will now exit
        self.fuse_options = fuse_options
        self.attachments: dict[str, Attachment] = {}
        self.fuse: FuseFrontend | None = None
        self.nbd_disks: dict[str, Disk] = {}  # export name -> Disk, for --via nbd
        self.nbd_server: NbdServer | None = None
        self.mount_dev = 0
        self.accepting = True
        self.op_lock = trio.Lock()
        stack.push_async_callback(self._close_all)
        stack.push_async_callback(self._detach_all_kmod)  # before the disks close
        stack.push_async_callback(self._detach_all_nbd)

    # -- helpers -------------------------------------------------------------------------------

    def _name_for(self, image: str) -> str:
        name = os.path.basename(image)
        stem, ext = os.path.splitext(name)
        n = 2
        while name in self.attachments or self.name_taken(name):
            name = f"{stem}-{n}{ext}"
            n += 1
        return name

    async def _frontend(self) -> FuseFrontend:
        if self.fuse is not None:
            return self.fuse
        os.makedirs(self.run.fuse_dir, mode=0o755, exist_ok=True)
        self.stack.callback(self._remove_fuse_dir)  # after the unmount
        fe = await mount_fuse(self.stack, self.nursery, self.run.fuse_dir, {},
                              self.fuse_options)
        # Registered after the frontend's close, so it runs first: loop devices let go of
        # the files before the mount is taken down.
        self.stack.push_async_callback(self._detach_all)
        self.fuse = fe
        st = await trio.to_thread.run_sync(os.stat, fe.mountpoint)
        self.mount_dev = st.st_dev
        return fe

    def _remove_fuse_dir(self) -> None:
        with contextlib.suppress(OSError):
            if not mounts_at(self.run.fuse_dir):
                os.rmdir(self.run.fuse_dir)

    def _save(self) -> None:
        try:
            write_state(self.run, [a.record() for a in self.attachments.values()])
        except OSError as e:
            log.warning("%s: cannot record the attached disks: %s", self.run.state, e)

    async def _ours(self, att: Attachment) -> LoopInfo | None:
        """The loop device's state if it is still the one we made, else None."""
        info = await trio.to_thread.run_sync(loop_info, att.device)
        if info is None or info.backing_file != att.file:
            return None
        if info.backing_dev and (info.backing_dev, info.backing_ino) != att.backing:
            return None
        return info

    async def _released(self, name: str, timeout_s: float) -> bool:
        """Wait until no handle on ``name`` is open (the loop device closes the FUSE file
        asynchronously after ``losetup -d``)."""
        fe = self.fuse
        assert fe is not None
        with trio.move_on_after(timeout_s):
            # Nothing signals a RELEASE to us but the count itself.
            while fe.stats()["files"].get(name, {}).get("open_handles", 0):  # noqa: ASYNC110
                await trio.sleep(0.01)
            return True
        return False

    # -- control handlers ----------------------------------------------------------------------

    async def attach(self, req: dict[str, Any]) -> dict[str, Any]:
        image = req.get("image")
        via = req.get("via", "fuse")
        readonly = bool(req.get("readonly", False))
        entries = req.get("kmod_entries", DEFAULT_MAX_ENTRIES)
        timeout_ms = req.get("kmod_timeout_ms", DEFAULT_DAEMON_TIMEOUT_MS)
        for name, v, low, top in (
                ("kmod_entries", entries, abi.MIN_ENTRIES, abi.MAX_ENTRIES),
                ("kmod_timeout_ms", timeout_ms, 1, abi.MAX_TIMEOUT_MS)):
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= top:
                raise UsageError(f"attach: {name} must be {low}..{top} ({name}={v!r})")
        if not isinstance(image, str) or not os.path.isabs(image):
            raise UsageError(f"attach: the image must be an absolute path (image={image!r})")
        if via not in ("fuse", "kmod", "nbd"):
            raise UsageError(f"attach: this daemon attaches through fuse, kmod or nbd "
                             f"(via={via!r})")
        async with self.op_lock:
            if not self.accepting:
                raise DaemonUnavailable("the daemon is shutting down")
            with trio.CancelScope(shield=True):
                try:
                    if via == "kmod":
                        att = await self._attach_kmod(image, readonly, max_entries=entries,
                                                      timeout_ms=timeout_ms)
                    elif via == "nbd":
                        att = await self._attach_nbd(image, readonly)
                    else:
                        att = await self._attach(image, readonly)
                finally:
                    self.after_change()
        return {"attached": att.record()}

    async def _check_new(self, image: str) -> str:
        """The image's real path, if attaching it is allowed."""
        # In a thread: a path into our own FUSE mount would need this thread to answer.
        real = await trio.to_thread.run_sync(os.path.realpath, image)
        if real == self.run.fuse_dir or real.startswith(self.run.fuse_dir + "/"):
            raise UsageError(f"{image}: is a disk this daemon serves (its FUSE file); "
                             "attach the image itself")
        for a in self.attachments.values():
            if a.realpath == real:
                raise UsageError(f"{image}: already attached as {a.device}")
        return real

    async def _attach_kmod(self, image: str, readonly: bool, take_over: int = -1, *,
                           max_entries: int = DEFAULT_MAX_ENTRIES,
                           timeout_ms: int = DEFAULT_DAEMON_TIMEOUT_MS) -> Attachment:
        """Attach through the kernel shim: /dev/cowdN, its channel served in the daemon's
        nursery, the kernel's remap table (``max_entries`` clusters) primed; without a
        daemon its misses wait ``timeout_ms`` for a new one.  ``take_over``: the index of a
        device a dead daemon left, to serve again instead of creating one (it keeps the
        bound and timeout it was created with)."""
        real = await self._check_new(image)
        problem = await trio.to_thread.run_sync(module_problem)
        if problem is not None:
            raise UsageError(f"--via kmod: {problem}")
        name = self._name_for(image)
        disk = await self.open_disk(image, readonly)
        try:
            if take_over >= 0:
                kdev = KmodDevice.take_over(disk, take_over)
            else:
                kdev = KmodDevice.create(disk, max_entries=max_entries,
                                         daemon_timeout_ms=timeout_ms)
            try:
                await self.nursery.start(kdev.serve)
                await kdev.prime()
                if take_over < 0:
                    await kdev.rescan_partitions()
                rdev = (await trio.to_thread.run_sync(os.stat, kdev.device)).st_rdev
            except BaseException:
                with contextlib.suppress(Exception):
                    kdev.remove(force=True)
                kdev.close()
                raise
        except BaseException:
            await disk.close()
            raise
        att = Attachment(name, image, real, disk, "kmod", "", kdev.device, rdev, (0, 0),
                         disk.readonly, kmod=kdev)
        self.attachments[name] = att
        self._save()
        log.info("attached %s as %s (via kmod%s; %d remaps primed in %.3f s)", image,
                 kdev.device, ", taken over" if take_over >= 0 else "", kdev.primed_entries,
                 kdev.prime_seconds or 0.0)
        return att

    async def _attach_nbd(self, image: str, readonly: bool) -> Attachment:
        """Attach through the kernel's nbd client: the Disk is an export of this attacher's
        NBD server, served over a socketpair whose other end /dev/nbdN reads."""
        real = await self._check_new(image)
        problem = await trio.to_thread.run_sync(nbd_problem)
        if problem is not None:
            raise UsageError(f"--via nbd: {problem}")
        name = self._name_for(image)
        disk = await self.open_disk(image, readonly)
        try:
            if self.nbd_server is None:
                self.nbd_server = NbdServer(self.nbd_disks)
            self.nbd_disks[name] = disk
            try:
                ndev = await NbdDevice.connect(self.nursery, self.nbd_server, name)
                try:
                    rdev = (await trio.to_thread.run_sync(os.stat, ndev.device)).st_rdev
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await ndev.disconnect()
                    raise
            except BaseException:
                del self.nbd_disks[name]
                raise
        except BaseException:
            await disk.close()
            raise
        att = Attachment(name, image, real, disk, "nbd", "", ndev.device, rdev, (0, 0),
                         disk.readonly, nbd=ndev)
        self.attachments[name] = att
        self._save()
        log.info("attached %s as %s (via nbd, %d bytes, flags %#x)", image, ndev.device,
                 ndev.size_bytes, ndev.flags)
        return att

    async def take_over(self, records: list[dict[str, Any]]) -> list[str]:
        """Serve again the kernel-shim devices a dead daemon of this run dir left (their
        waiting requests resume).  Returns one line per device taken over or given up."""
        lines = []
        for rec in records:
            index, image = rec.get("index"), rec.get("image")
            if rec.get("frontend") != "kmod" or not isinstance(index, int) or \
                    not isinstance(image, str):
                continue
            dev = f"/dev/cowd{index}"
            if not _exists(dev):
                continue
            try:
                async with self.op_lock:
                    await self._attach_kmod(image, bool(rec.get("readonly")), take_over=index)
                lines.append(f"took over {dev} ({image})")
            except (UsageError, RequestError, OSError) as e:
                lines.append(f"could not take over {dev} ({image}): {e}")
                log.warning("could not take over %s (%s): %s", dev, image, e)
        return lines

    async def _attach(self, image: str, readonly: bool) -> Attachment:
        real = await self._check_new(image)
        name = self._name_for(image)
        disk = await self.open_disk(image, readonly)
        try:
            fe = await self._frontend()
            path = fe.add_disk(name, disk)
            try:
                inode = fe.stats()["files"][name]["inode"]
                dev = await losetup_attach(path, disk.readonly)
                info = await trio.to_thread.run_sync(loop_info, dev)
                if info is None or info.backing_file != path or \
                        (info.backing_dev, info.backing_ino) != (self.mount_dev, inode):
                    # Not what we asked for; not ours to touch either.
                    raise UsageError(f"{dev}: losetup named a device that does not read "
                                     f"{path} (backing_file={info and info.backing_file})")
                if not info.dio:
                    log.warning("%s: direct I/O is off (the page cache holds a second copy)",
                                dev)
                rdev = (await trio.to_thread.run_sync(os.stat, dev)).st_rdev
            except BaseException:
                await fe.remove_disk(name, force=True)
                raise
        except BaseException:
            await disk.close()
            raise
        att = Attachment(name, image, real, disk, "fuse", path, dev, rdev,
                         (info.backing_dev, info.backing_ino), disk.readonly)
        self.attachments[name] = att
        self._save()
        log.info("attached %s as %s (%s, via fuse)", image, dev, path)
        return att

    def find(self, req: dict[str, Any]) -> Attachment | None:
        """The attachment a detach request names: by device number, image path or name."""
        rdev = req.get("rdev")
        image = req.get("image")
        target = req.get("target")
        for a in self.attachments.values():
            if isinstance(rdev, int) and rdev == a.rdev:
                return a
            if isinstance(image, str) and image in (a.realpath, a.image):
                return a
            if isinstance(target, str) and target in (a.name, a.device):
                return a
        return None

    async def detach(self, req: dict[str, Any]) -> dict[str, Any]:
        async with self.op_lock:
            att = self.find(req)
            if att is None:
                raise RequestError(errno.ENOENT, f"{req.get('target')}: not attached "
                                   f"(run dir {self.run.path})")
            with trio.CancelScope(shield=True):
                await self._detach(att)
                exiting = self.after_change()
        return {"detached": att.record(), "exiting": exiting}

    async def _detach(self, att: Attachment) -> None:
        if att.kmod is not None:
            await self._detach_kmod(att, att.kmod)
            return
        if att.nbd is not None:
            await self._detach_nbd(att, att.nbd)
            return
        fe = self.fuse
        assert fe is not None
        info = await self._ours(att)
        if info is not None:
            if await trio.to_thread.run_sync(is_busy, att.device):
                raise UsageError(f"{att.device}: in use (a mounted file system?); "
                                 "unmount it first")
            if not att.disk.readonly:
                await att.disk.flush()
            await losetup_detach(att.device)
        else:
            log.warning("%s: no longer reads %s; not touching it", att.device, att.file)
        if not await self._released(att.name, RELEASE_TIMEOUT_S):
            log.warning("%s: still open %g s after losetup -d; removing it anyway",
                        att.file, RELEASE_TIMEOUT_S)
        await fe.remove_disk(att.name, force=True)
        await self._forget(att)

    async def _forget(self, att: Attachment) -> None:
        """The end of every detach: drop the record, then close the disk."""
        del self.attachments[att.name]
        self._save()
        try:
            await att.disk.close()
        finally:
            log.info("detached %s (%s)", att.device, att.image)

    async def _detach_kmod(self, att: Attachment, kdev: KmodDevice) -> None:
        await trio.to_thread.run_sync(kdev.remove)  # refused while the device is open
        kdev.close()
        if not att.disk.readonly:
            await att.disk.flush()  # the kernel's writes sit in the files' page cache
        await self._forget(att)

    async def _detach_nbd(self, att: Attachment, ndev: NbdDevice) -> None:
        if await trio.to_thread.run_sync(is_busy, att.device):
            raise UsageError(f"{att.device}: in use (a mounted file system?); unmount it first")
        if not att.disk.readonly:
            await ndev.sync()  # the kernel's cached writes, then a FLUSH
        await ndev.disconnect()
        self.nbd_disks.pop(att.name, None)
        await self._forget(att)

    async def _detach_all_nbd(self) -> None:
        """At shutdown, disconnect every /dev/nbdN (one still mounted too: its I/O fails from
        now on, as it would once this process is gone) before the disks close."""
        with trio.CancelScope(shield=True):
            self.accepting = False
            for att in list(self.attachments.values()):
                ndev = att.nbd
                if ndev is None:
                    continue
                try:
                    if await trio.to_thread.run_sync(is_busy, att.device):
                        log.warning("%s: still in use at shutdown; disconnecting it anyway",
                                    att.device)
                    elif not att.disk.readonly:
                        await ndev.sync()
                except OSError as e:
                    log.error("%s: %s", att.device, e)
                await ndev.disconnect()

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for a in self.attachments.values():
            d = a.disk
            e = {**a.record(), "size": d.size, "remap": d.counters.as_dict(),
                 "ops": d.stats()["ops"]}
            if a.kmod is not None:
                e["kmod"] = a.kmod.stats()
            if a.nbd is not None:
                e["nbd"] = a.nbd.stats()
            out.append(e)
        return out

    async def list_disks(self, _req: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"attached": self.entries()}

    # -- shutdown ------------------------------------------------------------------------------

    async def quiesce(self) -> None:
        """Refuse new attaches and wait for the running one (shutdown calls this)."""
        self.accepting = False
        async with self.op_lock:
            pass

    async def _detach_all(self) -> None:
        with trio.CancelScope(shield=True):
            self.accepting = False
            for att in list(self.attachments.values()):
                if att.kmod is not None or att.nbd is not None:
                    continue  # _detach_all_kmod, _detach_all_nbd
                try:
                    info = await self._ours(att)
                    if info is None:
                        continue
                    if await trio.to_thread.run_sync(is_busy, att.device):
                        log.warning("%s: still in use at shutdown; detaching it anyway (it "
                                    "goes away when it is unmounted; its I/O fails until then)",
                                    att.device)
                    await losetup_detach(att.device)
                except (OSError, UsageError) as e:
                    log.error("%s: %s", att.device, e)
            for att in list(self.attachments.values()):
                if att.frontend == "fuse" and not await self._released(att.name,
                                                                 RELEASE_TIMEOUT_S / 2):
                    break  # the frontend's close waits and aborts what stays open

    async def _detach_all_kmod(self) -> None:
        """At shutdown, remove each kernel-shim device that nothing has open; leave the others
        for a new daemon to take over (their requests wait, then fail after the kernel's
        timeout)."""
        await trio.lowlevel.checkpoint()
        self.accepting = False
        for att in list(self.attachments.values()):
            kdev = att.kmod
            if kdev is None:
                continue
            try:
                await trio.to_thread.run_sync(kdev.remove)
            except (UsageError, RequestError) as e:
                log.warning("%s: left for a new daemon to take over (%s)", att.device, e)
            kdev.close()

    async def _close_all(self) -> None:
        with trio.CancelScope(shield=True):
            first: BaseException | None = None
            for att in list(self.attachments.values()):
                try:
                    await att.disk.close()
                except Exception as e:
                    log.error("%s: closing failed: %s", att.image, e)
                    first = first or e
            self.attachments.clear()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.run.state)
            if first is not None:
                raise first


# ---- the CLI's side ------------------------------------------------------------------------------

def ping(run: RunDir, timeout: float = 10.0) -> dict[str, Any]:
    """The running daemon's ping reply; DaemonUnavailable if none answers."""
    return control.request(run.control, "ping", timeout=timeout)


def _log_tail(run: RunDir) -> str:
    try:
        with open(run.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read()
    except OSError:
        return "(no log)"
    lines = [ln for ln in tail.decode(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("cowd:")]
    return (errors or lines or ["(empty log)"])[-1].strip()


def spawn_daemon(run: RunDir) -> subprocess.Popen[bytes]:
    """Start ``cowd daemon`` in a new session, its output appended to the run dir's log."""
    import cowd

    run.make()
    src = os.path.dirname(os.path.dirname(os.path.abspath(cowd.__file__)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with open(run.log, "ab") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "cowd.cli", "daemon", "--run-dir", run.path],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd="/", env=env)


def ensure_daemon(run: RunDir, say: Callable[[str], None]) -> dict[str, Any]:
    """A daemon that answers on ``run``'s control socket, started if none does.  A daemon
    that owns the run dir but does not answer yet (starting, or exiting) is waited for; a new
    one is started only when nobody owns the run dir."""
    with contextlib.suppress(DaemonUnavailable):
        return ping(run)
    run.make()
    limit_s = START_TIMEOUT_S + PID_WAIT_S
    with file_lock(run.start_lock, limit_s):
        proc: subprocess.Popen[bytes] | None = None
        deadline = time.monotonic() + limit_s
        while True:
            try:
                reply = ping(run, timeout=5.0)
                break
            except DaemonUnavailable:
                pass
            if proc is None and not is_owned(run.pid_file):
                proc = spawn_daemon(run)
            if proc is not None and (rc := proc.poll()) is not None:
                raise UsageError(f"the daemon exited while starting (status={rc}): "
                                 f"{_log_tail(run)} (log: {run.log})")
            if time.monotonic() > deadline:
                who = proc.pid if proc is not None else holder_pid(run.pid_file)
                raise UsageError(f"the daemon did not answer within {limit_s:.0f} s "
                                 f"(pid={who}, log: {run.log})")
            time.sleep(0.02)
    if proc is not None:
        for line in reply.get("cleanup", []):
            say(f"cleaned up after a dead daemon: {line}")
        # The daemon is in a session of its own and outlives us; forget it without the
        # "still running" warning.
        proc.returncode = 0
    return reply


def client_attach(run: RunDir, image: str, via: str, readonly: bool,
                  say: Callable[[str], None], **kmod: int) -> dict[str, Any]:
    """Attach ``image`` through the run dir's daemon (started if none runs); ``kmod``:
    kmod_entries / kmod_timeout_ms for --via kmod."""
    for _ in range(ATTACH_ATTEMPTS):
        ensure_daemon(run, say)
        try:
            reply = control.request(run.control, "attach", timeout=ATTACH_REQUEST_TIMEOUT_S,
                                    image=image, via=via, readonly=readonly, **kmod)
        except DaemonUnavailable:
            # It was exiting (its last disk was just detached): wait and start another.
            wait_gone(run, EXIT_WAIT_S)
            continue
        att: dict[str, Any] = reply["attached"]
        return att
    raise UsageError(f"{run.path}: the daemon kept exiting; try again")


def wait_gone(run: RunDir, timeout_s: float) -> bool:
    """Wait until nothing owns ``run`` (the daemon exited); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while is_owned(run.pid_file):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def detach_target(target: str) -> dict[str, Any]:
    """The detach request's fields for what the user typed: a block device (by number), an
    image (by real path) or an attachment's name."""
    req: dict[str, Any] = {"target": target}
    try:
        st = os.stat(target)
    except OSError:
        return req
    if stat.S_ISBLK(st.st_mode):
        req["rdev"] = st.st_rdev
    elif stat.S_ISREG(st.st_mode):
        req["image"] = os.path.realpath(target)
    return req


def cleanup_dead(run: RunDir) -> Cleanup | None:
    """With no daemon answering: own the run dir and clean up after a dead daemon.  None if
    some daemon owns the run dir after all (it is starting, or it does not answer)."""
    if not os.path.isdir(run.path):
        return Cleanup()
    with file_lock(run.start_lock, START_TIMEOUT_S + PID_WAIT_S):
        pid = PidFile(run.pid_file)
        if not pid.try_acquire():
            return None
        try:
            return trio.run(cleanup_stale, run)
        finally:
            pid.release()


def matches(done: Cleanup, req: dict[str, Any]) -> bool:
    """Whether a cleanup detached what a detach request names."""
    for dev, name, _busy in done.loops:
        rec = next((e for e in done.state if e.get("name") == name), {})
        if "rdev" in req:
            with contextlib.suppress(OSError):
                if os.stat(dev).st_rdev == req["rdev"]:
                    return True
            if rec.get("device") == req["target"]:
                return True
        image = rec.get("image")
        if "image" in req and isinstance(image, str) and \
                os.path.realpath(image) == req["image"]:
            return True
        if req["target"] in (name, dev):
            return True
    for dev, image, _outcome in done.kmod + done.nbd:
        if req["target"] == dev or req.get("image") == os.path.realpath(image):
            return True
    return False


__all__ = [
    "Attacher",
    "Attachment",
    "Cleanup",
    "LoopInfo",
    "PidFile",
    "RunDir",
    "choose_frontend",
    "cleanup_dead",
    "cleanup_stale",
    "client_attach",
    "detach_target",
    "ensure_daemon",
    "is_busy",
    "loop_info",
    "loops_backed_under",
    "take_run_dir",
    "wait_gone",
]
