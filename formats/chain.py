"""Layer: formats.  The library's reader of a whole chain: the one place in ``formats`` that
walks from a layer to the layers beneath it.

A codec resolves and allocates in *one* layer; what lies beneath it is a
:class:`~formats.base.Below` that the chain's owner injects.  :func:`formats.open_image`
injects a :class:`ChainBelow` for every parent it links, so a chain opened by the library
reads (and copies up) through here; the daemon injects its cached planner instead
(cowd/disk/), so its copy-ups share the remap cache with its guest reads.

:func:`resolve_in_chain` answers "which layer holds these bytes" for the inspection
commands (map, convert's sparseness).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Extent, Image, Kind
from .errors import CorruptImage


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a run of guest bytes lives in a chain: ``extent`` of ``layer``, the layer
    ``depth`` steps below the top.  Past a shorter parent's end, and below the last layer,
    the bytes are ZERO, reported on the deepest layer consulted."""

    depth: int
    layer: Image
    extent: Extent


def resolve_in_chain(top: Image, guest_offset: int, length: int) -> Placed:
    """The longest run from ``guest_offset`` (at most ``length``) that one layer answers."""
    layer = top
    depth = 0
    while True:
        ext = layer.resolve(guest_offset, length)
        if ext.length <= 0:
            raise CorruptImage(layer.path, "resolver made no progress", "offset", guest_offset)
        if ext.kind is not Kind.UNALLOCATED:
            return Placed(depth, layer, ext)
        length = ext.length
        nxt = layer.backing
        if nxt is None or guest_offset >= nxt.virtual_size:
            return Placed(depth, layer, Extent(guest_offset, length, Kind.ZERO))
        length = min(length, nxt.virtual_size - guest_offset)
        layer = nxt
        depth += 1


class ChainBelow:
    """:class:`~formats.base.Below` for the library: the parent image, read as it reads
    itself (its own ``below`` is the next :class:`ChainBelow`)."""

    def __init__(self, parent: Image):
        self.parent = parent

    @property
    def size(self) -> int:
        return self.parent.virtual_size

    def read_into(self, guest_offset: int, dest: memoryview) -> None:
        length = len(dest)
        n = max(0, min(length, self.parent.virtual_size - guest_offset))
        if n > 0:
            self.parent.read_into(guest_offset, dest[:n])
        if n < length:
            dest[n:] = bytes(length - n)

    def zero_prefix(self, guest_offset: int, length: int) -> int:
        if guest_offset >= self.parent.virtual_size:
            return length
        placed = resolve_in_chain(self.parent, guest_offset, length)
        return placed.extent.length if placed.extent.kind is Kind.ZERO else 0


__all__ = ["ChainBelow", "Placed", "resolve_in_chain"]
