"""Hostile input through the real commands, not only the library:

- the malformed-image corpus (tests/support/corpus.py) through `cowd serve` and
  `cowd attach --via fuse`: a one-line error naming a file, or a disk that serves what it
  can, answers errors per request and stops cleanly — never a traceback, a hang or a dead
  daemon (the attach daemon keeps serving a good disk throughout);
- a protocol fuzzer (hypothesis) over the NBD server: valid sessions with bytes mutated,
  inserted and cut, and plain noise; the server may only answer or drop the connection, and
  another client is served correctly after every example;
- backing names that escape the image's directory (``../``, absolute paths, symlinks out)
  are refused in one line unless ``--allow-backing-outside`` is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import corpus
from tests.support.corpus import CASES, BuiltSeed, materialize
from tests.support.peers import COWD, missing_tool, qemu_img, qemu_raw
from tests.support.reliability import SYSTEM_PYTHON, Daemon, start_daemon

seeds = corpus.seeds  # the session fixture that builds the corpus's seed images

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SERVE_DEADLINE_S = 20.0


def one_line(stderr: bytes, what: str) -> str:
    text = stderr.decode(errors="replace").strip()
    assert "Traceback" not in text, f"{what}: traceback:\n{text}"
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowd: "), f"{what}: not one line:\n{text}"
    return lines[0]


READER = '''
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
ok = errors = 0
spans = [(0, min(size, 4 << 20))]
if size > 4 << 20:
    spans.append((size - (1 << 20), 1 << 20))
for start, n in spans:
    pos = start
    while pos < start + n:
        k = min(1 << 20, start + n - pos)
        try:
            h.pread(k, pos)
            ok += 1
        except nbd.Error:
            errors += 1
        pos += k
h.shutdown()
print(json.dumps({"size": size, "ok": ok, "errors": errors}))
'''


def serve_case(top: Path, work: Path) -> str:
    """`cowd serve` one hostile image: returns "refused: <line>" or "served: <reader>"."""
    sock, run_dir = work / "s.sock", work / "run"
    p = subprocess.Popen([*COWD, "serve", str(top), "--nbd", f"unix:{sock}", "--run-dir",
                          str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SERVE_DEADLINE_S
        while p.poll() is None and not sock.exists():
            assert time.monotonic() < deadline, f"{top}: cowd serve hangs at start-up"
            time.sleep(0.02)
        if p.poll() is not None:
            _, err = p.communicate()
            assert p.returncode in (1, 2), (p.returncode, err)
            return "refused: " + one_line(err, str(top))
        r = subprocess.run([SYSTEM_PYTHON, "-c", READER, f"nbd+unix:///{top.name}?socket={sock}"],
                           capture_output=True, timeout=SERVE_DEADLINE_S)
        assert p.poll() is None, f"{top}: the daemon died while serving"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=SERVE_DEADLINE_S)
        text = err.decode(errors="replace")
        assert "Traceback" not in text, f"{top}: traceback:\n{text}"
        assert p.returncode in (0, 1), (p.returncode, text)
        return "served: " + r.stdout.decode().strip()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


SERVE_SAMPLE = [c for i, c in enumerate(CASES) if i % 6 == 0 or c.must_fail]


@pytest.mark.timeout(180)
def test_corpus_through_cowd_serve(seeds: dict[str, BuiltSeed], tmp_path: Path) -> None:
    reason = missing_tool("qemu-img")
    if reason:
        pytest.skip(reason)
    outcomes: dict[str, str] = {}
    for n, case in enumerate(SERVE_SAMPLE):
        work = tmp_path / f"c{n}"
        top = materialize(case, seeds, work / "case")
        outcomes[case.id] = serve_case(top, work)
        if case.must_fail:
            assert outcomes[case.id].startswith("refused"), (case.id, outcomes[case.id])
        if case.mutate is None:
            assert outcomes[case.id].startswith("served"), (case.id, outcomes[case.id])
        shutil.rmtree(work, ignore_errors=True)
    refused = sum(o.startswith("refused") for o in outcomes.values())
    assert 0 < refused < len(outcomes), outcomes  # both kinds of outcome were exercised


# ---- cowd attach --------------------------------------------------------------------------------


def attach_problem() -> str | None:
    from cowd.frontends.fuse.mount import fuse_problem

    if os.geteuid() != 0:
        return "cowd attach needs root"
    return fuse_problem() or missing_tool("losetup", "qemu-img")


ATTACH_SAMPLE = [c for i, c in enumerate(CASES) if i % 20 == 3] + \
    [c for c in CASES if c.must_fail][:3]


@pytest.mark.timeout(240)
def test_corpus_through_cowd_attach(seeds: dict[str, BuiltSeed], tmp_path: Path) -> None:
    reason = attach_problem()
    if reason:
        pytest.skip(reason)
    run_dir = tmp_path / "run"
    env = dict(os.environ, COWD_RUN_DIR=str(run_dir))

    def cowd(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*COWD, *map(str, args)], capture_output=True, timeout=timeout,
                              env=env)

    good_base = tmp_path / "good.raw"
    good_base.write_bytes(random.Random(9).randbytes(4 * MiB))
    good = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "good.raw", "-F", "raw", good)
    p = cowd("attach", "--via", "fuse", good)
    assert p.returncode == 0, p.stderr
    dev = p.stdout.decode().strip()
    try:
        assert json.loads(cowd("list", "--json").stdout), "no disk listed"
        daemon_pid = int((run_dir / "cowd.pid").read_text().split()[0])
        for n, case in enumerate(ATTACH_SAMPLE):
            top = materialize(case, seeds, tmp_path / f"a{n}")
            p = cowd("attach", "--via", "fuse", top)
            if p.returncode == 0:
                other = p.stdout.decode().strip()
                with contextlib.suppress(OSError), open(other, "rb") as f:
                    f.read(1 << 20)  # may fail with EIO: fine, the daemon must live on
                d = cowd("detach", other)
                assert d.returncode == 0, d.stderr
            else:
                assert p.returncode in (1, 2), (case.id, p.returncode, p.stderr)
                one_line(p.stderr, case.id)
                assert case.mutate is not None, f"{case.id}: a valid seed was refused"
            os.kill(daemon_pid, 0)  # still the same daemon
        with open(dev, "rb") as f:
            assert f.read(4 * MiB) == qemu_raw(good, tmp_path)
    finally:
        cowd("detach", dev)
    log = (run_dir / "cowd.log").read_text(errors="replace")
    assert "Traceback" not in log, log


# ---- backing names that escape ------------------------------------------------------------------


@pytest.fixture
def escapes(tmp_path: Path) -> dict[str, Path]:
    """Overlays in vm/ whose backing file lies elsewhere, each a different way."""
    reason = missing_tool("qemu-img")
    if reason:
        pytest.skip(reason)
    other = tmp_path / "other"
    other.mkdir()
    (other / "base.raw").write_bytes(random.Random(1).randbytes(MiB))
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "inside.raw").write_bytes(random.Random(2).randbytes(MiB))
    os.symlink(other / "base.raw", vm / "link.raw")
    out = {}
    for name, backing in (("dotdot", "../other/base.raw"),
                          ("absolute", str(other / "base.raw")),
                          ("symlink", "link.raw"),
                          ("inside-absolute", str(vm / "inside.raw")),
                          ("inside-relative", "inside.raw")):
        ov = vm / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", ov, "1M")
        out[name] = ov
    return out


@pytest.mark.timeout(120)
def test_backing_outside_refused_unless_allowed(escapes: dict[str, Path],
                                                tmp_path: Path) -> None:
    def cowd(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*COWD, *map(str, args)], capture_output=True, timeout=30)

    for name in ("dotdot", "absolute", "symlink"):
        ov = escapes[name]
        for cmd in (("info", ov), ("map", ov), ("convert", ov, tmp_path / f"{name}.raw",
                                                  "-O", "raw")):
            p = cowd(*cmd)
            assert p.returncode == 1, (name, cmd, p)
            line = one_line(p.stderr, f"{name} {cmd[0]}")
            assert f"{ov}: backing file lies outside {ov.parent}" in line, line
            assert "--allow-backing-outside" in line, line
        p = cowd("serve", ov, "--nbd", f"unix:{tmp_path / 'x.sock'}", "--run-dir",
                 tmp_path / f"run-{name}")
        assert p.returncode == 1 and "outside" in one_line(p.stderr, f"{name} serve"), p
        # Allowed explicitly: opens, and reads the base.
        p = cowd("info", "--json", "--backing-chain", "--allow-backing-outside", ov)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)[1]["virtual-size"] == MiB
        d = start_daemon(ov, tmp_path, extra=("--allow-backing-outside",))
        d.stop()
    for name in ("inside-absolute", "inside-relative"):
        p = cowd("info", escapes[name])
        assert p.returncode == 0, (name, p.stderr)


@pytest.mark.timeout(120)
def test_attach_refuses_backing_outside(escapes: dict[str, Path], tmp_path: Path) -> None:
    reason = attach_problem()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, COWD_RUN_DIR=str(tmp_path / "run"))
    p = subprocess.run([*COWD, "attach", "--via", "fuse", str(escapes["dotdot"])],
                       capture_output=True, timeout=60, env=env)
    assert p.returncode in (1, 2), p
    assert "outside" in one_line(p.stderr, "attach"), p.stderr


# ---- protocol fuzzer ---------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513


def valid_session(name: bytes, requests: list[tuple[int, int, int, int, bytes]]) -> bytes:
    """Client bytes of a fixed-newstyle session: flags, NBD_OPT_GO, requests, disconnect."""
    out = struct.pack(">I", 3)
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    out += struct.pack(">QII", IHAVEOPT, 7, len(go)) + go
    for i, (flags, cmd, off, length, payload) in enumerate(requests):
        out += struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, i + 1, off, length) + payload
    out += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 0, 0, 0)
    return out


request_st = st.tuples(
    st.sampled_from([0, 0, 1, 2, 4, 8, 16, 0xFFFF]),  # flags: none, FUA, NO_HOLE, DF, ...
    st.sampled_from([0, 0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 0xFFFF]),  # commands, known and not
    st.one_of(st.integers(0, 2 * MiB), st.sampled_from([2**63 - 1, 2**64 - 1, 4 * MiB - 1])),
    st.one_of(st.integers(0, 70000), st.sampled_from([2**32 - 1, 2**31, 0])),
    st.binary(max_size=2000),
)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    data = valid_session(b"disk.qcow2", draw(st.lists(request_st, max_size=6)))
    kind = draw(st.sampled_from(["mutate", "mutate", "noise", "truncate"]))
    if kind == "noise":
        return draw(st.binary(max_size=4000))
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[:draw(st.integers(0, len(buf)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip" and at < len(buf):
            buf[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif at < len(buf):
            del buf[at:at + draw(st.integers(1, 16))]
    return bytes(buf)


def exchange(sock_path: Path, data: bytes, timeout: float = 5.0) -> None:
    """Connect, read the greeting, send everything, half-close, read until the server
    closes.  The server must close (or answer) within ``timeout``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        with contextlib.suppress(OSError):
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while s.recv(1 << 16):
                assert time.monotonic() < deadline, "server kept the connection open"


def served_ok(sock_path: Path, name: bytes, expect: bytes) -> None:
    """A well-behaved client of export ``name`` reads its first 64 KiB correctly."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(valid_session(name, [(0, 0, 0, 65536, b"")])[:-28])

        def recv(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                assert chunk, "server closed"
                buf += chunk
            return buf

        recv(18)  # greeting
        while True:  # option replies up to NBD_REP_ACK
            _, _, rtype, n = struct.unpack(">QIII", recv(20))
            recv(n)
            if rtype == 1:
                break
        magic, err, _ = struct.unpack(">IIQ", recv(16))
        assert (magic, err) == (0x67446698, 0)
        assert recv(65536) == expect


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, bytes]]:
    """One daemon serving the fuzzed export (disk.qcow2) and a witness export the fuzzer
    never names, whose contents are known.  At the end the daemon must stop cleanly and
    the fuzzed overlay pass qemu-img check."""
    reason = missing_tool("qemu-img")
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("fuzz")
    (work / "base.raw").write_bytes(random.Random(4).randbytes(4 * MiB))
    ov = work / "disk.qcow2"
    witness = work / "witness.qcow2"
    for p in (ov, witness):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p)
    d = start_daemon(ov, work, more_images=(witness,))
    try:
        yield d, (work / "base.raw").read_bytes()[:65536]
        d.stop()
        qemu_img("check", ov)
    finally:
        d.kill()


@pytest.mark.timeout(240)
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=sessions())
def test_protocol_fuzzer(fuzz_target: tuple[Daemon, bytes], data: bytes) -> None:
    d, first = fuzz_target
    exchange(d.sock, data)
    assert d.alive(), d.log_text()
    served_ok(d.sock, b"witness.qcow2", first)
