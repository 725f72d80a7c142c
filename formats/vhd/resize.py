"""Layer: formats.vhd, above switch.py.  Growing a VHD's virtual size (``qemu-img resize``
cannot: qemu's vpc driver has no resize).

The size lives in the footer: Current Size (and Original Size, which libvhdi reads) and the
CHS geometry, chosen as ``create`` chooses them (structures.size_for_create: the exact
size, with the spec's geometry when it covers it, else the maximal geometry that tells
geometry readers to use Current Size).  Differencing disks are not grown: a child larger
than its parent is refused by libvhdi (I/O errors past the parent's end), and Hyper-V does
not resize differencing disks either.

Theory of operation (crash-safe)
--------------------------------
- Dynamic disks: when the BAT has an entry for every block of the new
  size, only the footer changes (switch.py: the trailing footer, then the copy at 0).
  Otherwise a larger BAT (the old entries, then unused ones) and a header that names it are
  written past the trailing footer, and the footer switched to them with the new size, in
  switch.py's order: the disk has its old size and BAT, or its new size and BAT.  The new
  blocks are unallocated: zeroes.
- Fixed disks (the guest bytes, then the footer at the end of the file, which may lie past
  the virtual size): bytes between the old size and the old footer that become guest bytes
  are zeroed first.  When the new size still ends before the old footer, the footer is
  rewritten in place (one sector).  Otherwise the new footer is written at the new end (the
  file grows; the space between reads as zeroes) and synced, then the old footer's sector,
  now guest bytes, is zeroed and synced.  A crash between those two leaves the new size
  with the old footer's 512 bytes at the old end: the one window (the file must end in its
  footer, so no order avoids it); resize reports the new size only once both are durable.
"""

from __future__ import annotations

import array
from dataclasses import replace

from ..base import SECTOR
from ..errors import UnsupportedImage
from .image import VhdImage
from .structures import (
    BAT_ENTRY_UNUSED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_SIZE,
    VHD_MAX_BAT_BYTES,
    Footer,
    Region,
    bat_to_bytes,
    size_for_create,
)
from .switch import free_offset, switch_footer


def _sized(footer: Footer, new_size: int) -> Footer:
    current, geometry = size_for_create(new_size)
    # Original Size too: the spec calls it informational, but libvhdi 20210425 sizes the
    # disk by it.
    return replace(footer, current_size=current, original_size=current,
                   cylinders=geometry.cylinders,
                   heads=geometry.heads, sectors_per_track=geometry.sectors_per_track)


def grow(img: VhdImage, new_size: int) -> None:
    """Grow ``img`` (open writable) to ``new_size`` bytes (whole sectors), as the module
    says."""
    img.require_writable()
    if new_size < img.virtual_size or new_size % SECTOR:
        raise ValueError(f"{img.path}: grow() takes a larger size in whole sectors "
                         f"(size={new_size})")
    try:
        footer = _sized(img.footer, new_size)
    except ValueError as e:
        raise UnsupportedImage(img.path, str(e), "size", new_size) from None
    if img.differencing:
        raise UnsupportedImage(img.path, "growing a differencing VHD is not supported (other "
                               "readers refuse a child larger than its parent)", "size",
                               new_size)
    img.flush()
    if img.fixed:
        _grow_fixed(img, footer, new_size)
        return
    h = img.header
    assert h is not None
    entries = (new_size + img.block_size - 1) // img.block_size
    if entries <= h.max_table_entries:
        switch_footer(img, footer, [])
        img.virtual_size = new_size
        return
    if entries * 4 > VHD_MAX_BAT_BYTES:
        raise UnsupportedImage(img.path, "the BAT would pass its 64 MiB limit for this block "
                               "size", "size", new_size)
    start = free_offset(img)
    bat = array.array("I", img.bat)
    bat.extend([BAT_ENTRY_UNUSED] * (entries - len(bat)))
    table_offset = start + DYNAMIC_HEADER_SIZE
    header = replace(h, table_offset=table_offset, max_table_entries=entries)
    switch_footer(img, replace(footer, data_offset=start),
                  [(start, header.pack()), (table_offset, bat_to_bytes(bat))])
    # The codec's state (this module is part of the codec).
    img.header, img.bat = header, bat
    img._metadata_regions = [
        *(r for r in img._metadata_regions
          if r.what not in ("dynamic disk header", "BAT")),
        Region(start, start + DYNAMIC_HEADER_SIZE, "dynamic disk header"),
        Region(table_offset, table_offset + entries * 4, "BAT"),
    ]
    img.virtual_size = new_size


def _grow_fixed(img: VhdImage, footer: Footer, new_size: int) -> None:
    old = img.virtual_size
    tail = img._tail_footer_offset
    assert tail is not None  # a fixed disk is opened only with its footer at the end
    gap_end = min(new_size, tail)
    if gap_end > old:  # bytes past the old size and before its footer: guest bytes now
        img._zero_file(old, gap_end - old, False)
    raw = footer.pack()
    if new_size <= tail:
        img.file.sync()
        img.file.pwrite(tail, raw)  # the footer in place: one sector
        img.file.sync()
    else:
        img.file.sync()
        img.file.pwrite(new_size, raw)  # the new footer ends the file
        img.file.sync()
        img.file.pwrite(tail, bytes(FOOTER_SIZE))  # the old one is guest bytes now
        img.file.sync()
        img._tail_footer_offset = img._data_end = new_size
    img.footer, img._footer_bytes = footer, raw
    img.virtual_size = new_size
