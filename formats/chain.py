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

from dataclasses import dataclass, replace

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


def resolve_in_chain(top: Image, guest_offset: int, length: int,
                     stop_depth: int | None = None) -> Placed:
    """The longest run from ``guest_offset`` (at most ``length``) that one layer answers.
    With ``stop_depth``, the layers from that depth down are not asked: a run that no layer
    above answers is UNALLOCATED at ``stop_depth`` (its ``layer`` is the one there)."""
    layer = top
    depth = 0
    while True:
        if depth == stop_depth:
            return Placed(depth, layer, Extent(guest_offset, length, Kind.UNALLOCATED))
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


def read_placed(placed: Placed, guest_offset: int, dest: memoryview) -> None:
    """Fill ``dest`` with the guest bytes at [guest_offset, +len(dest)), a part of the run
    ``placed`` answers, from the layer that holds them (no other layer is read)."""
    ext = placed.extent
    n = len(dest)
    if guest_offset < ext.guest_offset or guest_offset + n > ext.end:
        raise ValueError(f"{placed.layer.path}: {guest_offset}+{n} outside the run "
                         f"{ext.guest_offset}+{ext.length}")
    if ext.kind is Kind.DATA:
        assert ext.file is not None
        ext.file.pread_into(ext.file_offset + (guest_offset - ext.guest_offset), dest)
    elif ext.kind is Kind.COMPRESSED:
        dest[:] = placed.layer.read_compressed(replace(ext, guest_offset=guest_offset,
                                                       length=n))
    elif ext.kind is Kind.ZERO:
        dest[:] = bytes(n)
    else:
        raise ValueError(f"{placed.layer.path}: the run at {ext.guest_offset} is not "
                         "answered above stop_depth: read it from the layers beneath")


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


__all__ = ["ChainBelow", "Placed", "read_placed", "resolve_in_chain"]
