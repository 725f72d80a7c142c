"""Layer: formats.vhd, above structures.py.  A differencing disk's parent: reading the
parent locators, and turning the names they and the Parent Unicode Name hold into paths to try;
the locators and the name to write for a new parent (create, reparent).

Locators are W2ru (a relative Windows path, UTF-16 LE), W2ku (an absolute one) and MacX (a
UTF-8 file:// URL; blktap writes relative ones as file://./name).  Windows paths become POSIX
paths; one with a drive letter or a UNC share cannot name a file here and is skipped.

Invariants: a locator's length is bounded (VHD_MAX_LOCATOR_BYTES) and its data must lie
inside the file and clear of the footer copy, the dynamic disk header and the BAT before it
is read; undecodable text raises CorruptImage.  Which candidate is opened, and whether it may
be, is the opener's business (formats/opener.py), not this module's.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import NamedTuple

from ..base import SECTOR, HostFile, require
from ..errors import CorruptImage
from .structures import (
    PARENT_NAME_BYTES,
    PLATFORM_MACX,
    PLATFORM_NONE,
    PLATFORM_W2KU,
    PLATFORM_W2RU,
    VHD_MAX_LOCATOR_BYTES,
    DynamicHeader,
    ParentLocator,
    Region,
)

_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def decode_utf16(data: bytes, encoding: str, path: str, what: str) -> str:
    if len(data) % 2:
        data = data[:-1]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise CorruptImage(path, f"{what} is not valid UTF-16", "bytes", data[:32]) from None
    return text.split("\0", 1)[0]


def windows_to_posix(name: str, relative: bool) -> str | None:
    """A Windows path as a POSIX one, or None when it cannot name a file here (a drive
    letter or a UNC share)."""
    if not name or _DRIVE_RE.match(name) or name.startswith("\\\\"):
        return None
    p = name.replace("\\", "/")
    if relative:
        while p.startswith("./"):
            p = p[2:]
    return p or None


def file_url_to_path(url: str) -> str | None:
    """A MacX locator (file://[localhost]/abs or blktap's file://./rel) as a path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    path = urllib.parse.unquote(parts.path)
    if parts.netloc in ("", "localhost"):
        return path or None
    if parts.netloc in (".", ".."):  # blktap writes relative URLs as file://./name
        rel = parts.netloc + path
        return windows_to_posix(rel, relative=True)
    return None


def windows_relative(name: str) -> str:
    """How Windows records a relative parent path: backslashes, ``.\\`` before a plain one."""
    p = name.replace("/", "\\")
    return p if p.startswith("..\\") or p.startswith(".\\") else ".\\" + p


class LocatorData(NamedTuple):
    """A parent locator to write: its platform code and its data."""

    platform_code: bytes
    data: bytes


def new_locators(parent_abs: str, relative: str) -> list[LocatorData]:
    """The locators cowd writes for a parent at ``parent_abs``, named ``relative`` from the
    child's folder: W2ru (the relative path, Windows style), W2ku (the absolute path) and
    MacX (a file:// URL).  ValueError when one is longer than a locator may be."""
    out = [
        LocatorData(PLATFORM_W2RU, windows_relative(relative).encode("utf-16-le")),
        LocatorData(PLATFORM_W2KU, parent_abs.replace("/", "\\").encode("utf-16-le")),
        LocatorData(PLATFORM_MACX,
                    ("file://" + urllib.parse.quote(parent_abs)).encode("utf-8")),
    ]
    for loc in out:
        if len(loc.data) > VHD_MAX_LOCATOR_BYTES:
            raise ValueError(f"parent path too long for a VHD locator: {parent_abs!r}")
    return out


def unicode_name(parent_name: str) -> bytes:
    """The Parent Unicode Name field for ``parent_name``: UTF-16 BE, NUL-padded; the file
    name alone when the path does not fit (the locators hold the path)."""
    name16 = parent_name.encode("utf-16-be")
    if len(name16) > PARENT_NAME_BYTES:
        name16 = os.path.basename(parent_name).encode("utf-16-be")[:PARENT_NAME_BYTES]
    return name16.ljust(PARENT_NAME_BYTES, b"\0")


def place_locators(header: DynamicHeader, locators: list[LocatorData],
                   offset: int) -> list[tuple[int, bytes]]:
    """Record ``locators`` in ``header``, their data from file ``offset`` on, each in whole
    sectors; returns (offset, data) of each, to write."""
    header.parent_locators = []
    out = []
    for code, blob in locators:
        space = max(SECTOR, (len(blob) + SECTOR - 1) // SECTOR * SECTOR)
        # Platform Data Space: the spec says sectors, Windows writes bytes; readers (and
        # Windows) accept bytes as long as they cover the data, so we write bytes.
        header.parent_locators.append(ParentLocator(code, space, len(blob), 0, offset))
        out.append((offset, blob))
        offset += space
    return out


class ParentPath(NamedTuple):
    """The text of one parent locator the codec reads."""

    platform_code: bytes  # PLATFORM_W2RU, PLATFORM_W2KU or PLATFORM_MACX
    text: str


class Locators(NamedTuple):
    paths: list[ParentPath]
    regions: list[Region]  # where their data lies in the file (for overlap checks)


def read_locators(path: str, file: HostFile, header: DynamicHeader, data_end: int,
                  metadata: list[Region]) -> Locators:
    """The parent locators of a differencing disk's header that hold a path we read (W2ru,
    W2ku, MacX; the deprecated Wi2r/Wi2k and Mac alias records are skipped), each checked
    against the file's end (``data_end``) and the ``metadata`` it must not overlap."""
    paths: list[ParentPath] = []
    regions: list[Region] = []
    for i, loc in enumerate(header.parent_locators):
        if loc.platform_code == PLATFORM_NONE:
            continue
        n, off = loc.platform_data_length, loc.platform_data_offset
        if loc.platform_code not in (PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX):
            continue  # deprecated Wi2r/Wi2k and Mac alias records: not paths we read
        require(n <= VHD_MAX_LOCATOR_BYTES, path,
                "parent locator longer than 64 KiB", f"locator[{i}].data_length", n)
        require(off >= SECTOR and off + n <= data_end, path,
                "parent locator outside the file", f"locator[{i}].data_offset", off)
        for start, stop, name in metadata:
            require(off + n <= start or stop <= off or n == 0, path,
                    f"parent locator overlaps the {name}", f"locator[{i}].data_offset", off)
        data = file.pread_exact(off, n, "parent locator")
        if loc.platform_code == PLATFORM_MACX:
            try:
                text = data.decode("utf-8").split("\0", 1)[0]
            except UnicodeDecodeError:
                raise CorruptImage(path, "MacX parent locator is not UTF-8",
                                   f"locator[{i}].data_offset", off) from None
        else:
            text = decode_utf16(data, "utf-16-le", path,
                                f"{loc.platform_code.decode()} parent locator")
        paths.append(ParentPath(loc.platform_code, text))
        if n:
            regions.append(Region(off, off + n, f"parent locator {i}"))
    return Locators(paths, regions)


def parent_candidates(paths: list[ParentPath], parent_name: str) -> list[str]:
    """The paths to try for the parent, in order: the relative locators, the absolute ones,
    the URLs, then the Parent Unicode Name (or, when that is a Windows path with a drive, its
    file name beside the child); each once."""
    by_code: dict[bytes, list[str]] = {}
    for code, text in paths:
        by_code.setdefault(code, []).append(text)
    out: list[str] = []
    for text in by_code.get(PLATFORM_W2RU, []):
        p = windows_to_posix(text, relative=True)
        if p:
            out.append(p)
    for text in by_code.get(PLATFORM_W2KU, []):
        p = windows_to_posix(text, relative=False)
        if p:
            out.append(p)
    for text in by_code.get(PLATFORM_MACX, []):
        p = file_url_to_path(text)
        if p:
            out.append(p)
    if parent_name:
        p = windows_to_posix(parent_name, relative=True)
        if p is None:  # "C:\dir\base.vhd": try its file name beside this image
            p = parent_name.replace("\\", "/").rsplit("/", 1)[-1].split(":")[-1]
        if p:
            out.append(p)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
