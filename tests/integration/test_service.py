"""What the README's setup installs besides the venv (tools/install-extras: the man page, the
bash completion, the systemd unit) lands where it says, idempotently, with the unit naming
the installed cowd; `systemd-analyze verify` accepts the unit; and the daemon the unit
starts (`cowd daemon --no-idle-exit`) keeps running with no disk, where the one `cowd
attach` starts would exit when idle, and stops on `cowd stop`."""

from __future__ import annotations

import json
import shutil
import subprocess
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
