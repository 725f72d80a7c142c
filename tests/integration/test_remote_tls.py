"""Remote bases over TLS (issue 17): qemu-nbd requiring X.509 TLS (libnbd's STARTTLS with
the user's client certificates, qemu's folder layout), nbdkit requiring TLS with a pre-shared
key (a psktool keys file, an ``nbds://`` URL) and nginx over https (urllib3 checking the
server's certificate against the user's CA).  The credentials are the user's flags,
never in the image; without them the open fails in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.peers import qemu_img, run
from tests.support.remote import Cowd, make_base, nbdkit, nginx, qemu_nbd, remote_problem
from tools.tlscreds import client_dir, make_ca, psk_file, server_dir, tls_tools_problem

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(180)]

_problem = remote_problem() or tls_tools_problem()
if _problem:
    pytestmark.append(pytest.mark.skip(reason=_problem))


def test_nbd_over_tls(tmp_path: Path) -> None:
    cowd = Cowd(tmp_path, tmp_path / "cache")
    ca = make_ca(tmp_path / "ca")
    server = server_dir(ca, tmp_path / "server")
    client = client_dir(ca, tmp_path / "client", "cowd host")
    files = tmp_path / "files"
    files.mkdir()
    base = make_base(files, 8)
    with qemu_nbd(tmp_path, base, "raw", extra=[
            "--object", f"tls-creds-x509,id=tls0,dir={server},endpoint=server",
            "--tls-creds", "tls0"]) as srv:
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-u", "-F", "raw", "-b", srv.url, ov, "8M")
        p = cowd("convert", ov, tmp_path / "no.raw", "-O", "raw", "--allow-remote-backing",
                 rc=1)
        assert "\n" not in p.stderr.strip() and srv.url in p.stderr, p.stderr
        out = tmp_path / "out.raw"
        cowd("convert", ov, out, "-O", "raw", "--allow-remote-backing",
             "--remote-tls-certificates", client)
        assert out.read_bytes() == base.read_bytes()
        with cowd.serve(ov, extra=["--remote-tls-certificates", str(client)]) as sock:
            got = tmp_path / "served.raw"
            qemu_img("convert", "-f", "raw", "-O", "raw",
                     f"nbd+unix:///{ov.name}?socket={sock}", got)
            assert got.read_bytes() == base.read_bytes()


def test_https_checks_the_certificate(tmp_path: Path) -> None:
    cowd = Cowd(tmp_path, tmp_path / "cache")
    ca = make_ca(tmp_path / "ca")
    server = server_dir(ca, tmp_path / "server", hostname="127.0.0.1")
    files = tmp_path / "files"
    files.mkdir()
    base = make_base(files, 8)
    with nginx(tmp_path, files, tls=server) as srv:
        url = f"{srv.url}/{base.name}"
        assert url.startswith("https://")
        # Not trusting the test CA: refused in one line.
        p = cowd("create", "--base", url, "--overlay", "qcow", "-o", tmp_path / "x.qcow2",
                 rc=1)
        assert "\n" not in p.stderr.strip() and "CERTIFICATE_VERIFY_FAILED" in p.stderr
        ov = tmp_path / "ov.qcow2"
        cowd("create", "--base", url, "--overlay", "qcow", "-o", ov,
             "--remote-ca-file", ca.cert)
        out = tmp_path / "out.raw"
        cowd("convert", ov, out, "-O", "raw", "--allow-remote-backing", "--remote-ca-file",
             ca.cert)
        assert out.read_bytes() == base.read_bytes()


def test_nbd_over_tls_with_a_psk(tmp_path: Path) -> None:
    """nbdkit --tls=require --tls-psk=FILE, the overlay naming ``nbds://``: without a key,
    and with a wrong one, the open fails in one line naming the URL; with the user's keys
    file (``--remote-tls-psk-file``, ``--remote-tls-username``) every byte, through
    ``cowd convert`` and ``cowd serve``, equals qemu-img's read of the same chain (qemu
    with its own tls-creds-psk object)."""
    cowd = Cowd(tmp_path, tmp_path / "cache")
    keys_dir = tmp_path / "psk"
    keys_dir.mkdir()
    keys = psk_file(keys_dir / "keys.psk", "cowd")  # qemu's tls-creds-psk reads DIR/keys.psk
    wrong = psk_file(tmp_path / "wrong.psk", "cowd")  # the same identity, another key
    files = tmp_path / "files"
    files.mkdir()
    base = make_base(files, 8)
    with nbdkit(tmp_path, base, options=["--tls=require", f"--tls-psk={keys}"]) as srv:
        assert srv.url.startswith("nbds://")
        ov = tmp_path / "ov.qcow2"
        qemu_img("create", "-f", "qcow2", "-u", "-o", "cluster_size=65536", "-F", "raw",
                 "-b", srv.url, ov, "8M")
        # A cluster of the overlay's own (qemu writes it, the backing file not opened).
        run("qemu-io", "-c", "write -P 0x5a 1M 64k",
            "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                  "file": {"driver": "file", "filename": str(ov)}}))
        # The oracle: qemu-img convert of a copy of the overlay whose backing file says the
        # same server in qemu's own words (qemu 7.2 has no nbds:// URLs).
        ovq = tmp_path / "ovq.qcow2"
        shutil.copyfile(ov, ovq)
        qemu_img("rebase", "-u", "-F", "raw", "-b", "json:" + json.dumps({
            "driver": "raw", "file": {"driver": "nbd", "tls-creds": "tls0", "server": {
                "type": "inet", "host": "127.0.0.1", "port": str(srv.port)}}}), ovq)
        oracle = tmp_path / "oracle.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", "--object",
                 f"tls-creds-psk,id=tls0,dir={keys_dir},endpoint=client,username=cowd",
                 ovq, oracle)
        want = oracle.read_bytes()
        assert want[1 << 20:(1 << 20) + 65536] == b"\x5a" * 65536
        assert want != base.read_bytes() and want[:1 << 20] == base.read_bytes()[:1 << 20]
        for creds in ([], ["--remote-tls-psk-file", str(wrong), "--remote-tls-username",
                           "cowd"]):
            p = cowd("convert", ov, tmp_path / "no.raw", "-O", "raw",
                     "--allow-remote-backing", *creds, rc=1)
            line = p.stderr.strip()
            assert "\n" not in line and srv.url in line and ov.name in line, line
            # Refused by the handshake, not later: libnbd says TLS, or GnuTLS's own words
            # (gnutls_handshake: "Error in the pull function" when the server hangs up
            # first), depending on which side notices the wrong key first.
            assert "TLS" in line or "gnutls_handshake" in line, line
        assert not (tmp_path / "no.raw").exists()
        out = tmp_path / "out.raw"
        good = ["--remote-tls-psk-file", str(keys), "--remote-tls-username", "cowd"]
        cowd("convert", ov, out, "-O", "raw", "--allow-remote-backing", *good)
        assert out.read_bytes() == want
        with cowd.serve(ov, extra=good) as sock:
            got = tmp_path / "served.raw"
            qemu_img("convert", "-f", "raw", "-O", "raw",
                     f"nbd+unix:///{ov.name}?socket={sock}", got)
            assert got.read_bytes() == want
