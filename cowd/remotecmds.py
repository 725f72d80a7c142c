"""Layer: cowd (the top: command line).  ``cowd cache``: the local caches of remote bases
(formats/remote/cache.py) — show them, prefetch blocks into one, verify or drop one.

These work on the cache folders directly, with or without a daemon: a cache is shared
(flock), so a prefetch while a daemon serves the base fills the same cache (the daemon finds
those blocks on its next miss), and a drop or a verify that repairs waits for no one: it is
refused while another process uses the cache.

A cache marked changed (its base was seen as another version on the server: every open of
that base is refused) is shown with what changed, and dropping it is how the user accepts
the new version: the next open makes a new cache of what the server holds then.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import os
import time
from typing import Any

from formats.opener import OpenPolicy

from .errors import CommandFailed, UsageError

# Blocks fetched per request, and requests in flight, while prefetching.
PREFETCH_RUN_BYTES = 4 << 20
PREFETCH_THREADS = 4


def _open_index(folder: str) -> int:
    return os.open(os.path.join(folder, "index"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _changed(folder: str, hdr: Any) -> dict[str, Any] | None:
    """A cache's change marker (formats/remote/cache.py) as shown: None when unmarked."""
    from formats.remote.cache import read_mark

    dfd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mark = read_mark(dfd, hdr)
    finally:
        os.close(dfd)
    if mark is None:
        return None
    return {"was": mark.was, "seen": mark.seen,
            "seen_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mark.when))
                        if mark.when else None),
            "accept": f"cowd cache drop {hdr.url}"}


def _caches(root: str) -> list[dict[str, Any]]:
    from formats.remote.cache import HEADER_BYTES, CacheError, Header

    out = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("."):
            continue
        folder = os.path.join(root, name)
        try:
            fd = _open_index(folder)
        except OSError:
            continue
        try:
            hdr = Header.decode(os.pread(fd, HEADER_BYTES, 0), folder)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                in_use = False
            except BlockingIOError:
                in_use = True
            held = os.stat(os.path.join(folder, "data")).st_blocks * 512
            changed = _changed(folder, hdr)
        except (OSError, CacheError):
            continue
        finally:
            os.close(fd)
        out.append({"url": hdr.url, "folder": folder, "size": hdr.remote_size,
                    "block_size": hdr.block_size, "held_bytes": min(held, hdr.remote_size),
                    "validator": hdr.validator, "in_use": in_use, "changed": changed})
    return out


def _remote_of(arg: str, policy: OpenPolicy) -> Any:
    """The RemoteFile of a URL, or of the first remote layer of an image's chain."""
    import formats
    from formats import remote

    assert policy.remote is not None
    if remote.looks_remote(arg):
        try:
            parsed = remote.parse(arg)
        except remote.BadRemoteName as e:
            raise UsageError(f"{arg}: {e}") from None
        try:
            return remote.open_remote(parsed, policy.remote)
        except OSError as e:
            raise CommandFailed(f"{arg}: {e.strerror or e}") from None
    img = formats.open_image(arg, False, policy=policy)
    layer = img.backing
    while layer is not None and not isinstance(layer.file, remote.RemoteFile):
        layer = layer.backing
    if layer is None:
        img.close_chain()
        raise CommandFailed(f"{arg}: no remote base in its chain")
    # Keep the remote's file open, close the rest.
    file = remote.open_remote(remote.parse(layer.file.path), policy.remote)
    img.close_chain()
    return file


def _remote_name_of(arg: str, policy: OpenPolicy) -> Any:
    """The remote base a URL or an overlay names, without connecting to it: the chain is
    opened with remote names refused, and the first refusal carries the name."""
    import dataclasses

    import formats
    from formats import remote
    from formats.errors import UnsupportedImage

    if remote.looks_remote(arg):
        try:
            return remote.parse(arg)
        except remote.BadRemoteName as e:
            raise UsageError(f"{arg}: {e}") from None
    try:
        img = formats.open_image(arg, False, policy=dataclasses.replace(policy, remote=None))
    except UnsupportedImage as e:
        if isinstance(e.value, str) and remote.looks_remote(e.value):
            try:
                return remote.parse(e.value)
            except remote.BadRemoteName:
                pass
        raise
    img.close_chain()
    raise CommandFailed(f"{arg}: no remote base in its chain")


def prefetch(args: argparse.Namespace, policy: OpenPolicy) -> dict[str, Any]:
    from formats.remote.file import RemoteFile

    if not args.url:
        raise UsageError("cache prefetch: name a remote base (URL) or an overlay over one")
    if not args.all and not args.range:
        raise UsageError("cache prefetch: say what: --all or --range OFFSET:LENGTH")
    out = []
    for arg in args.url:
        file: RemoteFile = _remote_of(arg, policy)
        base = file.remote
        assert base is not None
        try:
            start, end = 0, base.size
            if args.range:
                start = min(base.size, args.range[0])
                end = min(base.size, start + args.range[1])
            before = base.counters["fetched_bytes"]
            gaps = base.missing(start, end - start)
            per = max(1, PREFETCH_RUN_BYTES // base.block_size)
            runs = [(a, min(b, a + per)) for a, b in gaps for a in range(a, b, per)]
            with concurrent.futures.ThreadPoolExecutor(PREFETCH_THREADS) as pool:
                for fut in [pool.submit(base.fetch, a, b) for a, b in runs]:
                    try:
                        fut.result()
                    except OSError as e:
                        raise CommandFailed(str(e)) from None
            out.append({"url": base.url, "fetched_bytes": base.counters["fetched_bytes"]
                        - before, "held_bytes": base.files.held_bytes, "size": base.size})
        finally:
            file.close()
    return {"prefetched": out}


def _folders(args: argparse.Namespace, policy: OpenPolicy) -> list[str]:
    from formats import remote
    from formats.remote.cache import cache_key_dir

    assert policy.remote is not None
    root = policy.remote.cache_root
    if args.all:
        return [c["folder"] for c in _caches(root)]
    if not args.url:
        raise UsageError(f"cache {args.action}: name the URLs, or --all")
    out = []
    for arg in args.url:
        try:
            out.append(os.path.join(root, cache_key_dir(remote.parse(arg).key)))
        except remote.BadRemoteName as e:
            raise UsageError(f"{arg}: {e}") from None
    return out


def drop(args: argparse.Namespace, policy: OpenPolicy) -> dict[str, Any]:
    """Delete caches: a changed base's (marked) cache too, which is how its new version is
    accepted (the next open makes a new cache of it)."""
    from formats.remote.cache import HEADER_BYTES, CacheError, Header, check_root, remove_folder

    assert policy.remote is not None
    root_fd = check_root(policy.remote.cache_root)
    dropped = []
    try:
        for folder in _folders(args, policy):
            name = os.path.basename(folder)
            try:
                fd = _open_index(folder)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise CommandFailed(f"{folder}: the cache is in use (a daemon serves "
                                        "that base); detach its disks first") from None
                try:
                    hdr = Header.decode(os.pread(fd, HEADER_BYTES, 0), folder)
                    url, changed = hdr.url, _changed(folder, hdr)
                except (OSError, CacheError):
                    url, changed = None, None
                remove_folder(root_fd, name)
                dropped.append({"folder": folder, "url": url, "changed": changed})
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    return {"dropped": dropped}


def verify(args: argparse.Namespace, policy: OpenPolicy) -> dict[str, Any]:
    out = []
    for arg in args.url:
        file = _remote_of(arg, policy)
        try:
            bad = file.remote.files.verify()
            out.append({"url": file.path, "bad_blocks": bad,
                        "held_bytes": file.remote.files.held_bytes})
        finally:
            file.close()
    if any(v["bad_blocks"] for v in out):
        print(json.dumps({"verified": out}, indent=2))
        raise CommandFailed("cache verify: blocks whose bytes do not match their checksum")
    return {"verified": out}


def run(args: argparse.Namespace, policy: OpenPolicy) -> int:
    assert policy.remote is not None
    if args.range is not None and args.action != "prefetch":
        raise UsageError(f"cache {args.action}: --range is for prefetch only")
    if args.action == "show":
        caches = _caches(policy.remote.cache_root)
        if args.url:
            # Only the caches of the bases named (a URL, or an overlay over one); a name
            # with no remote base is refused rather than shown as "no caches".
            from formats.remote.cache import cache_key_dir

            keep = {cache_key_dir(_remote_name_of(arg, policy).key) for arg in args.url}
            caches = [c for c in caches if os.path.basename(c["folder"]) in keep]
        doc: dict[str, Any] = {"root": policy.remote.cache_root, "caches": caches}
    elif args.action == "prefetch":
        doc = prefetch(args, policy)
    elif args.action == "drop":
        doc = drop(args, policy)
    else:
        doc = verify(args, policy)
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    elif args.action == "show":
        print(f"caches in {doc['root']}:")
        for c in doc["caches"]:
            pct = 100.0 * c["held_bytes"] / c["size"] if c["size"] else 100.0
            ch = c["changed"]
            state = "" if ch is None else (
                f"changed on the server since cached (was {ch['was']}; seen"
                f"{' at ' + ch['seen_at'] if ch['seen_at'] else ''}: {ch['seen']}), refused "
                f"until `{ch['accept']}` accepts the new version, ")
            print(f"{c['url']}: {state}{c['held_bytes']} of {c['size']} bytes ({pct:.1f}%), "
                  f"{c['block_size']}-byte blocks, {'in use' if c['in_use'] else 'idle'}, "
                  f"{c['folder']}")
    elif args.action == "drop":
        for d in doc["dropped"]:
            what = "" if d["changed"] is None else \
                " (it had changed on the server: its next open uses the new version)"
            print(f"dropped: {d['url'] or '?'}: {d['folder']}{what}")
    else:
        for key, items in doc.items():
            for item in items:
                print(f"{key}: {item}")
    return 0


__all__ = ["run"]
