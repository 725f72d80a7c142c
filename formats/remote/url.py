"""Layer: formats remote, bottom.  The backing names that point at another machine, parsed
and checked (no I/O).

A backing name is remote when it is one of qemu's URL forms for the protocols cowd speaks:

- ``nbd://HOST[:PORT]/EXPORT`` and ``nbds://...`` (TLS required), port 10809 by default;
- ``nbd+unix:///EXPORT?socket=PATH`` and ``nbds+unix://...`` (a local server's socket);
- ``http://HOST[:PORT]/PATH`` and ``https://...`` (range requests).

Anything else with a protocol prefix (``json:``, ``ftp:``, ``nbd:host:port`` in qemu's old
syntax, ``ssh:``) is not a remote name here and stays refused by the opener.  What a name may
carry is checked strictly, because whoever wrote the image chose it: no user or password
(credentials never live in an image: they are the user's configuration), no query but
``socket`` for the unix forms (libnbd would otherwise read ``tls-psk-file`` or run
``socket-activation`` commands the image names), no fragment, bounded lengths.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

# Longest remote name accepted (qemu's own limit for a backing file name is 1023 bytes).
MAX_URL_BYTES = 1023

NBD_DEFAULT_PORT = 10809

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
HTTP_SCHEMES = ("http", "https")
SCHEMES = NBD_SCHEMES + HTTP_SCHEMES


class BadRemoteName(ValueError):
    """A name that looks remote but that cowd will not connect to; the message says why."""


@dataclass(frozen=True, slots=True)
class RemoteName:
    """A parsed remote backing name.  ``url`` is the name as recorded (what qemu opens and
    what is shown); ``key`` identifies the remote base for its cache (scheme, where, what)."""

    url: str
    scheme: str
    host: str  # "" for the unix forms
    port: int  # 0 for the unix forms
    path: str  # the NBD export name, or the HTTP path (with its query)
    socket: str = ""  # nbd+unix: the server's socket

    @property
    def protocol(self) -> str:
        return "nbd" if self.scheme in NBD_SCHEMES else "http"

    @property
    def tls(self) -> bool:
        return self.scheme in ("nbds", "nbds+unix", "https")

    @property
    def where(self) -> str:
        """What an allow-list names: ``HOST`` or ``HOST:PORT`` (``unix:PATH`` for a socket)."""
        if self.socket:
            return f"unix:{self.socket}"
        return f"{self.host}:{self.port}"

    @property
    def key(self) -> str:
        return f"{self.scheme}|{self.where}|{self.path}"


def looks_remote(name: str) -> bool:
    """Is ``name`` one of the URL forms above (checked or not)?"""
    head = name.split(":", 1)[0].lower() if ":" in name else ""
    return head in SCHEMES and name[len(head):].startswith("://")


def parse(name: str) -> RemoteName:
    """Parse and check a remote name; :class:`BadRemoteName` says what is wrong with it."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_URL_BYTES:
        raise BadRemoteName(f"longer than {MAX_URL_BYTES} bytes")
    if any(ord(c) < 0x21 or ord(c) == 0x7f for c in name):
        raise BadRemoteName("contains spaces or control characters")
    if not looks_remote(name):
        raise BadRemoteName("not an nbd://, nbd+unix://, http:// or https:// URL")
    u = urllib.parse.urlsplit(name)
    scheme = u.scheme.lower()
    if u.username is not None or u.password is not None:
        raise BadRemoteName("carries credentials (give them to cowd, never in an image)")
    if u.fragment:
        raise BadRemoteName("has a fragment")
    try:
        port = u.port
    except ValueError:
        raise BadRemoteName("has a bad port") from None
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True, strict_parsing=False) \
        if u.query else {}
    if scheme in ("nbd+unix", "nbds+unix"):
        if u.netloc:
            raise BadRemoteName("a unix socket URL names no host (nbd+unix:///EXPORT?socket=)")
        if set(query) != {"socket"} or len(query["socket"]) != 1 or not query["socket"][0]:
            raise BadRemoteName("needs exactly one query parameter, socket=PATH")
        sock = query["socket"][0]
        if not sock.startswith("/"):
            raise BadRemoteName("socket= must be an absolute path")
        return RemoteName(name, scheme, "", 0, _export(u.path), socket=sock)
    host = (u.hostname or "").lower()
    if not host:
        raise BadRemoteName("names no host")
    if scheme in NBD_SCHEMES:
        if query:
            raise BadRemoteName("an nbd:// URL takes no query parameters")
        return RemoteName(name, scheme, host, port or NBD_DEFAULT_PORT, _export(u.path))
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return RemoteName(name, scheme, host, port or (443 if scheme == "https" else 80), path)


def _export(path: str) -> str:
    """The export name of an NBD URL: the path without its leading slash, unquoted."""
    return urllib.parse.unquote(path[1:] if path.startswith("/") else path)


def allowed(name: RemoteName, hosts: frozenset[str] | None) -> bool:
    """Does an allow-list let ``name`` be reached?  ``None`` allows every host; an entry is
    ``HOST`` (any port), ``HOST:PORT``, or ``unix:PATH`` for a socket."""
    if hosts is None:
        return True
    if name.socket:
        return f"unix:{name.socket}" in hosts
    return name.host in hosts or name.where in hosts


__all__ = ["MAX_URL_BYTES", "SCHEMES", "BadRemoteName", "RemoteName", "allowed",
           "looks_remote", "parse"]
