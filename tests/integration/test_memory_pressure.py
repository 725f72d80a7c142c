"""`cowd attach --via fuse` and `--via nbd` under memory pressure: fio's buffered writes with
``--verify`` and a memory hog share one memory cgroup whose limit is far below what they would
like, so the kernel must reclaim by writing dirty pages back through the device (/dev/loopN
over the FUSE file, or /dev/nbdN) -- that is, through the daemon.  Two cases each:

- ``writers``: the daemon runs outside the limited cgroup (its own, as a service should):
  it must keep serving the writeback that frees its clients' memory.
- ``daemon-too``: the daemon shares the limited cgroup, so serving a write-back needs memory
  that only write-back can free.  Without PR_SET_IO_FLUSHER this deadlocks: measured on the
  project machine, whose root lacks CAP_SYS_RESOURCE, the daemon sat in
  ``folio_wait_writeback`` under ``try_charge_memcg`` (its pwrite to the overlay charging a
  page-cache page) waiting for a loop page only it could write.  Every process of the daemon
  (its workers too, which serve FUSE) goes into the cgroup, and each must carry the flag's
  task flags.  The case is collected only where root holds CAP_SYS_RESOURCE, which the flag
  needs; ``tests/guest/test_memory_pressure.py`` runs it in a guest, so CI always runs it.

The nbd cases need the kernel's nbd driver, which the project's host lacks; they run in the
same guest boot as the FUSE ``daemon-too`` case.  There the worker that serves the device's
socketpair (or the daemon, without workers) must also have made its buffers up front: the
stats show them resident and, after the run, that no request needed a buffer beyond them
(``device_buffer_fallbacks``); the device shows the queue limits they are sized for.

Everything is bounded by timeouts: a hang fails the test, and the teardown lifts the limit
and, if the daemon is stuck, aborts its own FUSE connection (fusectl, found by the mount's
device number), or disconnects its /dev/nbdN (NBD_DISCONNECT: the kernel fails what is
queued), so that the stuck processes can finish and be killed.

Oracles: fio's own verify pass through the device, then, after ``cowd detach``, fio's
``--verify_only`` of the same job over the overlay as qemu-img converts it: every block fio
wrote and was acknowledged (the job ends with an fsync) must be there; ``qemu-img check``.
The cgroup is v2's ``memory.max`` where the memory controller is delegated there, else v1's
``memory.limit_in_bytes`` (the project machines run a v1 memory hierarchy).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowd.frontends.nbd.attach import (
    DEVICE_MAX_REQUEST_BYTES,
    DEVICE_QUEUE_DEPTH,
    NBD_DISCONNECT,
    nbd_problem,
)
from cowd.frontends.nbd.server import DEVICE_BUFFERS, DEVICE_SLAB_BYTES
from cowd.sysmem import CAP_SYS_RESOURCE, OOM_SCORE_ADJ_MIN
from tests.support.attach import Env, attach_problem
from tests.support.host import alive
from tests.support.peers import missing_tool, qemu_check, qemu_img, run

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

MiB = 1 << 20
DISK_BYTES = 256 * MiB
FIO_BYTES = 192 * MiB
LIMIT_BYTES = 160 * MiB  # the daemon, fio's page cache and the hog together
HOG_BYTES = 72 * MiB
# How long an emptied cgroup may take to be removable (its exited processes released).
CGROUP_RELEASE_S = 30.0
FIO_TIMEOUT_S = 420
# No verify state file: fio would leave it in its working directory.
FIO_JOB = ["--name=pressure", "--rw=randwrite", "--bs=64k", f"--size={FIO_BYTES}",
           "--verify=crc32c", "--verify_fatal=1", "--randseed=4242", "--iodepth=1",
           "--verify_state_save=0"]


@dataclass
class Cgroup:
    path: Path
    limit_file: str  # memory.max (v2) or memory.limit_in_bytes (v1)
    pressure_file: str  # memory.events (v2: "max N") or memory.failcnt (v1)

    def add(self, pid: int) -> None:
        """Move ``pid`` here; one that has exited meanwhile (a short-lived child of the
        daemon's) needs no moving."""
        with contextlib.suppress(ProcessLookupError):
            (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def limit(self, nbytes: int | None) -> None:
        value = str(nbytes) if nbytes is not None else (
            "max" if self.limit_file == "memory.max" else "-1")
        (self.path / self.limit_file).write_text(value + "\n")

    def events(self) -> dict[str, int]:
        """v2's memory.events (max, oom, oom_kill, ...); v1: failcnt and the OOM control."""
        if self.pressure_file == "memory.failcnt":
            out = {"failcnt": int((self.path / "memory.failcnt").read_text())}
            with contextlib.suppress(OSError, ValueError):
                for line in (self.path / "memory.oom_control").read_text().splitlines():
                    k, v = line.split()
                    out[k] = int(v)
            return out
        return {k: int(v) for k, v in (line.split() for line in
                                       (self.path / "memory.events").read_text().splitlines())}

    def stat(self) -> str:
        """The counters that say where the cgroup's memory was (anon, file, dirty,
        writeback), for a failure's report."""
        name = "memory.stat"
        keep = {"anon", "file", "file_dirty", "file_writeback", "kernel", "sock", "shmem",
                "unevictable", "rss", "cache", "dirty", "writeback", "total_rss",
                "total_cache", "total_dirty", "total_writeback"}
        with contextlib.suppress(OSError):
            return " ".join(f"{k}={int(v) >> 10}K" for k, v in (
                line.split() for line in (self.path / name).read_text().splitlines())
                if k in keep)
        return "(no memory.stat)"

    def times_at_limit(self) -> int:
        text = (self.path / self.pressure_file).read_text()
        if self.pressure_file == "memory.failcnt":
            return int(text)
        events = dict(line.split() for line in text.splitlines())
        return int(events.get("max", 0)) + int(events.get("oom", 0))


def _own_cgroup(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return None


def cgroup_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a memory cgroup)"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.subtree_control").exists() and "memory" in (
            v2 / "cgroup.subtree_control").read_text().split():
        return None
    v1 = _own_cgroup("memory")
    if v1 is not None and (Path("/sys/fs/cgroup/memory") / v1.lstrip("/")).is_dir():
        return None
    return "no memory cgroup controller this test can use (v2 delegated, or v1)"


@contextlib.contextmanager
def memory_cgroup(name: str) -> Iterator[Cgroup]:
    """A child memory cgroup, removed after (its processes moved back to the parent)."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.subtree_control").exists() and "memory" in (
            v2 / "cgroup.subtree_control").read_text().split():
        cg = Cgroup(v2 / name, "memory.max", "memory.events")
    else:
        own = _own_cgroup("memory")
        assert own is not None
        cg = Cgroup(Path("/sys/fs/cgroup/memory") / own.lstrip("/") / name,
                    "memory.limit_in_bytes", "memory.failcnt")
    cg.path.mkdir()
    try:
        yield cg
    finally:
        with contextlib.suppress(OSError):
            cg.limit(None)
        # Processes are moved back to the parent; the directory goes once the kernel has
        # let go of them too (rmdir says EBUSY while an exited process of ours is still
        # being released, seen in a slow guest), within CGROUP_RELEASE_S.
        parent = cg.path.parent / "cgroup.procs"
        deadline = time.monotonic() + CGROUP_RELEASE_S
        while True:
            for pid in (cg.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(pid + "\n")
            try:
                cg.path.rmdir()
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


HOG = r"""
import os, sys, time
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")  # if the kernel must kill, it kills the hog
n = int(sys.argv[1])
hog = bytearray(n)
for i in range(0, n, 4096):
    hog[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


def oom_report() -> str:
    """The kernel's report of its last OOM kill in this boot (the cgroup's counters at the
    time, the tasks, whom it killed), for a failure's report; empty if there was none or the
    log cannot be read."""
    lines = run("dmesg", check=False).stdout.decode(errors="replace").splitlines()
    starts = [i for i, ln in enumerate(lines) if "invoked oom-killer" in ln]
    return "\n".join(lines[starts[-1]:])[-4000:] if starts else ""


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    if proc.stdout is not None:
        proc.stdout.close()


FUSECTL = Path("/sys/fs/fuse/connections")


def fuse_connection(mountpoint: Path) -> str | None:
    """The FUSE connection (fusectl's name: the mount's device minor) of the mount at
    ``mountpoint``, from mountinfo (stat() of a stuck mount would hang)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint) and " - fuse" in line:
            return fields[2].split(":")[1]
    return None


def abort_fuse_connection(conn: str) -> None:
    """Abort our own stuck FUSE connection (fusectl mounted for it if it was not)."""
    mounted_here = False
    if not (FUSECTL / conn).exists() and run("mount", "-t", "fusectl", "none", FUSECTL,
                                              check=False).returncode == 0:
        mounted_here = True
    try:
        if (FUSECTL / conn).exists():
            (FUSECTL / conn / "abort").write_text("1\n")
    finally:
        if mounted_here:
            run("umount", FUSECTL, check=False)


def disconnect_nbd(dev: str) -> None:
    """NBD_DISCONNECT our own stuck /dev/nbdN (what ``nbd-client -d`` does): the kernel fails
    what is queued, so writers stuck on the device can finish."""
    with contextlib.suppress(OSError):
        fd = os.open(dev, os.O_RDWR)
        try:
            fcntl.ioctl(fd, NBD_DISCONNECT)
        finally:
            os.close(fd)


# PR_SET_IO_FLUSHER's task flags (<linux/sched.h>), read back from /proc/PID/stat.
PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000
IO_FLUSHER = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE


def can_set_io_flusher() -> bool:
    """Root with CAP_SYS_RESOURCE in its effective set (what PR_SET_IO_FLUSHER needs)."""
    if os.geteuid() != 0:
        return False
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the daemon and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def oom_score_adj(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def threads(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (none if it has exited meanwhile)."""
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def task_flags(pid: int) -> int:
    """The task flags of ``pid`` (field 9 of /proc/PID/stat); IO_FLUSHER's for a process that
    has exited meanwhile (a short-lived child: nothing left to check)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return IO_FLUSHER
    return int(stat[stat.rindex(")") + 2:].split()[6])  # after comm's parenthesis


WHERE = ["writers", "daemon-too"] if can_set_io_flusher() else ["writers"]
# The nbd cases where the kernel has an nbd driver (the host has none: the guest test runs
# them), so that nothing is collected only to be skipped.
VIA = ["fuse", "nbd"] if nbd_problem() is None else ["fuse"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("via", VIA)
def test_fio_verify_through_the_device_under_a_memory_limit(via: str, where: str,
                                                             tmp_path: Path) -> None:
    problem = attach_problem() or missing_tool("fio") or cgroup_problem() or (
        nbd_problem() if via == "nbd" else None)
    if problem:
        pytest.skip(problem)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(DISK_BYTES)
    hog: subprocess.Popen[bytes] | None = None
    fio: subprocess.Popen[bytes] | None = None
    with Env.under(tmp_path) as env, memory_cgroup(f"cowd-pressure-{os.getpid()}") as cg:
        ov = Path(env.cowd("create", "--base", base, "--overlay", "qcow",
                           run_dir=False).stdout.strip())
        if via == "fuse":
            dev = env.attach(ov, "--via", "fuse")
        else:
            dev = env.cowd("attach", ov, "--via", "nbd").stdout.strip()
            assert re.fullmatch(r"/dev/nbd[0-9]+", dev), dev
        pid = env.daemon_pid()
        assert pid is not None
        conn = fuse_connection(env.fuse_dir) if via == "fuse" else None
        stats = env.stats()
        io_flusher = stats["io_flusher"]
        if via == "fuse":
            fuse = stats["fuse"]
            assert isinstance(fuse, dict) and "buffers_locked" in fuse
            buffers = f"FUSE buffers locked: {fuse['buffers_locked']}"
            # Every worker made its session's buffers before attach returned: made later,
            # they would be charged to the limited cgroup (seen: 64 MiB of it, mlocked,
            # and an OOM kill of fio once the hog was gone).
            workers = stats["workers"]
            assert isinstance(workers, list) and workers, stats
            sessions = [(w["worker"]["fuse_sessions"], w["worker"]["fuse_buffers_locked"])
                        for w in workers]
            assert all(n == 1 for n, _ in sessions), sessions
            buffers += f", workers' locked: {[locked for _, locked in sessions]}"
        else:
            nbd = stats["nbd"]
            assert isinstance(nbd, dict), stats
            # The connection behind the device made its buffers before serving it.
            assert nbd["device_buffer_bytes"] == DEVICE_BUFFERS * DEVICE_SLAB_BYTES, nbd
            index = dev.removeprefix("/dev/nbd")
            queue = Path(f"/sys/block/nbd{index}/queue")
            assert (queue / "max_sectors_kb").read_text().strip() == \
                str(DEVICE_MAX_REQUEST_BYTES >> 10)
            assert (queue / "nr_requests").read_text().strip() == str(DEVICE_QUEUE_DEPTH)
            buffers = (f"NBD device buffers: {nbd['device_buffer_bytes']} bytes, "
                       f"{nbd['device_buffers_unlocked']} of {DEVICE_BUFFERS} not locked")
        daemon = process_tree(pid)
        if where == "daemon-too":
            assert io_flusher == "set", io_flusher
            # Every thread of every process: trio's worker threads, and for nbd the thread
            # that sits in NBD_DO_IT.
            unflagged = [(p, t) for p in daemon for t in threads(p)
                         if task_flags(t) & IO_FLUSHER != IO_FLUSHER]
            assert not unflagged, f"cowd threads without PR_SET_IO_FLUSHER: {unflagged}"
            # The limit may end in OOM kills (of the hog first): never of a cowd process.
            assert stats["oom_protection"] == "set", stats["oom_protection"]
            unprotected = {p: adj for p in daemon
                           if (adj := oom_score_adj(p)) not in (None, OOM_SCORE_ADJ_MIN)}
            assert not unprotected, f"cowd processes the OOM killer may pick: {unprotected}"
        stuck = False
        try:
            if where == "daemon-too":
                for proc in daemon:
                    cg.add(proc)
            cg.limit(LIMIT_BYTES)
            hog = subprocess.Popen([sys.executable, "-c", HOG, str(HOG_BYTES)],
                                   stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   preexec_fn=lambda: cg.add(os.getpid()))
            assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
            fio_log = tmp_path / "fio.json"
            with open(fio_log, "wb") as out:
                fio = subprocess.Popen(
                    ["fio", *FIO_JOB, f"--filename={dev}", "--ioengine=psync", "--direct=0",
                     "--do_verify=1", "--end_fsync=1", "--output-format=json"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=lambda: cg.add(os.getpid()))
                try:
                    rc = fio.wait(FIO_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    stuck = True
                    raise AssertionError(f"fio hung for {FIO_TIMEOUT_S} s under the limit "
                                         f"(io_flusher: {io_flusher})\n{env.log()}") from None
            report = fio_log.read_text(errors="replace")
            # fio's own error lines come before its JSON; the job's error number in it.
            head, _, _ = report.partition("{")
            errors = [ln for ln in report.splitlines() if '"error"' in ln or "err=" in ln]
            assert rc == 0, (f"fio failed under memory pressure (rc={rc}):\n{head[-2000:]}\n"
                             f"{errors[:8]}\ncgroup: {cg.events()}\n{cg.stat()}\n"
                             f"{oom_report()}\n"
                             f"cowd processes before {daemon}, now {process_tree(pid)}\n"
                             f"{env.log()}")
            job = json.loads(report[report.index("{"):])["jobs"][0]
            assert job["error"] == 0 and job["write"]["io_bytes"] == FIO_BYTES, job
            pressure = cg.times_at_limit()
            events = cg.events()
            assert pressure > 0, "the cgroup never reached its limit: no pressure was made"
            assert alive(pid), f"the daemon died under memory pressure\n{env.log()}"
            dead = [p for p in daemon if not alive(p)]
            # (Seen once in a clean run, 3e2bd94, fuse daemon-too: one cowd process gone while
            # fio passed, with no record of why: the daemon's log says which and how.)
            assert not dead, (f"cowd processes died under memory pressure: {dead} (daemon "
                              f"{pid}); cgroup: {events}; now {process_tree(pid)}\n"
                              f"{env.log()}")
            if via == "nbd":
                nbd = env.stats()["nbd"]
                assert isinstance(nbd, dict)
                assert nbd["device_buffer_fallbacks"] == 0, nbd  # nothing allocated on demand
        finally:
            with contextlib.suppress(OSError):
                cg.limit(None)
            if stuck and conn is not None:
                abort_fuse_connection(conn)  # the only way out of a writeback deadlock
            if stuck and via == "nbd":
                disconnect_nbd(dev)
            _stop(fio)
            _stop(hog)
        env.detach(dev)
    qemu_check(ov)
    # Nothing acknowledged was lost: fio checks every block of its job in the overlay as
    # qemu reads it.
    raw = tmp_path / "after.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ov, raw)
    p = run("fio", *FIO_JOB, f"--filename={raw}", "--ioengine=psync", "--verify_only",
            timeout=300, check=False)
    assert p.returncode == 0, p.stdout.decode(errors="replace")[-3000:]
    print(f"memory pressure ({via}, {where}, {len(daemon)} cowd processes): limit hit "
          f"{pressure} times, OOM kills {events.get('oom_kill', '?')} (none of cowd), "
          f"PR_SET_IO_FLUSHER {io_flusher}, {buffers}")
