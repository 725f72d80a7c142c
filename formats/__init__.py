"""Layer: formats — cowd's image-format library (raw, qcow v1, qcow2, VHD).

A library of its own: it never imports ``cowd``.  Entry points:

- :func:`open_image` opens an image and its whole backing chain (formats probed or as
  recorded, depth bounded, loops detected, protocol names refused);
- :func:`create_overlay` makes a qcow2 or differencing-VHD overlay over a base;
- :class:`~formats.base.Image` is the per-format contract (resolve / read / write / flush).
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable

from .base import MAX_CHAIN_DEPTH, CheckResult, Extent, HostFile, Image, Kind, NearOpener
from .chain import ChainBelow, Placed, read_placed, resolve_in_chain
from .errors import (
    BackingOutside,
    CorruptImage,
    FormatError,
    ImageIOError,
    ImageReadOnly,
    UnsupportedImage,
)
from .names import FORMAT_NAMES, canonical_format
from .opener import ChainOpener, OpenPolicy, Place
from .qcow import QcowImage
from .qcow2 import Qcow2Image
from .raw import RawImage
from .vhd import VhdImage

# The library's own version: bumped when what it reads or writes changes (a new format,
# feature or operation), independently of cowd's.
FORMATS_VERSION = "0.3.0"

# Probe order matters: raw accepts anything and goes last.
FORMATS: dict[str, type[Image]] = {
    "qcow2": Qcow2Image,
    "qcow": QcowImage,
    "vhd": VhdImage,
    "raw": RawImage,
}
assert tuple(FORMATS) == FORMAT_NAMES

PROBE_BYTES = 4096

# Confined to the top image's folder, no devices: what a chain may reach unless the user
# says otherwise (--allow-backing-outside, --allow-backing-device).
DEFAULT_POLICY = OpenPolicy()


def probe_format(path: str, file: HostFile) -> str:
    head = file.pread_data(0, PROBE_BYTES)
    size = file.size()
    for name, cls in FORMATS.items():
        if cls.probe(head, size):
            return name
    return "raw"


def open_file(file: HostFile, writable: bool, fmt: str | None, near: NearOpener) -> Image:
    """Parse an image from a file already opened (its format probed unless given); the file
    is closed if that fails.  ``near`` opens the files the image itself names."""
    try:
        if fmt:
            try:
                name = canonical_format(fmt)
            except ValueError:
                raise UnsupportedImage(file.path, "unknown image format", "format",
                                       fmt) from None
        else:
            name = probe_format(file.path, file)
        return FORMATS[name].open(file.path, file, writable, near=near)
    except BaseException:
        file.close()
        raise


def open_one(path: str, writable: bool = False, fmt: str | None = None, *,
             policy: OpenPolicy | None = None) -> Image:
    """Open a single image (no backing) as the user named it; a data file it names is
    opened as ``policy`` allows (confined to the image's folder by default)."""
    with ChainOpener(path, policy or DEFAULT_POLICY) as opener:
        return open_file(opener.open_top(writable), writable, fmt,
                         _near(opener, path, opener.top_place()))


def _near(opener: ChainOpener, image_path: str, place: Place) -> NearOpener:
    """The :data:`~formats.base.NearOpener` of one layer: names resolved from its folder."""

    def open_near(name: str, writable: bool, field: str, what: str) -> HostFile:
        got = opener.open_named(image_path, place, name, writable, field, what)
        if got is None:
            raise ImageIOError(image_path, f"{what} not found: {name}", errno_mod.ENOENT)
        return got[0]

    return open_near


# How a caller shares parents between chains: given the parent's file (already opened and
# checked), its recorded format and its NearOpener, return the parent image (the daemon's
# ImagePool returns the one it already has for that file and closes the new fd).
ParentOpener = Callable[[HostFile, str | None, NearOpener], Image]


def _open_backing(opener: ChainOpener, layer: Image, place: Place,
                  writable: bool = False) -> tuple[HostFile, Place]:
    """The first of ``layer``'s backing candidates (a VHD has several parent locators) that
    exists and that the policy lets it reach; a candidate outside is skipped, and refused
    only when no other one is found."""
    tried = []
    outside: BackingOutside | None = None
    for name in layer.backing_candidates():
        try:
            got = opener.open_named(layer.path, place, name, writable, "backing_file",
                                    "backing file", layer.file.dev_ino)
        except BackingOutside as e:
            outside = outside or e
            continue
        if got is not None:
            return got
        tried.append(name)
    if outside is not None:
        raise outside
    raise FormatError(layer.path, "backing file not found", "backing_file",
                      tried[0] if len(tried) == 1 else tried)


def open_image(
    path: str,
    writable: bool = False,
    fmt: str | None = None,
    *,
    open_parent: ParentOpener | None = None,
    policy: OpenPolicy | None = None,
    writable_depths: frozenset[int] = frozenset(),
) -> Image:
    """Open ``path`` and its backing chain.  The top image is writable as ``writable``
    says; a parent only where its depth (1: the top's backing file) is in
    ``writable_depths`` (``commit`` writes into one), and never through ``open_parent``.

    Every file an image names (backing files, data files) is opened by one
    :class:`~formats.opener.ChainOpener`: by default beneath the folder ``path`` is named
    in, decided on what was opened (formats/opener.py); ``policy`` may widen that.
    ``open_parent`` lets a caller share parent images between chains (the daemon opens a
    base once for many overlays); by default each parent is opened read-only here.
    """
    from .remote import looks_remote

    remote_top = looks_remote(path)
    # A remote top (``cowd create --base URL``) has no folder: its names must be remote.
    opener = ChainOpener(os.path.join(os.getcwd(), "-") if remote_top else path,
                         policy or DEFAULT_POLICY)
    top: Image | None = None
    try:
        if remote_top:
            place = Place(path, None, remote=True)
            tfile = opener.open_remote_top(path)
        else:
            place = opener.top_place()
            tfile = opener.open_top(writable)
        top = open_file(tfile, writable, fmt, _near(opener, path, place))
        _link_parents(opener, top, place, {top.file.dev_ino}, open_parent, writable_depths)
        return top
    except BaseException:
        if top is not None:
            if open_parent is None:
                top.close_chain()
            else:
                top.close()
        raise
    finally:
        opener.close()


def _link_parents(opener: ChainOpener, top: Image, place: Place, seen: set[tuple[int, int]],
                  open_parent: ParentOpener | None = None,
                  writable_depths: frozenset[int] = frozenset()) -> None:
    """Open ``top``'s backing chain (``top`` found at ``place``; ``seen``: the files already
    in the chain) and link each layer to its parent."""
    layer = top
    for depth in range(1, MAX_CHAIN_DEPTH + 2):
        if not layer.backing_candidates():
            return
        if depth > MAX_CHAIN_DEPTH:
            raise CorruptImage(top.path, "backing chain too deep", "depth", depth)
        pwritable = depth in writable_depths
        pfile, pplace = _open_backing(opener, layer, place, pwritable)
        if pfile.dev_ino in seen:
            pfile.close()
            raise CorruptImage(layer.path, "backing chain loops back", "backing_file",
                               layer.backing_name)
        seen.add(pfile.dev_ino)
        near = _near(opener, pfile.path, pplace)
        pfmt = layer.backing_format
        if open_parent is not None and not pwritable:
            parent = open_parent(pfile, pfmt, near)
        else:
            parent = open_file(pfile, pwritable, pfmt, near)
        layer.backing = parent
        layer.below = ChainBelow(parent)
        layer.backing_path = pfile.path
        layer.check_backing(parent)
        layer, place = parent, pplace
    raise AssertionError("unreachable")


def open_named_chain(owner: Image, name: str, fmt: str | None = None, *,
                     policy: OpenPolicy | None = None) -> Image | None:
    """The image ``owner`` would reach by recording ``name`` as its backing file, with its
    own chain, read-only and confined exactly as ``owner``'s own chain would be (the new
    backing file of a rebase); None when no such file exists.  A chain that reaches
    ``owner`` itself is refused (a loop)."""
    opener = ChainOpener(owner.path, policy or DEFAULT_POLICY)
    img: Image | None = None
    try:
        got = opener.open_named(owner.path, opener.top_place(), name, False, "backing_file",
                                "backing file", owner.file.dev_ino)
        if got is None:
            return None
        file, place = got
        if file.dev_ino == owner.file.dev_ino:
            file.close()
            raise CorruptImage(owner.path, "backing chain loops back", "backing_file", name)
        img = open_file(file, False, fmt, _near(opener, file.path, place))
        _link_parents(opener, img, place, {owner.file.dev_ino, img.file.dev_ino})
        return img
    except BaseException:
        if img is not None:
            img.close_chain()
        raise
    finally:
        opener.close()


def create_overlay(
    out_path: str,
    base_path: str,
    overlay_format: str = "qcow2",
    base_format: str | None = None,
    *,
    cluster_size: int | None = None,
    absolute_backing: bool = False,
    policy: OpenPolicy | None = None,
    size: int | None = None,
    extended_l2: bool = False,
) -> None:
    """Create an empty overlay over ``base_path`` recording it (relative where possible).
    The base's own chain is opened as ``policy`` allows.  ``size`` (qcow2 only): a virtual
    size at least the base's (the guest sees zeroes past the base's end); ValueError for a
    smaller one.  ``extended_l2`` (qcow2 only): subclusters."""
    overlay_format = canonical_format(overlay_format)
    base = open_image(base_path, False, base_format, policy=policy)
    try:
        base_fmt = base.format_name
        from .remote import looks_remote

        if looks_remote(base_path):
            name = base_path  # a remote base: its URL, as qemu records it
        elif absolute_backing:
            name = os.path.abspath(base_path)
        else:
            name = os.path.relpath(os.path.abspath(base_path),
                                   os.path.dirname(os.path.abspath(out_path)))
        if overlay_format == "qcow2":
            from . import qcow2

            if size is not None and size < base.virtual_size:
                raise ValueError(f"{out_path}: --size smaller than the base's virtual size "
                                 f"(size={size}, base={base.virtual_size})")
            qcow2.create(out_path, base.virtual_size if size is None else size,
                         backing_name=name,
                         backing_format=base_fmt,
                         cluster_size=cluster_size or qcow2.DEFAULT_CLUSTER_SIZE,
                         extended_l2=extended_l2)
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
    "FORMATS_VERSION",
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
    "OpenPolicy",
    "Placed",
    "Qcow2Image",
    "QcowImage",
    "RawImage",
    "UnsupportedImage",
    "VhdImage",
    "canonical_format",
    "create_overlay",
    "open_file",
    "open_image",
    "open_named_chain",
    "open_one",
    "read_placed",
    "resolve_in_chain",
]
