"""Several hosts sharing one base server (issue 17), simulated with network namespaces the
test makes: nginx in a namespace of its own serves the golden image; two "hosts" (each a
namespace with a veth link to the server's) read an overlay over it with cowd, each with a
cache of its own.  The server's access log counts the bytes it sent each host: a host's
second boot costs it (almost) nothing; the other host's first boot costs the whole read.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.peers import COWD, qemu_img, run
from tests.support.remote import bytes_sent_to, make_base, nginx, remote_problem

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.timeout(240)]

_problem = remote_problem()
if _problem:
    pytestmark.append(pytest.mark.skip(reason=_problem))
elif os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(reason="network namespaces need root"))

HOSTS = 2


def _ns(name: str, *cmd: str) -> subprocess.CompletedProcess[bytes]:
    return run("ip", "netns", "exec", name, *cmd)


@pytest.fixture
def network() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """The server's namespace and each host's (name, address), linked by veth pairs on
    10.231.N.0/30 (addresses only inside namespaces this test made)."""
    tag = f"cowdt{os.getpid() % 100000}"
    srv = f"{tag}-srv"
    made: list[str] = []
    hosts: list[tuple[str, str]] = []
    try:
        run("ip", "netns", "add", srv)
        made.append(srv)
        _ns(srv, "ip", "link", "set", "lo", "up")
        for i in range(1, HOSTS + 1):
            host = f"{tag}-h{i}"
            run("ip", "netns", "add", host)
            made.append(host)
            a, b = f"{tag}s{i}", f"{tag}h{i}"
            run("ip", "link", "add", a, "netns", srv, "type", "veth", "peer", "name", b,
                "netns", host)
            _ns(srv, "ip", "addr", "add", f"10.231.{i}.1/30", "dev", a)
            _ns(srv, "ip", "link", "set", a, "up")
            _ns(host, "ip", "addr", "add", f"10.231.{i}.2/30", "dev", b)
            _ns(host, "ip", "link", "set", b, "up")
            _ns(host, "ip", "link", "set", "lo", "up")
            hosts.append((host, f"10.231.{i}.2"))
        yield srv, hosts
    finally:
        for name in reversed(made):  # deleting a namespace deletes its veth ends
            run("ip", "netns", "del", name, check=False)


def test_hosts_share_one_server_each_with_its_own_cache(
        tmp_path: Path, network: tuple[str, list[tuple[str, str]]]) -> None:
    srv, hosts = network
    files = tmp_path / "files"
    files.mkdir()
    base = make_base(files, 24)
    with nginx(tmp_path, files, host="0.0.0.0", netns=srv) as server:
        log = server.extra["access_log"]
        sent: dict[str, list[int]] = {}
        for i, (host, addr) in enumerate(hosts, 1):
            url = f"http://10.231.{i}.1:8080/{base.name}"
            home = tmp_path / host
            home.mkdir()
            ov = home / "vm.qcow2"
            # -u: qemu-img runs outside the namespaces and must not look the URL up.
            qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", url, ov,
                     str(base.stat().st_size))
            env = {**os.environ, "COWD_REMOTE_CACHE_DIR": str(home / "cache")}
            for boot in (1, 2):
                before = bytes_sent_to(log).get(addr, 0)
                out = home / f"boot{boot}.raw"
                p = subprocess.run(["ip", "netns", "exec", host, *COWD, "convert", str(ov),
                                    str(out), "-O", "raw", "--allow-remote-host",
                                    f"10.231.{i}.1"], capture_output=True, text=True,
                                   env=env, timeout=120)
                assert p.returncode == 0, p.stderr
                assert out.read_bytes() == base.read_bytes()
                out.unlink()
                sent.setdefault(host, []).append(bytes_sent_to(log).get(addr, 0) - before)
        size = base.stat().st_size
        for host, (first, second) in sent.items():
            assert first >= size // 2, (host, first)  # the holes need fetching too (raw)
            assert second <= 64 << 10, (host, second)  # the probe at most: a warm cache
        caches = [tmp_path / h / "cache" for h, _ in hosts]
        assert all(any(c.iterdir()) for c in caches)
