"""Layer: tools (the TLS tests and tools/bench_tls.py share it).  TLS credentials made at run
time by GnuTLS's certtool and psktool (Debian's gnutls-bin),
in the layouts the peers read: a server directory for cowd and qemu-nbd (ca-cert.pem,
server-cert.pem, server-key.pem), client directories for qemu (tls-creds-x509 endpoint=client)
and libnbd (``?tls-certificates=DIR``: ca-cert.pem, client-cert.pem, client-key.pem), and
psktool keys files (``username:hexkey``).

Keys are ECDSA P-256 unless asked otherwise (``kind="rsa"``: 2048 bits).  Nothing here is
cowd's: the oracle for "which DN does a certificate have" is certtool's own ``-i`` output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CERTTOOL = "certtool"
PSKTOOL = "psktool"


def tls_tools_problem() -> str | None:
    """Why credentials cannot be made here (None: they can)."""
    for tool in (CERTTOOL, PSKTOOL):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package gnutls-bin, in packages.txt)"
    return None


def _certtool(*args: str | Path) -> str:
    p = subprocess.run([CERTTOOL, *map(str, args)], capture_output=True, text=True,
                       timeout=60, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"certtool {' '.join(map(str, args))}: {p.stderr.strip()}")
    return p.stdout


def _key(path: Path, kind: str) -> None:
    extra = ["--ecdsa", "--curve", "secp256r1"] if kind == "ecdsa" else ["--rsa",
                                                                        "--bits", "2048"]
    _certtool("--generate-privkey", *extra, "--outfile", path)
    path.chmod(0o600)


@dataclass
class Ca:
    dir: Path
    cert: Path
    key: Path
    kind: str

    def issue(self, out: Path, name: str, template: str) -> tuple[Path, Path]:
        key = out / f"{name}-key.pem"
        cert = out / f"{name}-cert.pem"
        tpl = out / f"{name}.tpl"
        tpl.write_text(template)
        _key(key, self.kind)
        _certtool("--generate-certificate", "--load-privkey", key, "--load-ca-certificate",
                  self.cert, "--load-ca-privkey", self.key, "--template", tpl,
                  "--outfile", cert)
        tpl.unlink()
        return cert, key


def make_ca(dir: Path, cn: str = "cowd test CA", kind: str = "ecdsa") -> Ca:
    dir.mkdir(parents=True, exist_ok=True)
    key = dir / "ca-key.pem"
    cert = dir / "ca-cert.pem"
    tpl = dir / "ca.tpl"
    tpl.write_text(f'cn = "{cn}"\nca\ncert_signing_key\nexpiration_days = 2\n')
    _key(key, kind)
    _certtool("--generate-self-signed", "--load-privkey", key, "--template", tpl,
              "--outfile", cert)
    tpl.unlink()
    return Ca(dir, cert, key, kind)


def server_dir(ca: Ca, dir: Path, hostname: str = "localhost") -> Path:
    """cowd's / qemu-nbd's server credentials directory, signed by ``ca``."""
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert, dir / "ca-cert.pem")
    ca.issue(dir, "server", f'organization = "cowd tests"\ncn = "{hostname}"\n'
             f'dns_name = "{hostname}"\nip_address = "127.0.0.1"\ntls_www_server\n'
             'encryption_key\nsigning_key\nexpiration_days = 2\n')
    return dir


def client_dir(ca: Ca, dir: Path, cn: str, organization: str = "Example",
               country: str = "GB") -> Path:
    """A client's credentials directory (qemu endpoint=client, libnbd tls-certificates)
    whose certificate has the subject C=<country>, O=<organization>, CN=<cn>, with the CA
    that signed the server's certificate (``ca``'s may be another CA: then the client
    does not trust the server, or the server does not trust it)."""
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert, dir / "ca-cert.pem")
    ca.issue(dir, "client", f'country = "{country}"\norganization = "{organization}"\n'
             f'cn = "{cn}"\ntls_www_client\nencryption_key\nsigning_key\n'
             'expiration_days = 2\n')
    return dir


def certificate_dn(cert: Path) -> str:
    """The subject DN as certtool prints it (RFC 4514, the form qemu's authz compares)."""
    out = _certtool("-i", "--infile", cert)
    m = re.search(r"^\s*Subject: (.*)$", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"certtool -i {cert}: no Subject line")
    return m.group(1).strip()


def psk_file(path: Path, *usernames: str) -> Path:
    """A psktool keys file with a fresh random key for each username."""
    for name in usernames:
        p = subprocess.run([PSKTOOL, "-u", name, "-p", str(path)], capture_output=True,
                           text=True, timeout=30, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"psktool -u {name}: {p.stderr.strip()}")
    path.chmod(0o600)
    return path
