"""Layer: formats remote, protocol.  Reading a file over HTTP(S) with range requests
(urllib3: connection pools, timeouts, certificate checks against the system's or the user's
CA file).

The remote file's *validator* is what says it is still the same file: its size, and its
``ETag`` (a strong one) or else its ``Last-Modified``.  Every range request carries it back
(``If-Match`` / ``If-Unmodified-Since``), so a file replaced on the server mid-session is
answered 412 and refused (:class:`Changed`), never mixed with the bytes already cached.  A
server that ignores ranges (200 with the whole file) is refused too: cowd never downloads a
whole base to serve one cluster.
"""

from __future__ import annotations

import errno as errno_mod
import re
import time
from dataclasses import dataclass

import urllib3

from .url import RemoteName

# Longest range asked in one request.
MAX_HTTP_READ_BYTES = 8 << 20

# Longest header value kept (an ETag or Last-Modified a server sends).
MAX_VALIDATOR_BYTES = 256

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HttpError(OSError):
    """The server failed or answered what cowd cannot use."""


class Changed(HttpError):
    """The file on the server is no longer the one that was opened (412, or another size)."""


@dataclass(frozen=True, slots=True)
class HttpTls:
    """The user's settings for https: ``ca_file`` (PEM) instead of the system's CAs."""

    ca_file: str | None = None


def _pool(name: RemoteName, tls: HttpTls, timeout_s: float) -> urllib3.HTTPConnectionPool:
    timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
    if name.scheme == "https":
        return urllib3.HTTPSConnectionPool(name.host, name.port, timeout=timeout, retries=False,
                                           cert_reqs="CERT_REQUIRED", ca_certs=tls.ca_file,
                                           maxsize=8, block=False)
    return urllib3.HTTPConnectionPool(name.host, name.port, timeout=timeout, retries=False,
                                      maxsize=8, block=False)


class HttpConnection:
    """The remote file: its size and validator (from a one-byte range request), and range
    reads that keep to that version.  Thread-safe (urllib3's pool)."""

    def __init__(self, name: RemoteName, tls: HttpTls, timeout_s: float):
        self.name = name
        self._pool = _pool(name, tls, timeout_s)
        try:
            resp = self._get({"Range": "bytes=0-0"}, time.monotonic() + timeout_s)
        except BaseException:
            self._pool.close()
            raise
        if resp.status == 416:  # an empty file
            self.size = 0
        elif resp.status != 206:
            self._pool.close()
            raise HttpError(errno_mod.EOPNOTSUPP,
                            f"the server does not answer range requests (status {resp.status})")
        else:
            self.size = _total(resp.headers.get("Content-Range", ""))
        etag = resp.headers.get("ETag", "")[:MAX_VALIDATOR_BYTES]
        self.etag = etag if etag and not etag.startswith("W/") else ""
        self.last_modified = resp.headers.get("Last-Modified", "")[:MAX_VALIDATOR_BYTES]

    @property
    def validator(self) -> str:
        return f"size={self.size} etag={self.etag} last-modified={self.last_modified}"

    def _get(self, headers: dict[str, str], deadline: float) -> urllib3.BaseHTTPResponse:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HttpError(errno_mod.ETIMEDOUT, "no answer from the server in time")
        try:
            return self._pool.request("GET", self.name.path, headers=headers,
                                      timeout=urllib3.Timeout(connect=left, read=left),
                                      redirect=False, preload_content=True)
        except urllib3.exceptions.HTTPError as e:
            raise HttpError(errno_mod.EIO, f"{type(e).__name__}: {e}") from None

    def pread(self, offset: int, length: int, deadline: float) -> bytes:
        parts = []
        pos = 0
        while pos < length:
            n = min(MAX_HTTP_READ_BYTES, length - pos)
            parts.append(self._range(offset + pos, n, deadline))
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _range(self, offset: int, length: int, deadline: float) -> bytes:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.etag:
            headers["If-Match"] = self.etag
        elif self.last_modified:
            headers["If-Unmodified-Since"] = self.last_modified
        resp = self._get(headers, deadline)
        if resp.status == 412:
            raise Changed(errno_mod.ESTALE, "the file changed on the server (412)")
        if resp.status != 206:
            raise HttpError(errno_mod.EIO, f"range request answered with status {resp.status}")
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        data = resp.data
        if m is None or int(m.group(1)) != offset or len(data) != length or \
                int(m.group(2)) != offset + length - 1:
            raise HttpError(errno_mod.EIO, "the server answered another range "
                            f"(asked {offset}+{length}, got "
                            f"{resp.headers.get('Content-Range')!r}, {len(data)} bytes)")
        if m.group(3) != "*" and int(m.group(3)) != self.size:
            raise Changed(errno_mod.ESTALE, f"the file changed size on the server "
                          f"({self.size} -> {m.group(3)})")
        return data

    def close(self) -> None:
        self._pool.close()


def _total(content_range: str) -> int:
    m = _CONTENT_RANGE.match(content_range)
    if m is None or m.group(3) == "*":
        raise HttpError(errno_mod.EIO, f"no file size in the answer "
                        f"(Content-Range={content_range!r})")
    return int(m.group(3))


__all__ = ["MAX_HTTP_READ_BYTES", "Changed", "HttpConnection", "HttpError", "HttpTls"]
