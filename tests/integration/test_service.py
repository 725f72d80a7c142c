"""What the README's setup installs besides the venv (tools/install-extras: the man page, the
bash completion, the systemd unit) lands where it says, idempotently, with the unit naming
the installed cowd; `systemd-analyze verify` accepts the unit; and the daemon the unit
starts (`cowd daemon --no-idle-exit`) keeps running with no disk, where the one `cowd
attach` starts would exit when idle, and stops on `cowd stop`.  The daemon commands'
answers a user sees: `cowd --version`, `cowd status`'s exit codes and lines, a second daemon
in a run dir and a port already bound refused in one line."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.peers import COWD

INSTALL = ROOT / "tools" / "install-extras"


def test_install_extras_is_idempotent(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    for _ in range(2):
        p = subprocess.run([str(INSTALL), str(prefix)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
    page = prefix / "share/man/man1/cowd.1"
    assert page.read_text() == (ROOT / "contrib/cowd.1").read_text()
    completion = prefix / "share/bash-completion/completions/cowd"
    assert completion.read_text() == (ROOT / "contrib/cowd.bash-completion").read_text()
    unit = (prefix / "lib/systemd/system/cowd.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    cowd = exec_start.removeprefix("ExecStart=").split()[0]
    assert "@" not in exec_start and Path(cowd).is_file(), exec_start
    if shutil.which("man"):
        p = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                           timeout=60, env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0 and "cowd commit" in " ".join(p.stdout.split()), p.stderr
    if shutil.which("systemd-analyze"):
        p = subprocess.run(["systemd-analyze", "verify", str(prefix /
                            "lib/systemd/system/cowd.service")], capture_output=True,
                           text=True, timeout=60)
        # Its one complaint may be that man(1) cannot find cowd(1) outside its MANPATH.
        problems = [line for line in p.stderr.splitlines() if "'man cowd(1)'" not in line]
        assert not problems, p.stderr


def _status(run_dir: Path) -> dict[str, object]:
    p = subprocess.run([*COWD, "status", "--output=json", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=30)
    return json.loads(p.stdout) if p.stdout.strip() else {}


@pytest.mark.parametrize("persistent", [True, False])
def test_daemon_no_idle_exit(tmp_path: Path, persistent: bool) -> None:
    run_dir = tmp_path / "run"
    args = [*COWD, "daemon", "--run-dir", str(run_dir), "--workers", "0"]
    log = tmp_path / "daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*args, *(["--no-idle-exit"] if persistent else [])],
                                stdout=subprocess.DEVNULL, stderr=logf)
    try:
        deadline = time.monotonic() + 30
        doc: dict[str, object] = {}
        while time.monotonic() < deadline and not doc.get("running"):
            time.sleep(0.1)
            doc = _status(run_dir)
        assert doc.get("running"), (doc, log.read_text())
        assert doc["background"] is (not persistent)
        p = subprocess.run([*COWD, "stop", "--run-dir", str(run_dir)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cowd(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*COWD, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_version_names_cowd_formats_and_the_kmod_abi() -> None:
    from importlib.metadata import version

    from cowd.frontends.kmod.abi import ABI_VERSION
    from formats import FORMATS_VERSION

    p = _cowd("--version")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"cowd {version('cowd')}", p.stdout
    assert lines[1].startswith(f"formats {FORMATS_VERSION} ("), p.stdout
    assert "qcow2" in lines[1] and "vhd" in lines[1] and "raw" in lines[1], p.stdout
    assert lines[2:] == [f"kernel module ABI {ABI_VERSION}"], p.stdout


def _holder(pid_file: Path) -> subprocess.Popen[bytes]:
    """A process that owns the run dir as a daemon does (an exclusive flock on the pid file,
    its pid written in it) but never answers on the control socket: starting or stuck."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'%d\\n' % os.getpid())\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(pid_file)],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_status_exit_codes_and_lines(tmp_path: Path) -> None:
    """The README's codes: 3 when no daemon runs (an empty run dir, or a pid file its
    process left behind), 1 when a process holds the run dir but does not answer; one
    line each, naming the run dir (and the holder's pid)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    p = _cowd("status", "--run-dir", run_dir)
    assert p.returncode == 3 and p.stdout == f"no cowd daemon runs in {run_dir}\n", p
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / "cowd.pid").write_text(f"{gone.pid}\n")  # its writer died: the lock went
    p = _cowd("status", "--run-dir", run_dir)
    assert p.returncode == 3 and p.stdout == f"no cowd daemon runs in {run_dir}\n", p
    holder = _holder(run_dir / "cowd.pid")
    try:
        p = _cowd("status", "--run-dir", run_dir)
        assert p.returncode == 1, p
        assert p.stdout == (f"a cowd process holds {run_dir} but does not answer (pid "
                            f"{holder.pid}): starting, exiting or stuck\n"), p.stdout
        doc = json.loads(_cowd("status", "--output=json", "--run-dir", run_dir).stdout)
        assert doc["running"] is False and doc["pid"] == holder.pid, doc
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_second_daemon_in_a_run_dir_is_refused_at_once(tmp_path: Path) -> None:
    """`cowd daemon` and `cowd serve` where a daemon already runs: one line naming the
    holder's pid, exit 1, at once (it once printed nothing and hung)."""
    run_dir = tmp_path / "run"
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    with open(tmp_path / "daemon.log", "wb") as logf:
        proc = subprocess.Popen([*COWD, "daemon", "--run-dir", str(run_dir), "--workers", "0",
                                 "--no-idle-exit"], stdout=subprocess.DEVNULL, stderr=logf)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _status(run_dir).get("running"):
            time.sleep(0.1)
        assert _status(run_dir).get("running"), (tmp_path / "daemon.log").read_text()
        want = f"cowd: {run_dir}: a cowd daemon is already running here (pid={proc.pid})\n"
        for args in (["daemon", "--workers", "0"],
                     ["serve", "--workers", "0", "--nbd", f"unix:{tmp_path / 'nbd.sock'}",
                      image]):
            started = time.monotonic()
            p = _cowd(*args, "--run-dir", run_dir, timeout=20)
            assert (p.returncode, p.stderr) == (1, want), (args, p)
            assert time.monotonic() - started < 10, args
        assert proc.poll() is None  # the first one is untouched
    finally:
        _cowd("stop", "--run-dir", run_dir, timeout=60)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serve_on_a_bound_port_names_the_address(tmp_path: Path) -> None:
    """`serve --nbd tcp:` on a port another socket listens on: one line naming the address,
    exit 1 (the README: an address in use is an environment problem)."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = _cowd("serve", "--workers", "0", "--run-dir", tmp_path / "run", "--nbd",
                  f"tcp:127.0.0.1:{port}", image, timeout=30)
    assert p.returncode == 1, p
    assert p.stderr == (f"cowd: --nbd tcp:127.0.0.1:{port}: cannot listen: Address already "
                        "in use\n"), p.stderr
