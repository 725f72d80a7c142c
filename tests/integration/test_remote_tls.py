"""Remote bases over TLS (issue 17): qemu-nbd requiring X.509 TLS (libnbd's STARTTLS with
the user's client certificates, qemu's folder layout) and nginx over https (urllib3 checking
the server's certificate against the user's CA).  The credentials are the user's flags,
never in the image; without them the open fails in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.peers import qemu_img
from tests.support.remote import Cowd, make_base, nginx, qemu_nbd, remote_problem
from tools.tlscreds import client_dir, make_ca, server_dir, tls_tools_problem

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
