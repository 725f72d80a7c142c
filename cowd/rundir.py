"""Layer: cowd, below the attach machinery and the daemon (it knows control.py's socket name
and nothing of the frontends).  The run directory and its locks: its layout, the pid file
whose flock is ownership, the CLI's start lock, and the state file recording what is attached.

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

Invariants: only the holder of the pid file's exclusive lock changes anything in the run
directory (:class:`PidFile`, :func:`take_run_dir`); :func:`pid_file_held` is the one probe of
whether a live process holds it (a shared, non-blocking flock that is never kept); the state
file is replaced atomically (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio

from . import control
from .errors import CommandFailed, UsageError

PID_FILE = "cowd.pid"
LOG_FILE = "cowd.log"
FUSE_DIR = "fuse"
STATE_FILE = "attached.json"
START_LOCK = "start.lock"
# How long a starting daemon waits for the previous owner of the run dir (one that is still
# unmounting after it decided to exit) to let go of the pid file.
PID_WAIT_S = 20.0


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
        """Create the run dir if it is missing (that folder only: its parent must exist,
        as for ``/run/cowd``), then refuse it unless it is private
        (:func:`check_private_dir`): its pid file, state file and sockets decide who
        controls the disks."""
        try:
            os.mkdir(self.path, 0o755)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise UsageError(f"{self.path}: cannot create this run dir: its parent folder "
                             f"{os.path.dirname(self.path)} does not exist") from None
        check_private_dir(self.path, "run dir", root_ok=False)


def check_socket_folder(socket_path: str) -> None:
    """The folder of a unix socket cowd listens on: private, or sticky like /tmp."""
    check_private_dir(os.path.dirname(os.path.abspath(socket_path)), "socket folder",
                      sticky_ok=True)


def check_private_dir(path: str, what: str, *, sticky_ok: bool = False,
                      root_ok: bool = True) -> None:
    """Refuse a folder cowd keeps sockets or state in if it is a symlink, is owned by
    another user (``root_ok``: root excepted, as for /tmp or /run holding a socket; a run dir
    must be the user's own, since its owner can replace the pid file, the state file or the
    control socket under the daemon), or another user can write it (``sticky_ok``: unless
    its sticky bit stops them removing or renaming what cowd puts there, as in /tmp).  A
    folder that others can write lets them replace a socket or a state file between two of
    cowd's steps."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: this {what} does not exist (cowd does not create it: "
                         "make it first)") from None
    except OSError as e:
        raise CommandFailed(f"{path}: cannot use this {what}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CommandFailed(f"{path}: this {what} is a symlink (refused: name the real folder)")
    if not stat.S_ISDIR(st.st_mode):
        raise CommandFailed(f"{path}: this {what} is not a folder")
    if st.st_uid != os.geteuid() and not (root_ok and st.st_uid == 0):
        raise CommandFailed(f"{path}: this {what} is owned by another user (uid={st.st_uid})")
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise CommandFailed(f"{path}: other users can write this {what} "
                         f"(mode={stat.S_IMODE(st.st_mode):o}); make it 0755 or 0700")


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


def holder_pid(pid_file: str | os.PathLike[str]) -> int | None:
    """The pid written in the pid file (whether or not its writer still holds the lock)."""
    try:
        with open(pid_file, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def pid_file_held(pid_file: str | os.PathLike[str]) -> bool:
    """True while some process holds the pid file's lock (a live owner, such as a daemon).
    The probe takes a shared lock without waiting and drops it at once, so it never blocks
    and never keeps an owner out; a missing file is not held."""
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
            raise CommandFailed(f"{run.path}: a cowd daemon is already running here "
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
                    raise CommandFailed(f"{path}: another cowd command holds this lock "
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


def lexists(path: str) -> bool:
    return os.path.lexists(path)  # the run dir is local: no need for a thread


__all__ = [
    "PidFile",
    "RunDir",
    "file_lock",
    "holder_pid",
    "lexists",
    "pid_file_held",
    "read_state",
    "take_run_dir",
    "write_state",
]
