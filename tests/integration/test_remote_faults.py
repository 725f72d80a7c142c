"""Remote bases under faults (issue 17): nbdkit's error, rate and delay filters in front of
the base, a server stalled (SIGSTOP) and resumed, killed mid-read and started again, a base
replaced on the server (through cowd convert, serve and attach: refused in one line, again
on every later open until `cowd cache drop URL` accepts the new version).  A read ends with
the right bytes or EIO at the request's deadline, never with zeroes or another version's
bytes; the daemon keeps serving its other disks; reconnection is automatic.  The daemon's
tests run with its worker processes (the default) and without.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from formats.errors import ImageIOError
from formats.remote.file import RemoteBase, RemoteConfig
from formats.remote.url import parse
from tests.support.peers import COWD, qemu_img, stop_process
from tests.support.remote import (
    Cowd,
    Server,
    cowd_fixture,
    make_base,
    nbd_read,
    nbdkit,
    nginx,
    qemu_chain,
    remote_marks,
)

pytestmark = remote_marks(240)
cowd = cowd_fixture()

# The daemon with its worker processes (the default: NBD connections are handed to workers,
# whose misses the daemon fetches) and without.
WORKERS = [pytest.param([], id="workers"), pytest.param(["--workers", "0"], id="no-workers")]


def read_export(sock: Path, export: str, out: Path,
                timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                           f"nbd+unix:///{export}?socket={sock}", str(out)],
                          capture_output=True, timeout=timeout)


def local_disk(tmp: Path) -> tuple[Path, bytes]:
    """A second disk of the same daemon, over a local base: it must go on being served."""
    base = tmp / "local.raw"
    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    base.write_bytes(data)
    ov = tmp / "local.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", "local.raw", ov)
    return ov, data


@pytest.mark.parametrize("workers", WORKERS)
def test_error_filter_is_eio_and_recovers(tmp_path: Path, cowd: Cowd,
                                          workers: list[str]) -> None:
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 16)
    trigger = tmp_path / "fail-now"
    trigger.touch()
    with nbdkit(tmp_path, raw, filters=["error"],
                params=["error-pread=EIO", "error-pread-rate=100%",
                        f"error-file={trigger}"]) as srv:
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov, "16M")
        local, local_data = local_disk(tmp_path)
        with cowd.serve(ov, local, extra=["--remote-timeout", "3", *workers]) as sock:
            t0 = time.monotonic()
            p = read_export(sock, ov.name, tmp_path / "bad.raw")
            took = time.monotonic() - t0
            assert p.returncode != 0 and b"Input/output error" in p.stderr, p.stderr
            assert took < 60, took
            # The daemon serves its other disk meanwhile and after.
            out = tmp_path / "local-read.raw"
            assert read_export(sock, local.name, out).returncode == 0
            assert out.read_bytes() == local_data
            bases = cowd.stats()["remote"]["bases"]  # type: ignore[index]
            assert bases[0]["failures"] >= 1 and bases[0]["retries"] >= 1
            trigger.unlink()
            good = tmp_path / "good.raw"
            p = read_export(sock, ov.name, good)
            assert p.returncode == 0, p.stderr
            assert good.read_bytes() == raw.read_bytes()


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("restart", [True, False])
def test_server_killed_mid_read(tmp_path: Path, cowd: Cowd, restart: bool,
                                workers: list[str]) -> None:
    """nbdkit (rate-limited to 64 Mbit/s, so the read takes seconds) is SIGKILLed in the
    middle of a whole-disk read; started again on the same port within the deadline the read
    completes with the right bytes; not started again, it fails with EIO.  Never wrong
    data."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 32)
    want = raw.read_bytes()
    ov = tmp_path / "ov.qcow2"
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(nbdkit(tmp_path, raw, filters=["rate"],
                                         params=["rate=64M"]))
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov, "32M")
        sock = stack.enter_context(cowd.serve(ov, extra=["--remote-timeout",
                                                         "20" if restart else "3",
                                                         *workers]))
        out = tmp_path / "out.raw"
        reader = subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                   f"nbd+unix:///{ov.name}?socket={sock}", str(out)],
                                  stderr=subprocess.PIPE)
        stack.callback(lambda: reader.poll() is None and reader.kill())
        time.sleep(0.8)
        assert reader.poll() is None, "the read ended before the server was killed"
        srv.kill()
        if restart:
            time.sleep(1.5)
            stack.enter_context(nbdkit(tmp_path, raw, filters=["rate"],
                                       params=["rate=64M"], port=srv.port))
        _, err = reader.communicate(timeout=120)
        if restart:
            assert reader.returncode == 0, err
            assert out.read_bytes() == want
            (b,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
            assert b["retries"] >= 1 and b["reconnects"] >= 1
        else:
            assert reader.returncode != 0 and b"Input/output error" in err, err


def test_changed_remote_fails_the_open_in_one_line(tmp_path: Path, cowd: Cowd) -> None:
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 8)
    with nginx(tmp_path, files) as srv:
        url = f"{srv.url}/base.raw"
        ov = tmp_path / "ov.qcow2"
        cowd("create", "--base", url, "--overlay", "qcow", "-o", ov)
        cowd("convert", ov, tmp_path / "a.raw", "-O", "raw", "--allow-remote-backing")
        # The base is replaced on the server (another size; another ETag).
        with open(raw, "ab") as f:
            f.write(b"\1" * 65536)
        p = cowd("convert", ov, tmp_path / "b.raw", "-O", "raw", "--allow-remote-backing",
                 rc=1)
        line = p.stderr.strip()
        assert "\n" not in line and "changed" in line and url in line, line
        assert "size=8388608" in line and "size=8454144" in line
        assert f"`cowd cache drop {url}`" in line, line
        # The old cache is kept, marked: the next open fails the same way (it does not
        # start from the new version under an overlay written over the old one).
        p2 = cowd("convert", ov, tmp_path / "c.raw", "-O", "raw", "--allow-remote-backing",
                  rc=1)
        assert p2.stderr.strip() == line
        (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
        assert c["url"] == url and c["size"] == 8388608 and c["held_bytes"] == 0, c
        assert c["changed"]["was"].startswith("size=8388608 ") and \
            c["changed"]["seen"].startswith("size=8454144 "), c
        assert not (tmp_path / "b.raw").exists() and not (tmp_path / "c.raw").exists()


@pytest.mark.parametrize("workers", WORKERS)
def test_base_replaced_while_served_is_eio_never_the_new_bytes(tmp_path: Path, cowd: Cowd,
                                                               workers: list[str]) -> None:
    """nginx's file is replaced (same size, new ETag) while a disk over it is served: reads
    that need a block not cached yet fail with EIO (If-Match answered 412), never the new
    version's bytes mixed with the old one's."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 8)
    with nginx(tmp_path, files) as srv:
        ov = tmp_path / "ov.qcow2"
        cowd("create", "--base", f"{srv.url}/base.raw", "--overlay", "qcow", "-o", ov)
        with cowd.serve(ov, extra=[*workers, "--remote-timeout", "3"]) as sock:
            uri = f"nbd+unix:///{ov.name}?socket={sock}"
            p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 1 0 64k", uri],
                               capture_output=True, text=True, timeout=60)
            assert "read 65536/65536" in p.stdout, p.stdout + p.stderr
            st = raw.stat()
            raw.write_bytes(b"\x7f" * st.st_size)  # a new version, same size
            os.utime(raw, (st.st_atime + 10, st.st_mtime + 10))  # nginx's ETag: mtime
            p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x7f 6M 64k", uri],
                               capture_output=True, text=True, timeout=60)
            assert "Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
            (b,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
            assert b["stale"] and "changed" in b["stale"]
            # The cache is marked while still in use (its blocks kept: the disk's remaps
            # point into them); the daemon's next disk over that base is refused.
            (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
            assert c["in_use"] and c["changed"] and c["held_bytes"] > 0, c
        # Every later open fails in one line, whatever opens it, and fetches nothing.
        lines = set()
        for out in ("a.raw", "b.raw"):
            p = cowd("convert", ov, tmp_path / out, "-O", "raw", "--allow-remote-backing",
                     rc=1)
            line = p.stderr.strip()
            assert "\n" not in line and "changed since it was cached" in line, line
            assert "cowd cache drop" in line and ov.name in line, line
            lines.add(line)
        assert len(lines) == 1
        (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
        assert c["changed"] and c["held_bytes"] == 0 and not c["in_use"], c


def test_a_new_connection_sees_the_base_replaced(tmp_path: Path) -> None:
    """nginx's file replaced (same size, new ETag) between two connections of one remote
    base: the second connection (a reconnect after an error, or a second fetch in flight)
    refuses the new version with EIO instead of filling the cache with its bytes."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 8)
    old = raw.read_bytes()
    with nginx(tmp_path, files) as srv:
        base = RemoteBase(parse(f"{srv.url}/base.raw"),
                          RemoteConfig(cache_root=str(tmp_path / "cache"), timeout_s=3.0))
        try:
            buf = bytearray(65536)
            assert base.read_into(base.files.data_fd, 0, memoryview(buf)) == len(buf)
            assert bytes(buf) == old[:65536]
            st = raw.stat()
            raw.write_bytes(b"\x7f" * st.st_size)
            os.utime(raw, (st.st_atime + 10, st.st_mtime + 10))  # nginx's ETag: mtime
            base._close_connections()  # the next fetch connects again
            with pytest.raises(ImageIOError) as e:
                base.read_into(base.files.data_fd, 6 << 20, memoryview(buf))
            assert "changed" in str(e.value), e.value
            assert bytes(buf) == old[:65536]  # nothing of the new version was read
            assert base.stale
        finally:
            base.close()


# ---- a stalled server, a slow one, and the request's one deadline -----------------------------

@pytest.mark.parametrize("workers", WORKERS)
def test_stalled_server_is_eio_at_the_deadline_then_recovers(tmp_path: Path, cowd: Cowd,
                                                             workers: list[str]) -> None:
    """nbdkit stopped (SIGSTOP: connections open, nothing answered) while a disk over it is
    read: the read fails with EIO once the deadline has passed (not at once, not never, not
    zeroes); another disk of the daemon is served meanwhile; after SIGCONT the same read
    gives qemu's bytes over the same connections or new ones, without a restart."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 16)
    deadline_s = 3.0
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(nbdkit(tmp_path, raw))
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov, "16M")
        want = qemu_chain(ov, tmp_path)
        local, local_data = local_disk(tmp_path)
        sock = stack.enter_context(cowd.serve(ov, local, extra=[
            "--remote-timeout", str(deadline_s), *workers]))
        os.kill(srv.proc.pid, signal.SIGSTOP)
        stopped = True

        def cont() -> None:
            if stopped:
                os.kill(srv.proc.pid, signal.SIGCONT)

        stack.callback(cont)
        t0 = time.monotonic()
        reader = subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                   f"nbd+unix:///{ov.name}?socket={sock}",
                                   str(tmp_path / "bad.raw")], stderr=subprocess.PIPE)
        stack.callback(lambda: reader.poll() is None and reader.kill())
        # While that read waits for the stalled server, the other disk is served.
        out = tmp_path / "local-read.raw"
        p = read_export(sock, local.name, out, timeout=30)
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == local_data
        assert reader.poll() is None, "the read did not wait for the stalled server"
        _, err = reader.communicate(timeout=60)
        took = time.monotonic() - t0
        assert reader.returncode != 0 and b"Input/output error" in err, err
        assert deadline_s - 0.5 <= took < deadline_s + 10, took
        (b,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
        assert b["failures"] >= 1 and b["fetched_bytes"] == 0, b
        os.kill(srv.proc.pid, signal.SIGCONT)
        stopped = False
        good = tmp_path / "good.raw"
        p = read_export(sock, ov.name, good, timeout=60)
        assert p.returncode == 0, p.stderr
        assert good.read_bytes() == want


@pytest.mark.parametrize("workers", WORKERS)
def test_slow_server_below_the_deadline_gives_the_bytes(tmp_path: Path, cowd: Cowd,
                                                        workers: list[str]) -> None:
    """nbdkit's delay filter holds every read 0.4 s (well under the 5 s deadline): slow,
    never a failure; the bytes are qemu's."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 8)
    with nbdkit(tmp_path, raw, filters=["delay"], params=["delay-read=400ms"]) as srv:
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov, "8M")
        want = qemu_chain(ov, tmp_path)
        with cowd.serve(ov, extra=["--remote-timeout", "5", *workers]) as sock:
            got = tmp_path / "got.raw"
            p = read_export(sock, ov.name, got, timeout=120)
            assert p.returncode == 0, p.stderr
            assert got.read_bytes() == want
            (b,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
            assert b["failures"] == 0 and b["fetched_bytes"] >= len(want), b


def test_deadline_bounds_the_whole_request_library(tmp_path: Path) -> None:
    """One read that needs four 4 MiB fetches from a server that takes 1.2 s for each: with
    a 2.5 s deadline it fails at about 2.5 s (one deadline for the request), not after
    4.8 s with the bytes (a deadline for each piece)."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 16)
    with nbdkit(tmp_path, raw, filters=["delay"], params=["delay-read=1200ms"]) as srv:
        base = RemoteBase(parse(srv.url), RemoteConfig(cache_root=str(tmp_path / "cache"),
                                                       timeout_s=2.5))
        try:
            buf = bytearray(16 << 20)
            t0 = time.monotonic()
            with pytest.raises(ImageIOError) as e:
                base.read_into(base.files.data_fd, 0, memoryview(buf))
            took = time.monotonic() - t0
            assert 2.0 <= took < 4.5, took  # (a deadline per piece: the bytes after 4.8 s)
            assert "deadline" in str(e.value) and srv.url in str(e.value), e.value
            # What was fetched in time is kept, and is the base's.
            held = base.files.held_bytes
            assert 0 < held < len(buf)
            assert base.read_into(base.files.data_fd, 0, memoryview(buf)[:held]) == held
            assert bytes(buf[:held]) == raw.read_bytes()[:held]
        finally:
            base.close()


def test_deadline_bounds_the_whole_request_served(tmp_path: Path, cowd: Cowd) -> None:
    """The same through the daemon (its fetcher, a worker process's miss): one 16 MiB NBD
    read over a server that takes 1.2 s per 4 MiB piece fails with EIO near the 2.5 s
    deadline; a small read afterwards still gives the base's bytes."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 16)
    with nbdkit(tmp_path, raw, filters=["delay"], params=["delay-read=1200ms"]) as srv:
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov, "16M")
        with cowd.serve(ov, extra=["--remote-timeout", "2.5"]) as sock:
            uri = f"nbd+unix:///{ov.name}?socket={sock}"
            t0 = time.monotonic()
            p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 16M", uri],
                               capture_output=True, text=True, timeout=60)
            took = time.monotonic() - t0
            assert "Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
            assert took < 6.0, took  # qemu-io's start included
            want = raw.read_bytes()[15 << 20:(15 << 20) + 65536]
            ref = tmp_path / "ref.raw"
            ref.write_bytes(want)
            p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref),
                                f"json:{{\"driver\":\"raw\",\"offset\":{15 << 20},"
                                f"\"size\":65536,\"file\":{{\"driver\":\"nbd\","
                                f"\"server\":{{\"type\":\"unix\",\"path\":\"{sock}\"}},"
                                f"\"export\":\"{ov.name}\"}}}}"],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("workers", WORKERS)
def test_deadline_bounds_every_round_of_a_request(tmp_path: Path, cowd: Cowd,
                                                  workers: list[str]) -> None:
    """A read of a remote qcow2 base whose L2 table is not cached takes two fetch rounds:
    the table, then the data it names (planned again in between).  With a server that
    takes 1.5 s per read and a 2.5 s deadline, each round alone is in time; the request is
    not: EIO near 2.5 s (a deadline per round answered after 3 s).  Once the table is
    cached, the same read gives the bytes qemu-io wrote (one round)."""
    files = tmp_path / "files"
    files.mkdir()
    base = files / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1G")
    # 8 MiB at the start, then a cluster in the second L2 table's range (512 MiB+): its
    # table lands after the 8 MiB, far from the header, L1 and first table the open reads.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M",
                    "-c", "write -P 0x5a 600M 64K", str(base)], check=True,
                   capture_output=True, timeout=60)
    with nbdkit(tmp_path, base, filters=["delay"], params=["delay-read=1500ms"]) as srv:
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", srv.url, ov)
        # --no-prime: priming would read every L2 table of the base before the request.
        with cowd.serve(ov, extra=["--remote-timeout", "2.5", "--no-prime", *workers]) as sock:
            uri = f"nbd+unix:///{ov.name}?socket={sock}"
            t0 = time.monotonic()
            p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 600M 64K", uri],
                               capture_output=True, text=True, timeout=60)
            took = time.monotonic() - t0
            out = p.stdout + p.stderr
            assert "Input/output error" in out, out
            assert took < 4.5, took  # qemu-io's start included; two rounds took 3 s+
            p = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 600M 64K", uri],
                               capture_output=True, text=True, timeout=60)
            out = p.stdout + p.stderr
            assert "read 65536/65536 bytes" in out and "fail" not in out.lower(), out


# ---- a changed base, through the daemon ----------------------------------------------------


def _changed_base(tmp: Path, cowd: Cowd,
                  server: str) -> Iterator[tuple[Path, str, str, Server]]:
    """An overlay over a base on ``server``, its cache filled by one ``cowd convert``, then
    the base changed on the server: nginx's file rewritten (same size, new ETag), or nbdkit
    started again on the same port exporting one of another size.  Yields the overlay, the
    base's URL, what the changed validator must mention and the server now running."""
    files = tmp / "files"
    files.mkdir()
    raw = make_base(files, 8)
    with contextlib.ExitStack() as stack:
        if server == "nginx":
            srv = stack.enter_context(nginx(tmp, files))
            url = f"{srv.url}/base.raw"
        else:
            srv = stack.enter_context(nbdkit(tmp, raw))
            url = srv.url
        ov = tmp / "ov.qcow2"
        cowd("create", "--base", url, "--overlay", "qcow", "-o", ov)
        cowd("convert", ov, tmp / "a.raw", "-O", "raw", "--allow-remote-backing")
        if server == "nginx":
            st = raw.stat()
            raw.write_bytes(b"\x7f" * st.st_size)  # a new version, same size
            os.utime(raw, (st.st_atime + 10, st.st_mtime + 10))  # nginx's ETag: mtime
            what = "etag="
        else:
            srv.stop()
            bigger = files / "bigger.raw"
            bigger.write_bytes(raw.read_bytes() + b"\1" * 65536)
            srv = stack.enter_context(nbdkit(tmp, bigger, port=srv.port))
            what = "size=8454144"
        yield ov, url, what, srv


@pytest.mark.parametrize("server", ["nginx", "nbdkit"])
def test_changed_base_fails_serve_in_one_line(tmp_path: Path, cowd: Cowd,
                                              server: str) -> None:
    for ov, url, what, _srv in _changed_base(tmp_path, cowd, server):
        sock = tmp_path / "x.sock"
        p = subprocess.run([*COWD, "serve", str(ov), "--nbd", f"unix:{sock}", "--run-dir",
                            str(tmp_path / "run"), "--allow-remote-backing"],
                           capture_output=True, text=True, timeout=60, env=cowd.env,
                           stdin=subprocess.DEVNULL)
        line = p.stderr.strip()
        assert p.returncode == 1, (p.returncode, p.stderr)
        assert "\n" not in line and "Traceback" not in line, line
        assert ov.name in line and url in line and "changed" in line and what in line, line
        assert not sock.exists()


@pytest.mark.parametrize("server", ["nginx", "nbdkit"])
def test_changed_base_fails_attach_in_one_line(tmp_path: Path, cowd: Cowd,
                                               server: str) -> None:
    from tests.support.attach import Env, attach_problem

    problem = attach_problem()
    if problem:
        pytest.skip(problem)
    for ov, url, what, _srv in _changed_base(tmp_path, cowd, server):
        with Env.under(tmp_path) as env:
            lines = []
            for _ in range(2):  # the second attach too: the cache stays marked
                p = env.cowd("attach", ov, "--via", "fuse", "--allow-remote-backing",
                             "--remote-cache-dir", cowd.cache, rc=1)
                line = p.stderr.strip()
                assert "\n" not in line, line
                assert ov.name in line and url in line and "changed" in line and \
                    what in line and f"cowd cache drop {url}" in line, line
                assert p.stdout == ""
                assert env.list() == []
                lines.append(line[line.index("the remote base changed"):])
            assert lines[0] == lines[1]
            (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
            assert c["changed"] and c["held_bytes"] == 0 and not c["in_use"], c


def _refusal(p: subprocess.CompletedProcess[str], ov: Path, url: str, what: str) -> str:
    """The one line a refused open printed, from "the remote base changed" on."""
    line = p.stderr.strip()
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "\n" not in line and "Traceback" not in line, line
    assert ov.name in line and url in line and what in line, line
    assert f"`cowd cache drop {url}`" in line, line
    return line[line.index("the remote base changed since it was cached"):]


def _served_refusal(cowd: Cowd, ov: Path) -> subprocess.CompletedProcess[str]:
    """``cowd serve`` of ``ov``, which must exit (refused) rather than start serving."""
    sock = cowd.tmp / "x.sock"
    argv = [*COWD, "serve", str(ov), "--nbd", f"unix:{sock}", "--run-dir",
            str(cowd.tmp / "run"), "--allow-remote-backing"]
    err = cowd.tmp / "serve-refused.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f, env=cowd.env,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sock.exists(), "cowd serve started serving the changed base"
        proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        stop_process(proc, signal.SIGTERM, 30)
    return subprocess.CompletedProcess(argv, proc.returncode, "", err.read_text())


@pytest.mark.parametrize("server", ["nginx", "nbdkit"])
def test_changed_base_stays_refused_until_dropped(tmp_path: Path, cowd: Cowd,
                                                  server: str) -> None:
    """After a base changed on the server, the first open fails in one line, and so do the
    second and the third (cowd serve, cowd convert, cowd serve again: the cache is kept,
    marked, not dropped), each the same line, and none of them puts a byte of the new
    version in the cache (nginx sends nothing but the one-byte probes); cowd cache show
    says so; cowd cache drop URL accepts the new version: a new overlay over it is served
    with qemu-img convert's bytes of its chain."""
    for ov, url, what, srv in _changed_base(tmp_path, cowd, server):
        log = srv.extra.get("access_log")
        mark = log.stat().st_size if log is not None else 0
        first = _refusal(cowd("convert", ov, tmp_path / "b.raw", "-O", "raw",
                              "--allow-remote-backing", rc=None), ov, url, what)
        assert "it is now" in first, first
        for again in (_served_refusal(cowd, ov),
                      cowd("convert", ov, tmp_path / "c.raw", "-O", "raw",
                           "--allow-remote-backing", rc=None),
                      _served_refusal(cowd, ov)):
            assert _refusal(again, ov, url, what) == first
        assert not (tmp_path / "b.raw").exists() and not (tmp_path / "c.raw").exists()
        if log is not None:
            ranges = [ln.split('"')[1] for ln in log.read_bytes()[mark:].decode().splitlines()]
            assert ranges and set(ranges) == {"bytes=0-0"}, ranges  # the probes alone
        (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
        assert c["url"] == url and c["size"] == 8 << 20 and c["held_bytes"] == 0, c
        assert (c["changed"]["accept"], c["in_use"]) == (f"cowd cache drop {url}", False), c
        assert what in c["changed"]["seen"] and c["changed"]["seen_at"], c
        assert os.stat(Path(c["folder"]) / "data").st_blocks == 0
        text = cowd("cache", "show").stdout
        assert f"{url}: changed on the server since cached" in text, text
        assert f"`cowd cache drop {url}` accepts the new version" in text, text
        # Prefetching it is refused too (it would fill the cache with the new version).
        p = cowd("cache", "prefetch", url, "--all", rc=1)
        assert "changed since it was cached" in p.stderr and "\n" not in p.stderr.strip()

        out = cowd("cache", "drop", url).stdout
        assert f"dropped: {url}: " in out and "it had changed on the server" in out, out
        assert json.loads(cowd("cache", "show", "--json").stdout)["caches"] == []
        new = tmp_path / "new.qcow2"
        cowd("create", "--base", url, "--overlay", "qcow", "-o", new)
        want = qemu_chain(new, tmp_path)
        with cowd.serve(new) as sock:
            got = nbd_read(sock, new.name, tmp_path)
        assert got == want
        assert len(got) == (8 << 20 if server == "nginx" else (8 << 20) + 65536)
        if server == "nginx":
            assert got == b"\x7f" * len(got)  # the new version's bytes
        (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
        assert c["changed"] is None and c["held_bytes"] > 0, c
