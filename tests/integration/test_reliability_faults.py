"""Faults under `cowd serve`, driven by a libnbd client (/usr/bin/python3):

- ENOSPC: an overlay on a small tmpfs mounted here; the client gets ENOSPC, the overlay stays
  consistent (qemu-img check), and writing resumes once space is freed.
- EIO from the backing file: the base is a file in an nbdfuse mount of nbdkit's error filter,
  which fails reads while a trigger file exists; reads and copy-up writes get EIO for that
  request only, the disk is not marked corrupt, and all is well once the trigger goes.
- A failed flush is never reported as success: fdatasync of the overlay fails (injected in
  the daemon process) and every later flush and FUA write fails too.
- A served overlay truncated under the daemon: EIO and the disk marked corrupt (and the qcow2
  header's corrupt bit set, as qemu does), never silent zeroes.

After each: the daemon is stopped, qemu-img check is clean (no corruption) and qemu's reading
of the overlay equals a model of the acknowledged writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import reliability
from tests.support.peers import COWD, missing_tool, qemu_img, qemu_raw
from tests.support.reliability import SYSTEM_PYTHON, Daemon, start_daemon

daemons = reliability.daemons  # the fixture: the daemons a test started, killed at teardown

pytestmark = pytest.mark.qemu

MiB = 1 << 20
K64 = 64 << 10

# The client side of each test: a libnbd script.  ``res(**kw)`` reports back as JSON.
PRELUDE = '''
import errno, json, random, sys, nbd
URI = sys.argv[1]
ARGS = json.loads(sys.argv[2])
def chunk(seed, n=65536):
    return random.Random(seed).randbytes(n)
def conn():
    h = nbd.NBD()
    h.connect_uri(URI)
    return h
def err_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
        return 0
    except nbd.Error as e:
        return e.errno or -1
def res(**kw):
    print(json.dumps(kw))
'''


def client(uri: str, script: str, timeout: float = 60, **args: object) -> dict[str, object]:
    p = subprocess.run([SYSTEM_PYTHON, "-c", PRELUDE + script, uri, json.dumps(args)],
                       capture_output=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr).decode(errors="replace")
    out: dict[str, object] = json.loads(p.stdout.decode().strip().splitlines()[-1])
    return out


def chunk(seed: int, n: int = K64) -> bytes:
    return random.Random(seed).randbytes(n)


def need_peers(*tools: str) -> None:
    reason = missing_tool("qemu-img", *tools)
    if reason:
        pytest.skip(reason)
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("python3-libnbd not installed for /usr/bin/python3 (make check installs it)")


def no_corruption(image: Path) -> int:
    """qemu-img check: no corruption (leaks allowed); returns the leak count."""
    p = qemu_img("check", "--output=json", "-f", "qcow2", image, check=False)
    assert p.returncode in (0, 3), (p.returncode, p.stdout, p.stderr)
    doc = json.loads(p.stdout)
    assert not doc.get("corruptions") and not doc.get("check-errors"), doc
    return int(doc.get("leaks", 0))


# ---- ENOSPC ------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str, daemons: list[Daemon]) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "cowd-test", str(where)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield where
    finally:
        for d in daemons:  # a failed test's daemon would keep the mount busy
            d.kill()
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


ENOSPC_FILL = '''
h = conn()
acked, failed, errs = [], None, []
for i in range(ARGS["max_chunks"]):
    off = i * 65536
    e = err_of(h.pwrite, chunk(off), off)
    if e:
        failed = off
        errs.append(e)
        break
    acked.append(off)
# Rewriting what is already allocated needs no space: it must still work.
rewrite = err_of(h.pwrite, chunk(acked[0] + 1), acked[0]) if acked else -1
flush = err_of(h.flush)
res(acked=acked, failed=failed, errs=errs, rewrite=rewrite, flush=flush)
'''

ENOSPC_RESUME = '''
h = conn()
errs = [err_of(h.pwrite, chunk(off), off) for off in ARGS["offsets"]]
res(errs=errs, flush=err_of(h.flush))
'''


@pytest.mark.timeout(120)
def test_enospc_is_reported_and_writing_resumes(tmp_path: Path,
                                                daemons: list[Daemon]) -> None:
    need_peers()
    with small_tmpfs(tmp_path / "small", "3m", daemons) as small:
        base = small / "base.raw"
        with open(base, "wb") as f:  # sparse: costs the tmpfs (almost) nothing
            f.truncate(16 * MiB)
            f.write(chunk(7, 4096))
        ov = small / "ov.qcow2"
        subprocess.run([*COWD, "create", "--base", str(base), "--overlay", "qcow", "-o",
                        str(ov)], check=True, capture_output=True, timeout=30)
        ballast = small / "ballast"
        ballast.write_bytes(os.urandom(MiB))
        model = bytearray(qemu_raw(ov, tmp_path))
        d = start_daemon(ov, tmp_path)
        daemons.append(d)
        r = client(d.uri, ENOSPC_FILL, max_chunks=200)
        acked, failed = r["acked"], r["failed"]
        assert isinstance(acked, list) and isinstance(failed, int), r
        assert r["errs"] == ["ENOSPC"], f"expected ENOSPC from the full tmpfs: {r}"
        assert r["rewrite"] == 0, r
        assert len(acked) >= 5, r
        for off in acked:
            model[off:off + K64] = chunk(off)
        model[acked[0]:acked[0] + K64] = chunk(acked[0] + 1)
        # A flush that needs space (deferred L2 entries into a table never written) may
        # fail: then it says so, and the entries are written by the next flush.
        assert r["flush"] in (0, "ENOSPC"), r
        assert d.alive(), d.log_text()
        # Free the space: the failed write and more succeed, the flush too.
        ballast.unlink()
        more = [failed + i * K64 for i in range(4)]
        r2 = client(d.uri, ENOSPC_RESUME, offsets=more)
        assert r2 == {"errs": [0, 0, 0, 0], "flush": 0}, (r2, d.log_text())
        for off in more:
            model[off:off + K64] = chunk(off)
        d.stop()
        leaks = no_corruption(ov)
        assert qemu_raw(ov, tmp_path) == model  # nothing acknowledged was lost
        if leaks:
            subprocess.run([*COWD, "check", "--repair", str(ov)], check=True,
                           capture_output=True, timeout=30)
            assert no_corruption(ov) == 0


# ---- EIO from the backing file -----------------------------------------------------------------


@contextlib.contextmanager
def failing_file(mnt: Path, source: Path, trigger: Path,
                 daemons: list[Daemon]) -> Iterator[Path]:
    """``source`` as the file mnt/base through nbdfuse and nbdkit's error filter: reads fail
    with EIO while ``trigger`` exists."""
    mnt.mkdir()
    pidfile = mnt.parent / "nbdfuse.pid"
    p = subprocess.Popen(["nbdfuse", "-r", "-P", str(pidfile), f"{mnt}/base", "--command",
                          "nbdkit", "-s", "--filter=error", "file", str(source), "error=EIO",
                          "error-pread-rate=100%", f"error-file={trigger}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and (mnt / "base").exists()):
            assert p.poll() is None, f"nbdfuse exited {p.returncode}"
            assert time.monotonic() < deadline, "nbdfuse did not mount in 20 s"
            time.sleep(0.05)
        yield mnt / "base"
    finally:
        for d in daemons:
            d.kill()
        # Lazily if still busy.
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True,
                          timeout=30).returncode:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


EIO_SCRIPT = '''
h = conn()
out = {}
for name, off in ARGS["reads"]:
    try:
        out[name] = h.pread(65536, off).hex()
    except nbd.Error as e:
        out[name] = e.errno
for name, off in ARGS["writes"]:
    out[name] = err_of(h.pwrite, b"\\x5a" * 4096, off)
out["flush"] = err_of(h.flush)
res(**out)
'''


@pytest.mark.timeout(120)
def test_backing_eio_fails_the_request_only(tmp_path: Path, daemons: list[Daemon]) -> None:
    need_peers("nbdfuse", "nbdkit", "fusermount3")
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(3).randbytes(8 * MiB))
    trigger = tmp_path / "trigger"
    with failing_file(tmp_path / "mnt", src, trigger, daemons):
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mnt/base", "-F", "raw", ov)
        model = bytearray(src.read_bytes())
        d = start_daemon(ov, tmp_path, extra=("--no-prime", "--readahead", "0"))
        daemons.append(d)
        r = client(d.uri, EIO_SCRIPT, reads=[["first", 0]], writes=[])
        assert bytes.fromhex(str(r["first"])) == model[:K64]
        trigger.touch()
        # Ranges nobody has read yet (not in the page cache): the base fails under them.
        r = client(d.uri, EIO_SCRIPT, reads=[["read", 6 * MiB]],
                   writes=[["copy_up", 5 * MiB + 512]])
        assert r["read"] == "EIO" and r["copy_up"] == "EIO", r
        assert r["flush"] == 0, r  # the overlay itself is fine
        trigger.unlink()
        r = client(d.uri, EIO_SCRIPT, reads=[["read", 6 * MiB]],
                   writes=[["copy_up", 5 * MiB + 512]])
        assert bytes.fromhex(str(r["read"])) == model[6 * MiB:6 * MiB + K64], r
        assert r["copy_up"] == 0 and r["flush"] == 0, r
        model[5 * MiB + 512:5 * MiB + 512 + 4096] = b"\x5a" * 4096
        stats = json.loads(subprocess.run([*COWD, "stats", "--json", "--run-dir",
                                           str(d.run_dir)], capture_output=True,
                                          check=True, timeout=30).stdout)
        assert stats["disks"][ov.name]["corrupt"] is None, stats
        d.stop()
        assert no_corruption(ov) == 0
        assert qemu_raw(ov, tmp_path) == model


# ---- a failed flush stays failed ----------------------------------------------------------------


FLUSH_SCRIPT = '''
h = conn()
out = {"w1": err_of(h.pwrite, b"\\x11" * 65536, 0), "f1": err_of(h.flush)}
open(ARGS["trigger"], "w").close()
out["w2"] = err_of(h.pwrite, b"\\x22" * 65536, 1 << 20)
out["f2"] = err_of(h.flush)
import os
os.unlink(ARGS["trigger"])
out["f3"] = err_of(h.flush)
out["fua"] = err_of(h.pwrite, b"\\x33" * 4096, 2 << 20, nbd.CMD_FLAG_FUA)
g = conn()  # another connection: the disk, not the connection, remembers
out["f4"] = err_of(g.flush)
res(**out)
'''


@pytest.mark.timeout(60)
def test_failed_flush_is_never_reported_as_success(tmp_path: Path,
                                                   daemons: list[Daemon]) -> None:
    need_peers()
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(5).randbytes(4 * MiB))
    ov = tmp_path / "ov.qcow2"
    subprocess.run([*COWD, "create", "--base", str(base), "--overlay", "qcow", "-o", str(ov)],
                   check=True, capture_output=True, timeout=30)
    trigger = tmp_path / "fail-sync"
    d = start_daemon(ov, tmp_path, record=tmp_path / "record.bin",
                     env={"COWD_TEST_FAIL_SYNC_IF": str(trigger)})
    daemons.append(d)
    r = client(d.uri, FLUSH_SCRIPT, trigger=str(trigger))
    assert r == {"w1": 0, "f1": 0, "w2": 0, "f2": "EIO", "f3": "EIO", "fua": "EIO",
                 "f4": "EIO"}, r
    # At exit the daemon cannot flush either: it says so in one line and exits non-zero.
    d.proc.terminate()
    assert d.proc.wait(20) != 0
    log = d.log_text()
    assert "Traceback" not in log and "an earlier flush failed" in log, log
    no_corruption(ov)


# ---- truncated while served --------------------------------------------------------------------


TRUNC_WRITE = '''
h = conn()
for i in range(ARGS["n"]):
    h.pwrite(chunk(i), i * 65536 * 3)
h.flush()
res(ok=1)
'''

TRUNC_READ = '''
h = conn()
out = {}
try:
    data = h.pread(65536, ARGS["at"])
    out["read"] = "zeroes" if data == bytes(65536) else "data"
except nbd.Error as e:
    out["read"] = e.errno
out["write"] = err_of(h.pwrite, b"\\x01" * 512, 0)
res(**out)
'''


@pytest.mark.timeout(60)
def test_truncated_overlay_is_eio_and_marked_corrupt(tmp_path: Path,
                                                     daemons: list[Daemon]) -> None:
    need_peers()
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(8 * MiB))
    ov = tmp_path / "ov.qcow2"
    subprocess.run([*COWD, "create", "--base", str(base), "--overlay", "qcow", "-o", str(ov)],
                   check=True, capture_output=True, timeout=30)
    d = start_daemon(ov, tmp_path)
    daemons.append(d)
    client(d.uri, TRUNC_WRITE, n=8)
    mapping = json.loads(qemu_img("map", "-U", "--output=json", ov).stdout)
    last = max((e for e in mapping if e.get("offset") is not None and e["depth"] == 0),
               key=lambda e: e["offset"])
    # Cut the file where the last data cluster begins: its guest bytes now have no data.
    os.truncate(ov, last["offset"])
    r = client(d.uri, TRUNC_READ, at=last["start"])
    assert r["read"] == "EIO", f"a cluster past the end of the file read as {r['read']}"
    assert r["write"] == "EPERM", r  #: the disk is read-only from now on
    stats = json.loads(subprocess.run([*COWD, "stats", "--json", "--run-dir", str(d.run_dir)],
                                      capture_output=True, check=True, timeout=30).stdout)
    assert "past the end of the file" in str(stats["disks"][ov.name]["corrupt"]), stats
    d.stop()
    info = json.loads(qemu_img("info", "--output=json", ov).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True, info
