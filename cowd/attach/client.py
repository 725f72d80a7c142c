"""Layer: cowd attach, the CLI's end of the control socket (the daemon's end is attacher.py).
Finds or starts the run dir's daemon and sends it attach requests; with no daemon answering,
owns the run dir and cleans up after a dead one.

Invariants: the CLI starts a daemon only while it holds ``start.lock`` and nobody owns the
pid file, so two CLIs start one daemon; it never touches a device or a mount itself except
through :func:`~.stale.cleanup_stale` with the pid file held.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

from .. import control
from ..control import DaemonUnavailable
from ..errors import CommandFailed
from ..rundir import PID_WAIT_S, PidFile, RunDir, file_lock, holder_pid, pid_file_held
from .stale import Cleanup, cleanup_stale

# How long the CLI waits for a daemon it started to answer on its control socket.
START_TIMEOUT_S = 30.0
# How long `cowd detach` waits for an exiting daemon to be gone.
EXIT_WAIT_S = 60.0
# A control request that opens, primes or flushes a disk may take long on a big image.
ATTACH_REQUEST_TIMEOUT_S = 600.0
# How often the CLI tries again when the daemon it asked was just exiting.
ATTACH_ATTEMPTS = 3


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
            if proc is None and not pid_file_held(run.pid_file):
                proc = spawn_daemon(run)
            if proc is not None and (rc := proc.poll()) is not None:
                raise CommandFailed(f"the daemon exited while starting (status={rc}): "
                                 f"{_log_tail(run)} (log: {run.log})")
            if time.monotonic() > deadline:
                who = proc.pid if proc is not None else holder_pid(run.pid_file)
                raise CommandFailed(f"the daemon did not answer within {limit_s:.0f} s "
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
                  say: Callable[[str], None], boot_trace: bool = True,
                  **kmod: int) -> dict[str, Any]:
    """Attach ``image`` through the run dir's daemon (started if none runs); ``kmod``:
    kmod_entries / kmod_timeout_ms for --via kmod."""
    for _ in range(ATTACH_ATTEMPTS):
        ensure_daemon(run, say)
        try:
            reply = control.request(run.control, "attach", timeout=ATTACH_REQUEST_TIMEOUT_S,
                                    image=image, via=via, readonly=readonly,
                                    **({} if boot_trace else {"boot_trace": False}), **kmod)
        except DaemonUnavailable:
            # It was exiting (its last disk was just detached): wait and start another.
            wait_gone(run, EXIT_WAIT_S)
            continue
        att: dict[str, Any] = reply["attached"]
        return att
    raise CommandFailed(f"{run.path}: the daemon kept exiting; try again")


def wait_gone(run: RunDir, timeout_s: float) -> bool:
    """Wait until nothing owns ``run`` (the daemon exited); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while pid_file_held(run.pid_file):
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


__all__ = [
    "cleanup_dead",
    "client_attach",
    "detach_target",
    "ensure_daemon",
    "ping",
    "spawn_daemon",
    "wait_gone",
]
