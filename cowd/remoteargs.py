"""Layer: cowd (the top: command line).  The flags of remote bases (formats/remote/) and the
:class:`~formats.remote.RemoteConfig` built from them and the environment.

Every flag has an environment variable: that is how a daemon that ``cowd attach`` starts
inherits them (as with ``--allow-backing-outside``), and how a user sets them once.  A flag
given on the command line is exported to the environment for that reason.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from formats.remote import RemoteConfig

ALLOW_ENV = "COWD_ALLOW_REMOTE_BACKING"  # "1": any host; else a comma-separated allow-list
CACHE_DIR_ENV = "COWD_REMOTE_CACHE_DIR"
CACHE_SIZE_ENV = "COWD_REMOTE_CACHE_SIZE"
TIMEOUT_ENV = "COWD_REMOTE_TIMEOUT"
TLS_DIR_ENV = "COWD_REMOTE_TLS_CERTIFICATES"
TLS_PSK_ENV = "COWD_REMOTE_TLS_PSK_FILE"
TLS_USER_ENV = "COWD_REMOTE_TLS_USERNAME"
CA_FILE_ENV = "COWD_REMOTE_CA_FILE"

# A read of a remote base may wait at most this long (a day: "wait for the network").
MAX_TIMEOUT_S = 86400.0


def default_cache_root() -> str:
    """$COWD_REMOTE_CACHE_DIR, else /var/cache/cowd/remote for root, else the user's
    $XDG_CACHE_HOME/cowd/remote (~/.cache/cowd/remote)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/cowd/remote"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cowd", "remote")


def add_remote_options(p: argparse.ArgumentParser) -> None:
    """The remote-base flags of every command that opens an image's chain."""
    from .cliargs import _seconds, parse_size

    g = p.add_argument_group("remote bases (nbd://, nbd+unix://, http(s):// backing files)")
    g.add_argument("--allow-remote-backing", action="store_true",
                   help="let an image's chain name a remote base on any host (refused by "
                   f"default; also ${ALLOW_ENV}=1)")
    g.add_argument("--allow-remote-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="let an image name a remote base on this host only (repeatable; "
                   f"unix:PATH for a socket; also ${ALLOW_ENV}=HOST,HOST:PORT,...)")
    g.add_argument("--remote-cache-dir", metavar="DIR",
                   help="where remote bases' local caches live (default "
                   f"${CACHE_DIR_ENV}, /var/cache/cowd/remote for root, "
                   "~/.cache/cowd/remote otherwise)")
    g.add_argument("--remote-cache-size", type=parse_size, metavar="SIZE",
                   help="most bytes one remote base's cache may hold (default: the base's "
                   f"size; also ${CACHE_SIZE_ENV})")
    g.add_argument("--remote-timeout", type=_seconds(MAX_TIMEOUT_S), metavar="SECONDS",
                   help="how long a read of a remote base is retried before it fails with "
                   f"EIO (default 30; also ${TIMEOUT_ENV})")
    g.add_argument("--remote-tls-certificates", metavar="DIR",
                   help="NBD over TLS with these X.509 credentials (qemu's layout: "
                   f"ca-cert.pem, client-cert.pem, client-key.pem; also ${TLS_DIR_ENV})")
    g.add_argument("--remote-tls-psk-file", metavar="FILE",
                   help=f"NBD over TLS with this psktool keys file (also ${TLS_PSK_ENV})")
    g.add_argument("--remote-tls-username", metavar="NAME",
                   help=f"the PSK identity (default: libnbd's; also ${TLS_USER_ENV})")
    g.add_argument("--remote-ca-file", metavar="FILE",
                   help="https: trust this CA (PEM) instead of the system's (also "
                   f"${CA_FILE_ENV})")


def _byte_range(text: str) -> tuple[int, int]:
    """--range OFFSET:LENGTH (sizes as for --size): (offset, length), length above 0."""
    from .cliargs import parse_size

    off, sep, length = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected OFFSET:LENGTH, got {text!r}")
    try:
        r = (parse_size(off), parse_size(length))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} in {text!r}") from None
    if r[1] == 0:
        raise argparse.ArgumentTypeError(f"an empty range: {text!r}")
    return r


def add_cache_command(sub: argparse._SubParsersAction) -> None:
    from .cliargs import _output_option

    c = sub.add_parser("cache", help="remote bases' local caches: show, prefetch, drop")
    c.add_argument("action", choices=("show", "prefetch", "drop", "verify"),
                   help="show: every cache (or those of the bases named: URLs, or overlays over "
                   "one), and which changed on the server since cached; prefetch: fetch "
                   "blocks of a remote base into its cache; drop: delete a cache (refused "
                   "while in use), which also clears a changed base's marker: every open of "
                   "it is refused until then, and the next one uses the new version; verify: "
                   "check every cached block's checksum")
    c.add_argument("url", nargs="*", metavar="URL",
                   help="remote bases (nbd://, nbd+unix://, http(s)://) or overlays over one")
    c.add_argument("--all", action="store_true",
                   help="prefetch: every block of the base; drop: every cache")
    c.add_argument("--range", metavar="OFFSET:LENGTH", type=_byte_range,
                   help="prefetch: these bytes of the base (sizes as for --size)")
    _output_option(c)
    add_remote_options(c)


def export_flags(args: argparse.Namespace) -> None:
    """Flags given on the command line into the environment (for a daemon started later)."""
    hosts = list(getattr(args, "allow_remote_host", None) or [])
    if getattr(args, "allow_remote_backing", False):
        os.environ[ALLOW_ENV] = "1"
    elif hosts:
        old = os.environ.get(ALLOW_ENV, "")
        if old != "1":
            os.environ[ALLOW_ENV] = ",".join([h for h in old.split(",") if h] + hosts)
    for attr, env in (("remote_cache_dir", CACHE_DIR_ENV), ("remote_timeout", TIMEOUT_ENV),
                      ("remote_cache_size", CACHE_SIZE_ENV), ("remote_tls_certificates",
                                                              TLS_DIR_ENV),
                      ("remote_tls_psk_file", TLS_PSK_ENV),
                      ("remote_tls_username", TLS_USER_ENV), ("remote_ca_file", CA_FILE_ENV)):
        value = getattr(args, attr, None)
        if value is not None:
            os.environ[env] = os.path.abspath(value) if attr.endswith(("_dir", "_file",
                                                                       "certificates")) \
                else str(value)


def remote_config(args: argparse.Namespace) -> RemoteConfig:
    """The user's remote settings: flags, then the environment.  No allowed host unless the
    user allowed some (an image naming a remote base is then refused in one line)."""
    from formats.remote import HttpTls, NbdTls, RemoteConfig
    from formats.remote.file import DEFAULT_TIMEOUT_S

    from .errors import UsageError

    export_flags(args)
    allow = os.environ.get(ALLOW_ENV, "")
    hosts: frozenset[str] | None
    if allow.strip() == "1":
        hosts = None
    else:
        hosts = frozenset(h.strip().lower() for h in allow.split(",") if h.strip())
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
        size = os.environ.get(CACHE_SIZE_ENV)
        budget = int(size) if size else None
    except ValueError as e:
        raise UsageError(f"${TIMEOUT_ENV} or ${CACHE_SIZE_ENV}: {e}") from None
    return RemoteConfig(
        cache_root=default_cache_root(), hosts=hosts, cache_budget_bytes=budget,
        timeout_s=timeout,
        nbd_tls=NbdTls(certificates=os.environ.get(TLS_DIR_ENV) or None,
                       psk_file=os.environ.get(TLS_PSK_ENV) or None,
                       username=os.environ.get(TLS_USER_ENV) or None),
        http_tls=HttpTls(ca_file=os.environ.get(CA_FILE_ENV) or None))


__all__ = ["add_cache_command", "add_remote_options", "default_cache_root", "export_flags",
           "remote_config"]
