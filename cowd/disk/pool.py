"""Layer: cowd disk.  The images a daemon holds open: a :class:`Layer` per image (its cache
identity, granule and lock) and the :class:`ImagePool` that opens every parent once and
shares it, refcounted, between the chains of every disk (many overlays on one base share the
base's open file *and* its cache entries: the base has one layer id).

Invariants: parents are opened read-only and never written; a file is never a writable top
and anyone's parent (or two writable tops) at the same time; every image open here holds
qemu's lock bytes (cowd/imagelock.py).  Trio-thread only.
"""

from __future__ import annotations

import os
from itertools import count

import trio

import formats
from formats.base import Image, NearOpener
from formats.errors import CorruptImage
from formats.remote import RemoteBase

from .. import imagelock
from ..errors import CommandFailed, UsageError

# A remap granule is the layer's cluster size, but never smaller than this (a qcow2 image of
# 512-byte clusters would otherwise need 128 lookups per 64 KiB) nor larger than
# MAX_GRANULE_BYTES (one entry's resolver pass must stay short).
MIN_GRANULE_BYTES = 64 << 10
MAX_GRANULE_BYTES = 64 << 20

# Worker threads for blocking calls (flush; library writes when offloaded), per pool.
MAX_SYNC_THREADS = 8

_layer_ids = count(1)


def granule_for(image: Image) -> int:
    size = image.cluster_size
    if size <= 0:
        return MIN_GRANULE_BYTES
    return min(max(size, MIN_GRANULE_BYTES), MAX_GRANULE_BYTES)


class Layer:
    """One image of a chain as the daemon holds it: the image, its cache identity and lock."""

    def __init__(self, image: Image):
        self.image = image
        self.layer_id = next(_layer_ids)
        self.granule = granule_for(image)
        self.size = image.virtual_size
        self.lock = trio.Lock()  # held by whoever calls into the image from a worker thread
        self.refs = 0
        self.file_key = image.file.dev_ino
        self.primed = False  # a shared parent is primed once (it never changes)
        # A remote base (formats/remote/): its file is a local cache whose blocks must be
        # held before they are read (cowd/disk/remote.py).
        self.remote: RemoteBase | None = getattr(image.file, "remote", None)

    def __repr__(self) -> str:
        return f"<Layer {self.layer_id} {self.image.path!r} granule={self.granule}>"


def lock_image(image: Image, writable: bool) -> None:
    """qemu's lock bytes on the image's fd (cowd/imagelock.py), held while it is open; an
    image a qemu process writes (or reads and forbids writing) is refused in one line."""
    try:
        imagelock.lock_image(image.file.fd, image.path, writable)
    except imagelock.ImageLocked as e:
        raise CommandFailed(str(e)) from None


def file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class ImagePool:
    """Parent images opened once per daemon and shared, refcounted, between disks.

    Also remembers which files are open as a top, so a file is never a writable top and
    anyone's parent (or two writable tops) at the same time.  Trio-thread only.
    """

    def __init__(self, *, sync_threads: int = MAX_SYNC_THREADS):
        self._parents: dict[tuple[int, int], Layer] = {}
        self._by_image: dict[int, Layer] = {}  # id(image) -> layer, for open_parent's callers
        # file key -> [disks with it as their top, whether one of them writes it]
        self._tops: dict[tuple[int, int], list[int | bool]] = {}
        self.limiter = trio.CapacityLimiter(sync_threads)
        self.images_opened = 0  # parents actually opened (sharing shows as fewer)

    def open_parent(self, file: formats.HostFile, fmt: str | None,
                    near: NearOpener) -> Image:
        """``formats.open_image``'s ``open_parent``: the shared, read-only parent image for
        the file the chain's opener found (keyed by what was opened, never by name)."""
        key = file.dev_ino
        layer = self._parents.get(key)
        if layer is not None or self._top_writable(key):
            file.close()
        if self._top_writable(key):
            raise CommandFailed(f"{file.path}: is served as a writable disk and cannot be a "
                             "parent too")
        if layer is None:
            image = formats.open_file(file, False, fmt, near)
            try:
                lock_image(image, writable=False)
            except (UsageError, CommandFailed):
                image.close()
                raise
            layer = Layer(image)
            self._parents[layer.file_key] = layer
            self._by_image[id(image)] = layer
            self.images_opened += 1
        elif fmt is not None and formats.canonical_format(fmt) != layer.image.format_name:
            raise CorruptImage(file.path, "parent is already open in another format",
                               "backing_format", fmt)
        layer.refs += 1
        return layer.image

    def layer_of(self, image: Image) -> Layer:
        return self._by_image[id(image)]

    def release(self, layer: Layer) -> bool:
        """Drop one reference; True if it was the last (the image is now closed)."""
        layer.refs -= 1
        if layer.refs > 0:
            return False
        self._parents.pop(layer.file_key, None)
        self._by_image.pop(id(layer.image), None)
        layer.image.close()
        return True

    def _top_writable(self, key: tuple[int, int]) -> bool:
        entry = self._tops.get(key)
        return entry is not None and bool(entry[1])

    def check_top(self, path: str, key: tuple[int, int] | None, writable: bool) -> None:
        if key is None:
            return
        if writable and key in self._parents:
            raise CommandFailed(f"{path}: is a parent of a served disk and cannot be written")
        if key in self._tops and (writable or self._top_writable(key)):
            raise CommandFailed(f"{path}: is already served")

    def add_top(self, key: tuple[int, int], writable: bool) -> None:
        entry = self._tops.setdefault(key, [0, False])
        entry[0] = int(entry[0]) + 1
        entry[1] = bool(entry[1]) or writable

    def remove_top(self, key: tuple[int, int]) -> None:
        entry = self._tops.get(key)
        if entry is None:
            return
        entry[0] = int(entry[0]) - 1
        if entry[0] <= 0:
            del self._tops[key]

    def open_count(self) -> int:
        return len(self._parents)



__all__ = ["MAX_GRANULE_BYTES", "MIN_GRANULE_BYTES", "ImagePool", "Layer", "file_key",
           "granule_for", "lock_image"]
