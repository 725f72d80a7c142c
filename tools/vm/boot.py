"""Layer: tools (VM boots).  Boots qemu-system-x86_64 (TCG) from a cowd disk and times it.

Theory of operation.  A boot is one qemu process: Debian's kernel and the initramfs from
``tools/mkbase`` (``-kernel``/``-initrd``, no bootloader), one virtio disk as the root
(``root=/dev/vda``), the serial console on qemu's stdout.  The base's /sbin/init does its
first-boot work, syncs, prints one ``COWD-BOOT-OK key=value ...`` line and powers off (or
prints ``COWD-BOOT-FAIL ...``).  The boot time is the wall time from starting qemu to the end
of that line; :func:`boot` reads the console with a deadline and kills qemu (its own child,
by pid) if the marker never comes.

Where the root disk comes from (``via``):

- ``nbd``: ``cowd serve IMAGE... --nbd unix:SOCK`` (one daemon, each image an export named
  after its file) and qemu's own NBD client, ``file=nbd+unix:///NAME?socket=SOCK``.
- ``fuse``: ``cowd attach IMAGE --via fuse`` prints /dev/loopN (a loop device on the daemon's
  FUSE file); qemu opens it as a raw disk; ``cowd detach`` afterwards.
- ``kmod``: the same as ``fuse`` with ``cowd attach --via kmod`` (/dev/cowdN, the kernel
  shim).  This is the hook for issue 5: it calls the real command, which refuses with a
  one-line reason where /dev/cowd-control is absent (the host kernel loads no modules);
  where the shim is loaded (a virtme-ng guest that insmod'ed it) the same call boots from
  /dev/cowdN (tools/vm/boot_in_guest.py does that, qemu TCG inside TCG).  Nothing here
  imitates the shim.
- ``qemu``: no cowd at all; qemu opens the image itself (the overlay as a qcow2, proof that it
  is a standard file; or a raw base copy, the baseline of the boot benchmark).

Invariants: every process this module starts is its own child, stopped by pid in a
``finally`` (qemu: SIGKILL after the deadline; ``cowd serve``: SIGTERM, which flushes and
closes the disks, SIGKILL only if it does not exit in time); the daemon ``cowd attach``
starts is not, and goes by itself after the last ``cowd detach``.  Every cowd daemon runs in the
caller's run dir (never /run/cowd), and each qemu writes its pid to ``RUN/qemu-*.pid`` so a
test's teardown can find one whose parent died.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.benchlib import cowd_command
from tools.vm import image

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_KERNEL = image.DEFAULT_KERNEL
DEFAULT_BUILD_DIR = REPO / "build" / "vm"
MARKER_OK = "COWD-BOOT-OK"
MARKER_FAIL = "COWD-BOOT-FAIL"
VIAS = ("nbd", "fuse", "kmod", "qemu")
DEFAULT_MEMORY_MIB = 512
DEFAULT_DEADLINE_S = 120.0  # a TCG boot of the base takes ~8 s alone, ~2x that two at a time
POWEROFF_WAIT_S = 30.0  # after the marker: the guest remounts / read-only and powers off
SERVE_START_S = 30.0  # cowd serve opens and primes the disks before it listens
STOP_POLL_S = 0.2  # how soon a boot notices that another one failed or the user interrupted
CONSOLE_KEEP_BYTES = 1 << 20  # a console that talks more than this is cut (kept: the tail)
_FIELD = re.compile(r"([a-z0-9-]+)=(\S*)")


class BootError(Exception):
    """A one-line reason a boot could not run or did not reach its marker."""


@dataclass
class BootResult:
    image: str
    via: str
    ok: bool
    seconds: float | None  # qemu start -> end of the marker line
    total_seconds: float  # qemu start -> qemu exit (or kill)
    marker: str | None
    fields: dict[str, str]
    returncode: int | None
    console: str = field(repr=False)
    reason: str | None = None
    started_at: float = 0.0  # wall clock (time.time()) when qemu was started
    qemu_cpu_seconds: float = 0.0  # qemu's user + system time (less noisy than wall time)

    @property
    def ended_at(self) -> float:
        return self.started_at + self.total_seconds

    @property
    def boot_number(self) -> int:
        return int(self.fields.get("boot", "0"))

    def as_json(self) -> dict[str, object]:
        return {"image": self.image, "via": self.via, "ok": self.ok, "seconds": self.seconds,
                "total_seconds": self.total_seconds, "marker": self.marker,
                "fields": self.fields, "returncode": self.returncode, "reason": self.reason,
                "started_at": self.started_at, "qemu_cpu_seconds": self.qemu_cpu_seconds}


def find_initrd(image: Path, explicit: Path | None) -> Path:
    """--initrd, else initramfs.img beside the image, else in build/vm (tools/mkbase's
    default output directory)."""
    if explicit is not None:
        if not explicit.is_file():
            raise BootError(f"{explicit}: no such initramfs (--initrd)")
        return explicit
    for d in (image.resolve().parent, DEFAULT_BUILD_DIR):
        if (d / "initramfs.img").is_file():
            return d / "initramfs.img"
    raise BootError(f"{image}: no initramfs.img beside it or in {DEFAULT_BUILD_DIR} "
                    "(run tools/mkbase, or pass --initrd)")


def image_format(image: Path) -> str:
    """qemu's name for the image's format (qemu-img info)."""
    p = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                       text=True, timeout=30)
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1:] or ["qemu-img info failed"]
        raise BootError(f"{image}: {last[0]}")
    fmt = json.loads(p.stdout)["format"]
    assert isinstance(fmt, str)
    return fmt


def qemu_direct_drive(image: Path) -> str:
    """The -drive for qemu opening the image itself (``--via qemu``)."""
    fmt = image_format(image)
    if fmt == "vpc" and _vhd_disk_type(image) == 4:
        raise BootError(f"{image}: qemu's vpc driver does not read differencing VHDs "
                        "(disk_type=4); boot it --via nbd or --via fuse")
    if "," in str(image):
        raise BootError(f"{image}: a comma in the path cannot be passed to -drive")
    return f"file={image},format={fmt},if=virtio"


def _vhd_disk_type(image: Path) -> int:
    with open(image, "rb") as f:
        f.seek(-512, os.SEEK_END)
        footer = f.read(512)
    return int.from_bytes(footer[60:64], "big") if footer[:8] == b"conectix" else 0


def qemu_command(drive: str, kernel: Path, initrd: Path, memory_mib: int,
                 pidfile: Path | None = None, append: Sequence[str] = ()) -> list[str]:
    # +rdrand: the guest's crng is ready at once instead of ~1.5 s into a TCG boot (the
    # first boot's random machine id and keys waited for it); a real host CPU has RDRAND.
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64,+rdrand",
           "-m", str(memory_mib), "-smp", "1",
           "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio",
           "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
           # panic=-1: a kernel panic reboots, which -no-reboot turns into qemu exiting.
           "-append", " ".join(["root=/dev/vda", "rw", "console=ttyS0", "panic=-1",
                                *append]),
           "-drive", drive]
    if pidfile is not None:
        cmd += ["-pidfile", str(pidfile)]
    return cmd


def boot(cmd: list[str], image: str, via: str,
         deadline_s: float = DEFAULT_DEADLINE_S,
         console_log: Path | None = None, stop: threading.Event | None = None) -> BootResult:
    """Run one qemu boot, read its console until the marker, wait for power-off.  ``stop``
    (set by another thread) ends the boot early: qemu is killed."""
    if stop is not None and stop.is_set():
        raise BootError(f"{image}: boot not started (interrupted)")
    started_at = time.time()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    console = bytearray()
    marker: str | None = None
    seconds: float | None = None
    reason: str | None = None
    eof = False
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            pending = b""
            while not eof:
                now = time.monotonic()
                # the deadline is for the marker; after it, power-off gets its own time
                limit = start + (deadline_s if seconds is None else seconds + POWEROFF_WAIT_S)
                if now >= limit:
                    reason = (f"no {MARKER_OK} line within {deadline_s:.0f} s" if marker is None
                              else f"qemu did not exit {POWEROFF_WAIT_S:.0f} s after the marker")
                    break
                if stop is not None and stop.is_set():
                    reason = "interrupted"
                    break
                if not sel.select(min(limit - now, STOP_POLL_S)):
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    eof = True
                    chunk = b"\n"
                console += chunk
                if len(console) > CONSOLE_KEEP_BYTES:
                    del console[:len(console) - CONSOLE_KEEP_BYTES]
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").replace("\r", "")
                    if marker is None and MARKER_OK in line:
                        marker = line[line.index(MARKER_OK):].strip()
                        seconds = time.monotonic() - start
                    elif MARKER_FAIL in line and reason is None:
                        reason = line[line.index(MARKER_FAIL):].strip()
    finally:
        # Leaving early (a reason, or an exception such as Ctrl-C): qemu goes at once.  After
        # EOF it is exiting by itself.
        if _running(proc) and (reason is not None or not eof):
            proc.kill()
        try:
            rc, cpu = _reap(proc, POWEROFF_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, cpu = _reap(proc, None)
        proc.stdout.close()
    total = time.monotonic() - start
    text = console.decode(errors="replace").replace("\r", "")
    if console_log is not None:
        console_log.write_text(text)
    if reason is None and marker is None:
        reason = f"qemu exited {rc} without a {MARKER_OK} line"
    fields = dict(_FIELD.findall(marker or ""))
    return BootResult(image=image, via=via, ok=reason is None, seconds=seconds,
                      total_seconds=total, marker=marker, fields=fields, returncode=rc,
                      console=text, reason=reason, started_at=started_at,
                      qemu_cpu_seconds=cpu)


def _running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether our child still runs, without reaping it (so _reap gets its CPU time)."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def _reap(proc: subprocess.Popen[bytes], timeout: float | None) -> tuple[int, float]:
    """Wait for our child like Popen.wait, but with wait4, for its CPU time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout or 0.0)
        time.sleep(0.02)


# ---- cowd as the disk's server -----------------------------------------------------------------

@dataclass
class Served:
    """A running ``cowd serve``: its process, socket and exports."""
    proc: subprocess.Popen[bytes]
    socket: Path
    exports: dict[Path, str]
    log: Path

    def drive(self, image: Path) -> str:
        return f"file=nbd+unix:///{self.exports[image]}?socket={self.socket},format=raw," \
               "if=virtio"


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except FileNotFoundError:
        return ""
    return " | ".join(tail)


@contextlib.contextmanager
def cowd_serve(images: Sequence[Path], run_dir: Path,
               extra: Sequence[str] = ()) -> Iterator[Served]:
    """``cowd serve IMAGES --nbd unix:RUN/nbd.sock --run-dir RUN`` for the duration of the
    block; stopped with SIGTERM (drain, flush, close) and required to exit 0."""
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        raise BootError(f"{images[0].parent}: two images with the same file name would be "
                        "the same NBD export (export name = file name)")
    run_dir.mkdir(parents=True, exist_ok=True)
    sock = run_dir / "nbd.sock"
    log = run_dir / "serve.log"
    cmd = [*cowd_command(), "serve", *map(str, images), "--nbd", f"unix:{sock}",
           "--run-dir", str(run_dir), *extra]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    stopped = False
    try:
        deadline = time.monotonic() + SERVE_START_S
        while not sock.exists():
            if proc.poll() is not None:
                raise BootError(f"cowd serve exited {proc.returncode}: {_log_tail(log, 1)}")
            if time.monotonic() > deadline:
                raise BootError(f"cowd serve: no socket {sock} after {SERVE_START_S:.0f} s")
            time.sleep(0.05)
        yield Served(proc, sock, {p: p.name for p in images}, log)
        stopped = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if stopped and rc != 0:
            raise BootError(f"cowd serve exited {rc} after SIGTERM: {_log_tail(log)}")


def _cowd(*args: str, run_dir: Path, timeout: float = 120) -> str:
    cmd = [*cowd_command(), *args, "--run-dir", str(run_dir)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1:] or [f"exited {p.returncode}"]
        raise BootError(f"cowd {args[0]}: {last[0]}")
    return p.stdout.strip()


@contextlib.contextmanager
def cowd_attached(image: Path, via: str, run_dir: Path,
                  extra: Sequence[str] = ()) -> Iterator[str]:
    """``cowd attach IMAGE --via VIA`` (a block device) for the block, ``cowd detach`` after."""
    dev = _cowd("attach", str(image), "--via", via, *extra, run_dir=run_dir)
    if not dev.startswith("/dev/"):
        raise BootError(f"cowd attach: expected a device, got {dev!r}")
    ok = False
    try:
        yield dev
        ok = True
    finally:
        try:
            _cowd("detach", dev, run_dir=run_dir)
        except BootError:
            if ok:
                raise


def block_drive(dev: str) -> str:
    # cache=none: O_DIRECT on the device, so the guest's flushes are what reach cowd and no
    # second page cache sits between the guest and the daemon.
    return f"file={dev},format=raw,if=virtio,cache=none"


# ---- the user's whole job ------------------------------------------------------------------------

@dataclass
class BootPlan:
    images: list[Path]
    via: str = "nbd"
    kernel: Path = DEFAULT_KERNEL
    initrd: Path | None = None
    memory_mib: int = DEFAULT_MEMORY_MIB
    deadline_s: float = DEFAULT_DEADLINE_S
    parallel: int = 1
    run_dir: Path | None = None  # default: a fresh temporary directory, removed afterwards
    console_dir: Path | None = None
    serve_extra: list[str] = field(default_factory=list)
    attach_extra: list[str] = field(default_factory=list)  # fuse, kmod: cowd attach's flags


def _kill_stale_qemus(run_dir: Path) -> None:
    """qemu processes whose pid files this run dir holds and that still run qemu."""
    for pidfile in run_dir.glob("qemu-*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if "qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                    errors="replace"):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


def _under_a_mount(directory: Path) -> bool:
    prefix = f"{directory.resolve()}/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4].startswith(prefix) for line in f)


def _run_all(fn: Callable[[int], BootResult], n: int, parallel: int, stop: threading.Event,
             run_dir: Path) -> list[BootResult]:
    """fn(0..n-1), ``parallel`` at a time.  An exception (or Ctrl-C) in any of them stops
    the others: boots in flight kill their qemu, boots not started do not start."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=parallel)
    futures = [pool.submit(fn, i) for i in range(n)]
    try:
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _kill_stale_qemus(run_dir)


def run_plan(plan: BootPlan, say: Callable[[BootResult], None] | None = None
             ) -> list[BootResult]:
    """Boot every image once through ``plan.via``, ``plan.parallel`` at a time (one cowd
    daemon for all of them with nbd).  Returns the results in the order of the images."""
    import tempfile

    if plan.via not in VIAS:
        raise BootError(f"--via: expected one of {', '.join(VIAS)} (via={plan.via!r})")
    if plan.parallel < 1:
        raise BootError(f"--parallel: at least 1 (parallel={plan.parallel})")
    if not plan.kernel.is_file():
        raise BootError(f"{plan.kernel}: no such kernel (linux-image-amd64)")
    images = [p.resolve() for p in plan.images]
    for p in images:
        if not p.is_file():
            raise BootError(f"{p}: no such image")
    initrd = find_initrd(images[0], plan.initrd)
    drives: list[str] = []
    if plan.via == "qemu":
        drives = [qemu_direct_drive(p) for p in images]
    own_dir = plan.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="cowd-vm-boot-")) if own_dir else plan.run_dir
    assert run_dir is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.console_dir is not None:
        plan.console_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def one(i: int, drive: str) -> BootResult:
        pidfile = run_dir / f"qemu-{i}.pid"
        cmd = qemu_command(drive, plan.kernel, initrd, plan.memory_mib, pidfile)
        log = None if plan.console_dir is None else \
            plan.console_dir / f"{images[i].name}.{plan.via}.console.txt"
        res = boot(cmd, str(images[i]), plan.via, plan.deadline_s, log, stop)
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        if say is not None:
            say(res)
        return res

    def one_attached(i: int) -> BootResult:
        with cowd_attached(images[i], plan.via, run_dir, plan.attach_extra) as dev:
            return one(i, block_drive(dev))

    try:
        if plan.via == "nbd":
            with cowd_serve(images, run_dir, plan.serve_extra) as served:
                return _run_all(lambda i: one(i, served.drive(images[i])), len(images),
                                plan.parallel, stop, run_dir)
        if plan.via == "qemu":
            return _run_all(lambda i: one(i, drives[i]), len(images), plan.parallel, stop,
                            run_dir)
        # fuse, kmod: one `cowd attach` per image; the first starts the daemon in run_dir,
        # which exits by itself after the last detach.
        return _run_all(one_attached, len(images), plan.parallel, stop, run_dir)
    finally:
        if own_dir and not _under_a_mount(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
