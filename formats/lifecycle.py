"""Layer: formats, above the codecs.  The changes of an image's life cycle that each format
makes its own way — grow or shrink the virtual size, empty an overlay, record another
backing file —
behind one name each, for commit, rebase and resize (formats/commit.py, rebase.py and
cowd's lifecycle commands).

Each format's module says its crash-safe order: formats/qcow2/resize.py, empty.py,
backing.py; formats/vhd/resize.py, empty.py, reparent.py (the first and the last by
switch.py).  A format that cannot do one raises UnsupportedImage naming what it is.
"""

from __future__ import annotations

from .base import Image
from .errors import UnsupportedImage
from .qcow2 import Qcow2Image
from .qcow2.backing import set_backing as qcow2_set_backing
from .qcow2.empty import make_empty as qcow2_make_empty
from .qcow2.resize import grow as qcow2_grow
from .qcow2.resize import shrink as qcow2_shrink
from .raw import RawImage
from .vhd import VhdImage
from .vhd.empty import make_empty as vhd_make_empty
from .vhd.reparent import set_parent as vhd_set_parent
from .vhd.resize import grow as vhd_grow


def grow(img: Image, new_size: int) -> None:
    """Make ``img`` (open writable) ``new_size`` bytes, at least its current size; the new
    bytes read as zeroes (qcow2 over a larger backing file: zero clusters hide it, as qemu;
    the backing chain must be open for that).  Durable when it returns."""
    img.require_writable()
    if new_size < img.virtual_size:
        raise ValueError(f"{img.path}: grow() cannot shrink (size={new_size})")
    if new_size == img.virtual_size:
        return
    if isinstance(img, RawImage):
        img.file.truncate(new_size)  # the new tail is a hole: zeroes
        img.file.sync()
        img.virtual_size = new_size
    elif isinstance(img, Qcow2Image):
        old_size = img.virtual_size
        shows = img.below.size > old_size  # the backing file would show past the old end
        if shows and img.version < 3:
            raise UnsupportedImage(img.path, "cannot grow a compat=0.10 image over a larger "
                                   "backing file: it has no zero clusters to hide it (as "
                                   "qemu-img)", "size", new_size)
        qcow2_grow(img, new_size)
        if shows:
            # As qemu: zero clusters over the new range (written after the header's switch,
            # as qemu writes them; a crash between shows the backing file there).
            img.write_zeroes(old_size, new_size - old_size)
            img.flush()
    elif isinstance(img, VhdImage):
        vhd_grow(img, new_size)
    else:
        raise UnsupportedImage(img.path, f"growing a {img.format_name} image is not "
                               "supported", "size", new_size)


def shrink(img: Image, new_size: int) -> None:
    """Make ``img`` (open writable, with its backing chain) ``new_size`` bytes, at most its
    current size, dropping what lies past it (qemu-img resize --shrink).  Durable when it
    returns.  raw: truncated; qcow2: formats/qcow2/resize.py; VHD and qcow (v1): refused,
    as qemu refuses them."""
    img.require_writable()
    if new_size > img.virtual_size:
        raise ValueError(f"{img.path}: shrink() cannot grow (size={new_size})")
    if new_size == img.virtual_size:
        return
    if isinstance(img, RawImage):
        img.file.truncate(new_size)
        img.file.sync()
        img.virtual_size = new_size
    elif isinstance(img, Qcow2Image):
        qcow2_shrink(img, new_size)
    else:
        raise UnsupportedImage(img.path, f"shrinking a {img.format_name} image is not "
                               "supported", "size", new_size)


def make_empty(img: Image) -> None:
    """Unallocate everything ``img``'s active layer holds, so that it reads from its backing
    file again.  The caller has made the backing file show those bytes (and synced it)."""
    img.require_writable()
    if isinstance(img, Qcow2Image):
        qcow2_make_empty(img)
    elif isinstance(img, VhdImage):
        vhd_make_empty(img)
    else:
        raise UnsupportedImage(img.path, f"emptying a {img.format_name} image is not "
                               "supported", "format", img.format_name)


def set_backing(img: Image, name: str | None, fmt: str | None, parent: Image | None) -> None:
    """Record ``name`` (None: no backing file) of format ``fmt`` as ``img``'s backing file,
    in one crash-safe switch.  ``parent``: that file, opened (a differencing VHD records its
    parent's unique id; None where it is not at hand, e.g. an unsafe rebase onto a file not
    there yet, which only qcow2 can record).  The open chain is not relinked: reopen."""
    img.require_writable()
    if isinstance(img, Qcow2Image):
        qcow2_set_backing(img, name, fmt)
    elif isinstance(img, VhdImage) and img.differencing:
        if name is None:
            raise UnsupportedImage(img.path, "a differencing VHD cannot be made standalone in "
                                   "place (cowd convert it to a new image instead)",
                                   "backing_file", "")
        if not isinstance(parent, VhdImage):
            raise UnsupportedImage(img.path, "a differencing VHD's parent must be a VHD that "
                                   "exists (its unique id is recorded)", "backing_file", name)
        vhd_set_parent(img, parent, name)
    else:
        raise UnsupportedImage(img.path, f"a {img.format_name} image records no backing "
                               "file", "format", img.format_name)
