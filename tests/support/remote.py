"""Servers of remote bases for the tests of issue 17 (tests/integration/test_remote*.py,
tools/bench_remote.py): nbdkit (file plugin, with filters), qemu-nbd and nginx, started on
loopback (or in a network namespace) by the test, and stopped by their pid however it ends.

Each server is a :class:`Server` with the URL a backing file names; :func:`nbdkit`,
:func:`qemu_nbd` and :func:`nginx` start one and yield it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.peers import COWD, missing_tool, qemu_img, stop_process

# How long a server may take to listen.
START_TIMEOUT_S = 15.0


def remote_problem() -> str | None:
    """Why the remote-base tests cannot run here (None: they can)."""
    problem = missing_tool("nbdkit", "qemu-nbd", "nginx", "qemu-img")
    if problem:
        return problem
    try:
        import ctypes

        ctypes.CDLL("libnbd.so.0")
    except OSError:
        return "libnbd.so.0 not installed (make check installs libnbd0 with python3-libnbd)"
    return None


def remote_marks(timeout_s: float) -> list[pytest.MarkDecorator]:
    """A remote-base test module's marks: qemu, its deadline, the skip reason if any."""
    marks = [pytest.mark.qemu, pytest.mark.timeout(timeout_s)]
    problem = remote_problem()
    if problem:
        marks.append(pytest.mark.skip(reason=problem))
    return marks


def cowd_fixture() -> Any:
    """The ``cowd`` fixture of a test module: :class:`Cowd` in the test's tmp_path."""

    @pytest.fixture(name="cowd")
    def fixture(tmp_path: Path) -> Cowd:
        return Cowd(tmp_path, tmp_path / "cache")

    return fixture


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A started server: its process and the URL of what it serves."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0
    extra: dict[str, Path] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig, 10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, *, port: int = 0,
                    host: str = "127.0.0.1", path: Path | None = None,
                    netns: str | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: "
                                 f"{log.read_text(errors='replace')}")
        if path is not None and path.exists():
            return
        if port and netns is None:
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return
        if port and netns is not None:
            p = subprocess.run(["ip", "netns", "exec", netns, "bash", "-c",
                                f"exec 3<>/dev/tcp/{host}/{port}"], capture_output=True)
            if p.returncode == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"server did not listen in {START_TIMEOUT_S} s: "
                         f"{log.read_text(errors='replace')}")


@contextlib.contextmanager
def _started(argv: Sequence[str], log: Path, url: str, *, port: int = 0,
             host: str = "127.0.0.1", path: Path | None = None,
             netns: str | None = None) -> Iterator[Server]:
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = Server(url, proc, log, port)
    try:
        _wait_listening(proc, log, port=port, host=host, path=path, netns=netns)
        yield server
    finally:
        server.stop()


def nbdkit_argv(image: Path, *, filters: Sequence[str] = (), params: Sequence[str] = (),
                sock: Path | None = None, port: int = 0, host: str = "127.0.0.1",
                options: Sequence[str] = ()) -> list[str]:
    where = ["-U", str(sock)] if sock is not None else ["-p", str(port), "-i", host]
    return ["nbdkit", "-f", "-r", *where, *options, *[f"--filter={f}" for f in filters],
            "file", f"file={image}", *params]


@contextlib.contextmanager
def nbdkit(tmp: Path, image: Path, *, filters: Sequence[str] = (),
           params: Sequence[str] = (), unix: bool = False, port: int = 0,
           host: str = "127.0.0.1", netns: str | None = None,
           options: Sequence[str] = ()) -> Iterator[Server]:
    """nbdkit's file plugin exporting ``image`` read-only (its bytes, whatever format);
    ``options`` are nbdkit's own (``--tls=require``...), ``params`` the plugin's and the
    filters'.  With ``--tls=require`` in ``options`` the URL is ``nbds://``."""
    if unix:
        sock = tmp / f"nbdkit-{image.stem}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        with _started(nbdkit_argv(image, filters=filters, params=params, sock=sock,
                                  options=options),
                      tmp / "nbdkit.log", f"nbd+unix:///?socket={sock}", path=sock) as s:
            yield s
        return
    port = port or free_port(host)
    scheme = "nbds" if "--tls=require" in options else "nbd"
    with _started(nbdkit_argv(image, filters=filters, params=params, port=port, host=host,
                              options=options),
                  tmp / "nbdkit.log", f"{scheme}://{host}:{port}/", port=port, host=host,
                  netns=netns) as s:
        yield s


@contextlib.contextmanager
def qemu_nbd(tmp: Path, image: Path, fmt: str, export: str = "base",
             extra: Sequence[str] = ()) -> Iterator[Server]:
    """qemu-nbd exporting ``image`` read-only over TCP on loopback: ``fmt`` raw exports the
    file's bytes (a qcow2 that cowd decodes), qcow2 the guest's view of it."""
    port = free_port()
    argv = ["qemu-nbd", "-r", "-t", "-f", fmt, "-x", export, "-b", "127.0.0.1", "-p",
            str(port), "--cache=none", *extra, str(image)]
    with _started(argv, tmp / "qemu-nbd.log", f"nbd://127.0.0.1:{port}/{export}",
                  port=port) as s:
        yield s


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    default_type application/octet-stream;
    # qemu 7.2's curl driver never exits after a read over a kept-alive connection.
    keepalive_timeout {keepalive};
    log_format bytes '$remote_addr $request_method $status $body_bytes_sent "$http_range"';
    access_log {tmp}/nginx-access.log bytes;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen {host}:{port}{ssl};
        {tls}
        root {root};
        location / {{ }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(tmp: Path, root: Path, *, host: str = "127.0.0.1", tls: Path | None = None,
          netns: str | None = None, keepalive: bool = False) -> Iterator[Server]:
    """nginx serving the files of ``root`` on ``host`` (range requests, ETags); with
    ``tls``, https with ``tls/server-cert.pem`` and ``tls/server-key.pem``.  Its access log
    records each request's client and bytes sent (``bytes_sent_to``)."""
    port = free_port() if netns is None else 8080
    ssl_lines = (f"ssl_certificate {tls}/server-cert.pem; "
                 f"ssl_certificate_key {tls}/server-key.pem;") if tls else ""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=host, port=port, root=root,
                                      ssl=" ssl" if tls else "", tls=ssl_lines,
                                      keepalive="75s" if keepalive else "0"))
    scheme = "https" if tls else "http"
    with _started(["nginx", "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log",
                  f"{scheme}://{host}:{port}", port=port, host=host, netns=netns) as s:
        s.extra["access_log"] = tmp / "nginx-access.log"
        yield s


def bytes_sent_to(access_log: Path) -> dict[str, int]:
    """Body bytes nginx sent, per client address."""
    out: dict[str, int] = {}
    if not access_log.exists():
        return out
    for line in access_log.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].isdigit():
            out[parts[0]] = out.get(parts[0], 0) + int(parts[3])
    return out


@dataclass
class Cowd:
    """cowd commands with a cache folder of their own (``COWD_REMOTE_CACHE_DIR``)."""

    tmp: Path
    cache: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "COWD_REMOTE_CACHE_DIR": str(self.cache)}

    def __call__(self, *args: str | os.PathLike[str], rc: int | None = 0,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*COWD, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, env=self.env,
                           cwd=self.tmp)
        if rc is not None:
            assert p.returncode == rc, f"cowd {args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
        assert "Traceback" not in p.stderr, p.stderr
        return p

    @contextlib.contextmanager
    def serve(self, *images: Path, extra: Sequence[str] = ()) -> Iterator[Path]:
        """``cowd serve`` of ``images`` on a unix socket (yielded), remote bases allowed."""
        sock = self.tmp / "cowd.sock"
        run_dir = self.tmp / "run"
        run_dir.mkdir(exist_ok=True)
        argv = [*COWD, "serve", *map(str, images), "--nbd", f"unix:{sock}", "--run-dir",
                str(run_dir), "--allow-remote-backing", *extra]
        log = self.tmp / "serve.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=self.tmp)
        try:
            _wait_listening(proc, log, path=sock)
            time.sleep(0.2)  # the socket exists a moment before it accepts
            yield sock
        finally:
            stop_process(proc, signal.SIGTERM, 60)  # the daemon drains and flushes
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    def stats(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self("stats", "--json", "--run-dir",
                                                 self.tmp / "run").stdout)
        return doc


def make_base(tmp: Path, size_mib: int = 64, name: str = "base.raw") -> Path:
    """A raw base with recognisable data (different patterns, holes between)."""
    base = tmp / name
    with open(base, "wb") as f:
        f.truncate(size_mib << 20)
        for i, off in enumerate(range(0, size_mib << 20, 3 << 20)):
            f.seek(off)
            f.write(os.urandom(1 << 20) if i % 2 else bytes([i % 251 + 1]) * (256 << 10))
    return base


__all__ = [
    "Cowd",
    "Server",
    "bytes_sent_to",
    "cowd_fixture",
    "free_port",
    "make_base",
    "nbdkit",
    "nbdkit_argv",
    "nginx",
    "qemu_nbd",
    "remote_marks",
    "remote_problem",
]


def qemu_chain(image: Path, tmp: Path) -> bytes:
    """The oracle: qemu-img convert of the chain, qemu opening the remote base itself (one
    request at a time: qemu 7.2's curl driver hangs on some overlapping concurrent reads)."""
    out = tmp / "oracle.raw"
    qemu_img("convert", "-m", "1", "-U", "-f", "qcow2", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def nbd_read(sock: Path, export: str, tmp: Path) -> bytes:
    """The served disk as qemu-img's NBD client reads it."""
    out = tmp / f"read-{export}.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", f"nbd+unix:///{export}?socket={sock}", out)
    data = out.read_bytes()
    out.unlink()
    return data
