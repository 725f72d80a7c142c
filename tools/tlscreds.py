"""Layer: tools (the TLS tests and tools/bench_tls.py share it).  TLS credentials made at run
time by GnuTLS's certtool and psktool (Debian's gnutls-bin), or by the ``openssl`` command
(:func:`openssl_ca`: the README says its certificates work too), in the layouts the peers
read: a server directory for cowd and qemu-nbd (ca-cert.pem,
server-cert.pem, server-key.pem), client directories for qemu (tls-creds-x509 endpoint=client)
and libnbd (``?tls-certificates=DIR``: ca-cert.pem, client-cert.pem, client-key.pem), and
psktool keys files (``username:hexkey``), and certificate revocation lists
(:func:`revoke`: ``ca-crl.pem`` in a server directory).

Keys are ECDSA P-256 unless asked otherwise (``kind="rsa"``: 2048 bits).  Nothing here is
cowd's: the oracle for "which DN does a certificate have" is certtool's own ``-i`` output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CERTTOOL = "certtool"
PSKTOOL = "psktool"
OPENSSL = "openssl"


def tls_tools_problem() -> str | None:
    """Why credentials cannot be made here (None: they can)."""
    for tool in (CERTTOOL, PSKTOOL):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package gnutls-bin, in packages.txt)"
    return None


def openssl_problem() -> str | None:
    """Why certificates cannot be made with openssl here (None: they can)."""
    if shutil.which(OPENSSL) is None:
        return f"{OPENSSL} not installed (Debian package openssl, in packages.txt)"
    return None


def _run(tool: str, *args: str | Path) -> str:
    p = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=60,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(map(str, args))}: {p.stderr.strip()}")
    return p.stdout


def _certtool(*args: str | Path) -> str:
    return _run(CERTTOOL, *args)


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


def revoke(ca: Ca, certs: list[Path], out: Path) -> Path:
    """A CRL signed by ``ca`` that revokes ``certs`` (certtool --generate-crl), written to
    ``out`` (a server directory's ``ca-crl.pem``)."""
    revoked = out.with_name(out.name + ".revoked")
    revoked.write_bytes(b"".join(c.read_bytes() for c in certs))
    tpl = out.with_name(out.name + ".tpl")
    tpl.write_text("crl_next_update = 2\ncrl_number = 1\n")
    _certtool("--generate-crl", "--load-ca-privkey", ca.key, "--load-ca-certificate", ca.cert,
              "--load-certificate", revoked, "--template", tpl, "--outfile", out)
    tpl.unlink()
    revoked.unlink()
    return out


# ---- the same with the openssl command ---------------------------------------------------------

# The extensions each kind of certificate gets (openssl's x509v3_config syntax), as certtool's
# templates above give them: a CA that signs certificates and CRLs, a TLS server for localhost
# and 127.0.0.1, a TLS client.
_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:{hostname},IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

# How openssl writes a private key, by the command a user is likely to have typed:
# "ec": ``openssl ecparam -genkey`` (an EC PARAMETERS block, then a SEC1 EC PRIVATE KEY);
# "rsa": ``openssl genpkey`` (PKCS#8 PRIVATE KEY); "rsa-pkcs1": ``openssl genrsa
# -traditional`` (PKCS#1 RSA PRIVATE KEY).
OPENSSL_KEY_KINDS = ("ec", "rsa", "rsa-pkcs1")


def _openssl_key(path: Path, kind: str) -> None:
    if kind == "ec":
        _run(OPENSSL, "ecparam", "-name", "prime256v1", "-genkey", "-out", path)
    elif kind == "rsa":
        _run(OPENSSL, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", path)
    elif kind == "rsa-pkcs1":
        _run(OPENSSL, "genrsa", "-traditional", "-out", path, "2048")
    else:
        raise ValueError(f"openssl key kind {kind!r} (one of {OPENSSL_KEY_KINDS})")
    path.chmod(0o600)


@dataclass
class OpensslCa:
    dir: Path
    cert: Path
    key: Path
    config: Path

    def issue(self, out: Path, name: str, subject: str, extensions: str,
              key_kind: str) -> tuple[Path, Path]:
        """``out/NAME-cert.pem`` and ``out/NAME-key.pem``: a certificate with ``subject``
        (openssl's ``/C=../O=../CN=..`` form) and the config's ``extensions`` section, made
        from a certificate request as a CA would."""
        key = out / f"{name}-key.pem"
        cert = out / f"{name}-cert.pem"
        csr = out / f"{name}.csr"
        _openssl_key(key, key_kind)
        _run(OPENSSL, "req", "-new", "-key", key, "-subj", subject, "-config", self.config,
             "-out", csr)
        _run(OPENSSL, "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
             "-set_serial", f"0x{os.urandom(8).hex()}", "-days", "2", "-extfile", self.config,
             "-extensions", extensions, "-out", cert)
        csr.unlink()
        return cert, key


def openssl_ca(dir: Path, cn: str = "cowd openssl CA", hostname: str = "localhost",
               key_kind: str = "ec") -> OpensslCa:
    """A self-signed CA made by the openssl command (its config beside it)."""
    dir.mkdir(parents=True, exist_ok=True)
    config = dir / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG.format(hostname=hostname))
    key = dir / "ca-key.pem"
    cert = dir / "ca-cert.pem"
    _openssl_key(key, key_kind)
    _run(OPENSSL, "req", "-x509", "-new", "-key", key, "-subj", f"/CN={cn}", "-days", "2",
         "-config", config, "-extensions", "ca", "-out", cert)
    return OpensslCa(dir, cert, key, config)


def openssl_server_dir(ca: OpensslCa, dir: Path, key_kind: str = "ec",
                       hostname: str = "localhost") -> Path:
    """A server credentials directory (the layout of :func:`server_dir`) made by openssl."""
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert, dir / "ca-cert.pem")
    ca.issue(dir, "server", f"/O=cowd tests/CN={hostname}", "server", key_kind)
    return dir


def openssl_client_dir(ca: OpensslCa, dir: Path, cn: str, organization: str = "Example",
                       country: str = "GB", key_kind: str = "ec") -> Path:
    """A client credentials directory (the layout of :func:`client_dir`) made by openssl,
    with the subject C=<country>, O=<organization>, CN=<cn>."""
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert, dir / "ca-cert.pem")
    ca.issue(dir, "client", f"/C={country}/O={organization}/CN={cn}", "client", key_kind)
    return dir


def psk_file(path: Path, *usernames: str) -> Path:
    """A psktool keys file with a fresh random key for each username."""
    for name in usernames:
        p = subprocess.run([PSKTOOL, "-u", name, "-p", str(path)], capture_output=True,
                           text=True, timeout=30, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"psktool -u {name}: {p.stderr.strip()}")
    path.chmod(0o600)
    return path
