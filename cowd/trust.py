"""Layer: cowd (CLI support; imports nothing else of cowd).  The backing names the user
vouched for: ``cowd create --absolute`` records the base's absolute path in the overlay, and
when that path lies outside the overlay's folder cowd's confinement (formats/opener.py)
would refuse it.  The user asked for that name, so cowd remembers the choice here and
opens the overlay without ``--allow-backing-outside``.

Theory of operation
-------------------
An entry is (st_dev, st_ino, name): this overlay file — not whatever file later bears its
path — may name this absolute backing path.  Confinement protects a user from images that
*someone else* wrote; an entry can only be written by the user who runs cowd, in a file of
theirs:

- the list lives in ``$COWD_STATE_DIR/vouched.json`` (default ``/var/lib/cowd`` for root,
  ``$XDG_STATE_HOME/cowd`` or ``~/.local/state/cowd`` for other users);
- it is read only while it and its folder belong to the user and nobody else can write
  them; otherwise it is ignored (and nothing is vouched for);
- an entry names one path; another image that names the same path is not vouched for, and
  an attacker who replaces the overlay file gets a new inode, which matches no entry.  A
  stale entry (the overlay deleted, its inode number reused) can only let the new file name
  the very path the user chose, nothing else.

The vouched path itself is then opened as a path the user typed: symlinks in it are
followed, as on the command line.  The layer found there confines its own names to its own
folder, like a top image.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

# Entries kept; the oldest are dropped past this (each `create --absolute` adds one).
MAX_VOUCHED_ENTRIES = 4096
# The list is a few hundred KiB at most; a larger file is not ours and is ignored.
MAX_LIST_BYTES = 1 << 20

STATE_DIR_ENV = "COWD_STATE_DIR"
LIST_NAME = "vouched.json"


def state_dir() -> str:
    if os.environ.get(STATE_DIR_ENV):
        return os.environ[STATE_DIR_ENV]
    if os.geteuid() == 0:
        return "/var/lib/cowd"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "cowd")


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _load(path: str) -> list[dict[str, Any]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or not _private(st)
                or not _private(os.stat(os.path.dirname(path)))
                or st.st_size > MAX_LIST_BYTES):
            return []
        doc = json.loads(os.read(fd, MAX_LIST_BYTES))
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)
    if not isinstance(doc, list):
        return []
    return [e for e in doc if isinstance(e, dict) and isinstance(e.get("dev"), int)
            and isinstance(e.get("ino"), int) and isinstance(e.get("name"), str)]


def is_vouched(dev: int, ino: int, name: str) -> bool:
    """The policy's ``vouched`` callback (formats/opener.py); reads the list each time, so a
    running daemon sees overlays created after it started."""
    path = os.path.join(state_dir(), LIST_NAME)
    return any(e["dev"] == dev and e["ino"] == ino and e["name"] == name
               for e in _load(path))


def vouch(overlay: str) -> None:
    """Remember that the user chose ``overlay``'s recorded backing name."""
    import formats  # here: the client commands that only read the list never load it

    img = formats.open_one(overlay, False, policy=formats.OpenPolicy(confine=False))
    try:
        name = img.backing_name
        dev, ino = img.file.dev_ino
    finally:
        img.close()
    if not name:
        return
    folder = state_dir()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, LIST_NAME)
    entries = [e for e in _load(path) if (e["dev"], e["ino"]) != (dev, ino)]
    entries.append({"dev": dev, "ino": ino, "name": name, "image": os.path.abspath(overlay)})
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(entries[-MAX_VOUCHED_ENTRIES:], f, indent=1)
    os.replace(tmp, path)
