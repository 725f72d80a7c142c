"""Layer: formats, above the codecs.  The changes of an image's life cycle that each format
makes its own way — grow the virtual size, empty an overlay, record another backing file —
behind one name each, for commit, rebase and resize (formats/commit.py, rebase.py and
cowd's lifecycle commands).

Each format's module says its crash-safe order: formats/qcow2/resize.py, empty.py,
backing.py; formats/vhd/resize.py, empty.py, reparent.py.  A format that cannot do one
raises UnsupportedImage naming what it is.
"""

from __future__ import annotations

from .base import Image
from .errors import UnsupportedImage
from .qcow2 import Qcow2Image
from .qcow2.empty import make_empty as qcow2_make_empty
from .qcow2.resize import grow as qcow2_grow
from .raw import RawImage
from .vhd import VhdImage
from .vhd.empty import make_empty as vhd_make_empty


def grow(img: Image, new_size: int) -> None:
    """Make ``img`` (open writable) ``new_size`` bytes, at least its current size; the new
    bytes read as zeroes in this layer.  Durable when it returns."""
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
        qcow2_grow(img, new_size)
    else:
        raise UnsupportedImage(img.path, f"growing a {img.format_name} image is not "
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
