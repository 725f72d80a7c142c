"""Layer: formats.vhd, beside image.py (above structures.py and parents.py).  Creating VHDs:
fixed and dynamic disks (as ``qemu-img create -f vpc`` does) and differencing disks (which
qemu cannot create).

A new file is never written over an existing one (O_EXCL), is complete and synced before
``create`` returns, and is removed if writing it fails.  Its size and geometry follow
:func:`~.structures.size_for_create`, so that qemu (geometry) and libvhdi (Current Size)
read the same size; a differencing disk records its parent's unique id, modification time
and name, and locators that name it (W2ru, W2ku, MacX).
"""

from __future__ import annotations

import os
import time
import uuid

from ..base import SECTOR
from .image import VhdImage
from .parents import new_locators, place_locators, unicode_name
from .structures import (
    DEFAULT_BLOCK_SIZE,
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_SIZE,
    MAX_GEOMETRY,
    NO_DATA_OFFSET,
    VHD_MAX_BAT_BYTES,
    VHD_MAX_BLOCK_SIZE,
    VHD_MIN_BLOCK_SIZE,
    DynamicHeader,
    Footer,
    Geometry,
    size_for_create,
    vhd_time_stamp,
)


def _new_footer(disk_type: int, current_size: int, geometry: Geometry,
                data_offset: int) -> Footer:
    c, h, s = geometry
    return Footer(data_offset=data_offset, time_stamp=vhd_time_stamp(time.time()),
                  original_size=current_size, current_size=current_size, cylinders=c,
                  heads=h, sectors_per_track=s, disk_type=disk_type,
                  unique_id=uuid.uuid4().bytes)


def _write_new_file(path: str, parts: list[tuple[int, bytes]], size: int) -> None:
    """Create ``path`` (never over an existing file) with ``parts`` at their offsets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset, blob in parts:
            view = memoryview(blob)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _dynamic_layout(footer: Footer, header: DynamicHeader,
                    extra: list[tuple[int, bytes]]) -> tuple[list[tuple[int, bytes]], int]:
    """Footer copy, header, an empty BAT, ``extra`` (already placed), trailing footer."""
    bat = b"\xff" * (header.max_table_entries * 4)
    end = header.table_offset + (len(bat) + SECTOR - 1) // SECTOR * SECTOR
    for offset, blob in extra:
        end = max(end, offset + (len(blob) + SECTOR - 1) // SECTOR * SECTOR)
    fb = footer.pack()
    parts = [(0, fb), (footer.data_offset, header.pack()), (header.table_offset, bat),
             *extra, (end, fb)]
    return parts, end + FOOTER_SIZE


def create(path: str, virtual_size: int, *, kind: str = "dynamic",
           block_size: int = DEFAULT_BLOCK_SIZE, round_to_geometry: bool = False) -> None:
    """Create a fixed or dynamic VHD (never over an existing file) of ``virtual_size`` bytes,
    rounded up to a sector, or, with ``round_to_geometry``, up to the spec's CHS geometry as
    ``qemu-img create -f vpc`` does; see :func:`size_for_create`."""
    if kind not in ("dynamic", "fixed"):
        raise ValueError(f"VHD kind must be 'dynamic' or 'fixed', not {kind!r}")
    if virtual_size < 0:
        raise ValueError(f"negative size {virtual_size}")
    current_size, geometry = size_for_create(virtual_size, round_to_geometry)
    if kind == "fixed":
        footer = _new_footer(DISK_TYPE_FIXED, current_size, geometry, NO_DATA_OFFSET)
        _write_new_file(path, [(current_size, footer.pack())], current_size + FOOTER_SIZE)
        return
    if not (VHD_MIN_BLOCK_SIZE <= block_size <= VHD_MAX_BLOCK_SIZE
            and block_size & (block_size - 1) == 0):
        raise ValueError(f"VHD block size must be a power of two in [512, 256 MiB], "
                         f"not {block_size}")
    entries = (current_size + block_size - 1) // block_size
    if entries * 4 > VHD_MAX_BAT_BYTES:
        raise ValueError(f"block size {block_size} too small for {current_size} bytes")
    footer = _new_footer(DISK_TYPE_DYNAMIC, current_size, geometry, FOOTER_SIZE)
    header = DynamicHeader(table_offset=FOOTER_SIZE + DYNAMIC_HEADER_SIZE,
                           max_table_entries=entries, block_size=block_size)
    parts, size = _dynamic_layout(footer, header, [])
    _write_new_file(path, parts, size)


def create_differencing(path: str, parent: VhdImage, parent_name: str) -> None:
    """Create an empty differencing VHD over ``parent`` (an open VHD of any type).

    ``parent_name`` is how the child names the parent, relative to the child's directory
    where possible.  The child records the parent's unique id and modification time, the
    name as Parent Unicode Name, and three locators: W2ru (the relative path, Windows
    style), W2ku (the absolute path) and MacX (a file:// URL).
    """
    parent_abs = os.path.abspath(parent.path)
    child_dir = os.path.dirname(os.path.abspath(path))
    relative = os.path.relpath(parent_abs, child_dir) if os.path.isabs(parent_name) else parent_name
    pf = parent.footer
    size = parent.virtual_size
    if pf.geometry_sectors * SECTOR == size:
        geometry = Geometry(pf.cylinders, pf.heads, pf.sectors_per_track)
    else:
        # The parent is sized by Current Size: the maximal geometry tells readers that
        # size by geometry (qemu) to use Current Size for the child too.
        geometry = MAX_GEOMETRY
    block_size = parent.block_size or DEFAULT_BLOCK_SIZE
    entries = (size + block_size - 1) // block_size
    footer = _new_footer(DISK_TYPE_DIFFERENCING, size, geometry, FOOTER_SIZE)
    header = DynamicHeader(table_offset=FOOTER_SIZE + DYNAMIC_HEADER_SIZE,
                           max_table_entries=entries, block_size=block_size,
                           parent_unique_id=pf.unique_id,
                           parent_time_stamp=vhd_time_stamp(os.stat(parent_abs).st_mtime),
                           parent_unicode_name=unicode_name(parent_name))
    offset = header.table_offset + (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
    extra = place_locators(header, new_locators(parent_abs, relative), offset)
    parts, file_size = _dynamic_layout(footer, header, extra)
    _write_new_file(path, parts, file_size)
