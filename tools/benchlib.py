"""What every benchmark shares: the JSON header (date, kernel, machine, commit, load), the
fio runner and its parser, dropping the page cache, CPU counters from /proc, quiet commands,
and the work directory that is cleaned up whatever happens (signals included).

Layer: tools (not a test; pytest does not collect it).  No cowd import: the benchmarks are
clients of the ``cowd`` command; this module drives fio, reads /proc and removes files.

The fio runner.  :func:`run` builds one fio command with one job per target (a job section
starts at ``--name``; the engine and its target follow it, so one process can drive 16
clients, each with its own connection or device): block devices with libaio and O_DIRECT, NBD
exports with fio's nbd engine (the same client for cowd and qemu-nbd).  Unless
``time_based`` is asked for, a job ends after one pass over ``size`` bytes or at
``runtime_s``, whichever comes first: a write job on a fresh overlay then writes each block
at most once, so every write is a first write.  ``verify`` writes with a crc32c header per
block and reads every block back (fio's do_verify), exiting non-zero on the first mismatch.
The figures of one job side (read or write) come from :func:`figures`: bandwidth, IOPS,
bytes, completion latency percentiles.

The work directory.  :func:`in_work_dir` runs a benchmark's body in a fresh directory with
SIGTERM/SIGHUP unwinding like Ctrl-C and its clean-up run with every signal ignored;
:func:`signals_deferred` runs one clean-up step whole; :func:`quiet` runs a clean-up command
in its own session (a second Ctrl-C does not kill it midway).  :func:`scratch_dir` is the
plain version for benchmarks that make no devices or mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
COMMAND_TIMEOUT_S = 600  # any single command; a hung one is an error, not a hang
CLEANUP_TIMEOUT_S = 60

FIO_TIMEOUT_S = 900  # one fio command; a hung one is an error, not a hang


@dataclass(frozen=True)
class Job:
    rw: str  # fio's rw: read, write, randread, randwrite
    bs: str  # block size: 4k, 1M
    qd: int  # iodepth

    @property
    def side(self) -> str:
        return "read" if "read" in self.rw else "write"


def target_args(target: str) -> list[str]:
    """A block device path, or an NBD URI (nbd+unix://... or nbd://...)."""
    if target.startswith("nbd"):
        return ["--ioengine=nbd", f"--uri={target}"]
    return ["--ioengine=libaio", "--direct=1", f"--filename={target}"]


def figures(side: dict[str, object]) -> dict[str, float]:
    """The figures of one side (``job['read']`` or ``job['write']``) of fio's JSON."""
    clat = side["clat_ns"]
    assert isinstance(clat, dict)
    pct = clat.get("percentile", {})
    return {"MBps": float(side["bw_bytes"]) / 1e6,  # type: ignore[arg-type]
            "iops": float(side["iops"]),  # type: ignore[arg-type]
            "bytes": float(side["io_bytes"]),  # type: ignore[arg-type]
            "ios": float(side["total_ios"]),  # type: ignore[arg-type]
            "seconds": float(side["runtime"]) / 1000,  # type: ignore[arg-type]
            "lat_p50_us": pct.get("50.000000", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000}


def command(targets: list[str], job: Job, size: int | None, runtime_s: float | None,
            verify: bool = False, time_based: bool = False,
            ramp_s: float | None = None) -> list[str]:
    args = ["fio", "--output-format=json", f"--rw={job.rw}", f"--bs={job.bs}",
            f"--iodepth={job.qd}"]
    if size is not None:
        args.append(f"--size={size}")
    if runtime_s is not None:
        args.append(f"--runtime={runtime_s}")
        if time_based:
            args.append("--time_based")
    if ramp_s is not None:
        args.append(f"--ramp_time={ramp_s}")
    if job.rw.startswith("rand"):
        args.append("--randrepeat=0")
    if verify:
        # no verify state file: fio would leave it in the working directory
        args += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0"]
    elif runtime_s is None:
        args.append("--end_fsync=1")
    for i, t in enumerate(targets):
        args += [f"--name=job{i}", *target_args(t)]
    return args


def run(targets: list[str], job: Job, size: int | None = None,
        runtime_s: float | None = None, verify: bool = False,
        time_based: bool = False, ramp_s: float | None = None) -> list[dict[str, float]]:
    """Run ``job`` on every target at once; the figures of each, in the targets' order.
    A fio that fails (a verify mismatch, an I/O error) is a RuntimeError with its output."""
    args = command(targets, job, size, runtime_s, verify, time_based, ramp_s)
    p = bounded(args, FIO_TIMEOUT_S, f"fio {job}")
    if p.returncode != 0:
        tail = " | ".join((p.stderr.strip() or p.stdout.strip()).splitlines()[-4:])
        raise RuntimeError(f"fio {job.rw} {job.bs} QD{job.qd} on {', '.join(targets)}: "
                           f"exit {p.returncode}: {tail}")
    text = p.stdout
    doc = json.loads(text[text.index("{"):])  # the nbd engine prints lines before the JSON
    jobs = sorted(doc["jobs"], key=lambda j: int(j["jobname"][3:]))
    out = []
    for j in jobs:
        f = figures(j[job.side])
        if verify:
            f["verified_bytes"] = float(j["read"]["io_bytes"])
        out.append(f)
    return out


# ---- the JSON header -------------------------------------------------------------------------

def machine() -> str:
    """``x86_64, 2 cores (CPU model), N GiB RAM``: which machine a figure comes from."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) >> 20
    return f"{platform.machine()}, {os.cpu_count()} cores ({model}), {mem} GiB RAM"


def commit(*dirty_paths: str) -> str:
    """The checkout's short commit, ``+dirty`` when tracked files under ``dirty_paths``
    (default: the code a benchmark measures) differ from it; ``unknown`` outside git."""
    p = quiet("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    if p.returncode != 0:
        return "unknown"
    dirty = quiet("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no",
                  "--", *(dirty_paths or ("cowd", "formats", "kmod", "tools")))
    return p.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def header(*dirty_paths: str) -> dict[str, object]:
    """The fields every benchmark's JSON starts with.  Other work on the machine skews every
    figure (the machines are shared): the 1/5/15-minute load averages at the start say how
    quiet it was (a benchmark may add ``loadavg_after``).  ``cowd`` names the command
    measured when $COWD chose another checkout's."""
    doc: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "kernel": platform.release(),
        "machine": machine(), "commit": commit(*dirty_paths),
        "loadavg": list(os.getloadavg())}
    if os.environ.get("COWD"):
        doc["cowd"] = os.environ["COWD"]
    return doc


def cowd_command() -> list[str]:
    """How the benchmarks run cowd: $COWD (another checkout's ``.venv/bin/cowd``, to measure
    it against this one in one run), this checkout's venv script, the one on PATH, or
    ``python -m cowd.cli``."""
    if os.environ.get("COWD"):
        return [os.environ["COWD"]]
    script = ROOT / ".venv" / "bin" / "cowd"
    if script.exists():
        return [str(script)]
    found = shutil.which("cowd")
    return [found] if found else [sys.executable, "-m", "cowd.cli"]


def missing_tool(suite: str, *tools: str) -> bool:
    """Say on stderr which of ``tools`` is not installed (True), or nothing (False)."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{suite}: {tool} not installed (make deps installs it from packages.txt)",
                  file=sys.stderr)
            return True
    return False


def parse_size(text: str) -> int:
    """``128M``, ``1G``, ``4096``: a size from the command line, in bytes."""
    t = text.upper().rstrip("B").rstrip("I")
    mult = {"K": 10, "M": 20, "G": 30}.get(t[-1:], 0)
    return int(t[:-1] if mult else t) << mult


# ---- the page cache and CPU counters ---------------------------------------------------------

def forget_boot_trace(image: Path) -> None:
    """Remove the boot trace (``BASE.cowd-trace``, cowd/disk/boottrace.py) of the base under
    ``image``'s chain, before a cowd serves it: an earlier run's trace would have the new
    server prefetch the base, so a cold run would read a warm cache.  (Traces are measured
    where they are the point: ``tools.bench boot --trace``.)"""
    p = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(image)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    if p.returncode != 0:
        return  # not an image qemu-img reads: nothing of ours to forget
    from cowd.disk.boottrace import trace_path  # here: the other benches need no cowd

    bottom = json.loads(p.stdout)[-1]["filename"]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(trace_path(bottom))


def drop_caches(what: int = 3) -> None:
    """Write back and drop the page cache (root only: OSError otherwise); ``what`` is the
    kernel's: 1 the page cache only, 3 also dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{what}\n")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc/PID/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def cpu_seconds(pid: int) -> float:
    return cpu_ticks(pid) / HZ


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a daemon's workers)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (a daemon and its worker processes; a
    child that exits between two readings takes its share with it)."""
    total = cpu_ticks(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):
            total += cpu_ticks(child)
    return total / HZ


def idle_ticks() -> tuple[int, int]:
    """(idle + iowait, total) ticks of the whole machine (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[3] + f[4], sum(f)


# ---- commands --------------------------------------------------------------------------------

def bounded(args: list[str] | tuple[str, ...], timeout_s: float,
            what: str) -> subprocess.CompletedProcess[str]:
    """Run a command (output captured, no stdin); one that hangs past ``timeout_s`` is a
    RuntimeError naming ``what``, not a hang."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no answer after {timeout_s} s") from None


def sh(*args: str) -> str:
    """Run a command; its stripped stdout, or RuntimeError naming it with its stderr."""
    p = bounded(args, COMMAND_TIMEOUT_S, " ".join(args))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout.strip()


def quiet(*args: str, timeout: float = CLEANUP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """A clean-up command: in its own session, so a second Ctrl-C does not kill it midway."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -1, "", f"timed out after {timeout:.0f} s")


# ---- the work directory ----------------------------------------------------------------------

class Interrupted(Exception):
    """SIGTERM/SIGHUP: unwind through every finally block like Ctrl-C."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run one clean-up step whole: a Ctrl-C, SIGTERM or SIGHUP arriving meanwhile is raised
    when the step is done, not in the middle of it (a ``cowd detach`` killed halfway leaves
    the daemon doing what its CLI no longer knows).  Signals already ignored stay ignored."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        if old[s] is not signal.SIG_IGN:
            signal.signal(s, lambda signum, _frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            if got[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise Interrupted(signal.Signals(got[0]).name)


def in_work_dir(prefix: str, parent: str, body: Callable[[Path], None],
                cleanup: Callable[[], list[str]], say: Callable[[str], None]) -> int:
    """Make a work dir under ``parent`` and run ``body`` in it with SIGTERM/SIGHUP unwinding
    like Ctrl-C.  Whatever happens, ``cleanup()`` (what it could not remove) runs with every
    signal ignored, and the work dir is removed unless something was left in it.
    Returns 0, 1 (failed, or something left behind) or 130 (interrupted)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).resolve()
    rc = 0
    try:
        say(f"work dir {work}")
        body(work)
    except (KeyboardInterrupt, Interrupted) as e:
        say(f"interrupted ({str(e) or 'SIGINT'}); cleaning up")
        rc = 130
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        say(f"failed: {e}")
        rc = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish the clean-up whatever comes
        left = cleanup()
        if left:
            say(f"left behind, not removing {work}: {', '.join(left)}")
            rc = rc or 1
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


@contextlib.contextmanager
def scratch_dir(prefix: str, parent: str | None = "/var/tmp",
                keep: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A fresh work dir under ``parent``, removed afterwards whatever happens; ``keep``: use
    that directory instead (created if needed) and leave it."""
    if keep is not None:
        work = Path(keep)
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_json(path: str | os.PathLike[str], doc: object, indent: int = 1) -> None:
    """``doc`` as JSON at ``path`` (its folder made if needed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=indent) + "\n")
