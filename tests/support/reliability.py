"""Shared by tests/integration/test_reliability*.py and ``tools/stress.py crash|long``: the
daemon as a user runs it (``cowd serve``), overlays made by ``cowd create``, the crash loop,
and a file level write recorder for power-cut simulation through the daemon.

Crash loop (:func:`crash_iteration`): start ``cowd serve`` on the overlay, run the write storm
of tools/stress.py (libnbd, /usr/bin/python3) against it, SIGKILL the daemon at a random
moment, then check the overlay (qemu-img check for qcow2 — no errors, leaks allowed — and
``cowd check`` for VHD, which qemu does not check), read the disk back with a reader nobody
here wrote (qemu-img convert for qcow2, libvhdi's vhdimount for a differencing VHD), hold
every sector against the journal (tools/stress.py: ``verify``), then ``cowd check --repair``
and require a clean check.  The next iteration starts from the bytes read back.

Power cut (:func:`recorded_main`, :func:`power_cut_image`): the daemon runs with ``os.pwrite``,
``os.fdatasync``/``os.fsync``, ``os.ftruncate`` and the format library's ``fallocate``
wrapped, so that every change to the overlay file is appended to a record file *after* it
returned (a write recorded before a sync began was complete when the sync began, even with
the flush in a worker thread).  A power cut at the moment of the kill keeps every write
recorded before the last completed sync began, and a random subset of the 512-byte pieces of
every later write, in order (the same model as tests/integration/test_qcow2_write.py's IoLog).  The
image so rebuilt must pass the same checks as the killed one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.peers import COWD, libvhdi_raw
from tools import stress

SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter with libnbd's binding
STRESS = ROOT / "tools" / "stress.py"
MiB = 1 << 20


def sh(*args: str | os.PathLike[str], timeout: float = 120,
       check: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run([os.fspath(a) for a in args], capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}:\n"
                             f"{p.stdout.decode(errors='replace')}"
                             f"{p.stderr.decode(errors='replace')}")
    return p


# ---- the daemon ----------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    sock: Path
    run_dir: Path
    log: Path
    name: str

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def worker_pids(self) -> list[int]:
        """The daemon's worker processes (its children running cowd.workers.worker)."""
        pids = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                for child in Path(f"/proc/{self.proc.pid}/task/{task}/children").read_text() \
                        .split():
                    with contextlib.suppress(OSError):
                        if b"cowd.workers.worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                            pids.append(int(child))
        return sorted(pids)

    def kill_workers(self) -> list[int]:
        """SIGKILL every worker (the daemon lives on and starts new ones)."""
        pids = self.worker_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def tree_rss_kib(self) -> int:
        return rss_kib(self.proc.pid) + sum(rss_kib(p) for p in self.worker_pids())

    def stop(self, timeout: float = 20) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"cowd serve ignored SIGTERM:\n{self.log_text()}") from None
        text = self.log_text()
        assert rc == 0, f"cowd serve exited {rc}:\n{text}"
        assert "Traceback" not in text, text
        return text


def start_daemon(image: Path, work: Path, *, extra: tuple[str, ...] = (),
                 record: Path | None = None, wait_s: float = 30,
                 env: dict[str, str] | None = None,
                 more_images: tuple[Path, ...] = ()) -> Daemon:
    """``cowd serve IMAGE --nbd unix:SOCK`` (optionally under the write recorder); returns
    once the socket accepts connections."""
    n = 0
    while (work / f"run{n}").exists():
        n += 1
    sock, run_dir, log = work / f"nbd{n}.sock", work / f"run{n}", work / f"cowd{n}.log"
    run_dir.mkdir()
    args = ["serve", str(image), *map(str, more_images), "--nbd", f"unix:{sock}",
            "--run-dir", str(run_dir), *extra]
    if record is not None:
        cmd = [sys.executable, "-c", "import sys; from tests.support.reliability import "
               "recorded_main; sys.exit(recorded_main(sys.argv[1:]))", str(record), str(image),
               *args]
        env = {**(env or {}), "PYTHONPATH": str(ROOT)}  # finds tests/ from the daemon's cwd
    else:
        cmd = [*COWD, *args]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, **env} if env else None)
    d = Daemon(proc, sock, run_dir, log, image.name)
    try:
        wait_listening(proc, sock, log, wait_s)
    except AssertionError:
        d.kill()
        raise
    return d


def wait_listening(proc: subprocess.Popen[bytes], sock: Path, log: Path,
                   wait_s: float = 30) -> None:
    """Return once ``cowd serve`` (``proc``, logging to ``log``) accepts connections on
    ``sock``; fail with its log if it exits first or does not listen within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            raise AssertionError(f"cowd serve exited {proc.returncode}:\n{text}")
        if sock.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                return
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace")
            raise AssertionError(f"cowd serve did not listen in {wait_s} s:\n{text}")
        time.sleep(0.02)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """The daemons a test started (it appends them): killed at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


# ---- overlays ------------------------------------------------------------------------------


@dataclass
class Setup:
    fmt: str  # qcow2 or vhd
    work: Path
    overlay: Path
    base: Path
    old: bytes  # the disk's contents before the next storm
    figures: list[dict[str, Any]] = field(default_factory=list)


def make_setup(work: Path, fmt: str, size: int = 32 * MiB, seed: int = 1,
               create_args: tuple[str, ...] = ()) -> Setup:
    """A base of random bytes and an overlay on it made by ``cowd create`` (with
    ``create_args``: e.g. --extended-l2)."""
    rnd = random.Random(seed)
    raw = work / "base.raw"
    raw.write_bytes(rnd.randbytes(size))
    if fmt == "qcow2":
        base = raw
    else:
        base = work / "base.vhd"
        sh("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
           "subformat=dynamic,force_size=on", raw, base)
    ov = work / f"ov.{'qcow2' if fmt == 'qcow2' else 'vhd'}"
    sh(*COWD, "create", "--base", base, "--overlay", "qcow" if fmt == "qcow2" else "vhd",
       "-o", ov, *create_args)
    old = read_disk(fmt, ov, work)
    if fmt == "vhd":
        assert old[:size] == raw.read_bytes()[:len(old)], "VHD base differs from its raw"
    return Setup(fmt, work, ov, base, old)


def read_disk(fmt: str, image: Path, work: Path) -> bytes:
    """The virtual disk as a reader nobody here wrote sees it."""
    if fmt == "qcow2":
        out = work / "readback.raw"
        sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, out)
        data = out.read_bytes()
        out.unlink()
        return data
    return libvhdi_raw(image, work)


def check_image(fmt: str, image: Path) -> tuple[int, str]:
    """(leaks, text) — raises AssertionError on any corruption.  qcow2: qemu-img check;
    VHD: cowd check (qemu-img has no check for vpc)."""
    if fmt == "qcow2":
        p = sh("qemu-img", "check", "--output=json", "-f", "qcow2", image, check=False)
        text = (p.stdout + p.stderr).decode(errors="replace")
        assert p.returncode in (0, 3), f"qemu-img check {image}: rc={p.returncode}\n{text}"
        doc = json.loads(p.stdout)
        assert not doc.get("corruptions") and not doc.get("check-errors"), text
        return int(doc.get("leaks", 0)), text
    p = sh(*COWD, "check", "--json", image, check=False)
    text = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode in (0, 3), f"cowd check {image}: rc={p.returncode}\n{text}"
    doc = json.loads(p.stdout)  # qemu-img check's schema: counts, present when not zero
    assert not doc.get("corruptions") and not doc.get("check-errors"), text
    return int(doc.get("leaks", 0)), text


def repair_and_recheck(fmt: str, image: Path) -> None:
    p = sh(*COWD, "check", "--repair", image, check=False)
    assert p.returncode == 0, f"cowd check --repair: rc={p.returncode}\n{p.stdout.decode()}"
    leaks, text = check_image(fmt, image)
    assert leaks == 0, f"leaks after cowd check --repair:\n{text}"


# ---- the crash loop ------------------------------------------------------------------------


def run_writer(uri: str, journal: Path, seconds: float, seed: int, seq0: int,
               depth: int = 16, align_share: float = 0.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen([SYSTEM_PYTHON, str(STRESS), "writer", uri, str(journal),
                             "--seconds", str(seconds), "--seed", str(seed), "--seq0",
                             str(seq0), "--depth", str(depth),
                             "--align-share", str(align_share)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_acks(journal: Path, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if journal.read_text().count("\nA ") >= n:
                return
        time.sleep(0.01)
    raise AssertionError(f"the writer got fewer than {n} acks in {timeout_s} s")


def crash_iteration(s: Setup, it: int, rnd: random.Random, *, power_cut: bool = False,
                    max_kill_s: float = 1.5, workers: int = 0,
                    kill_workers: bool = False, align_share: float = 0.0) -> dict[str, Any]:
    """One storm, one SIGKILL, every check; returns the iteration's figures.  With
    ``workers``, the daemon serves from that many worker processes; with ``kill_workers``
    the SIGKILL goes to every worker instead of the daemon, which must start them again and
    go on serving, then stop cleanly."""
    work = s.work
    journal = work / f"journal{it}.txt"
    record = work / f"record{it}.bin" if power_cut else None
    before = s.overlay.read_bytes() if power_cut else b""
    d = start_daemon(s.overlay, work, record=record, extra=("--workers", str(workers)))
    w = run_writer(d.uri, journal, seconds=30, seed=rnd.randrange(1 << 30),
                   seq0=(it + 1) * 10_000_000, align_share=align_share)
    try:
        wait_acks(journal, 20, 20)
        delay = rnd.uniform(0.0, max_kill_s)
        time.sleep(delay)
        if kill_workers:
            killed = d.kill_workers()
            assert len(killed) == workers, f"found workers {killed}, expected {workers}"
        else:
            d.kill()
        out, _ = w.communicate(timeout=30)
        if kill_workers:
            _wait_workers_again(d, killed, workers)
            d.stop()
    finally:
        d.kill()
        if w.poll() is None:
            w.kill()
            w.wait()
    assert w.returncode == 0, f"writer exited {w.returncode}: {out.decode(errors='replace')}"
    j = stress.Journal.parse(journal.read_text().splitlines())
    assert j.end.startswith("connection"), f"the storm ended before the kill: {j.end}"
    fig: dict[str, Any] = {"iteration": it, "kill_after_s": round(delay, 3), **j.counts()}
    leaks, _ = check_image(s.fmt, s.overlay)
    fig["leaks"] = leaks
    got = read_disk(s.fmt, s.overlay, work)
    problems = stress.verify(got, s.old, j)
    assert not problems, f"iteration {it} (killed after {delay:.2f} s): " + "; ".join(problems)
    if record is not None:
        fig["power_cut"] = power_cut_check(s, before, record, j, rnd)
    repair_and_recheck(s.fmt, s.overlay)
    after = read_disk(s.fmt, s.overlay, work)
    assert after == got, f"iteration {it}: cowd check --repair changed the disk's contents"
    s.old = got
    journal.unlink()
    s.figures.append(fig)
    return fig


def _wait_workers_again(d: Daemon, killed: list[int], workers: int,
                        timeout_s: float = 30) -> None:
    """The daemon starts new workers for the killed ones, and serves through them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = d.worker_pids()
        if len(now) == workers and not set(now) & set(killed):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the daemon did not start new workers (killed {killed}, "
                             f"now {d.worker_pids()}):\n{d.log_text()}")
    sh("qemu-img", "info", "-f", "raw", d.uri, timeout=30)


def power_cut_check(s: Setup, before: bytes, record: Path, j: Any,
                    rnd: random.Random, variants: int = 2) -> dict[str, Any]:
    events = parse_record(record.read_bytes())
    cut_path = s.overlay.with_name("cut-" + s.overlay.name)
    dropped_total = 0
    leaks_total = 0
    for _ in range(variants):
        img, dropped = power_cut_image(before, events, rnd)
        dropped_total += dropped
        cut_path.write_bytes(img)
        leaks, _ = check_image(s.fmt, cut_path)
        leaks_total += leaks
        got = read_disk(s.fmt, cut_path, s.work)
        problems = stress.verify(got, s.old, j)
        assert not problems, "power cut: " + "; ".join(problems)
        repair_and_recheck(s.fmt, cut_path)
        cut_path.unlink()
    record.unlink()
    syncs = sum(1 for e in events if e[0] == "E")
    return {"events": len(events), "syncs": syncs, "pieces_dropped": dropped_total,
            "leaks": leaks_total}


# ---- the write recorder --------------------------------------------------------------------

_FRAME = struct.Struct(">cQQ")  # tag, offset (or size), length


def recorded_main(argv: list[str]) -> int:
    """``cowd`` with every change to one file recorded: argv = RECORD IMAGE cowd-args..."""
    record, image, *cowd_args = argv
    st = os.stat(image)
    key = (st.st_dev, st.st_ino)
    rec_fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    # Fault injection: while this file exists, a sync of the image fails with EIO (what the
    # kernel reports when write-back failed).
    fail_sync_if = os.environ.get("COWD_TEST_FAIL_SYNC_IF")
    import formats.base as fb

    real_pwrite, real_fdatasync, real_fsync = os.pwrite, os.fdatasync, os.fsync
    real_ftruncate, real_fallocate = os.ftruncate, fb.fallocate
    real_write = os.write

    def ours(fd: int) -> bool:
        try:
            s2 = os.fstat(fd)
        except OSError:
            return False
        return (s2.st_dev, s2.st_ino) == key

    def note(tag: bytes, a: int, b: int, data: bytes = b"") -> None:
        real_write(rec_fd, _FRAME.pack(tag, a, b) + data)

    def pwrite(fd: int, data: Any, offset: int) -> int:
        n = real_pwrite(fd, data, offset)
        if n > 0 and ours(fd):
            note(b"W", offset, n, bytes(memoryview(data).cast("B")[:n]))
        return n

    def sync(real: Any) -> Any:
        def call(fd: int) -> None:
            mine = ours(fd)
            if mine:
                note(b"B", 0, 0)
                if fail_sync_if and os.path.exists(fail_sync_if):
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)
            if mine:
                note(b"E", 0, 0)
        return call

    def ftruncate(fd: int, size: int) -> None:
        real_ftruncate(fd, size)
        if ours(fd):
            note(b"T", size, 0)

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        real_fallocate(fd, mode, offset, length)
        if ours(fd) and mode & (fb.FALLOC_FL_PUNCH_HOLE | fb.FALLOC_FL_ZERO_RANGE):
            note(b"Z", offset, length)

    os.pwrite = pwrite
    os.fdatasync = sync(real_fdatasync)
    os.fsync = sync(real_fsync)
    os.ftruncate = ftruncate
    fb.fallocate = fallocate
    from cowd.cli import main

    return main(cowd_args)


def parse_record(raw: bytes) -> list[tuple[str, int, int, bytes]]:
    """The record's events; a frame cut short by the kill is dropped."""
    out = []
    pos = 0
    while pos + _FRAME.size <= len(raw):
        tag, a, b = _FRAME.unpack_from(raw, pos)
        pos += _FRAME.size
        data = b""
        if tag == b"W":
            if pos + b > len(raw):
                break
            data = raw[pos:pos + b]
            pos += b
        out.append((tag.decode(), a, b, data))
    return out


def power_cut_image(before: bytes, events: list[tuple[str, int, int, bytes]],
                    rnd: random.Random) -> tuple[bytes, int]:
    """The file as a power cut at the end of the record could leave it: every change
    recorded before the last completed sync began is kept, each 512-byte piece of a later
    change is kept or dropped at random (in order).  Returns (image, pieces dropped)."""
    last_begin = -1
    open_begin = -1
    for i, e in enumerate(events):
        if e[0] == "B":
            open_begin = i
        elif e[0] == "E" and open_begin >= 0:
            last_begin = open_begin
    img = bytearray(before)
    dropped = 0
    for i, (tag, a, b, data) in enumerate(events):
        sure = i < last_begin
        if tag == "T":
            if len(img) < a:
                img.extend(bytes(a - len(img)))
            elif sure:
                del img[a:]
            continue
        if tag not in ("W", "Z"):
            continue
        pos = 0
        length = b
        while pos < length:
            n = min(length - pos, 512 - (a + pos) % 512)
            if sure or rnd.random() < 0.5:
                piece = data[pos:pos + n] if tag == "W" else bytes(n)
                at = a + pos
                if at + n > len(img):
                    img.extend(bytes(at + n - len(img)))
                img[at:at + n] = piece
            else:
                dropped += 1
            pos += n
    return bytes(img), dropped


# ---- the long run (tools/stress.py crash|long) ---------------------------------------------


def long_run(args: Any) -> int:
    import tempfile

    fmts = ["qcow2", "vhd"] if args.format == "both" else [args.format]
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="cowd-stress-", dir=args.workdir) as tmp:
        for fmt in fmts:
            work = Path(tmp) / fmt
            work.mkdir()
            s = make_setup(work, fmt)
            rnd = random.Random(20261124)
            t0 = time.monotonic()
            for it in range(args.iterations):
                fig = crash_iteration(s, it, rnd, power_cut=it % 2 == 1)
                print(json.dumps({"format": fmt, **fig}), flush=True)
            summary[fmt] = summarize(s.figures, time.monotonic() - t0)
        if args.cmd == "long":
            work = Path(tmp) / "load"
            work.mkdir()
            summary["load"] = load_run(work, args.load_seconds)
    print(json.dumps(summary, indent=2))
    return 0


def summarize(figs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    tot: dict[str, Any] = {"iterations": len(figs), "seconds": round(seconds, 1)}
    for k in ("writes_sent", "writes_acked", "writes_durable", "flushes_acked", "leaks"):
        tot[k] = sum(f[k] for f in figs)
    cuts = [f["power_cut"] for f in figs if "power_cut" in f]
    tot["power_cut_images"] = 2 * len(cuts)
    tot["power_cut_pieces_dropped"] = sum(c["pieces_dropped"] for c in cuts)
    return tot


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def load_run(work: Path, seconds: float, size: int = 64 * MiB,
             workers: int = 0) -> dict[str, Any]:
    """8 connections x 64 in flight against a shadow model (tools/stress.py load), with the
    daemon's RSS (its workers' included) sampled every 0.5 s; then the overlay is checked
    and read back by qemu."""
    rnd = random.Random(5)
    base = work / "base.raw"
    base.write_bytes(rnd.randbytes(size))
    ov = work / "ov.qcow2"
    sh(*COWD, "create", "--base", base, "--overlay", "qcow", "-o", ov)
    d = start_daemon(ov, work, extra=("--workers", str(workers)))
    rss: list[int] = [d.tree_rss_kib()]
    p = subprocess.Popen([SYSTEM_PYTHON, str(STRESS), "load", d.uri, str(base), "--seconds",
                          str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while p.poll() is None:
            time.sleep(0.5)
            if d.alive():
                rss.append(d.tree_rss_kib())
        out, err = p.communicate(timeout=seconds + 120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        d.stop()
    assert p.returncode == 0, err.decode(errors="replace")
    doc: dict[str, Any] = json.loads(out)
    leaks, _ = check_image("qcow2", ov)
    doc["leaks_after_clean_stop"] = leaks
    final = Path(str(base) + ".final").read_bytes()
    doc["qemu_readback_matches_model"] = read_disk("qcow2", ov, work) == final
    doc["rss_kib_start"] = rss[0]
    doc["rss_kib_max"] = max(rss)
    doc["rss_kib_mid"] = rss[len(rss) // 2]
    doc["rss_kib_end"] = rss[-1]
    doc["rss_samples"] = len(rss)
    return doc
