"""formats/remote without a network: URL checks, the cache's crash-safety rules (an entry
only names durable bytes; a torn or foreign entry is not held), its budget and trimming, and
RemoteBase's fetch, retry, NotCached and read-through logic over a fake server."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from formats.errors import ImageIOError
from formats.remote import NotCached, RemoteConfig, parse
from formats.remote import file as remote_file
from formats.remote.cache import (
    ENTRIES_OFFSET,
    ENTRY,
    CacheFiles,
    Header,
    cache_key_dir,
    check_root,
)
from formats.remote.file import RemoteBase
from formats.remote.url import BadRemoteName, allowed


@pytest.mark.parametrize("url,where,path", [
    ("nbd://host/exp", "host:10809", "exp"),
    ("nbd://Host:1234/", "host:1234", ""),
    ("nbd+unix:///e?socket=/run/s.sock", "unix:/run/s.sock", "e"),
    ("http://files.example/a/b.qcow2?x=1", "files.example:80", "/a/b.qcow2?x=1"),
    ("https://files.example:8443/b", "files.example:8443", "/b"),
])
def test_remote_names(url: str, where: str, path: str) -> None:
    n = parse(url)
    assert n.where == where and n.path == path and n.url == url


@pytest.mark.parametrize("url", [
    "nbd://u:p@h/x", "nbd://h/x?tls-psk-file=/etc/shadow", "nbd+unix:///x",
    "nbd+unix:///x?socket=rel", "nbd+unix://h/x?socket=/s", "http://h/x#frag",
    "nbd:///x", "ftp://h/x", "http://h/x y", "http://" + "a" * 2000,
])
def test_bad_remote_names(url: str) -> None:
    with pytest.raises(BadRemoteName):
        parse(url)


def test_allow_list() -> None:
    n = parse("nbd://golden.lan:10809/base")
    assert allowed(n, None)
    assert allowed(n, frozenset({"golden.lan"}))
    assert allowed(n, frozenset({"golden.lan:10809"}))
    assert not allowed(n, frozenset({"golden.lan:1"}))
    assert not allowed(n, frozenset())
    u = parse("nbd+unix:///b?socket=/run/b.sock")
    assert allowed(u, frozenset({"unix:/run/b.sock"})) and not allowed(u, frozenset({"b"}))


# ---- the cache files -------------------------------------------------------------------------


def _open(root: Path, hdr: Header, budget: int | None = None) -> tuple[CacheFiles, str | None]:
    fd = check_root(str(root))
    files = CacheFiles(fd, cache_key_dir("k"), str(root))
    return files, files.open(hdr, budget)


HDR = Header(16, (10 << 16) + 1000, "size=656360", "nbd://h/x")


def test_blocks_survive_and_torn_entries_are_not_held(tmp_path: Path) -> None:
    files, why = _open(tmp_path, HDR)
    assert why is None and files.held_bytes == 0
    data = os.urandom(2 << 16)
    files.store(3, data)
    files.store(10, b"t" * 1000)  # the short last block
    files.close()
    files, _ = _open(tmp_path, HDR)
    assert [b for b in range(11) if files.present[b]] == [3, 4, 10]
    assert files.held_bytes == (2 << 16) + 1000
    assert files.verify() == []
    # A torn entry (its check does not match) and a block whose data reached the file but
    # whose entry did not (a crash between the two) are not held.
    os.pwrite(files.index_fd, b"\xff" * 5, ENTRIES_OFFSET + 4 * ENTRY.size)
    os.pwrite(files.data_fd, b"x" * 65536, 6 << 16)
    files.close()
    files, _ = _open(tmp_path, HDR)
    assert [b for b in range(11) if files.present[b]] == [3, 10]
    # Bytes changed under an entry: verify finds them (and drops them: sole user).
    files.exclusive = True
    os.pwrite(files.data_fd, b"y", 3 << 16)
    assert files.verify() == [3]
    assert not files.present[3]
    files.close()


def test_changed_remote_is_reported_and_dropped(tmp_path: Path) -> None:
    files, _ = _open(tmp_path, HDR)
    files.store(0, b"a" * 65536)
    files.close()
    other = Header(16, HDR.remote_size + 1, "size=656361", HDR.url)
    files, why = _open(tmp_path, other)
    assert why is not None and "size=656360" in why and "size=656361" in why
    files.close()
    assert not (tmp_path / cache_key_dir("k")).exists()


def test_trim_drops_least_recently_used_first(tmp_path: Path) -> None:
    files, _ = _open(tmp_path, HDR)
    for b in range(6):
        files.store(b, bytes([b + 1]) * 65536)
    files.close()
    files, _ = _open(tmp_path, HDR)
    files.used[4] = files.used[5] = 1  # read in this session
    files.close()
    files, _ = _open(tmp_path, HDR, budget=3 << 16)  # sole user: trimmed to 7/8 of it
    held = [b for b in range(11) if files.present[b]]
    assert held == [4, 5] and files.held_bytes <= 3 << 16
    assert os.pread(files.data_fd, 1, 0) == b"\0"  # punched
    files.close()


# ---- RemoteBase over a fake server -----------------------------------------------------------


class FakeConn:
    def __init__(self, data: bytes, fail: list[int]):
        self.data = data
        self.size = len(data)
        self.validator = f"size={self.size}"
        self.fail = fail
        self.closed = False

    def pread(self, offset: int, length: int, deadline: float) -> bytes:
        if self.fail and self.fail[0] > 0:
            self.fail[0] -= 1
            raise OSError(errno.ECONNRESET, "reset by the fake server")
        return self.data[offset:offset + length]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    data = random.Random(7).randbytes((20 << 16) + 333)
    fail = [0]
    monkeypatch.setattr(RemoteBase, "_connect", lambda self, deadline: FakeConn(data, fail))
    monkeypatch.setattr(remote_file, "RETRY_MIN_S", 0.001)

    def make(**kw: object) -> RemoteBase:
        cfg = RemoteConfig(cache_root=str(tmp_path / "c"), timeout_s=1.0, **kw)  # type: ignore[arg-type]
        return RemoteBase(parse("nbd://fake/x"), cfg)

    yield make, data, fail
    remote_file.set_fetch_inline(remote_file._always)


def test_reads_fetch_retry_and_never_zero(fake) -> None:  # type: ignore[no-untyped-def]
    make, data, fail = fake
    base = make()
    buf = bytearray(100_000)
    fail[0] = 2  # two resets, then the read goes through on a new connection
    assert base.read_into(base.files.data_fd, 70_000, memoryview(buf)) == len(buf)
    assert bytes(buf) == data[70_000:170_000]
    assert base.counters["retries"] == 2 and base.counters["reconnects"] >= 2
    # Past the deadline: EIO, nothing read.
    fail[0] = 10**9
    with pytest.raises(ImageIOError) as e:
        base.read_into(base.files.data_fd, 10 << 16, memoryview(bytearray(10)))
    assert e.value.errno == errno.EIO
    fail[0] = 0
    # Where the caller may not block: NotCached names the missing blocks.
    remote_file.set_fetch_inline(lambda: False)
    with pytest.raises(NotCached) as nc:
        base.read_into(base.files.data_fd, (12 << 16) - 1, memoryview(bytearray(2)))
    assert nc.value.blocks == [(11, 13)]
    assert base.held_runs(0, 4 << 16) == [(0, 1 << 16, False), (1 << 16, 2 << 16, True),
                                          (3 << 16, 1 << 16, False)]
    base.close()


def test_a_full_cache_reads_through(fake) -> None:  # type: ignore[no-untyped-def]
    make, data, _ = fake
    base = make(cache_budget_bytes=2 << 16)
    buf = bytearray(5 << 16)
    assert base.read_into(base.files.data_fd, 0, memoryview(buf)) == len(buf)
    assert bytes(buf) == data[:5 << 16]
    assert base.files.held_bytes <= 2 << 16
    assert base.counters["uncached_bytes"] >= 3 << 16
    base.close()
