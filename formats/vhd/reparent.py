"""Layer: formats.vhd, above image.py.  Recording another parent in a differencing VHD: the
dynamic disk header's Parent Unique Id, Parent Time Stamp and Parent Unicode Name, and its
parent locators (``qemu-img rebase``'s header switch; the caller has already made the old and
the new parent show the same bytes through this disk).

Theory of operation (crash-safe)
--------------------------------
The dynamic disk header is 1024 bytes (two sectors under one checksum), so rewriting it in
place could be torn by a power cut into a header no reader accepts.  Instead a new header and
new locator data are written where nothing reads them, and the footer — one sector, found
at the end of the file and copied at offset 0 — is switched to them:

1. A copy of the current footer is written at the new end of the file, past the current
   trailing footer (which stays: the file ends in a valid footer all along, as when a block
   is allocated), then the new header and the new locators' data between the two; synced.
   The file now reads as before: the footers still name the old header.
2. The trailing footer, with Data Offset naming the new header (and a new checksum): one
   sector, synced.  Readers take the trailing footer (cowd, libvhdi): the disk has the new
   parent from here on.
3. The footer copy at offset 0, the same sector, synced.  Between 2 and 3 the two copies
   differ; ``check`` reports it and ``check --repair`` rewrites the copy from the footer in
   use, which is what 3 does.

The old header and locators stay in the file, unreferenced.  Nothing that maps guest bytes
(BAT, blocks, bitmaps) changes.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..base import SECTOR
from ..errors import UnsupportedImage
from .image import VhdImage
from .parents import (
    decode_utf16,
    new_locators,
    place_locators,
    read_locators,
    unicode_name,
)
from .structures import DYNAMIC_HEADER_SIZE, FOOTER_SIZE, Region, vhd_time_stamp


def _round(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR


def set_parent(img: VhdImage, parent: VhdImage, name: str) -> None:
    """Record ``parent`` (an open VHD), named ``name`` from ``img``'s folder, as the parent
    of the differencing disk ``img``, as the module says."""
    img.require_writable()
    if not img.differencing or img.header is None:
        raise UnsupportedImage(img.path, "only a differencing VHD records a parent",
                               "disk_type", img.disk_type)
    img.flush()
    child_dir = os.path.dirname(os.path.abspath(img.path))
    parent_abs = os.path.normpath(os.path.join(child_dir, name))
    relative = os.path.relpath(parent_abs, child_dir) if os.path.isabs(name) else name
    try:
        locators = new_locators(parent_abs, relative)
    except ValueError as e:
        raise UnsupportedImage(img.path, str(e), "parent", name) from None
    header = replace(img.header, parent_unique_id=parent.footer.unique_id,
                     parent_time_stamp=vhd_time_stamp(os.fstat(parent.file.fd).st_mtime),
                     parent_unicode_name=unicode_name(name))
    tail = img._tail_footer_offset
    start = tail + FOOTER_SIZE if tail is not None else _round(img.file.size())
    placed = place_locators(header, locators, start + DYNAMIC_HEADER_SIZE)
    end = _round(max(off + len(blob) for off, blob in placed))
    img.file.pwrite(end, img._footer_bytes)  # 1: the file keeps ending in a footer
    img.file.pwrite(start, header.pack())
    for off, blob in placed:
        img.file.pwrite(off, blob)
    img.file.sync()
    footer = replace(img.footer, data_offset=start)
    raw = footer.pack()
    img.file.pwrite(end, raw)  # 2
    img.file.sync()
    img.file.pwrite(0, raw)  # 3
    img.file.sync()
    # The codec's state (this module is part of the codec).
    img.footer, img._footer_bytes, img.header = footer, raw, header
    img._tail_footer_offset = img._data_end = end
    regions = [r for r in img._metadata_regions
               if r.what in ("footer copy", "BAT")]
    regions.append(Region(start, start + DYNAMIC_HEADER_SIZE, "dynamic disk header"))
    found = read_locators(img.path, img.file, header, end, regions)
    img._metadata_regions = regions + found.regions
    img.locators = found.paths
    img.parent_unique_id = parent.footer.unique_id
    img.parent_name = decode_utf16(header.parent_unicode_name, "utf-16-be", img.path,
                                   "parent unicode name")
    img.backing_name = img.backing_candidates()[0]
