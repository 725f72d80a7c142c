"""Remote bases (issue 17): overlays over bases that nbdkit, qemu-nbd and nginx serve on
loopback, read through cowd's local cache.  Every byte cowd reads equals what qemu-img
reads from the same chain (qemu opens the overlay cowd created, with the URL as its backing
file); a remote name is refused unless allowed; a failing server is EIO, never zeroes.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.peers import qemu_img, qemu_io, run
from tests.support.remote import (
    Cowd,
    cowd_fixture,
    make_base,
    nbd_read,
    nbdkit,
    nginx,
    qemu_chain,
    qemu_nbd,
    remote_marks,
)

pytestmark = remote_marks(240)
cowd = cowd_fixture()


@pytest.fixture
def bases(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A raw base and the same disk as qcow2 (what the servers export)."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 48)
    qcow = files / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    yield raw, qcow


# ---- refusal --------------------------------------------------------------------------------


def test_remote_backing_refused_unless_allowed(tmp_path: Path, cowd: Cowd,
                                               bases: tuple[Path, Path]) -> None:
    raw, _ = bases
    with nbdkit(tmp_path, raw) as srv:
        ov = tmp_path / "ov.qcow2"
        # An overlay someone else made (qemu-img) naming a remote base.
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov)
        p = cowd("info", ov, rc=1)
        line = p.stderr.strip()
        assert "\n" not in line and str(ov.name) in line and srv.url in line
        assert "--allow-remote-backing" in line
        p = cowd("info", ov, "--allow-remote-host", "192.0.2.1", rc=1)
        assert "not in the allowed hosts" in p.stderr and srv.url in p.stderr
        assert not cowd.cache.exists() or not any(cowd.cache.iterdir())  # never connected
        cowd("info", ov, "--allow-remote-host", "127.0.0.1")
        cowd("info", ov, "--allow-remote-backing")
        # The daemon refuses it too, in one line.
        p = subprocess.run([*cowd_cmd(), "serve", str(ov), "--nbd",
                            f"unix:{tmp_path / 'x.sock'}", "--run-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60, env=cowd.env)
        assert p.returncode == 1 and "--allow-remote-backing" in p.stderr, p.stderr
    for bad, why in [("nbd://user:secret@127.0.0.1/x", "credentials"),
                     ("nbd+unix:///x?socket=/s&tls-psk-file=/etc/shadow", "socket=PATH"),
                     ("nbd+unix:///x?socket=relative", "absolute"),
                     ("json:{\"file\":{\"driver\":\"nbd\"}}", "protocol")]:
        ov2 = tmp_path / "bad.qcow2"
        qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", bad, ov2, "64M")
        p = cowd("info", ov2, "--allow-remote-backing", rc=1)
        assert why in p.stderr and "\n" not in p.stderr.strip(), p.stderr
        ov2.unlink()


def cowd_cmd() -> list[str]:
    from tests.support.peers import COWD

    return list(COWD)


# ---- every byte, every server ----------------------------------------------------------------


SERVERS = ["nbdkit-raw", "nbdkit-qcow2", "nbdkit-vhd", "nbdkit-unix-raw",
           "qemu-nbd-qcow2-bytes", "qemu-nbd-guest-view", "nginx-raw", "nginx-qcow2"]


def _server(kind: str, tmp: Path, raw: Path, qcow: Path):  # type: ignore[no-untyped-def]
    if kind == "nbdkit-raw":
        return nbdkit(tmp, raw)
    if kind == "nbdkit-qcow2":
        return nbdkit(tmp, qcow)
    if kind == "nbdkit-vhd":
        vhd = raw.parent / "base.vhd"
        qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, vhd)
        return nbdkit(tmp, vhd)
    if kind == "nbdkit-unix-raw":
        return nbdkit(tmp, raw, unix=True)
    if kind == "qemu-nbd-qcow2-bytes":
        return qemu_nbd(tmp, qcow, "raw")
    if kind == "qemu-nbd-guest-view":
        return qemu_nbd(tmp, qcow, "qcow2")
    return nginx(tmp, raw.parent)


@pytest.mark.parametrize("kind", SERVERS)
def test_overlay_over_remote_base_reads_as_qemu(tmp_path: Path, cowd: Cowd, kind: str,
                                                bases: tuple[Path, Path]) -> None:
    """cowd create --base URL; qemu writes into the overlay; the whole disk through cowd
    convert and through cowd serve equals qemu-img convert of the same chain."""
    raw, qcow = bases
    with _server(kind, tmp_path, raw, qcow) as srv:
        url = srv.url
        if kind.startswith("nginx"):
            url += "/" + (raw.name if kind == "nginx-raw" else qcow.name)
        ov = tmp_path / "ov.qcow2"
        cowd("create", "--base", url, "--overlay", "qcow", "-o", ov)
        info = qemu_img("info", "--output=json", ov).stdout
        assert json.loads(info)["backing-filename"] == url
        want_fmt = "qcow2" if kind in ("nbdkit-qcow2", "qemu-nbd-qcow2-bytes",
                                       "nginx-qcow2") else "vpc" if kind == "nbdkit-vhd" \
            else "raw"
        assert json.loads(info)["backing-filename-format"] == want_fmt
        qemu_io(ov, "write -P 0x5a 1M 200k", "write -P 0x33 40M 64k", fmt="qcow2")
        oracle = qemu_chain(ov, tmp_path)  # qemu opens the remote chain itself
        out = tmp_path / "cowd.raw"
        cowd("convert", ov, out, "-O", "raw", "--allow-remote-backing")
        assert out.read_bytes() == oracle
        with cowd.serve(ov) as sock:
            assert nbd_read(sock, ov.name, tmp_path) == oracle
            # A write that copies up from the remote base: head and tail of clusters.
            qemu_io(f"nbd+unix:///{ov.name}?socket={sock}",
                    f"write -P 0x77 {(30 << 20) + 1000} 5000", "flush", fmt="raw")
            stats = cowd.stats()
        remote = stats["remote"]
        assert isinstance(remote, dict)
        (base_stats,) = remote["bases"]
        assert base_stats["url"] == url and base_stats["failures"] == 0
        qemu_img("check", ov)
        oracle2 = qemu_chain(ov, tmp_path)
        assert oracle2[30 << 20:(30 << 20) + 1000] == oracle[30 << 20:(30 << 20) + 1000]
        assert oracle2[(30 << 20) + 1000:(30 << 20) + 6000] == b"\x77" * 5000
        assert oracle2[(30 << 20) + 6000:] == oracle[(30 << 20) + 6000:]


def test_cache_is_shared_and_survives(tmp_path: Path, cowd: Cowd,
                                      bases: tuple[Path, Path]) -> None:
    """Two overlays of one base in one daemon share one cache; a second daemon over a warm
    cache fetches nothing; cowd cache show / prefetch --all / drop."""
    raw, _ = bases
    with nbdkit(tmp_path, raw) as srv:
        ovs = [tmp_path / f"vm{i}.qcow2" for i in range(2)]
        for ov in ovs:
            cowd("create", "--base", srv.url, "--overlay", "qcow", "-o", ov)
        want = raw.read_bytes()
        with cowd.serve(*ovs) as sock:
            for ov in ovs:
                assert nbd_read(sock, ov.name, tmp_path) == want
            (b1,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
        # (Served by the daemon itself; test_worker_cache_hits_count_in_stats has workers.)
        with cowd.serve(*ovs, extra=["--workers", "0"]) as sock:
            assert nbd_read(sock, ovs[0].name, tmp_path) == want
            (b2,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
        assert b1["fetched_bytes"] <= len(want)  # once for both overlays
        assert b2["fetched_bytes"] == 0 and b2["hit_rate"] == 1.0
        shown = json.loads(cowd("cache", "show", "--json").stdout)
        (c,) = shown["caches"]
        assert c["url"] == srv.url and c["size"] == len(want) and not c["in_use"]
        # Named: only the caches of those bases, found from an overlay without connecting.
        for name in (srv.url, ovs[1]):
            assert json.loads(cowd("cache", "show", name, "--json").stdout)["caches"] == [c]
        other = json.loads(cowd("cache", "show", "nbd://127.0.0.1:1/other", "--json").stdout)
        assert other["caches"] == []
        local = tmp_path / "local.raw"
        local.write_bytes(bytes(4096))
        assert "no remote base" in cowd("cache", "show", local, rc=1).stderr
        cowd("cache", "drop", srv.url)
        assert json.loads(cowd("cache", "show", "--json").stdout)["caches"] == []
        p = json.loads(cowd("cache", "prefetch", srv.url, "--all", "--json").stdout)
        assert p["prefetched"][0]["held_bytes"] == len(want)
        cowd("cache", "verify", srv.url)
        # In use: a drop is refused while a daemon holds the cache.
        with cowd.serve(ovs[0]):
            p2 = cowd("cache", "drop", srv.url, rc=1)
            assert "in use" in p2.stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "0"]], ids=["workers", "no-workers"])
def test_worker_cache_hits_count_in_stats(tmp_path: Path, cowd: Cowd,
                                          workers: list[str]) -> None:
    """The disk read twice through cowd serve: the second read is all cache hits, most of
    them read by the worker processes from the cache file by fd; cowd stats counts them
    (hit bytes, bytes saved, hit rate; ``worker_hit_bytes`` for the workers' share) and
    fetches nothing more.  The bytes are qemu's both times."""
    files = tmp_path / "files"
    files.mkdir()
    raw = make_base(files, 16)
    with nbdkit(tmp_path, raw) as srv:
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", srv.url, ov, "16M")
        want = qemu_chain(ov, tmp_path)
        with cowd.serve(ov, extra=workers) as sock:
            assert nbd_read(sock, ov.name, tmp_path) == want
            (b1,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
            assert b1["fetched_bytes"] >= len(want) // 2
            assert nbd_read(sock, ov.name, tmp_path) == want
            (b2,) = cowd.stats()["remote"]["bases"]  # type: ignore[index]
    assert b2["fetched_bytes"] == b1["fetched_bytes"] and b2["fetches"] == b1["fetches"]
    hits = b2["hit_bytes"] - b1["hit_bytes"]
    by_workers = b2["worker_hit_bytes"] - b1["worker_hit_bytes"]
    assert hits >= len(want) // 2, (b1, b2)  # (reads of zeroes may be skipped by status)
    assert b2["saved_bytes"] == b2["hit_bytes"]
    assert b2["hit_rate"] > b1["hit_rate"]
    if workers:  # --workers 0: the daemon reads them all itself
        assert b2["worker_hit_bytes"] == 0
    else:
        assert by_workers >= hits // 2, (b1, b2)


def test_ext4_through_attach_on_a_remote_base(tmp_path: Path, cowd: Cowd) -> None:
    """mkfs'd base on nginx; cowd attach --via fuse; mount; the files read back; a write
    reaches the overlay (debugfs on qemu-img's reading of the chain)."""
    from tests.support.attach import Env, attach_problem

    problem = attach_problem()
    if problem:
        pytest.skip(problem)
    files = tmp_path / "files"
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    for i in range(50):
        (tree / "etc" / f"f{i}").write_bytes(os.urandom(1000 + i * 97))
    files.mkdir()
    base = files / "fs.raw"
    run("mkfs.ext4", "-q", "-F", "-d", tree, base, "64M")
    with nginx(tmp_path, files) as srv, Env.under(tmp_path) as env:
        ov = tmp_path / "ov.qcow2"
        cowd("create", "--base", f"{srv.url}/fs.raw", "--overlay", "qcow", "-o", ov)
        os.environ["COWD_REMOTE_CACHE_DIR"] = str(cowd.cache)
        try:
            dev = env.attach(ov, "--via", "fuse", "--allow-remote-backing")
        finally:
            del os.environ["COWD_REMOTE_CACHE_DIR"]
        mnt = env.mount(dev, "mnt")
        for i in range(50):
            assert (mnt / "etc" / f"f{i}").read_bytes() == (tree / "etc" / f"f{i}").read_bytes()
        (mnt / "new.txt").write_text("written over a remote base\n")
        env.umount(mnt)
        env.detach(dev)
        qemu_img("check", ov)
        flat = tmp_path / "flat.raw"
        flat.write_bytes(qemu_chain(ov, tmp_path))
        got = run("debugfs", "-R", "cat /new.txt", flat).stdout
        assert got == b"written over a remote base\n"
