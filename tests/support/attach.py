"""`cowd attach` as a user runs it (tests/integration/test_attach.py, the VM boots of
tests/guest/test_vm_boot.py): :class:`Env`, a run dir of a test's own and the cowd command
that uses it, with a teardown that takes down only what is ours; :func:`attach_problem`, why
it cannot run here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cowd import rundir
from cowd.frontends.fuse.mount import fuse_problem
from tests.support.host import alive, loops_under, mounted_at
from tests.support.peers import COWD, missing_tool, run

LOOP_DEV = re.compile(r"/dev/loop[0-9]+")


def attach_problem() -> str | None:
    return fuse_problem() or missing_tool("mkfs.ext4", "debugfs", "e2fsck", "mount",
                                            "umount", "qemu-img")


@dataclass
class Env:
    """A run dir of its own under ``tmp`` (so a test never meets a user's daemon in
    /run/cowd), the cowd command that uses it, and the mounts the test made there.
    :meth:`teardown` takes down only what is ours, by name and pid: the mounts, the daemon
    whose pid file lock is held in the run dir, the loop devices on its FUSE mount, that
    mount."""

    tmp: Path
    run_dir: Path
    mounts: list[Path] = field(default_factory=list)

    @property
    def fuse_dir(self) -> Path:
        return self.run_dir / "fuse"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "cowd.pid"

    @property
    def socket(self) -> Path:
        return self.run_dir / "control.sock"

    def cowd(self, *args: str | os.PathLike[str], rc: int | None = 0,
             run_dir: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*COWD, *map(str, args)]
        if run_dir:
            cmd += ["--run-dir", str(self.run_dir)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                           stdin=subprocess.DEVNULL)
        if rc is not None:
            assert p.returncode == rc, (f"cowd {args}: rc={p.returncode}\n{p.stdout}\n"
                                        f"{p.stderr}\n{self.log()}")
        assert "Traceback" not in p.stderr, p.stderr
        return p

    def log(self) -> str:
        try:
            return "daemon log:\n" + (self.run_dir / "cowd.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no daemon log)"

    def attach(self, image: Path, *extra: str) -> str:
        p = self.cowd("attach", image, *extra)
        dev = p.stdout.strip()
        assert LOOP_DEV.fullmatch(dev), p.stdout
        return dev

    def detach(self, target: str | Path) -> subprocess.CompletedProcess[str]:
        return self.cowd("detach", target)

    def list(self) -> list[dict[str, object]]:
        doc: list[dict[str, object]] = json.loads(self.cowd("list", "--json").stdout)
        return doc

    def stats(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.cowd("stats", "--json").stdout)
        return doc

    def daemon_pid(self) -> int | None:
        if not rundir.pid_file_held(self.pid_file):
            return None
        return int(self.pid_file.read_text())

    def mount(self, dev: str, name: str, *opts: str) -> Path:
        where = self.tmp / name
        where.mkdir(exist_ok=True)
        run("mount", *opts, dev, where)
        self.mounts.append(where)
        return where

    def umount(self, where: Path) -> None:
        run("umount", where)
        self.mounts.remove(where)

    def assert_daemon_gone(self) -> None:
        """The idle daemon exited and took everything of its own along."""
        assert self.daemon_pid() is None
        assert not self.pid_file.exists()
        assert not self.socket.exists()
        assert "fuse.cowd" not in mounted_at(self.fuse_dir)
        assert loops_under(self.fuse_dir) == []
        assert not (self.run_dir / "attached.json").exists()

    def teardown(self) -> None:
        for where in reversed(self.mounts):
            if mounted_at(where):
                run("umount", where, check=False)
        pid = self.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for dev in loops_under(self.fuse_dir):
            run("losetup", "-d", dev, check=False)
        while "fuse.cowd" in mounted_at(self.fuse_dir)[-1:]:
            if run("umount", "-l", self.fuse_dir, check=False).returncode != 0:
                break

    @classmethod
    @contextlib.contextmanager
    def under(cls, tmp: Path) -> Iterator[Self]:
        """An environment in ``tmp`` (its run dir ``tmp/run``), torn down however the test
        ends."""
        env = cls(tmp, tmp / "run")
        try:
            yield env
        finally:
            env.teardown()
