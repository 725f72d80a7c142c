"""Layer: formats remote — bases on another machine (NBD, HTTP), read through a local cache.

- :mod:`~formats.remote.url`: which backing names are remote, parsed and checked (no I/O);
- :mod:`~formats.remote.nbd`, :mod:`~formats.remote.http`: the clients (libnbd, urllib3);
- :mod:`~formats.remote.cache`: the cache folder of one remote (sparse data file, index);
- :mod:`~formats.remote.file`: :class:`RemoteFile`, the HostFile a codec reads a remote
  base through, and :class:`NotCached`, what a caller that must not block is told.

The opener (formats/opener.py) opens a remote name only when the caller's
:class:`~formats.opener.OpenPolicy` carries a :class:`RemoteConfig` whose host list lets it
through: an image never makes cowd connect anywhere the user did not allow.
"""

from __future__ import annotations

from .file import NotCached, RemoteBase, RemoteConfig, RemoteFile, open_bases, open_remote
from .http import HttpTls
from .nbd import NbdTls
from .url import BadRemoteName, RemoteName, allowed, looks_remote, parse

__all__ = ["BadRemoteName", "HttpTls", "NbdTls", "NotCached", "RemoteBase", "RemoteConfig",
           "RemoteFile", "RemoteName", "allowed", "looks_remote", "open_bases", "open_remote",
           "parse"]
