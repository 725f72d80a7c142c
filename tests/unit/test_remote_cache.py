"""formats/remote without a network: URL checks, the cache's crash-safety rules (an entry
only names durable bytes; a torn or foreign entry is not held), its change marker (a changed
remote stays refused until dropped; a damaged marker refuses; a crash while marking leaves
no half marker), its budget and trimming, and RemoteBase's fetch, retry, NotCached and
read-through logic over a fake server."""

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
    MARKER,
    MARKER_MAGIC,
    CacheFiles,
    ChangeMark,
    Header,
    cache_key_dir,
    check_root,
    remove_folder,
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


def _open(root: Path, hdr: Header,
          budget: int | None = None) -> tuple[CacheFiles, ChangeMark | None]:
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
    # A byte that differs from the one there (random data: a fixed byte was already there
    # once in 256 runs, and verify rightly found nothing: a failed clean run, 368adc9).
    os.pwrite(files.data_fd, bytes([data[0] ^ 0xFF]), 3 << 16)
    assert files.verify() == [3]
    assert not files.present[3]
    files.close()


def _marked(root: Path) -> Path:
    return root / cache_key_dir("k") / MARKER


OTHER = Header(16, HDR.remote_size + 1, "size=656361", HDR.url)


def test_a_changed_remote_stays_refused_until_dropped(tmp_path: Path) -> None:
    """The first open of another version marks the cache and discards its blocks; every
    later open is refused the same way — the new version again, and the old one again too
    (an NBD size cannot tell two versions apart) — until the folder is removed."""
    files, _ = _open(tmp_path, HDR)
    files.store(0, b"a" * 65536)
    files.close()
    files, mark = _open(tmp_path, OTHER)
    files.close()
    assert mark is not None and (mark.was, mark.seen, mark.url) == \
        ("size=656360", "size=656361", HDR.url)
    line = mark.describe("size=656361")
    assert "\n" not in line and "it was size=656360, it is now size=656361" in line
    assert f"cowd cache drop {HDR.url}" in line
    assert _marked(tmp_path).is_file()
    data = tmp_path / cache_key_dir("k") / "data"
    assert data.stat().st_blocks == 0  # discarded (the sole user)
    for want in (OTHER, OTHER, HDR):
        files, again = _open(tmp_path, want)
        files.close()
        assert again == mark, want  # the first record, never rewritten
    assert "seen since at " in mark.describe(HDR.validator)
    fd = check_root(str(tmp_path))
    remove_folder(fd, cache_key_dir("k"))
    os.close(fd)
    assert not (tmp_path / cache_key_dir("k")).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left behind
    files, fresh = _open(tmp_path, OTHER)  # accepted: a new cache of the new version
    assert fresh is None and files.held_bytes == 0
    files.close()


def test_a_change_seen_in_use_marks_the_cache_and_keeps_its_blocks(tmp_path: Path) -> None:
    """Marked by a user that shares the cache: the blocks stay (others' remaps point into
    them) until a sole user opens it; that open is refused even with the old validator."""
    one, _ = _open(tmp_path, HDR)
    two, _ = _open(tmp_path, HDR)  # two users
    one.store(0, b"a" * 65536)
    assert one.header is not None
    mark, durable = one.mark_changed(one.header, "the file changed on the server (412)")
    assert durable and _marked(tmp_path).is_file()
    # A second change seen keeps the first record.
    assert two.mark_changed(one.header, "size=1") == (mark, True)
    one.close()
    two.close()
    data = tmp_path / cache_key_dir("k") / "data"
    assert data.stat().st_blocks > 0
    files, again = _open(tmp_path, HDR)
    files.close()
    assert again == mark and data.stat().st_blocks == 0
    assert "seen since at " in again.describe() and "(412)" in again.describe()


@pytest.mark.parametrize("damage", ["torn", "garbage", "empty", "symlink", "folder"])
def test_a_damaged_marker_still_refuses(tmp_path: Path, damage: str) -> None:
    """Fail closed: a marker cut short, overwritten, empty, a symlink or not a file marks
    the cache all the same (a whole marker is never confused with another)."""
    files, _ = _open(tmp_path, HDR)
    files.close()
    whole = ChangeMark(HDR.validator, "size=1", 1, HDR.url).encode()
    marker = _marked(tmp_path)
    if damage == "torn":
        marker.write_bytes(whole[:-3])
    elif damage == "garbage":
        marker.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))
    elif damage == "empty":
        marker.write_bytes(b"")
    elif damage == "symlink":
        (tmp_path / "elsewhere").write_bytes(whole)
        marker.symlink_to(tmp_path / "elsewhere")
    else:
        marker.mkdir()
    files, mark = _open(tmp_path, HDR)
    files.close()
    assert mark is not None and mark.when == 0 and "unreadable change marker" in mark.seen
    assert "cowd cache drop" in mark.describe(HDR.validator)


def test_a_crash_while_marking_leaves_no_half_marker(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A marker that cannot be made durable (here its rename fails) is not a marker: the
    open is refused by the header's comparison, the blocks are kept; a crash's leftover
    temporary file, whole or torn, is not a marker either; the next open writes the marker
    whole."""
    files, _ = _open(tmp_path, HDR)
    files.store(0, b"a" * 65536)
    files.close()
    real_rename = os.rename

    def crash(src: str, dst: str, **kw: object) -> None:
        if dst == MARKER:
            raise OSError(errno.EIO, "crashed before the rename")
        real_rename(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", crash)
    files, mark = _open(tmp_path, OTHER)
    files.close()
    assert mark is not None and not _marked(tmp_path).exists()
    folder = tmp_path / cache_key_dir("k")
    assert sorted(p.name for p in folder.iterdir()) == ["data", "index"]
    assert (folder / "data").stat().st_blocks > 0  # not discarded without a marker
    monkeypatch.setattr(os, "rename", real_rename)
    # What a crash before the rename leaves: a temporary file, whole or cut short.
    whole = ChangeMark(HDR.validator, "size=1", 1, HDR.url).encode()
    (folder / f".{MARKER}.1.1.tmp").write_bytes(whole)
    (folder / f".{MARKER}.1.2.tmp").write_bytes(whole[:7])
    files, again = _open(tmp_path, HDR)  # the old version again: not refused (no record)
    assert again is None and files.held_bytes == 65536
    files.close()
    files, again = _open(tmp_path, OTHER)
    files.close()
    assert again is not None and _marked(tmp_path).is_file()
    raw = _marked(tmp_path).read_bytes()
    assert ChangeMark.decode(raw, "", "") == again and raw.startswith(MARKER_MAGIC)


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


def test_a_change_seen_in_use_refuses_every_later_open(fake, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A new connection that sees another size fails the read with EIO and marks the
    cache: a new RemoteBase of the same remote (another process's open) is refused with
    ESTALE, also once the server is back at the old size, and so is a new disk over the
    same base in this process (open_remote)."""
    make, data, _ = fake
    name = parse("nbd://fake/x")
    cfg = RemoteConfig(cache_root=str(tmp_path / "c"), timeout_s=1.0)
    file = remote_file.open_remote(name, cfg)
    base = file.remote
    assert base is not None
    buf = bytearray(10)
    assert base.read_into(base.files.data_fd, 0, memoryview(buf)) == 10
    base._close_connections()
    bigger = data + b"x" * 65536
    monkeypatch.setattr(RemoteBase, "_connect", lambda self, deadline: FakeConn(bigger, [0]))
    with pytest.raises(ImageIOError) as e:
        base.read_into(base.files.data_fd, 5 << 16, memoryview(buf))
    assert e.value.errno == errno.EIO and base.stale and "cowd cache drop" in base.stale
    assert (tmp_path / "c" / cache_key_dir(name.key) / MARKER).is_file()
    with pytest.raises(OSError) as e1:  # another disk over it, in this process
        remote_file.open_remote(name, cfg)
    assert e1.value.errno == errno.ESTALE and "cowd cache drop" in str(e1.value)
    file.close()
    assert remote_file.open_bases() == []
    for server in (bigger, data):
        monkeypatch.setattr(RemoteBase, "_connect",
                            lambda self, deadline, d=server: FakeConn(d, [0]))
        with pytest.raises(OSError) as e2:
            make()
        assert e2.value.errno == errno.ESTALE and "changed" in str(e2.value)
        assert "cowd cache drop nbd://fake/x" in str(e2.value)
