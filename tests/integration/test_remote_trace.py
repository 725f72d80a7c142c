"""Boot-trace priming of remote bases (issues 16 and 17): the first `cowd serve` of an
overlay of a base that nbdkit or nginx serves on loopback records the order in which the
guest (libnbd's nbdsh, in a known order) first reads the base, beside the base's local cache;
the next serve of a *new* overlay of that base fills the cache in that order before the
guest asks.  The server's own record (nbdkit's log filter, nginx's access log) and the
cache's fetched bytes show the prefetch came before the reads and fetched exactly the traced
granules; the bytes read equal `qemu-img convert` of the chain (qemu opening the remote
itself); a base replaced on the server makes the old trace stale: ignored with one log line,
nothing prefetched, then replaced.  In the daemon and from two worker processes."""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from cowd.disk.boottrace import TRACE_GRANULE_BYTES, RemoteIdentity, TraceError, read_trace
from tests.support.nbdserve import nbdsh
from tests.support.peers import qemu_img, qemu_io
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

pytestmark = remote_marks(300)
cowd = cowd_fixture()

MiB = 1 << 20
G = TRACE_GRANULE_BYTES
SIZE_MIB = 16
# Base granules the guest reads first, in this order; none is one the overlay hides (its
# writes: granule 0, granules 15 and 16), no two adjacent (the fetcher's read-ahead follows
# sequential misses only, so the first serve fetches exactly these).
ORDER = [96, 32, 66, 48, 120, 5, 200, 140]


@pytest.fixture(params=[0, 2], ids=["in-daemon", "2-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


class Origin:
    """A server of the base and what it says it sent: the ranges it read (nbdkit's log
    filter: one line per request) or sent (nginx's access log)."""

    def __init__(self, kind: str, tmp: Path, files: Path, base: Path):
        self.kind = kind
        self.tmp = tmp
        self.files = files
        self.base = base
        self.server: Server | None = None
        self.log = tmp / "nbdkit-requests.log"

    def start(self) -> AbstractContextManager[Server]:
        if self.kind == "nbdkit":
            return nbdkit(self.tmp, self.base, filters=["log"], params=[f"logfile={self.log}"])
        return nginx(self.tmp, self.files)

    def url(self, srv: Server) -> str:
        return srv.url if self.kind == "nbdkit" else f"{srv.url}/{self.base.name}"

    def sent(self) -> int:
        """Bytes of the base the server has sent so far, to anyone."""
        return sum(n for _off, n in self.reads())

    def reads(self) -> list[tuple[int, int]]:
        """The server's reads of the base so far: (offset, bytes sent) each, from nbdkit's
        READ requests or nginx's ranged GETs (less a client's one-byte probe of its size:
        cowd's HTTP client asks for bytes 0-0 when it connects)."""
        if self.kind == "nbdkit":
            if not self.log.exists():
                return []
            return [(int(m[1], 16), int(m[2], 16)) for m in re.finditer(
                r" Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)",
                self.log.read_text())]
        access = self.tmp / "nginx-access.log"
        if not access.exists():
            return []
        out = []
        for line in access.read_text().splitlines():
            m = re.fullmatch(r'\S+ GET 206 (\d+) "bytes=(\d+)-(\d+)"', line)
            if m and m.group(2, 3) != ("0", "0"):
                out.append((int(m[2]), int(m[1])))
        return out


@pytest.fixture(params=["nbdkit", "nginx"])
def origin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Origin]:
    files = tmp_path / "files"
    files.mkdir()
    yield Origin(str(request.param), tmp_path, files, make_base(files, SIZE_MIB))


def _overlay(cowd: Cowd, url: str, name: str) -> Path:
    ov = cowd.tmp / name
    cowd("create", "--base", url, "--overlay", "qcow", "-o", ov)
    qemu_io(ov, "write -P 0x5a 0 64k", "write -P 0x33 1000000 70000", fmt="qcow2")
    return ov


def _read_in_order(sock: Path, name: str, order: list[int]) -> None:
    # 4 KiB in the middle of each granule, then its end: one first touch per granule.
    script = "h = connect(NAME)\nfor i in ORDER:\n" \
             "    h.pread(4096, i * G + 8192)\n    h.pread(512, i * G + G - 512)\n"
    nbdsh(script, NAME=name, ORDER=order, G=G, SOCK=str(sock))


def _disk(cowd: Cowd) -> dict[str, Any]:
    disks = cowd.stats()["disks"]
    assert isinstance(disks, dict) and len(disks) == 1
    d: dict[str, Any] = next(iter(disks.values()))
    return d


def _remote(cowd: Cowd) -> dict[str, Any]:
    remote = cowd.stats()["remote"]
    assert isinstance(remote, dict)
    (b,) = remote["bases"]
    assert isinstance(b, dict)
    return b


def _wait_prefetched(cowd: Cowd, deadline_s: float = 60) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while True:
        bt: dict[str, Any] = _disk(cowd)["boot_trace"]
        if bt["prefetch"] not in ("not started", "running") or time.monotonic() > end:
            return bt
        time.sleep(0.1)


def _cache(cowd: Cowd) -> dict[str, Any]:
    (c,) = json.loads(cowd("cache", "show", "--json").stdout)["caches"]
    assert isinstance(c, dict)
    return c


def _log_since(cowd: Cowd, offset: int) -> str:
    return (cowd.tmp / "serve.log").read_bytes()[offset:].decode(errors="replace")


def _log_size(cowd: Cowd) -> int:
    log = cowd.tmp / "serve.log"
    return log.stat().st_size if log.exists() else 0


def _record(cowd: Cowd, origin: Origin, srv: Server, workers: int) -> tuple[str, str]:
    """The first serve: reads ORDER, leaves the trace beside the cache.  Returns the URL
    and the trace's path."""
    url = origin.url(srv)
    first = _overlay(cowd, url, "first.qcow2")
    with cowd.serve(first, extra=["--workers", str(workers)]) as sock:
        bt = _disk(cowd)["boot_trace"]
        assert (bt["state"], bt["remote"]) == ("no trace yet", url), bt
        _read_in_order(sock, first.name, ORDER)
        assert _disk(cowd)["boot_trace"]["base_granules_read"] == len(ORDER)
    cache = _cache(cowd)
    path = cache["folder"] + ".cowd-trace"
    ident = RemoteIdentity(url, cache["size"], cache["validator"])
    assert read_trace(path, ident) == (G, ORDER)
    # Beside the cache folder, in the cache root: nothing was written beside the overlay.
    assert os.path.dirname(path) == str(cowd.cache)
    assert not [p for p in cowd.tmp.iterdir() if "cowd-trace" in p.name]
    return url, path


def test_second_overlay_fills_the_cache_in_trace_order(cowd: Cowd, origin: Origin,
                                                       workers: int) -> None:
    with origin.start() as srv:
        url, path = _record(cowd, origin, srv, workers)
        recorded = Path(path).read_bytes()
        second = _overlay(cowd, url, "second.qcow2")
        # A cache that lost its blocks (dropped here; trimmed, or a new machine's) keeps the
        # trace: it orders the refill.
        cowd("cache", "drop", url)
        assert Path(path).read_bytes() == recorded
        sent0 = origin.sent()
        requests0 = len(origin.reads())
        with cowd.serve(second, extra=["--workers", str(workers)]) as sock:
            bt = _wait_prefetched(cowd)
            assert (bt["state"], bt["entries"], bt["prefetch"]) == \
                ("loaded", len(ORDER), "done"), bt
            assert bt["prefetched"] == len(ORDER) and bt["base_granules_read"] == 0, bt
            # The prefetch was a cache fill of exactly the traced granules, one fetch each,
            # before the guest read anything: the cache fetched them, the server sent them.
            assert bt["prefetch_fetched_bytes"] == len(ORDER) * G, bt
            b = _remote(cowd)
            assert b["fetched_bytes"] == len(ORDER) * G and b["fetches"] == len(ORDER), b
            assert b["held_bytes"] == len(ORDER) * G, b
            assert origin.sent() - sent0 == len(ORDER) * G
            got = sorted(origin.reads()[requests0:])
            assert got == sorted((i * G, G) for i in ORDER), got
            # The guest's reads in the trace's order: all from the cache, nothing fetched.
            _read_in_order(sock, second.name, ORDER)
            b = _remote(cowd)
            assert b["fetched_bytes"] == len(ORDER) * G, b
            assert origin.sent() - sent0 == len(ORDER) * G
            bt = _disk(cowd)["boot_trace"]
            assert (bt["covered"], bt["prefetched_before_read"]) == (len(ORDER), len(ORDER)), bt
            text = cowd("stats", "--run-dir", cowd.tmp / "run").stdout
            assert f"boot trace: loaded, {len(ORDER)} entries" in text, text
            assert f"{len(ORDER)} prefetched before read (100.0%)" in text, text
            # Every byte as qemu reads the chain.
            got_disk = nbd_read(sock, second.name, cowd.tmp)
        assert got_disk == qemu_chain(second, cowd.tmp)
        # A loaded trace is kept (it is the first boot's).
        assert Path(path).read_bytes() == recorded


def test_a_replaced_remote_base_ignores_the_stale_trace(cowd: Cowd, tmp_path: Path) -> None:
    """nginx's file replaced by a new version (same size: only the ETag and Last-Modified
    differ) and accepted (`cowd cache drop`): the old trace is never trusted — ignored with
    one log line, nothing prefetched — and the new version's trace replaces it."""
    files = tmp_path / "files"
    files.mkdir()
    origin = Origin("nginx", tmp_path, files, make_base(files, SIZE_MIB))
    with origin.start() as srv:
        url, path = _record(cowd, origin, srv, 0)
        old = _cache(cowd)
        old_ident = RemoteIdentity(url, old["size"], old["validator"])
        st = origin.base.stat()
        old_bytes = origin.base.read_bytes()
        new_bytes = random.Random(11).randbytes(st.st_size)
        origin.base.write_bytes(new_bytes)
        os.utime(origin.base, (st.st_atime + 10, st.st_mtime + 10))  # nginx's ETag: mtime
        # The first open of the new version fails in one line (the cache is marked changed
        # and refused until dropped); dropping it accepts the new version; the trace beside
        # it stays, to be found stale.
        p = cowd("info", tmp_path / "first.qcow2", "--allow-remote-backing", rc=1)
        assert "changed" in p.stderr, p.stderr
        cowd("cache", "drop", url)
        assert Path(path).exists()

        second = _overlay(cowd, url, "second.qcow2")
        sent0 = origin.sent()
        mark = _log_size(cowd)
        with cowd.serve(second, extra=["--workers", "0"]) as sock:
            bt = _disk(cowd)["boot_trace"]
            assert str(bt["state"]).startswith(
                "ignored: stale: the remote base changed"), bt
            assert (bt["entries"], bt["prefetch"]) == (0, "not started"), bt
            time.sleep(0.5)  # a prefetch, were there one, would have started by now
            assert (_remote(cowd)["fetched_bytes"], origin.sent() - sent0) == (0, 0)
            _read_in_order(sock, second.name, ORDER[:3])
            got_disk = nbd_read(sock, second.name, tmp_path)
            bt = _disk(cowd)["boot_trace"]
            assert (bt["prefetched"], bt["prefetched_before_read"]) == (0, 0), bt
        log = _log_since(cowd, mark)
        assert log.count("boot trace ignored: stale: the remote base changed") == 1, log
        assert got_disk == qemu_chain(second, tmp_path)
        i = ORDER[0]
        assert got_disk[i * G:(i + 1) * G] == new_bytes[i * G:(i + 1) * G] != \
            old_bytes[i * G:(i + 1) * G]
        new = _cache(cowd)
        assert new["validator"] != old["validator"] and new["size"] == old["size"]
        # This boot's trace replaced the stale one: ORDER[:3] first, under the new identity.
        _granule, indices = read_trace(path, RemoteIdentity(url, new["size"],
                                                            new["validator"]))
        assert indices[:3] == ORDER[:3]
        with pytest.raises(TraceError, match="stale: the remote base changed"):
            read_trace(path, old_ident)


def test_worker_reads_of_cached_blocks_are_traced(cowd: Cowd, tmp_path: Path) -> None:
    """Over a warm cache a worker process reads the remote's blocks itself (by fd, from
    the remaps the daemon hands it ahead of a sequential reader): its first touches reach
    the trace too, merged with the daemon's in time order."""
    files = tmp_path / "files"
    files.mkdir()
    origin = Origin("nbdkit", tmp_path, files, make_base(files, SIZE_MIB))
    first, count = 128, 64
    with origin.start() as srv:
        url = origin.url(srv)
        ov = _overlay(cowd, url, "seq.qcow2")
        cowd("cache", "prefetch", url, "--all")
        with cowd.serve(ov, extra=["--workers", "2"]) as sock:
            script = "h = connect(NAME)\nfor i in range(FIRST, FIRST + COUNT):\n" \
                     "    h.pread(G, i * G)\n"
            nbdsh(script, NAME=ov.name, FIRST=first, COUNT=count, G=G, SOCK=str(sock))
            d = _disk(cowd)
            bt = d["boot_trace"]
            assert bt["base_granules_read"] == count, bt
            # Some granules were read by the worker alone: fewer daemon reads than granules.
            assert d["workers"]["reads_local"] > 0, d["workers"]
            assert d["ops"]["reads"] < count, d["ops"]
            assert _remote(cowd)["fetched_bytes"] == 0
        cache = _cache(cowd)
        ident = RemoteIdentity(url, cache["size"], cache["validator"])
        assert read_trace(cache["folder"] + ".cowd-trace", ident) == \
            (G, list(range(first, first + count)))


def test_a_full_cache_stops_the_prefetch(cowd: Cowd, tmp_path: Path) -> None:
    """With room for four granules (--remote-cache-size), the prefetch fills the cache up to
    its budget and stops there, in one log line; the guest's reads are still right."""
    files = tmp_path / "files"
    files.mkdir()
    origin = Origin("nbdkit", tmp_path, files, make_base(files, SIZE_MIB))
    budget = 4 * G
    with origin.start() as srv:
        url, _path = _record(cowd, origin, srv, 0)
        second = _overlay(cowd, url, "second.qcow2")
        cowd("cache", "drop", url)
        mark = _log_size(cowd)
        with cowd.serve(second, extra=["--workers", "0", "--remote-cache-size",
                                       str(budget)]) as sock:
            bt = _wait_prefetched(cowd)
            assert str(bt["prefetch"]).startswith("stopped: the cache is full"), bt
            b = _remote(cowd)
            assert 0 < b["held_bytes"] <= budget, b
            # Nothing fetched past the budget to be kept in memory only.
            assert b["uncached_bytes"] == 0 and b["fetched_bytes"] == b["held_bytes"], b
            assert bt["prefetched"] == b["held_bytes"] // G, bt
            got_disk = nbd_read(sock, second.name, tmp_path)
        assert got_disk == qemu_chain(second, tmp_path)
        log = _log_since(cowd, mark)
        assert log.count("boot-trace prefetch stopped: the cache is full") == 1, log


def test_concurrent_fills_keep_the_cache_within_its_budget(tmp_path: Path) -> None:
    """Eight threads fetch distinct blocks at once (the fetcher's eight, a prefetch beside
    the guest's misses) into a cache with room for four: it keeps four, the rest is served
    from memory, and each block reads as nbdkit serves it."""
    from concurrent.futures import ThreadPoolExecutor

    from formats.remote.file import RemoteBase, RemoteConfig
    from formats.remote.url import parse

    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, SIZE_MIB)
    want = raw.read_bytes()
    with nbdkit(tmp_path, raw) as srv:
        base = RemoteBase(parse(srv.url), RemoteConfig(cache_root=str(tmp_path / "cache"),
                                                       cache_budget_bytes=4 * G))
        try:
            blocks = [3 * k + 1 for k in range(16)]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda b: base.fetch(b, b + 1), blocks))
            assert base.files.held_bytes == 4 * G, base.files.held_bytes
            assert base.counters["uncached_bytes"] == 12 * G
            for b in blocks:  # from the cache file, or from memory
                buf = bytearray(G)
                assert base.read_into(base.files.data_fd, b * G, memoryview(buf)) == G
                assert bytes(buf) == want[b * G:(b + 1) * G]
        finally:
            base.close()


def test_a_remote_qcow2_base_traces_its_data_clusters(cowd: Cowd, tmp_path: Path,
                                                      workers: int) -> None:
    """A qcow2 base on nbdkit (its bytes: cowd decodes it): the trace holds the granules of
    the remote *file* that the guest's reads reached (qemu-img map's host offsets, in read
    order; metadata is not traced), and the next overlay's prefetch fills them before the
    guest reads them."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, SIZE_MIB)
    qcow = files / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    # Guest granules the qcow2 holds (make_base's data runs), none the overlay hides.
    order = [150, 97, 50, 193, 241, 60]
    host: dict[int, int] = {}
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", qcow).stdout):
        if e["data"]:
            for off in range(e["start"], e["start"] + e["length"], G):
                host[off // G] = (e["offset"] + off - e["start"]) // G
    assert all(i in host for i in order)
    want_trace = [host[i] for i in order]
    origin = Origin("nbdkit", tmp_path, files, qcow)
    with origin.start() as srv:
        url = origin.url(srv)
        first = _overlay(cowd, url, "first.qcow2")
        with cowd.serve(first, extra=["--workers", str(workers)]) as sock:
            _read_in_order(sock, first.name, order)
        cache = _cache(cowd)
        path = cache["folder"] + ".cowd-trace"
        assert read_trace(path, RemoteIdentity(url, cache["size"], cache["validator"])) == \
            (G, want_trace)

        second = _overlay(cowd, url, "second.qcow2")
        cowd("cache", "drop", url)
        with cowd.serve(second, extra=["--workers", str(workers)]) as sock:
            bt = _wait_prefetched(cowd)
            assert (bt["state"], bt["prefetch"], bt["prefetched"]) == \
                ("loaded", "done", len(order)), bt
            assert bt["prefetch_fetched_bytes"] == len(order) * G, bt
            fetched = _remote(cowd)["fetched_bytes"]
            _read_in_order(sock, second.name, order)
            assert _remote(cowd)["fetched_bytes"] == fetched  # all from the cache
            bt = _disk(cowd)["boot_trace"]
            assert bt["prefetched_before_read"] == len(order), bt
            got_disk = nbd_read(sock, second.name, tmp_path)
        assert got_disk == qemu_chain(second, tmp_path)
