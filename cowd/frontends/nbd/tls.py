"""Layer: cowd frontends — TLS for the NBD server: the configuration (:class:`TlsConfig`),
the credentials it names (an X.509 directory or a PSK keys file), the server side of the
handshake and a trio stream of TLS records (:class:`TlsStream`), over GnuTLS.

Invariants
----------
- :class:`TlsConfig` is the whole TLS configuration: immutable, file paths and names only,
  picklable, so a worker process can be handed it and load the credentials itself
  (:meth:`TlsConfig.load`).  No module state: every GnuTLS object belongs to one
  :class:`ServerCredentials` (one per process) or one :class:`TlsStream` (one per
  connection), and is freed by its ``close``/``aclose``.
- An identity is what the peer proved, nothing it merely claimed: the subject DN of a client
  certificate that GnuTLS verified against ``ca-cert.pem`` during the handshake (only with
  ``--tls-verify-peer``), or the PSK username whose key completed the handshake.  Sessions are
  never resumed (``GNUTLS_NO_TICKETS``), so every connection proves its identity afresh.
- TLS 1.2 and 1.3 only (the NBD spec: TLS 1.2 MUST, older SHOULD NOT by default).
- Every error a peer or a file can cause is one line: :class:`TlsError` (a handshake or
  record that failed: drop that connection) or :class:`~cowd.errors.CowdError` /
  :class:`~cowd.errors.UsageError` (credentials that cannot be loaded, flags that do not
  fit: exit 1 or 2).

Why GnuTLS, through ctypes
--------------------------
Python 3.11's ``ssl`` has no TLS-PSK (it arrived in 3.13).  pyOpenSSL (26.x) has no PSK
callbacks either; reaching them means calling cryptography's private cffi bindings with
pyOpenSSL's private handles (``Context._context``).  sslpsk3 copies CPython's private
``PySSLSocket`` struct layout in a C extension.  GnuTLS is the library qemu-nbd, nbdkit and
libnbd themselves use, and it is already on every machine that has qemu-utils: loading it
with ctypes adds no Python dependency, and cowd then reads a psktool keys file with the very
function nbdkit and qemu use (``gnutls_psk_set_server_credentials_file``), verifies client
certificates with the same code, and formats a certificate's DN with the call qemu's
``authz`` objects compare (``gnutls_x509_crt_get_dn``), so an authorization list written for
qemu-nbd means the same here.  One library serves both credential kinds.  The binding is
small (opaque pointers, ~30 functions of the stable libgnutls.so.30 ABI).

GnuTLS does the socket I/O itself on the connection's non-blocking fd
(``gnutls_transport_set_int``): no Python callback or extra copy per record; on
``GNUTLS_E_AGAIN`` the stream waits for the fd with trio.  ctypes releases the GIL during
each call, so the expensive steps of a handshake (a certificate signature: milliseconds)
run in a worker thread, at most :data:`TLS_HANDSHAKE_THREADS` at once: a flood of
handshakes takes at most that many cores and never stalls the event loop that serves the
connections already in transmission.  The time a handshake may take is the connection's
negotiation deadline (``HANDSHAKE_TIMEOUT_S`` in server.py), and a connection still
handshaking is among the negotiating ones a new connection may evict when all slots are
taken.

What it costs (tools/bench_tls.py, paired against qemu-nbd with the same credentials;
2026-12-06, 2 vCPUs with AES instructions, the README's "TLS: what it costs" has the table):
with X.509, 1 MiB reads run at 0.42x plaintext and writes at 0.81x, 4 KiB random reads at
0.82x, level with or ahead of qemu-nbd under TLS (1.12-1.26x); the server spends about as
much CPU per GiB as qemu-nbd does (the cipher runs in GnuTLS's C code; the binding adds a
ctypes call per 16 KiB record).  A whole TLS connection (nbdinfo) takes 10-20 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import trio

from ...errors import CowdError, UsageError
from . import wire as W

log = logging.getLogger("cowd.nbd.tls")

# The credentials directory's files, in the layout qemu (tls-creds-x509) and nbdkit
# (--tls-certificates) read.
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"  # optional: revoked client certificates
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

# Handshakes whose crypto runs at once, each in a worker thread (one core of the machine's
# two: the event loop keeps the other).
TLS_HANDSHAKE_THREADS = 1
# Largest identity we accept: a certificate's DN or a PSK username, as the NBD spec bounds
# strings.
MAX_IDENTITY_BYTES = W.NBD_MAX_STRING
# A PSK keys file larger than this is not a keys file (psktool writes ~80 bytes per user).
MAX_PSK_FILE_BYTES = 1 << 20
# Plaintext bytes handed to GnuTLS per record call when sending (GnuTLS cuts records at
# 16 KiB; corking a batch of them makes one sendmsg of up to this many bytes).
SEND_CORK_BYTES = 256 << 10
# How long aclose() tries to send the close_notify alert before it closes the socket.
BYE_TIMEOUT_S = 1.0

# TLS 1.2 and 1.3 only; PSK adds the PSK key exchanges (ECDHE-PSK first), as qemu and nbdkit
# do for their PSK credentials.  A TLS 1.3 external PSK is bound to SHA-256, which rules out
# AES-256-GCM (SHA-384); left to the client's order the session then gets ChaCha20, 3x slower
# than AES-128-GCM on a CPU with AES instructions (measured: 280 against 800 MB/s through
# nbdcopy), so for PSK the server's order wins and puts AES-128-GCM first.
PRIORITY_X509 = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
PRIORITY_PSK = (PRIORITY_X509 + ":+ECDHE-PSK:+DHE-PSK:+PSK:%SERVER_PRECEDENCE:-CIPHER-ALL"
                ":+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305:+AES-128-CCM:+AES-256-CCM")


class TlsError(CowdError):
    """A TLS handshake or record failed (the peer's doing, or its credentials): drop the
    connection.  The message names the GnuTLS error."""


# --------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """The NBD server's TLS configuration, as the command line gave it (paths, not keys).

    ``policy`` is what the codec enforces (mode and authorization list); the credentials
    are ``certificates_dir`` (qemu's and nbdkit's layout: ``ca-cert.pem``,
    ``server-cert.pem``, ``server-key.pem``, optional ``ca-crl.pem``) or ``psk_file`` (a
    psktool keys file: ``username:hexkey`` lines); ``verify_peer`` asks X.509 clients for a
    certificate signed by ``ca-cert.pem`` (their DN is then the identity the authorization
    list names).
    """

    policy: W.TlsPolicy = field(default_factory=W.TlsPolicy)
    certificates_dir: str | None = None
    psk_file: str | None = None
    verify_peer: bool = False

    def __post_init__(self) -> None:
        mode = self.policy.mode
        if mode == W.TLS_OFF:
            if self.certificates_dir or self.psk_file or self.verify_peer:
                raise UsageError("--tls-certificates, --tls-psk and --tls-verify-peer need "
                                 "--tls=on or --tls=require")
            return
        if bool(self.certificates_dir) == bool(self.psk_file):
            raise UsageError(f"--tls={mode}: give exactly one of --tls-certificates DIR "
                             "and --tls-psk FILE")
        if self.verify_peer and not self.certificates_dir:
            raise UsageError("--tls-verify-peer: only with --tls-certificates (a PSK "
                             "client is always verified by its key)")
        if self.policy.authz and self.certificates_dir and not self.verify_peer:
            raise UsageError("--tls-authz with --tls-certificates needs --tls-verify-peer "
                             "(an unverified certificate's name proves nothing)")

    @property
    def enabled(self) -> bool:
        return self.policy.offered

    def load(self) -> ServerCredentials:
        """Load the credentials (in the process that will serve): one-line errors naming
        the file.  Only when TLS is on."""
        if not self.enabled:
            raise UsageError("TLS is off: no credentials to load")
        return ServerCredentials(self)


# --------------------------------------------------------------------------------------------
# The GnuTLS binding (libgnutls.so.30; names and numbers as in <gnutls/gnutls.h>)
# --------------------------------------------------------------------------------------------

GNUTLS_SERVER = 1
GNUTLS_NONBLOCK = 1 << 3
GNUTLS_NO_SIGNAL = 1 << 6
GNUTLS_NO_TICKETS = 1 << 10
GNUTLS_CRD_CERTIFICATE = 1
GNUTLS_CRD_PSK = 4
GNUTLS_CERT_IGNORE = 0
GNUTLS_CERT_REQUIRE = 2
GNUTLS_SHUT_WR = 1
GNUTLS_X509_FMT_DER = 0
GNUTLS_X509_FMT_PEM = 1
GNUTLS_RECORD_WAIT = 1
GNUTLS_E_AGAIN = -28
GNUTLS_E_INTERRUPTED = -52
GNUTLS_E_SHORT_MEMORY_BUFFER = -51
GNUTLS_E_PREMATURE_TERMINATION = -110
GNUTLS_E_FATAL_ALERT_RECEIVED = -12
GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR = -348
# Why a client certificate failed verification (gnutls_certificate_status_t bits), in the
# words the server's log gives them.
GNUTLS_CERT_STATUS = (
    (1 << 5, "revoked (ca-crl.pem)"),
    (1 << 6, "not signed by ca-cert.pem"),
    (1 << 7, "signed by a certificate that is not a CA"),
    (1 << 8, "signed with an insecure algorithm"),
    (1 << 9, "not yet valid"),
    (1 << 10, "expired"),
    (1 << 11, "its signature does not verify"),
    (1 << 18, "not for TLS clients (key purpose)"),
)
GNUTLS_E_WARNING_ALERT_RECEIVED = -16


class _Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(ctypes.c_ubyte)), ("size", ctypes.c_uint)]


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_S = ctypes.c_char_p
_I = ctypes.c_int
_U = ctypes.c_uint
_SZ = ctypes.c_size_t

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "gnutls_check_version": (_S, [_S]),
    "gnutls_strerror": (_S, [_I]),
    "gnutls_error_is_fatal": (_I, [_I]),
    "gnutls_init": (_I, [_PP, _U]),
    "gnutls_deinit": (None, [_P]),
    "gnutls_priority_init": (_I, [_PP, _S, ctypes.POINTER(_S)]),
    "gnutls_priority_deinit": (None, [_P]),
    "gnutls_priority_set": (_I, [_P, _P]),
    "gnutls_credentials_set": (_I, [_P, _I, _P]),
    "gnutls_certificate_allocate_credentials": (_I, [_PP]),
    "gnutls_certificate_free_credentials": (None, [_P]),
    "gnutls_certificate_set_x509_trust_file": (_I, [_P, _S, _I]),
    "gnutls_certificate_set_x509_crl_file": (_I, [_P, _S, _I]),
    "gnutls_certificate_set_x509_key_file": (_I, [_P, _S, _S, _I]),
    "gnutls_certificate_server_set_request": (None, [_P, _I]),
    "gnutls_session_set_verify_cert": (None, [_P, _S, _U]),
    "gnutls_session_get_verify_cert_status": (_U, [_P]),
    "gnutls_certificate_get_peers": (ctypes.POINTER(_Datum), [_P, ctypes.POINTER(_U)]),
    "gnutls_x509_crt_init": (_I, [_PP]),
    "gnutls_x509_crt_deinit": (None, [_P]),
    "gnutls_x509_crt_import": (_I, [_P, ctypes.POINTER(_Datum), _I]),
    "gnutls_x509_crt_get_dn": (_I, [_P, _P, ctypes.POINTER(_SZ)]),
    "gnutls_psk_allocate_server_credentials": (_I, [_PP]),
    "gnutls_psk_free_server_credentials": (None, [_P]),
    "gnutls_psk_set_server_credentials_file": (_I, [_P, _S]),
    "gnutls_psk_server_get_username": (_S, [_P]),
    "gnutls_transport_set_int2": (None, [_P, _I, _I]),
    "gnutls_handshake": (_I, [_P]),
    "gnutls_record_get_direction": (_I, [_P]),
    "gnutls_record_recv": (ctypes.c_ssize_t, [_P, _P, _SZ]),
    "gnutls_record_send": (ctypes.c_ssize_t, [_P, _P, _SZ]),
    "gnutls_record_cork": (None, [_P]),
    "gnutls_record_uncork": (_I, [_P, _U]),
    "gnutls_record_check_pending": (_SZ, [_P]),
    "gnutls_bye": (_I, [_P, _I]),
    "gnutls_alert_get": (_I, [_P]),
    "gnutls_alert_get_name": (_S, [_I]),
    "gnutls_protocol_get_version": (_I, [_P]),
    "gnutls_protocol_get_name": (_S, [_I]),
    "gnutls_cipher_get": (_I, [_P]),
    "gnutls_cipher_get_name": (_S, [_I]),
}
# The oldest GnuTLS with every call above (gnutls_session_set_verify_cert: 3.4.6).
GNUTLS_MIN_VERSION = b"3.4.6"


class _GnuTLS:
    """The loaded library with typed functions (attribute ``gnutls_X`` is ``X``)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("gnutls") or "libgnutls.so.30"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise CowdError(f"TLS: cannot load GnuTLS ({name}): {e} "
                            "(install libgnutls30)") from None
        for fn, (restype, argtypes) in _SIGNATURES.items():
            f = getattr(lib, fn)
            f.restype = restype
            f.argtypes = argtypes
            setattr(self, fn.removeprefix("gnutls_"), f)
        if not lib.gnutls_check_version(GNUTLS_MIN_VERSION):
            found = lib.gnutls_check_version(None)
            raise CowdError(f"TLS: GnuTLS {found.decode()} is older than "
                            f"{GNUTLS_MIN_VERSION.decode()}")

    def __getattr__(self, name: str) -> Any:
        # Only for the type checker: every function was set in __init__.
        raise AttributeError(name)

    def error(self, rc: int) -> str:
        return f"{self.strerror(rc).decode(errors='replace')} (gnutls={rc})"


def _gnutls() -> _GnuTLS:
    # Loaded per credentials object (cheap: the dynamic loader keeps one copy), so that no
    # module state exists.
    return _GnuTLS()


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------


def _readable_file(path: str) -> None:
    """One line naming ``path`` if it is not a readable regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise CowdError(f"{path}: cannot read ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CowdError(f"{path}: not a regular file")
    finally:
        os.close(fd)


def read_psk_usernames(path: str) -> list[str]:
    """The usernames of a psktool keys file (``username:hexkey`` per line), checked line by
    line so that a broken file is one line naming the line, not a failing handshake."""
    _readable_file(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_PSK_FILE_BYTES + 1)
    if len(raw) > MAX_PSK_FILE_BYTES:
        raise CowdError(f"{path}: larger than {MAX_PSK_FILE_BYTES} bytes: not a PSK keys file")
    names: list[str] = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        name, colon, key = line.partition(b":")
        try:
            text = name.decode("utf-8")
            bytes.fromhex(key.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            text = ""
        if not colon or not text or not key or len(key) % 2 or len(name) > MAX_IDENTITY_BYTES:
            raise CowdError(f"{path}: not a psktool line (username:hexkey) (line={lineno})")
        names.append(text)
    if not names:
        raise CowdError(f"{path}: no keys in this PSK file (make one with psktool -u NAME "
                        f"-p {path})")
    return names


class ServerCredentials:
    """GnuTLS server credentials and priorities loaded from a :class:`TlsConfig`, shared by
    the connections of one process.  ``close`` frees them (after the last connection)."""

    def __init__(self, config: TlsConfig):
        self.config = config
        self.lib = lib = _gnutls()
        self.psk = config.psk_file is not None
        self.usernames: list[str] = []
        self._cred = ctypes.c_void_p()
        self._prio = ctypes.c_void_p()
        self.handshake_limiter = trio.CapacityLimiter(TLS_HANDSHAKE_THREADS)
        try:
            if config.psk_file is not None:
                self.usernames = read_psk_usernames(config.psk_file)
                self._check(lib.psk_allocate_server_credentials(
                    ctypes.byref(self._cred)), "allocating PSK credentials")
                self._check(lib.psk_set_server_credentials_file(
                    self._cred, os.fsencode(config.psk_file)), config.psk_file)
                priority = PRIORITY_PSK
            else:
                self._load_x509(config)
                priority = PRIORITY_X509
            err = ctypes.c_char_p()
            self._check(lib.priority_init(ctypes.byref(self._prio),
                                          priority.encode(), ctypes.byref(err)),
                        f"priority {priority!r}")
        except BaseException:
            self.close()
            raise
        for export, identity in sorted(config.policy.authz):
            if self.psk and identity not in self.usernames:
                log.warning("--tls-authz %s %s: no such user in %s", export, identity,
                            config.psk_file)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise CowdError(f"{what}: {self.lib.error(rc)}")
        return rc

    def _load_x509(self, config: TlsConfig) -> None:
        lib = self.lib
        assert config.certificates_dir is not None
        d = config.certificates_dir

        def path(name: str) -> str:
            return os.path.join(d, name)

        if not os.path.isdir(d):
            raise CowdError(f"{d}: not a credentials directory (expected {CA_CERT}, "
                            f"{SERVER_CERT}, {SERVER_KEY})")
        for name in (SERVER_CERT, SERVER_KEY) + ((CA_CERT,) if config.verify_peer else ()):
            _readable_file(path(name))
        self._check(lib.certificate_allocate_credentials(
            ctypes.byref(self._cred)), "allocating certificate credentials")
        if os.path.exists(path(CA_CERT)):
            _readable_file(path(CA_CERT))
            n = self._check(lib.certificate_set_x509_trust_file(
                self._cred, os.fsencode(path(CA_CERT)), GNUTLS_X509_FMT_PEM), path(CA_CERT))
            if n == 0:
                raise CowdError(f"{path(CA_CERT)}: no certificate in this file")
        if os.path.exists(path(CA_CRL)):
            _readable_file(path(CA_CRL))
            self._check(lib.certificate_set_x509_crl_file(
                self._cred, os.fsencode(path(CA_CRL)), GNUTLS_X509_FMT_PEM), path(CA_CRL))
        self._check(lib.certificate_set_x509_key_file(
            self._cred, os.fsencode(path(SERVER_CERT)), os.fsencode(path(SERVER_KEY)),
            GNUTLS_X509_FMT_PEM), f"{path(SERVER_CERT)} with {path(SERVER_KEY)}")

    def close(self) -> None:
        lib = self.lib
        if self._prio:
            lib.priority_deinit(self._prio)
            self._prio = ctypes.c_void_p()
        if self._cred:
            if self.psk:
                lib.psk_free_server_credentials(self._cred)
            else:
                lib.certificate_free_credentials(self._cred)
            self._cred = ctypes.c_void_p()

    def new_session(self, fd: int) -> ctypes.c_void_p:
        """A server session on the (non-blocking) socket ``fd``; the caller deinits it."""
        lib = self.lib
        session = ctypes.c_void_p()
        rc = lib.init(ctypes.byref(session),
                      GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL | GNUTLS_NO_TICKETS)
        if rc < 0:
            raise TlsError(f"TLS: cannot start a session: {lib.error(rc)}")
        try:
            self._check(lib.priority_set(session, self._prio), "priority")
            kind = GNUTLS_CRD_PSK if self.psk else GNUTLS_CRD_CERTIFICATE
            self._check(lib.credentials_set(session, kind, self._cred), "credentials")
            if not self.psk and self.config.verify_peer:
                # The handshake fails unless the client sends a certificate that verifies
                # against ca-cert.pem (and ca-crl.pem); no host name to check on a client.
                lib.certificate_server_set_request(session, GNUTLS_CERT_REQUIRE)
                lib.session_set_verify_cert(session, None, 0)
            lib.transport_set_int2(session, fd, fd)
        except BaseException:
            lib.deinit(session)
            raise
        return session


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


def _buffer_address(data: bytes | bytearray | memoryview) -> tuple[int, Any]:
    """The address of ``data``'s bytes and an object that keeps them alive, without a copy
    where the buffer allows one (a read-only memoryview of something else is copied)."""
    if isinstance(data, bytes):
        keep = ctypes.c_char_p(data)  # points into the bytes object itself
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, (keep, data)
    if isinstance(data, memoryview) and data.readonly:
        copy = bytes(data)
        keep = ctypes.c_char_p(copy)
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, (keep, copy)
    arr = (ctypes.c_char * len(data)).from_buffer(data)
    return ctypes.addressof(arr), arr


class TlsStream(trio.abc.Stream):
    """TLS records over a connected trio socket stream, GnuTLS doing the socket I/O.

    One task may receive while another sends (GnuTLS keeps the two directions apart); two
    concurrent senders or receivers are the caller's bug (the NBD server sends under its
    send lock).  ``identity`` is what the handshake verified (see :class:`TlsConfig`).
    """

    def __init__(self, transport: trio.SocketStream, creds: ServerCredentials,
                 session: ctypes.c_void_p):
        self.transport = transport
        self.socket = transport.socket
        self._creds = creds
        self._lib = creds.lib
        self._session = session
        self._recv_buf = bytearray(W.RECEIVE_CHUNK_BYTES)
        self._recv_view = (ctypes.c_char * len(self._recv_buf)).from_buffer(self._recv_buf)
        self._recv_addr = ctypes.addressof(self._recv_view)
        self._closed = False
        self.identity: str | None = None
        self.description = ""

    # ---- the handshake ------------------------------------------------------------------------

    @classmethod
    async def server_handshake(cls, transport: trio.SocketStream,
                               creds: ServerCredentials) -> TlsStream:
        """Run the server side of the handshake on ``transport`` (after the NBD STARTTLS
        ACK); TlsError if it fails.  Bounded by the caller's cancel scope."""
        session = creds.new_session(transport.socket.fileno())
        stream = cls(transport, creds, session)
        try:
            await stream._handshake()
            stream.identity = stream._peer_identity()
        except BaseException:
            stream._free()
            raise
        lib = stream._lib
        stream.description = "{}/{}".format(
            lib.protocol_get_name(lib.protocol_get_version(session)).decode(),
            (lib.cipher_get_name(lib.cipher_get(session)) or b"?").decode())
        return stream

    async def _handshake(self) -> None:
        lib, session = self._lib, self._session
        while True:
            # The crypto of a step (a signature, a key exchange) runs in a worker thread: ctypes
            # drops the GIL, so the event loop goes on serving other connections.
            rc = await trio.to_thread.run_sync(lib.handshake, session,
                                               limiter=self._creds.handshake_limiter)
            if rc == 0:
                return
            if rc in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                if lib.record_get_direction(session) == 0:
                    await trio.lowlevel.wait_readable(self.socket)
                else:
                    await trio.lowlevel.wait_writable(self.socket)
                continue
            if rc == GNUTLS_E_WARNING_ALERT_RECEIVED or not lib.error_is_fatal(rc):
                continue
            raise TlsError(f"TLS handshake failed: {self._describe(rc)}")

    def _describe(self, rc: int) -> str:
        text = self._lib.error(rc)
        if rc == GNUTLS_E_FATAL_ALERT_RECEIVED:
            alert = self._lib.alert_get_name(self._lib.alert_get(self._session))
            if alert:
                text += f": the client sent '{alert.decode(errors='replace')}'"
        elif rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR:
            status = self._lib.session_get_verify_cert_status(self._session)
            why = [words for bit, words in GNUTLS_CERT_STATUS if status & bit]
            text += f": the client's certificate is {', '.join(why) or 'not valid'}"
            text += f" (status=0x{status:x})"
        return text

    def _peer_identity(self) -> str | None:
        lib, session = self._lib, self._session
        if self._creds.psk:
            name = lib.psk_server_get_username(session)
            if not name:
                raise TlsError("TLS: the PSK client sent no username")
            return self._identity_text(name)
        if not self._creds.config.verify_peer:
            return None
        count = ctypes.c_uint(0)
        certs = lib.certificate_get_peers(session, ctypes.byref(count))
        if not certs or count.value == 0:
            raise TlsError("TLS: the client sent no certificate")
        crt = ctypes.c_void_p()
        if lib.x509_crt_init(ctypes.byref(crt)) < 0:
            raise TlsError("TLS: cannot read the client's certificate")
        try:
            rc = lib.x509_crt_import(crt, certs, GNUTLS_X509_FMT_DER)
            if rc < 0:
                raise TlsError(f"TLS: the client's certificate: {lib.error(rc)}")
            buf = ctypes.create_string_buffer(MAX_IDENTITY_BYTES + 1)
            size = ctypes.c_size_t(len(buf))
            rc = lib.x509_crt_get_dn(crt, buf, ctypes.byref(size))
            if rc == GNUTLS_E_SHORT_MEMORY_BUFFER:
                raise TlsError(f"TLS: the client certificate's DN is longer than "
                               f"{MAX_IDENTITY_BYTES} bytes")
            if rc < 0:
                raise TlsError(f"TLS: the client certificate's DN: {lib.error(rc)}")
            return self._identity_text(buf.value)
        finally:
            lib.x509_crt_deinit(crt)

    @staticmethod
    def _identity_text(raw: bytes) -> str:
        if len(raw) > MAX_IDENTITY_BYTES:
            raise TlsError(f"TLS: the client's identity is longer than {MAX_IDENTITY_BYTES} "
                           "bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TlsError("TLS: the client's identity is not UTF-8") from None

    # ---- records ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of plaintext (everything GnuTLS can decrypt without waiting,
        once at least one byte is there); b"" at the peer's close_notify or EOF."""
        self._check_open()
        want = min(max_bytes or len(self._recv_buf), len(self._recv_buf))
        lib, session = self._lib, self._session
        got = 0
        while got < want:
            rc = lib.record_recv(session, self._recv_addr + got, want - got)
            if rc > 0:
                got += rc
                continue
            if rc == 0 or rc == GNUTLS_E_PREMATURE_TERMINATION:
                break  # close_notify, or the socket's EOF without one: both end the stream
            if rc == GNUTLS_E_INTERRUPTED:
                continue
            if rc == GNUTLS_E_AGAIN:
                if got:
                    break
                await trio.lowlevel.wait_readable(self.socket)
                self._check_open()
                continue
            if rc == GNUTLS_E_WARNING_ALERT_RECEIVED or not lib.error_is_fatal(rc):
                continue
            raise trio.BrokenResourceError(f"TLS receive failed: {self._describe(rc)}")
        return bytes(memoryview(self._recv_buf)[:got])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``: records of a batch are corked into one send."""
        self._check_open()
        total = len(data)
        if not total:
            return
        lib, session = self._lib, self._session
        base, _keep = _buffer_address(data)
        sent = 0
        while sent < total:
            batch_end = min(total, sent + SEND_CORK_BYTES)
            lib.record_cork(session)
            while sent < batch_end:
                rc = lib.record_send(session, base + sent, batch_end - sent)
                if rc < 0:
                    if rc == GNUTLS_E_INTERRUPTED:
                        continue
                    raise trio.BrokenResourceError(f"TLS send failed: {self._describe(rc)}")
                sent += rc
            while True:
                rc = lib.record_uncork(session, 0)
                if rc >= 0:
                    break
                if rc in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                    await trio.lowlevel.wait_writable(self.socket)
                    self._check_open()
                    continue
                raise trio.BrokenResourceError(f"TLS send failed: {self._describe(rc)}")

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    # ---- closing ------------------------------------------------------------------------------

    def _free(self) -> None:
        if self._session:
            self._lib.deinit(self._session)
            self._session = ctypes.c_void_p()

    async def aclose(self) -> None:
        """Send close_notify (best effort, bounded by BYE_TIMEOUT_S), free the session and
        close the socket.  Tasks waiting on the socket get ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        try:
            with trio.move_on_after(BYE_TIMEOUT_S):
                while self._session:
                    rc = self._lib.bye(self._session, GNUTLS_SHUT_WR)
                    if rc not in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED):
                        break
                    await trio.lowlevel.wait_writable(self.socket)
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            # Wake anyone waiting on the fd before it is closed, then free the session: no
            # GnuTLS call can follow (every entry point checks _closed after its waits).
            trio.lowlevel.notify_closing(self.socket)
            self._free()
            await trio.aclose_forcefully(self.transport)


__all__ = [
    "CA_CERT",
    "SERVER_CERT",
    "SERVER_KEY",
    "ServerCredentials",
    "TlsConfig",
    "TlsError",
    "TlsStream",
    "read_psk_usernames",
]
