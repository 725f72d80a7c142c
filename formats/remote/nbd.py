"""Layer: formats remote, protocol.  Reading an NBD export through libnbd (the NBD
community's own client library, ``libnbd.so.0``), called with ctypes.

Why libnbd through ctypes: libnbd does the whole client side of the protocol (fixed newstyle,
structured replies, STARTTLS with GnuTLS in qemu's certificate layout or with a PSK file) and
is what qemu-img, nbdcopy and nbdinfo are tested against; Debian ships it as ``libnbd0``.
Its Python binding (python3-libnbd) is built for the system Python only and is not on PyPI,
so a virtualenv cannot import it; a dozen C calls through ctypes need no build step.  Writing
the client ourselves would mean a second TLS stack on the client side.

Every call is synchronous and bounded: the connection and each read use libnbd's
asynchronous calls and ``nbd_poll`` with a timeout, so a server that stalls never holds the
caller past its deadline (the handle is then closed: a new one reconnects).  A handle is used
by one thread at a time (:class:`NbdConnection`); concurrency is several connections.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import time
from dataclasses import dataclass

from .url import RemoteName

LIBNBD_TLS_DISABLE = 0
LIBNBD_TLS_REQUIRE = 2

# Longest read asked of a server in one command (the NBD spec's default maximum block size is
# 32 MiB; most servers take at least this much).
MAX_NBD_READ_BYTES = 4 << 20

# A poll never waits longer than this in one call, so a deadline is checked often.
POLL_SLICE_MS = 200


class NbdError(OSError):
    """libnbd refused or the server failed: ``errno`` and libnbd's own message."""


class _Completion(ctypes.Structure):
    # struct nbd_completion_callback {int (*callback)(void *, int *); void *user_data;
    #                                  void (*free)(void *);}
    _fields_ = [("callback", ctypes.c_void_p), ("user_data", ctypes.c_void_p),
                ("free", ctypes.c_void_p)]


_NULL_COMPLETION = _Completion(None, None, None)


class _Lib:
    """The libnbd calls cowd makes, with their C signatures."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnbd.so.0", use_errno=True)
        h = ctypes.c_void_p
        s = ctypes.c_char_p
        i = ctypes.c_int
        sigs: dict[str, tuple[object, list[object]]] = {
            "nbd_create": (h, []),
            "nbd_close": (None, [h]),
            "nbd_get_error": (s, []),
            "nbd_get_errno": (i, []),
            "nbd_set_export_name": (i, [h, s]),
            "nbd_set_tls": (i, [h, i]),
            "nbd_set_tls_certificates": (i, [h, s]),
            "nbd_set_tls_verify_peer": (i, [h, ctypes.c_bool]),
            "nbd_set_tls_psk_file": (i, [h, s]),
            "nbd_set_tls_username": (i, [h, s]),
            "nbd_aio_connect_tcp": (i, [h, s, s]),
            "nbd_aio_connect_unix": (i, [h, s]),
            "nbd_aio_is_connecting": (i, [h]),
            "nbd_aio_is_ready": (i, [h]),
            "nbd_poll": (i, [h, i]),
            "nbd_get_size": (ctypes.c_int64, [h]),
            "nbd_aio_pread": (ctypes.c_int64, [h, ctypes.c_void_p, ctypes.c_size_t,
                                               ctypes.c_uint64, _Completion, ctypes.c_uint32]),
            "nbd_aio_command_completed": (i, [h, ctypes.c_uint64]),
            "nbd_shutdown": (i, [h, ctypes.c_uint32]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
            setattr(self, name, fn)

    def error(self, what: str) -> NbdError:
        msg = self.nbd_get_error()  # type: ignore[attr-defined]
        err = self.nbd_get_errno() or errno_mod.EIO  # type: ignore[attr-defined]
        text = msg.decode("utf-8", "replace") if msg else "libnbd failed"
        return NbdError(err, f"{what}: {text}")


_lib: _Lib | None = None


def libnbd() -> _Lib:
    """The library, loaded on first use; OSError where libnbd0 is not installed."""
    global _lib
    if _lib is None:
        try:
            _lib = _Lib()
        except OSError as e:
            raise NbdError(errno_mod.ENOSYS, f"libnbd.so.0 cannot be loaded ({e}); "
                           "install libnbd0") from None
    return _lib


@dataclass(frozen=True, slots=True)
class NbdTls:
    """The user's TLS settings for NBD (never the image's): ``certificates`` is a folder in
    qemu's layout (ca-cert.pem, client-cert.pem, client-key.pem); ``psk_file`` a psktool
    keys file with ``username``.  Either one set makes TLS required for every NBD base."""

    certificates: str | None = None
    psk_file: str | None = None
    username: str | None = None
    verify_peer: bool = True

    @property
    def configured(self) -> bool:
        return bool(self.certificates or self.psk_file)


class NbdConnection:
    """One libnbd handle connected to an export; one thread at a time."""

    def __init__(self, name: RemoteName, tls: NbdTls, timeout_s: float):
        self.lib = libnbd()
        self.name = name
        self._h: int | None = self.lib.nbd_create()  # type: ignore[attr-defined]
        if not self._h:
            raise self.lib.error("nbd_create")
        try:
            self._connect(tls, time.monotonic() + timeout_s)
            size = self.lib.nbd_get_size(self._h)  # type: ignore[attr-defined]
            if size < 0:
                raise self.lib.error("size of the export")
            self.size = int(size)
        except BaseException:
            self.close()
            raise

    def _call(self, fn: str, *args: object) -> int:
        r = int(getattr(self.lib, fn)(self._h, *args))
        if r == -1:
            raise self.lib.error(fn.removeprefix("nbd_").replace("_", " "))
        return r

    def _connect(self, tls: NbdTls, deadline: float) -> None:
        n = self.name
        self._call("nbd_set_export_name", n.path.encode())
        if n.tls or tls.configured:
            self._call("nbd_set_tls", LIBNBD_TLS_REQUIRE)
            if tls.certificates:
                self._call("nbd_set_tls_certificates", tls.certificates.encode())
            if tls.psk_file:
                self._call("nbd_set_tls_psk_file", tls.psk_file.encode())
            if tls.username:
                self._call("nbd_set_tls_username", tls.username.encode())
            self._call("nbd_set_tls_verify_peer", tls.verify_peer)
        else:
            self._call("nbd_set_tls", LIBNBD_TLS_DISABLE)
        if n.socket:
            self._call("nbd_aio_connect_unix", n.socket.encode())
        else:
            self._call("nbd_aio_connect_tcp", n.host.encode(), str(n.port).encode())
        while not self._call("nbd_aio_is_ready"):
            if not self._call("nbd_aio_is_connecting") and \
                    not self._call("nbd_aio_is_ready"):
                raise self.lib.error("connect")
            self._poll(deadline, "connect")

    def _poll(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NbdError(errno_mod.ETIMEDOUT, f"{what}: no answer from the server in time")
        self._call("nbd_poll", max(1, min(POLL_SLICE_MS, int(left * 1000))))

    def pread(self, offset: int, length: int, deadline: float) -> bytes:
        """``length`` bytes at ``offset`` of the export, or NbdError (ETIMEDOUT past
        ``deadline``); never fewer bytes."""
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(MAX_NBD_READ_BYTES, length - pos)
            buf = (ctypes.c_char * n).from_buffer(out, pos)
            cookie = self._call("nbd_aio_pread", ctypes.cast(buf, ctypes.c_void_p), n,
                                offset + pos, _NULL_COMPLETION, 0)
            while not self._call("nbd_aio_command_completed", cookie):
                self._poll(deadline, f"read at {offset + pos}")
            pos += n
        return bytes(out)

    def close(self) -> None:
        if self._h:
            self.lib.nbd_close(self._h)  # type: ignore[attr-defined]
            self._h = None


__all__ = ["MAX_NBD_READ_BYTES", "NbdConnection", "NbdError", "NbdTls", "libnbd"]
