"""Layer: formats — cowd's image-format library (raw, qcow v1, qcow2, VHD).

A library of its own: it never imports ``cowd``.  Entry points:

- :func:`open_image` opens an image and its whole backing chain (formats probed or as
  recorded, depth bounded, loops detected, protocol names refused);
- :func:`create_overlay` makes a qcow2 or differencing-VHD overlay over a base;
- :class:`~formats.base.Image` is the per-format contract (resolve / read / write / flush).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from .base import MAX_CHAIN_DEPTH, CheckResult, Extent, HostFile, Image, Kind
from .errors import (
    BackingOutside,
    CorruptImage,
    FormatError,
    ImageIOError,
    ImageReadOnly,
    UnsupportedImage,
)
from .qcow import QcowImage
from .qcow2 import Qcow2Image
from .raw import RawImage
from .vhd import VhdImage

# Probe order matters: raw accepts anything and goes last.
FORMATS: dict[str, type[Image]] = {
    "qcow2": Qcow2Image,
    "qcow": QcowImage,
    "vhd": VhdImage,
    "raw": RawImage,
}
# Names other tools use for the same formats (qemu calls VHD "vpc").
FORMAT_ALIASES = {"vpc": "vhd", "qcow1": "qcow", "file": "raw"}

PROBE_BYTES = 4096

# qemu accepts "protocol:" prefixes in backing names (json:, nbd:, http:, ...).  cowd opens
# only local files: a name with such a prefix is refused, never interpreted.
_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def canonical_format(name: str) -> str:
    """Map a user or on-disk format name to one of FORMATS, or raise ValueError."""
    key = name.strip().lower()
    key = FORMAT_ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown image format {name!r} (known: {', '.join(FORMATS)})")
    return key


def probe_format(path: str, file: HostFile) -> str:
    head = file.pread_data(0, PROBE_BYTES)
    size = file.size()
    for name, cls in FORMATS.items():
        if cls.probe(head, size):
            return name
    return "raw"


def open_one(path: str, writable: bool = False, fmt: str | None = None) -> Image:
    """Open a single image (no backing), probing the format unless given."""
    file = HostFile(path, writable)
    try:
        if fmt:
            try:
                name = canonical_format(fmt)
            except ValueError:
                raise UnsupportedImage(path, "unknown image format", "format", fmt) from None
        else:
            name = probe_format(path, file)
        return FORMATS[name].open(path, file, writable)
    except BaseException:
        file.close()
        raise


def resolve_backing_path(image: Image) -> str:
    """The host path of ``image``'s backing file: the first candidate that exists."""
    base_dir = os.path.dirname(os.path.abspath(image.path))
    tried = []
    for name in image.backing_candidates():
        if _PROTOCOL_RE.match(name) and not re.match(r"^[A-Za-z]:[\\/]", name):
            raise UnsupportedImage(image.path, "backing file names a protocol, not a file",
                                   "backing_file", name)
        full = name if os.path.isabs(name) else os.path.join(base_dir, name)
        if os.path.exists(full):
            if not os.path.isfile(full) and not _is_block_device(full):
                raise UnsupportedImage(image.path, "backing file is not a regular file",
                                       "backing_file", name)
            return os.path.normpath(full)
        tried.append(name)
    raise FormatError(image.path, "backing file not found", "backing_file",
                      tried[0] if len(tried) == 1 else tried)


def _is_block_device(path: str) -> bool:
    import stat

    return stat.S_ISBLK(os.stat(path).st_mode)


ParentOpener = Callable[[str, str | None], Image]


def confinement_root(path: str) -> str:
    """The directory tree a chain opened from ``path`` stays in by default: the real path of
    the directory the image is named in."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path)))


def check_confined(image: Image, parent_path: str, root: str) -> None:
    """Refuse a backing file that resolves (``..``, absolute names, symlinks) outside
    ``root``: an image from elsewhere must not make its reader open arbitrary files."""
    real = os.path.realpath(parent_path)
    if os.path.commonpath([real, root]) != root:
        raise BackingOutside(image.path, f"backing file lies outside {root}", "backing_file",
                             image.backing_name)


def open_image(
    path: str,
    writable: bool = False,
    fmt: str | None = None,
    *,
    open_parent: ParentOpener | None = None,
    confine_to: str | None = None,
) -> Image:
    """Open ``path`` and its backing chain.  Only the top image is ever writable.

    ``open_parent(path, fmt)`` lets a caller share parent images between chains (the daemon
    opens a base once for many overlays); by default each parent is opened read-only here.
    With ``confine_to`` (a real directory path, e.g. :func:`confinement_root`), every
    backing file must resolve inside that tree (:class:`BackingOutside` otherwise).
    """
    top = open_one(path, writable, fmt)
    seen = {top.file.dev_ino}
    layer = top
    try:
        for depth in range(1, MAX_CHAIN_DEPTH + 2):
            if not layer.backing_candidates():
                return top
            if depth > MAX_CHAIN_DEPTH:
                raise CorruptImage(top.path, "backing chain too deep", "depth", depth)
            parent_path = resolve_backing_path(layer)
            if confine_to is not None:
                check_confined(layer, parent_path, confine_to)
            pfmt = layer.backing_format
            if open_parent is not None:
                parent = open_parent(parent_path, pfmt)
            else:
                parent = open_one(parent_path, False, pfmt)
            if parent.file.dev_ino in seen:
                raise CorruptImage(layer.path, "backing chain loops back", "backing_file",
                                   layer.backing_name)
            seen.add(parent.file.dev_ino)
            layer.backing = parent
            layer.backing_path = parent_path
            layer.check_backing(parent)
            layer = parent
        raise AssertionError("unreachable")
    except BaseException:
        if open_parent is None:
            top.close_chain()
        else:
            top.close()
        raise


def create_overlay(
    out_path: str,
    base_path: str,
    overlay_format: str = "qcow2",
    base_format: str | None = None,
    *,
    cluster_size: int | None = None,
    absolute_backing: bool = False,
) -> None:
    """Create an empty overlay over ``base_path`` recording it (relative where possible)."""
    overlay_format = canonical_format(overlay_format)
    base = open_image(base_path, False, base_format)
    try:
        base_fmt = base.format_name
        if absolute_backing:
            name = os.path.abspath(base_path)
        else:
            name = os.path.relpath(os.path.abspath(base_path),
                                   os.path.dirname(os.path.abspath(out_path)))
        if overlay_format == "qcow2":
            from . import qcow2

            qcow2.create(out_path, base.virtual_size, backing_name=name,
                         backing_format=base_fmt,
                         cluster_size=cluster_size or qcow2.DEFAULT_CLUSTER_SIZE)
        elif overlay_format == "vhd":
            from . import vhd

            if not isinstance(base, VhdImage):
                raise UnsupportedImage(base_path, "a differencing VHD needs a VHD parent",
                                       "format", base_fmt)
            vhd.create_differencing(out_path, base, parent_name=name)
        else:
            raise ValueError(f"cannot create {overlay_format} overlays (use qcow2 or vhd)")
    finally:
        base.close_chain()


__all__ = [
    "FORMATS",
    "BackingOutside",
    "CheckResult",
    "CorruptImage",
    "Extent",
    "FormatError",
    "HostFile",
    "Image",
    "ImageIOError",
    "ImageReadOnly",
    "Kind",
    "Qcow2Image",
    "QcowImage",
    "RawImage",
    "UnsupportedImage",
    "VhdImage",
    "canonical_format",
    "check_confined",
    "confinement_root",
    "create_overlay",
    "open_image",
    "open_one",
]
