"""``cowd serve`` as a user runs it, for the tests that drive it with real NBD clients
(test_nbd_server.py, test_boot_trace.py): the ``serve`` fixture (in the daemon and from two
worker processes), :class:`Served`, and ``nbdsh`` (libnbd's Python shell) with a prelude of
helpers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.peers import COWD, run, stop_process
from tests.support.reliability import wait_listening


def _tree_rss_kib(pid: int) -> int:
    """The RSS of ``pid`` and its children (a daemon's workers)."""
    total = _rss_kib(pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                with contextlib.suppress(OSError):
                    total += _rss_kib(int(child))
    return total


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Served:
    """One running `cowd serve` process."""

    proc: subprocess.Popen[bytes]
    sock: Path
    run_dir: Path
    log: Path
    names: list[str]
    workers: int = 0
    signalled: bool = False

    def uri(self, name: str | None = None) -> str:
        return f"nbd+unix:///{name if name is not None else self.names[0]}?socket={self.sock}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return _tree_rss_kib(self.proc.pid)

    def memory_bound(self, kib: int) -> int:
        """What a memory test allows the daemon to grow by: ``kib`` per process.  Each
        worker may hold its connections' in-flight budget (MAX_INFLIGHT_BYTES a connection)
        while the control plane answers, where the daemon alone answers reads inline."""
        return kib * (1 + self.workers)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[str, object]:
        p = run(*COWD, "stats", "--json", "--run-dir", self.run_dir, timeout=20)
        doc: dict[str, object] = json.loads(p.stdout)
        return doc

    def disk_stats(self, name: str | None = None) -> dict[str, dict[str, int]]:
        disks = self.stats()["disks"]
        assert isinstance(disks, dict)
        d: dict[str, dict[str, int]] = disks[name or self.names[0]]
        return d

    def terminate(self) -> None:
        """One SIGTERM (a second one after the daemon has closed its disks, while the
        interpreter exits, would be the default action again: death by signal)."""
        if not self.signalled:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20) -> str:
        """SIGTERM; the daemon must drain and exit 0 within ``timeout``."""
        if self.proc.poll() is None:
            self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"cowd serve ignored SIGTERM for {timeout} s:\n"
                                 f"{self.log_text()}") from None
        text = self.log_text()
        assert rc == 0, f"cowd serve exited {rc}:\n{text}"
        assert "Traceback" not in text, text
        assert not self.sock.exists(), "the NBD socket outlived the daemon"
        return text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(params=[0, 2], ids=["in-daemon", "2-workers"])
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Served]]:
    """``serve(image, ..., readonly=False, prime=True, extra=())``: a running daemon, serving
    its connections itself or from two worker processes (every test runs both ways).  Every
    daemon still running at teardown is terminated (SIGTERM, then SIGKILL)."""
    started: list[Served] = []
    workers: int = request.param

    def start(*images: Path, readonly: bool = False, prime: bool = True,
              extra: tuple[str, ...] = (), nbd: str | None = None) -> Served:
        n = len(started)
        sock = tmp_path / f"nbd{n}.sock"
        run_dir = tmp_path / f"run{n}"
        log = tmp_path / f"cowd{n}.log"
        args = [*COWD, "serve", *map(str, images), "--nbd", nbd or f"unix:{sock}",
                "--run-dir", str(run_dir)]
        if nbd:
            args += ["--nbd", f"unix:{sock}"]  # always also unix: that is what we wait for
        if readonly:
            args.append("--readonly")
        if not prime:
            args.append("--no-prime")
        args += ["--workers", str(workers), *extra]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        d = Served(proc, sock, run_dir, log, [Path(i).name for i in images], workers)
        started.append(d)
        wait_listening(proc, sock, log)
        return d

    try:
        yield start
    finally:
        for d in started:
            stop_process(d.proc, signal.SIGTERM, 15)


@functools.cache
def nbdsh_env() -> dict[str, str] | None:
    """An environment whose ``python3`` can import libnbd's binding (nbdsh runs
    ``python3 -m nbd``; a python3 that shadows Debian's on PATH may lack the module)."""
    if subprocess.run(["which", "nbdsh"], capture_output=True).returncode:
        return None
    for prefix in ("", "/usr/bin"):
        env = dict(os.environ)
        if prefix:
            env["PATH"] = prefix + os.pathsep + env.get("PATH", "")
        p = subprocess.run(["nbdsh", "-n", "-c", "pass"], env=env, capture_output=True)
        if p.returncode == 0:
            return env
    return None


NBDSH_PRELUDE = '''
import errno, os, sys, nbd

def connect(name, structured=True, handshake_flags=None, strict=False, meta=True, uri=None):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)  # let bad requests reach the server
    h.set_request_structured_replies(structured)
    if handshake_flags is not None:
        h.set_handshake_flags(handshake_flags)
    if meta and structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(name)
    if uri:
        h.connect_uri(uri)
    else:
        h.connect_unix(SOCK)
    return h

def fails(want, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        # nbd.Error.errno is the errno's name ("EINVAL") in libnbd's binding
        assert e.errno in {errno.errorcode[w] for w in want}, (fn.__name__, args, e.errno,
                                                               e.string)
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} succeeded; expected errno in {want}")

def extents(h, length, offset, flags=0):
    got = []
    def cb(context, off, entries, err):
        assert context == nbd.CONTEXT_BASE_ALLOCATION, context
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb, flags)
    return got
'''


def nbdsh(script: str, timeout: float = 60, **variables: object) -> str:
    """Run ``script`` under nbdsh (libnbd's Python shell); it fails by raising."""
    env = nbdsh_env()
    if env is None:
        pytest.skip("nbdsh with python3-libnbd not installed (make check installs it from "
                    "packages.txt)")
    head = "".join(f"{k} = {v!r}\n" for k, v in variables.items())
    p = subprocess.run(["nbdsh", "-n", "-c", head + NBDSH_PRELUDE + script], env=env,
                       capture_output=True, timeout=timeout)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, f"nbdsh script failed ({p.returncode}):\n{out}\n" \
                              f"{p.stderr.decode(errors='replace')}"
    return out
