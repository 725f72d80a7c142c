"""Layer: formats.vhd, above image.py.  Recording another parent in a differencing VHD: the
dynamic disk header's Parent Unique Id, Parent Time Stamp and Parent Unicode Name, and its
parent locators (``qemu-img rebase``'s header switch; the caller has already made the old and
the new parent show the same bytes through this disk).

Theory of operation (crash-safe)
--------------------------------
The dynamic disk header is 1024 bytes (two sectors under one checksum), so rewriting it in
place could be torn by a power cut into a header no reader accepts.  Instead a new header
(the parent's unique id, time stamp and name) and new locator data are written past the
trailing footer, and the footer is switched to them: switch.py says the order (new
structures and synced; the trailing footer; the copy at offset 0).  Nothing that maps guest
bytes (BAT, blocks, bitmaps) changes.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..errors import UnsupportedImage
from .image import VhdImage
from .parents import (
    decode_utf16,
    new_locators,
    place_locators,
    read_locators,
    unicode_name,
)
from .structures import DYNAMIC_HEADER_SIZE, Region, vhd_time_stamp
from .switch import free_offset, switch_footer


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
    start = free_offset(img)
    placed = place_locators(header, locators, start + DYNAMIC_HEADER_SIZE)
    switch_footer(img, replace(img.footer, data_offset=start),
                  [(start, header.pack()), *placed])
    img.header = header
    end = img._data_end
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
