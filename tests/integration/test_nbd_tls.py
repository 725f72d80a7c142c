"""TLS on the NBD server (``cowd serve --tls ...``) against clients nobody here wrote: qemu-img
and qemu-io (qemu's GnuTLS client, tls-creds-x509 / tls-creds-psk objects), nbdinfo and
nbdcopy (libnbd, ``nbds://`` URIs), fio's nbd engine behind qemu-nbd as a TLS client, and
qemu-nbd as the reference server for the authorization syntax.

Credentials are made at test time by certtool and psktool, and by openssl for the test of
openssl's credentials (tools/tlscreds.py); every server listens on 127.0.0.1 and on a unix
socket of the test's own.  Oracles: qemu-img convert of the image itself (the bytes read over
TLS must equal it), qemu-io's pattern reads of what was written over TLS, and ``qemu-img
check`` of the overlay afterwards.  The option-phase tests speak NBD on a raw socket, from
the spec's numbers (tests/support/nbdspec.py), with Python's ssl as the TLS client.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cowd.frontends.nbd.server import HANDSHAKE_TIMEOUT_S
from tests.support.nbdspec import (
    CMD_DISC,
    CMD_READ,
    ERR,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_NAME,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META,
    OPT_PEEK,
    OPT_SET_META,
    OPT_STARTTLS,
    OPT_STRUCTURED,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_MAGIC,
    REP_META,
    REP_SERVER,
    SIMPLE_MAGIC,
    client_flags,
    info_data,
    meta_data,
    opt,
    req,
)
from tests.support.peers import COWD, need, qemu_check, qemu_img, qemu_raw, run
from tests.support.reliability import Daemon, start_daemon
from tools import tlscreds

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 16 * MiB

OPT_EXTENDED_HEADERS = 11  # the spec's number; cowd does not offer the extension


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---- credentials and images ------------------------------------------------------------------


@dataclass
class Creds:
    root: Path
    ca: tlscreds.Ca  # signed server, alice and bob (and signs the CRL test's CRL)
    server: Path  # cowd's / qemu-nbd's credentials directory
    alice: Path  # client directories (qemu endpoint=client, libnbd tls-certificates)
    bob: Path
    mallory: Path  # a certificate from a CA the server does not trust
    nocert: Path  # the CA only: no client certificate
    psk: Path  # alice and bob
    wrong_psk: Path  # alice with another key
    alice_dn: str  # as qemu's authz compares it (GnuTLS's gnutls_x509_crt_get_dn)
    bob_dn: str


def der_order(rfc4514: str) -> str:
    """certtool prints the subject in RFC 4514 order (most specific first); qemu's authz and
    cowd compare it in the certificate's order, as gnutls_x509_crt_get_dn prints it."""
    return ",".join(reversed(rfc4514.split(",")))


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    problem = tlscreds.tls_tools_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("tls")
    ca = tlscreds.make_ca(root / "ca")
    other_ca = tlscreds.make_ca(root / "other-ca", cn="someone else's CA")
    server = tlscreds.server_dir(ca, root / "server")
    alice = tlscreds.client_dir(ca, root / "alice", "alice")
    bob = tlscreds.client_dir(ca, root / "bob", "bob", organization="Example Two")
    mallory = tlscreds.client_dir(other_ca, root / "mallory", "alice")  # alice's name, wrong CA
    # mallory's directory must still trust the server's CA, so that only the server refuses.
    (mallory / "ca-cert.pem").write_bytes((server / "ca-cert.pem").read_bytes())
    nocert = root / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((server / "ca-cert.pem").read_bytes())
    psk = tlscreds.psk_file(root / "keys.psk", "alice", "bob")
    wrong_psk = tlscreds.psk_file(root / "wrong.psk", "alice")
    return Creds(root, ca, server, alice, bob, mallory, nocert, psk, wrong_psk,
                 der_order(tlscreds.certificate_dn(alice / "client-cert.pem")),
                 der_order(tlscreds.certificate_dn(bob / "client-cert.pem")))


@dataclass
class Image:
    dir: Path
    base: Path
    top: Path

    @property
    def name(self) -> str:
        return self.top.name

    def oracle(self) -> bytes:
        return qemu_raw(self.top, self.dir, fmt="qcow2")


@pytest.fixture
def image(tmp_path: Path) -> Image:
    """A qcow2 overlay over a raw base with data in both layers."""
    d = tmp_path / "img"
    d.mkdir()
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(SIZE)
    top = d / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 3M 2M", "-c", "write -z 9M 1M", top)
    return Image(d, base, top)


# ---- clients ---------------------------------------------------------------------------------


@dataclass
class Served:
    daemon: Daemon
    port: int
    creds: Creds

    def client_dir(self, who: str | Path) -> Path:
        """A client credentials directory: one of Creds' by name, or the one given."""
        return who if isinstance(who, Path) else Path(getattr(self.creds, who))

    def uri(self, export: str, who: str | Path = "alice", psk: Path | None = None) -> str:
        """libnbd's URI: X.509 with ``who``'s client directory, or PSK as ``who``."""
        if psk is not None:
            return f"nbds://{who}@127.0.0.1:{self.port}/{export}?tls-psk-file={psk}"
        return (f"nbds://127.0.0.1:{self.port}/{export}"
                f"?tls-certificates={self.client_dir(who)}")

    def qemu_opts(self, export: str, who: str | Path = "alice",
                  psk: Path | None = None) -> list[str]:
        """qemu-img/qemu-io arguments opening the export over TLS (before the command's
        own arguments: --object and --image-opts)."""
        if psk is not None:
            pskdir = self.creds.root / f"qemu-psk-{psk.stem}"
            pskdir.mkdir(exist_ok=True)
            (pskdir / "keys.psk").write_bytes(psk.read_bytes())  # qemu's layout: DIR/keys.psk
            obj = f"tls-creds-psk,id=tls0,dir={pskdir},username={who},endpoint=client"
        else:
            obj = f"tls-creds-x509,id=tls0,dir={self.client_dir(who)},endpoint=client"
        return ["--object", obj, "--image-opts",
                f"driver=nbd,host=127.0.0.1,port={self.port},export={export},tls-creds=tls0"]


@pytest.fixture
def served(creds: Creds, tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(image: Image, *flags: str, more: tuple[Path, ...] = (),
              workers: str | None = None) -> Served:
        """``cowd serve`` on a TCP port with ``flags``; ``workers`` (WORKERS) is checked:
        the daemon runs that many worker processes once it listens."""
        port = free_port()
        if workers is not None:
            flags = (*flags, "--workers", workers)
        d = start_daemon(image.top, tmp_path, more_images=more,
                         extra=("--nbd", f"tcp:{port}", *flags))
        started.append(d)
        if workers is not None:
            deadline = time.monotonic() + 20
            while len(d.worker_pids()) != int(workers):
                assert time.monotonic() < deadline, (workers, d.worker_pids(), d.log_text())
                time.sleep(0.05)
        return Served(d, port, creds)

    yield start
    for d in started:
        d.kill()


# Worker processes the tests that matter run with: two (the default on a machine with two
# cores: each connection is handed to a worker, which loads its own credentials and runs the
# handshake) and none (the daemon serves every connection itself).
WORKERS = ["2", "0"]


def x509_flags(creds: Creds, *more: str) -> tuple[str, ...]:
    return ("--tls", "require", "--tls-certificates", str(creds.server), *more)


def qemu_convert(s: Served, export: str, out: Path, **kw: Any) -> bytes:
    qemu_img("convert", "-O", "raw", *s.qemu_opts(export, **kw), out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_io_tls(s: Served, export: str, *cmds: str, **kw: Any) -> str:
    args = ["qemu-io", *s.qemu_opts(export, **kw)[:3]]
    for c in cmds:
        args += ["-c", c]
    args.append(s.qemu_opts(export, **kw)[3])
    out = run(*args, timeout=60).stdout.decode(errors="replace")
    assert "error" not in out.lower() and "fail" not in out.lower(), out
    return out


def cowd_stats(s: Served) -> dict[str, Any]:
    """``cowd stats --json`` of the daemon behind ``s``."""
    doc: dict[str, Any] = json.loads(run(*COWD, "stats", "--json", "--run-dir",
                                         s.daemon.run_dir).stdout)
    return doc


def tls_handshakes_where(s: Served, workers: str) -> int:
    """The TLS handshakes the daemon counted, checked to have been done where ``workers``
    says: in the worker processes (each counts its own), or in the daemon itself."""
    doc = cowd_stats(s)
    if workers == "0":
        assert doc["workers"] is None, doc["workers"]
    else:
        assert len(doc["workers"]) == int(workers), doc["workers"]
        in_workers = sum(w["worker"]["nbd"]["tls_handshakes"] for w in doc["workers"])
        assert in_workers == doc["nbd"]["tls_handshakes"], doc
    n: int = doc["nbd"]["tls_handshakes"]
    return n


def refused(*args: str | Path, timeout: float = 60) -> str:
    """Run a client that must fail; its output (for the reason)."""
    p = run(*args, check=False, timeout=timeout)
    text = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode != 0, f"{args[0]} succeeded but should have been refused:\n{text}"
    return text


# ==== X.509 and PSK against qemu and libnbd ===================================================


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("kind", ["x509", "psk"])
def test_read_and_write_over_tls(kind: str, workers: str, creds: Creds, image: Image,
                                 served: Any, tmp_path: Path) -> None:
    need("nbdinfo")
    need("nbdcopy")
    expect = bytearray(image.oracle())
    if kind == "x509":
        s = served(image, *x509_flags(creds, "--tls-verify-peer"), workers=workers)
        kw: dict[str, Any] = {}
    else:
        s = served(image, "--tls", "require", "--tls-psk", str(creds.psk), workers=workers)
        kw = {"psk": creds.psk, "who": "bob"}
    # nbdinfo says TLS; the bytes qemu-img reads over TLS are the image's bytes.
    info = run("nbdinfo", s.uri(image.name, **kw), timeout=60).stdout.decode()
    assert "with TLS" in info, info
    assert qemu_convert(s, image.name, tmp_path / "read.raw", **kw) == expect
    # Writes over TLS read back over TLS (qemu-io's pattern check) ...
    qemu_io_tls(s, image.name, "write -P 0xa1 5M 3M", "write -P 0xa2 100k 64k",
                "read -P 0xa1 5M 3M", "read -P 0xa2 100k 64k", "flush", **kw)
    expect[5 * MiB:8 * MiB] = b"\xa1" * (3 * MiB)
    expect[100 << 10:(100 << 10) + (64 << 10)] = b"\xa2" * (64 << 10)
    # ... and through nbdcopy, both ways.
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(2 * MiB))
    part = tmp_path / "part.raw"
    run("nbdcopy", "--flush", str(src), s.uri(image.name, **kw), timeout=60)
    expect[:2 * MiB] = src.read_bytes()
    run("nbdcopy", s.uri(image.name, **kw), str(part), timeout=60)
    assert part.read_bytes() == expect
    # nbdinfo, qemu-img, qemu-io and two nbdcopy runs (each may open several connections).
    assert tls_handshakes_where(s, workers) >= 5
    text = s.daemon.stop()
    assert "Traceback" not in text
    qemu_check(image.top)
    assert image.oracle() == expect


@pytest.mark.parametrize("workers", WORKERS)
def test_require_refuses_plaintext_and_wrong_credentials(workers: str, creds: Creds,
                                                         image: Image, served: Any,
                                                         tmp_path: Path) -> None:
    need("nbdinfo")
    s = served(image, *x509_flags(creds, "--tls-verify-peer"), workers=workers)
    plain = f"nbd://127.0.0.1:{s.port}/{image.name}"
    # Plaintext: libnbd, qemu-img and a raw socket that goes straight to NBD_OPT_EXPORT_NAME.
    refused("nbdinfo", plain)
    refused("qemu-img", "info", "-f", "raw", plain)
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        assert c.recv(18, socket.MSG_WAITALL)[:8] == NBDMAGIC
        c.sendall(struct.pack(">I", 3) + IHAVEOPT
                  + struct.pack(">II", 1, len(image.name)) + image.name.encode())
        assert c.recv(4096) == b""  # closed without an export
    # Certificates: one from another CA (with alice's name), none at all.
    for who in ("mallory", "nocert"):
        refused("nbdinfo", s.uri(image.name, who))
        refused("qemu-img", "info", *s.qemu_opts(image.name, who))
    # The server still serves a good client, and said why it refused the others (qemu checks
    # mallory's certificate against mallory's CA itself and never connects).
    assert qemu_convert(s, image.name, tmp_path / "ok.raw") == image.oracle()
    assert tls_handshakes_where(s, workers) >= 1
    text = s.daemon.stop()
    assert text.count("TLS handshake failed: Certificate is required") >= 3, text
    assert "NBD_OPT_EXPORT_NAME before TLS" in text

    p = served(image, "--tls", "require", "--tls-psk", str(creds.psk), workers=workers)
    refused("nbdinfo", p.uri(image.name, "alice", psk=creds.wrong_psk))  # wrong key
    refused("nbdinfo", p.uri(image.name, "carol", psk=creds.wrong_psk))  # unknown user
    refused("qemu-img", "info", *p.qemu_opts(image.name, "alice", psk=creds.wrong_psk))
    refused("nbdinfo", f"nbd://127.0.0.1:{p.port}/{image.name}")
    run("nbdinfo", p.uri(image.name, "alice", psk=creds.psk), timeout=60)
    p.daemon.stop()


@pytest.mark.parametrize("workers", WORKERS)
def test_revoked_client_certificate_is_refused(workers: str, creds: Creds, image: Image,
                                               served: Any, tmp_path: Path) -> None:
    """``ca-crl.pem`` in the credentials directory (a CRL made by certtool that revokes
    bob's certificate): with --tls-verify-peer bob is refused by qemu-img and nbdinfo while
    alice reads the image's bytes; the same directory without the CRL admits bob, so it is
    the CRL that refuses him.  Each worker process loads the CRL itself."""
    need("nbdinfo")
    need("nbdcopy")
    server = tmp_path / "server-crl"
    shutil.copytree(creds.server, server)
    s = served(image, *x509_flags(creds, "--tls-verify-peer"), workers=workers)
    run("nbdinfo", s.uri(image.name, "bob"), timeout=60)  # (creds.server: no CRL)
    s.daemon.stop()

    tlscreds.revoke(creds.ca, [creds.bob / "client-cert.pem"], server / "ca-crl.pem")
    s = served(image, "--tls", "require", "--tls-certificates", str(server),
               "--tls-verify-peer", workers=workers)
    refused("nbdinfo", s.uri(image.name, "bob"))
    refused("qemu-img", "info", *s.qemu_opts(image.name, "bob"))
    expect = image.oracle()
    assert qemu_convert(s, image.name, tmp_path / "alice.raw") == expect
    part = tmp_path / "part.raw"
    run("nbdcopy", s.uri(image.name, "alice"), str(part), timeout=60)
    assert part.read_bytes() == expect
    text = s.daemon.stop()
    assert text.count("the client's certificate is revoked (ca-crl.pem)") >= 2, text


@pytest.mark.parametrize("key_kind", tlscreds.OPENSSL_KEY_KINDS)
def test_credentials_made_by_openssl(key_kind: str, image: Image, served: Any,
                                     tmp_path: Path) -> None:
    """The README says openssl's certificates work too: a CA, a server and two client
    certificates made by the openssl command, the server's key in each form openssl writes
    one (``key_kind``).  qemu-img reads the image's bytes over TLS with --tls-verify-peer,
    nbdinfo connects, and ``--tls-authz`` names a client by the subject openssl was given
    (``/C=GB/O=Example/CN=laptop`` is ``C=GB,O=Example,CN=laptop``): the other client is
    refused by that name."""
    need("nbdinfo")
    problem = tlscreds.openssl_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path / "openssl"
    ca = tlscreds.openssl_ca(root / "ca")
    server = tlscreds.openssl_server_dir(ca, root / "server", key_kind=key_kind)
    laptop = tlscreds.openssl_client_dir(ca, root / "laptop", "laptop")
    other = tlscreds.openssl_client_dir(ca, root / "other", "other", key_kind="rsa")
    laptop_dn = "C=GB,O=Example,CN=laptop"
    s = served(image, "--tls", "require", "--tls-certificates", str(server),
               "--tls-verify-peer", "--tls-authz", image.name, laptop_dn)
    assert qemu_convert(s, image.name, tmp_path / "read.raw", who=laptop) == image.oracle()
    run("nbdinfo", s.uri(image.name, laptop), timeout=60)
    text = refused("qemu-img", "info", *s.qemu_opts(image.name, other))
    assert "C=GB,O=Example,CN=other is not authorized" in text, text
    s.daemon.stop()


# ==== authorization ==========================================================================


def test_authz_by_certificate_dn_as_qemu_nbd_reads_it(creds: Creds, image: Image, served: Any,
                                                     tmp_path: Path) -> None:
    """``--tls-authz EXPORT IDENTITY`` with IDENTITY as qemu-nbd's ``--tls-authz`` (an
    authz-simple object) compares it: the same string admits alice and refuses bob on both
    servers."""
    need("nbdinfo")
    need("qemu-nbd")
    assert creds.alice_dn == "C=GB,O=Example,CN=alice"
    other = image.dir / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", other)
    s = served(image, *x509_flags(creds, "--tls-verify-peer", "--tls-authz", image.name,
                                  creds.alice_dn), more=(other,))
    assert qemu_convert(s, image.name, tmp_path / "a.raw") == image.oracle()
    run("nbdinfo", s.uri(image.name, "alice"), timeout=60)
    # bob has a good certificate, but is not on the list: refused, told why, by name (qemu
    # prints the server's message; libnbd only its errno).
    refused("nbdinfo", s.uri(image.name, "bob"))
    text = refused("qemu-img", "info", *s.qemu_opts(image.name, "bob"))
    assert f"{creds.bob_dn} is not authorized" in text, text
    # The export without a list is open to any verified client; LIST shows bob only it.
    run("nbdinfo", s.uri("other.qcow2", "bob"), timeout=60)
    listed = run("nbdinfo", "--list", s.uri("", "bob"), timeout=60).stdout.decode()
    assert "other.qcow2" in listed and image.name not in listed, listed
    s.daemon.stop()

    # qemu-nbd, given the same identity string, makes the same decision.
    port = free_port()
    ident = creds.alice_dn.replace(",", ",,")  # qemu's option syntax escapes commas
    q = subprocess.Popen(
        ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,dir={creds.server},"
         "endpoint=server,verify-peer=on",
         "--object", f"authz-simple,id=auth0,identity={ident}",
         "--tls-creds", "tls0", "--tls-authz", "auth0", "-r", "-x", image.name,
         "-f", "qcow2", "-b", "127.0.0.1", "-p", str(port), "--persistent", str(image.top)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qs = Served(s.daemon, port, creds)
        deadline = time.monotonic() + 20
        while run("nbdinfo", qs.uri(image.name, "alice"), check=False,
                  timeout=30).returncode != 0:
            assert time.monotonic() < deadline and q.poll() is None, "qemu-nbd did not serve"
            time.sleep(0.2)
        refused("nbdinfo", qs.uri(image.name, "bob"))
    finally:
        q.send_signal(signal.SIGTERM)
        q.wait(20)


def test_authz_by_psk_username(creds: Creds, image: Image, served: Any,
                               tmp_path: Path) -> None:
    need("nbdinfo")
    s = served(image, "--tls", "require", "--tls-psk", str(creds.psk),
               "--tls-authz", image.name, "bob")
    assert qemu_convert(s, image.name, tmp_path / "b.raw", who="bob",
                        psk=creds.psk) == image.oracle()
    refused("nbdinfo", s.uri(image.name, "alice", psk=creds.psk))
    text = refused("qemu-img", "info", *s.qemu_opts(image.name, "alice", psk=creds.psk))
    assert "alice is not authorized" in text, text
    s.daemon.stop()


def test_tls_on_makes_only_listed_exports_tls_only(creds: Creds, image: Image, served: Any,
                                                   tmp_path: Path) -> None:
    """--tls=on (the spec's SELECTIVETLS): a plaintext client may open the export that has no
    authorization list, and is told TLS is required for the one that has."""
    need("nbdinfo")
    other = image.dir / "open.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", other)
    s = served(image, "--tls", "on", "--tls-psk", str(creds.psk), "--tls-authz", image.name,
               "alice", more=(other,))
    plain = f"nbd://127.0.0.1:{s.port}"
    run("nbdinfo", f"{plain}/open.qcow2", timeout=60)
    text = refused("nbdinfo", f"{plain}/{image.name}")
    assert "TLS" in text, text
    listed = run("nbdinfo", "--list", f"{plain}/", timeout=60).stdout.decode()
    assert "open.qcow2" in listed and image.name not in listed, listed
    assert qemu_convert(s, image.name, tmp_path / "c.raw", psk=creds.psk) == image.oracle()
    s.daemon.stop()


# ==== fio verify through a TLS hop ===========================================================


def test_fio_verify_over_tls(creds: Creds, image: Image, served: Any, tmp_path: Path) -> None:
    """fio's nbd engine opens libnbd URIs without nbd_set_uri_allow_local_file, so it cannot
    name a certificate directory or a keys file (libnbd refuses such URIs).  qemu-nbd is the
    TLS client instead: it serves cowd's export, read over TLS, on a plain unix socket, and
    every I/O of fio's verify crosses cowd's TLS."""
    need("fio")
    need("qemu-nbd")
    s = served(image, *x509_flags(creds, "--tls-verify-peer"))
    sock = tmp_path / "relay.sock"
    obj, imgopts = s.qemu_opts(image.name)[1], s.qemu_opts(image.name)[3]
    relay = subprocess.Popen(["qemu-nbd", "--object", obj, "--image-opts", imgopts,
                              "-k", str(sock), "-x", "relay", "--persistent", "--shared", "4"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(sock))
                break
            assert time.monotonic() < deadline and relay.poll() is None, "qemu-nbd exited"
            time.sleep(0.1)
        p = run("fio", "--name=tlsverify", "--ioengine=nbd",
                f"--uri=nbd+unix:///relay?socket={sock}", "--rw=randwrite", "--bs=4k",
                "--iodepth=16", "--size=8M", "--offset=4M", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--randrepeat=0", "--output-format=json",
                "--verify_state_save=0",
                timeout=240)
        assert b'"error" : 0' in p.stdout or b'"error": 0' in p.stdout, p.stdout[-2000:]
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(30)
    text = s.daemon.stop()
    assert "Traceback" not in text
    qemu_check(image.top)


# ==== handshakes that stall, or flood ========================================================


def _starttls(port: int) -> socket.socket:
    """A connection that asked for TLS and got the ACK (the caller then stalls or
    handshakes)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=20)
    greeting = c.recv(18, socket.MSG_WAITALL)
    assert greeting[:16] == NBDMAGIC + IHAVEOPT, greeting
    c.sendall(struct.pack(">I", 3) + IHAVEOPT + struct.pack(">II", OPT_STARTTLS, 0))
    reply = c.recv(20, socket.MSG_WAITALL)
    assert struct.unpack(">QIII", reply)[2] == REP_ACK, reply
    return c


def _wait_closed_by_server(c: socket.socket, deadline_s: float) -> bytes:
    """Read until the server closes ``c`` (EOF or a reset); what it sent before that.  Fails
    if it is still open after ``deadline_s`` seconds."""
    c.settimeout(deadline_s)
    got = b""
    try:
        while chunk := c.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server did not close a stalled handshake in {deadline_s} s "
                             f"(it sent {got!r})") from None
    return got


def test_a_stalled_tls_handshake_is_cut_after_the_handshake_timeout(creds: Creds,
                                                                    image: Image,
                                                                    served: Any,
                                                                    tmp_path: Path) -> None:
    """Two clients stop in the middle of the TLS handshake, after the STARTTLS ACK: one sends
    nothing, one the first bytes of a ClientHello.  The server closes each after
    HANDSHAKE_TIMEOUT_S (server.py) — not before, and not much after — and counts both in
    ``handshake_timeouts``; meanwhile another client reads the whole disk over TLS."""
    s = served(image, *x509_flags(creds))
    expect = image.oracle()
    assert cowd_stats(s)["nbd"]["handshake_timeouts"] == 0
    t0 = time.monotonic()  # before the server's clock for these connections starts
    silent = _starttls(s.port)
    partial = _starttls(s.port)
    partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # a record header and the message type
    try:
        assert qemu_convert(s, image.name, tmp_path / "good.raw") == expect
        assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT_S, "the good client was held up"
        for c in (silent, partial):
            got = _wait_closed_by_server(c, t0 + HANDSHAKE_TIMEOUT_S + 10 - time.monotonic())
            took = time.monotonic() - t0
            # Nothing but, at most, a TLS alert record (content type 21) before the close.
            assert got == b"" or got[:1] == b"\x15", got
            assert HANDSHAKE_TIMEOUT_S <= took < HANDSHAKE_TIMEOUT_S + 5, took
    finally:
        silent.close()
        partial.close()
    stats = cowd_stats(s)["nbd"]
    assert stats["handshake_timeouts"] == 2, stats
    assert stats["tls_handshakes"] >= 1, stats  # the good client's
    s.daemon.stop()


def test_stalled_and_flooding_handshakes_do_not_starve_others(creds: Creds, image: Image,
                                                              served: Any,
                                                              tmp_path: Path) -> None:
    """600 connections that stop half-way through the TLS handshake (more than the
    server's 512 slots: the oldest negotiating ones are evicted) and 3 threads that do
    nothing but full handshakes: a good client still reads the whole disk, within time."""
    s = served(image, *x509_flags(creds))
    expect = image.oracle()
    stalled: list[socket.socket] = []
    stop = threading.Event()
    handshakes = [0]

    def flood() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(creds.server / "ca-cert.pem"))
        while not stop.is_set():
            with contextlib.suppress(OSError), _starttls(s.port) as c, \
                    ctx.wrap_socket(c, server_hostname="localhost"):
                handshakes[0] += 1

    try:
        for i in range(600):
            c = _starttls(s.port)
            if i % 2:
                c.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
            stalled.append(c)
        threads = [threading.Thread(target=flood, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        assert qemu_convert(s, image.name, tmp_path / "good.raw") == expect
        took = time.monotonic() - t0
        assert took < 30, took
        # The good client may finish before the flood got going (workers serve it fast):
        # let the flood run until it has really reached the server.
        deadline = time.monotonic() + 30
        while handshakes[0] <= 10 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for c in stalled:
            c.close()
    for t in threads:
        t.join(30)
    assert handshakes[0] > 10, handshakes  # the flood did reach the server
    stats = run(*COWD, "stats", "--json", "--run-dir", s.daemon.run_dir).stdout.decode()
    evicted = int(re.search(r'"handshakes_evicted": (\d+)', stats).group(1))  # type: ignore[union-attr]
    assert evicted >= 88, stats  # 600 + the flood's + ours - 512 slots
    s.daemon.stop()


# ==== every option before STARTTLS, on a real socket =========================================


class RawNbd:
    """An NBD client written from the spec (tests/support/nbdspec.py) on a real socket to the
    running daemon: plaintext, then TLS (Python's ssl) after STARTTLS."""

    def __init__(self, port: int):
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=20)
        greeting = self.recv(18)
        assert greeting[:16] == NBDMAGIC + IHAVEOPT, greeting
        (handshake_flags,) = struct.unpack(">H", greeting[16:])
        assert handshake_flags & 3 == 3, handshake_flags  # FIXED_NEWSTYLE, NO_ZEROES
        self.sock.sendall(client_flags(fixed=True, no_zeroes=True))

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(opt(option, data))

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        """The replies to ``option``, up to its ACK or error (each must echo ``option``)."""
        out = []
        while True:
            magic, echoed, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == REP_MAGIC, hex(magic)
            assert echoed == option, (echoed, option, rtype)
            out.append((rtype, self.recv(length)))
            if rtype == REP_ACK or rtype & ERR:
                return out

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.send_option(option, data)
        return self.replies(option)

    def closed_silently(self) -> bytes:
        """Whatever the server sends before it closes the connection (it must close)."""
        got = b""
        try:
            while chunk := self.sock.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        return got

    def starttls(self, creds: Creds, client: Path | None = None) -> None:
        assert self.option(OPT_STARTTLS) == [(REP_ACK, b"")]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(creds.server / "ca-cert.pem"))
        if client is not None:
            ctx.load_cert_chain(str(client / "client-cert.pem"), str(client / "client-key.pem"))
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def go(self, name: str) -> int:
        """NBD_OPT_GO on ``name`` (asking for the block sizes); the export's size."""
        replies = self.option(OPT_GO, info_data(name, [INFO_BLOCK_SIZE]))
        assert replies[-1] == (REP_ACK, b""), replies
        sizes = [struct.unpack(">HQH", p)[1] for t, p in replies
                 if t == REP_INFO and p[:2] == b"\0\0"]  # NBD_INFO_EXPORT
        assert len(sizes) == 1, replies
        return sizes[0]

    def read(self, size: int, chunk: int = MiB) -> bytes:
        """The export's bytes by NBD_CMD_READ (simple replies), then NBD_CMD_DISC."""
        out = bytearray()
        for offset in range(0, size, chunk):
            n = min(chunk, size - offset)
            self.sock.sendall(req(CMD_READ, offset, n, cookie=offset))
            magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
            assert (magic, error, cookie) == (SIMPLE_MAGIC, 0, offset), (magic, error, cookie)
            out += self.recv(n)
        self.sock.sendall(req(CMD_DISC))
        return bytes(out)


def assert_error(replies: list[tuple[int, bytes]], expected: int, what: str) -> None:
    """One error reply of type ``expected``, whose data (the spec: optional) is a message
    string: UTF-8, no NUL, at most 4096 bytes."""
    assert [t for t, _ in replies] == [expected], (what, replies)
    message = replies[0][1]
    assert len(message) <= 4096 and b"\0" not in message, (what, message)
    message.decode("utf-8")


def options_before_tls(name: str) -> list[tuple[str, int, bytes]]:
    """Every option a client may send, with data as a client would send it, and some with
    data no server would take: under FORCEDTLS each gets NBD_REP_ERR_TLS_REQD whatever its
    data, which is read and discarded (the next option must parse)."""
    return [
        ("LIST", OPT_LIST, b""),
        ("LIST with data", OPT_LIST, b"junk"),
        ("PEEK_EXPORT", OPT_PEEK, b""),
        ("INFO", OPT_INFO, info_data(name, [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])),
        ("GO", OPT_GO, info_data(name, [INFO_BLOCK_SIZE])),
        ("GO to no export", OPT_GO, info_data("nosuch", [])),
        ("INFO with broken data", OPT_INFO, b"\xff\xff\xff\xff"),
        ("STRUCTURED_REPLY", OPT_STRUCTURED, b""),
        ("LIST_META_CONTEXT", OPT_LIST_META, meta_data(name, ["base:allocation"])),
        ("SET_META_CONTEXT", OPT_SET_META, meta_data(name, ["base:allocation", "base:"])),
        ("EXTENDED_HEADERS", OPT_EXTENDED_HEADERS, b""),
        # Data that is itself an option: were it parsed, EXPORT_NAME would end the session.
        ("unknown option", 0x4242, opt(OPT_EXPORT_NAME, name.encode())),
        ("GO with 200 KiB of data", OPT_GO, os.urandom(200 << 10)),
    ]


@pytest.mark.parametrize("workers", WORKERS)
def test_require_answers_every_option_before_starttls_on_the_wire(workers: str, creds: Creds,
                                                                 image: Image, served: Any
                                                                 ) -> None:
    """``--tls=require`` (the spec's FORCEDTLS) against the daemon itself, on a real socket:
    before STARTTLS every option but STARTTLS and ABORT gets exactly one
    NBD_REP_ERR_TLS_REQD (with a message string at most), sent one at a time and all at once;
    STARTTLS with data is NBD_REP_ERR_INVALID; EXPORT_NAME ends the session without a byte;
    ABORT gets its ACK (or the close the spec lets a client expect).  After STARTTLS the
    same session lists and opens the export, reads the image's bytes, and a second STARTTLS
    is NBD_REP_ERR_INVALID (TLS_REQD is never sent once TLS is on)."""
    s = served(image, *x509_flags(creds), workers=workers)
    name = image.name
    expect = image.oracle()
    cases = options_before_tls(name)

    # One option at a time: each reply is the option's own, and nothing follows it.
    c = RawNbd(s.port)
    for what, option, data in cases:
        assert_error(c.option(option, data), REP_ERR_TLS_REQD, what)
    assert_error(c.option(OPT_STARTTLS, b"data"), REP_ERR_INVALID, "STARTTLS with data")
    c.starttls(creds)
    assert_error(c.option(OPT_STARTTLS), REP_ERR_INVALID, "a second STARTTLS")
    listed = c.option(OPT_LIST)
    assert [t for t, _ in listed] == [REP_SERVER, REP_ACK], listed
    assert listed[0][1].startswith(struct.pack(">I", len(name)) + name.encode()), listed
    assert [t for t, _ in c.option(OPT_STRUCTURED)] == [REP_ACK]
    assert c.go(name) == SIZE
    c.close()

    # All at once, STARTTLS last: the replies come back in order, then TLS and the bytes.
    c = RawNbd(s.port)
    c.sock.sendall(b"".join(opt(option, data) for _, option, data in cases))
    for what, option, _ in cases:
        assert_error(c.replies(option), REP_ERR_TLS_REQD, what)
    c.starttls(creds)
    assert c.go(name) == SIZE
    assert c.read(SIZE) == expect
    c.close()

    # EXPORT_NAME cannot be refused: the session ends, without the export's size or any
    # byte (first option, and after a refused one).
    for before in ([], [(OPT_LIST, b"")]):
        c = RawNbd(s.port)
        for option, data in before:
            assert_error(c.option(option, data), REP_ERR_TLS_REQD, "LIST")
        c.send_option(OPT_EXPORT_NAME, name.encode())
        assert c.closed_silently() == b""
        c.close()

    # ABORT: an ACK then the close, or the close (the spec allows both), and nothing else.
    for before in ([], [(OPT_INFO, info_data(name))]):
        c = RawNbd(s.port)
        for option, data in before:
            assert_error(c.option(option, data), REP_ERR_TLS_REQD, "INFO")
        c.send_option(OPT_ABORT)
        got = c.closed_silently()
        assert got in (b"", opt_reply(OPT_ABORT, REP_ACK)), got
        c.close()

    text = s.daemon.stop()
    assert text.count("NBD_OPT_EXPORT_NAME before TLS") == 2, text


def opt_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    """An option reply as the spec frames it."""
    return struct.pack(">QIII", REP_MAGIC, option, rtype, len(data)) + data


def test_tls_on_answers_tls_only_exports_on_the_wire(creds: Creds, image: Image, served: Any,
                                                     ) -> None:
    """``--tls=on`` (SELECTIVETLS) with an authorization list on one export, on a real
    socket: before TLS, INFO and GO on that export get NBD_REP_ERR_TLS_REQD and EXPORT_NAME
    ends the session, while the other export answers INFO, GO (its bytes) and LIST shows
    only it; no other option gets TLS_REQD (the spec keeps it for the three that choose an
    export).  After STARTTLS alice (on the list) reads the export's bytes; bob gets
    NBD_REP_ERR_POLICY, never TLS_REQD."""
    name = image.name
    other = image.dir / "open.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", other)
    s = served(image, "--tls", "on", "--tls-certificates", str(creds.server),
               "--tls-verify-peer", "--tls-authz", name, creds.alice_dn, more=(other,))
    expect = image.oracle()
    open_expect = qemu_raw(other, image.dir, fmt="qcow2")

    c = RawNbd(s.port)
    assert_error(c.option(OPT_INFO, info_data(name, [INFO_BLOCK_SIZE])), REP_ERR_TLS_REQD,
                 "INFO on the TLS-only export")
    assert_error(c.option(OPT_GO, info_data(name, [INFO_BLOCK_SIZE])), REP_ERR_TLS_REQD,
                 "GO on the TLS-only export")
    info = c.option(OPT_INFO, info_data("open.qcow2", [INFO_BLOCK_SIZE]))
    assert info[-1] == (REP_ACK, b"") and {t for t, _ in info[:-1]} == {REP_INFO}, info
    listed = c.option(OPT_LIST)
    assert [t for t, _ in listed] == [REP_SERVER, REP_ACK], listed
    assert listed[0][1].startswith(struct.pack(">I", 10) + b"open.qcow2"), listed
    assert [t for t, _ in c.option(OPT_STRUCTURED)] == [REP_ACK]
    assert_error(c.option(OPT_LIST_META, meta_data(name, ["base:allocation"])),
                 REP_ERR_POLICY, "LIST_META_CONTEXT on the TLS-only export")
    meta = c.option(OPT_LIST_META, meta_data("open.qcow2", ["base:allocation"]))
    assert [t for t, _ in meta] == [REP_META, REP_ACK], meta
    assert_error(c.option(0x4242, b"x" * 10), REP_ERR_UNSUP, "an unknown option")
    c.close()

    c = RawNbd(s.port)  # plaintext reads the open export
    assert c.go("open.qcow2") == SIZE
    assert c.read(SIZE) == open_expect
    c.close()

    c = RawNbd(s.port)
    c.send_option(OPT_EXPORT_NAME, name.encode())
    assert c.closed_silently() == b""
    c.close()

    c = RawNbd(s.port)
    c.starttls(creds, creds.alice)
    assert c.go(name) == SIZE
    assert c.read(SIZE) == expect
    c.close()

    c = RawNbd(s.port)
    c.starttls(creds, creds.bob)
    assert_error(c.option(OPT_GO, info_data(name, [INFO_BLOCK_SIZE])), REP_ERR_POLICY,
                 "GO on the export bob is not authorized for")
    assert c.go("open.qcow2") == SIZE
    c.close()
    s.daemon.stop()


# ==== configuration errors: one line, the README's exit codes ================================


def _serve_fails(image: Image, tmp_path: Path, *flags: str) -> tuple[int, str]:
    p = run(*COWD, "serve", image.top, "--nbd", f"unix:{tmp_path / 'x.sock'}", "--run-dir",
            tmp_path / "run-err", *flags, check=False, timeout=60)
    text = p.stderr.decode(errors="replace").strip()
    assert p.returncode != 0, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return p.returncode, text


def test_bad_tls_flags_and_credentials_are_one_line(creds: Creds, image: Image,
                                                    tmp_path: Path) -> None:
    usage = [
        (("--tls", "on"), "exactly one of"),
        (("--tls", "require", "--tls-certificates", str(creds.server), "--tls-psk",
          str(creds.psk)), "exactly one of"),
        (("--tls-certificates", str(creds.server)), "need --tls=on"),
        (("--tls-authz", image.name, "x"), "needs --tls=on"),
        (("--tls", "require", "--tls-psk", str(creds.psk), "--tls-verify-peer"),
         "only with --tls-certificates"),
        (("--tls", "require", "--tls-certificates", str(creds.server), "--tls-authz",
          image.name, "x"), "needs --tls-verify-peer"),
        (("--tls", "require", "--tls-psk", str(creds.psk), "--tls-authz", "nosuch.qcow2",
          "alice"), "no export named 'nosuch.qcow2'"),
    ]
    for flags, needle in usage:
        rc, text = _serve_fails(image, tmp_path, *flags)
        assert rc == 2 and needle in text, (flags, rc, text)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "server-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    (broken / "server-key.pem").write_bytes((creds.server / "server-key.pem").read_bytes())
    nokey = tmp_path / "nokey"
    nokey.mkdir()
    (nokey / "server-cert.pem").write_bytes((creds.server / "server-cert.pem").read_bytes())
    badpsk = tmp_path / "bad.psk"
    badpsk.write_text("alice:00ff\nbob-without-a-key\n")
    emptypsk = tmp_path / "empty.psk"
    emptypsk.write_text("")
    files = [
        (("--tls-certificates", str(tmp_path / "nosuchdir")), "nosuchdir: not a credentials"),
        (("--tls-certificates", str(nokey)), "nokey/server-key.pem: cannot read"),
        (("--tls-certificates", str(broken)), "broken/server-cert.pem"),
        (("--tls-certificates", str(nokey), "--tls-verify-peer"),
         "server-key.pem: cannot read"),
        (("--tls-psk", str(tmp_path / "nosuch.psk")), "nosuch.psk: cannot read"),
        (("--tls-psk", str(badpsk)), "bad.psk: not a psktool line (username:hexkey) (line=2)"),
        (("--tls-psk", str(emptypsk)), "empty.psk: no keys"),
        (("--tls-psk", str(tmp_path)), "not a regular file"),
    ]
    for flags, needle in files:
        rc, text = _serve_fails(image, tmp_path, "--tls", "require", *flags)
        assert rc == 1 and needle in text, (flags, rc, text)
