"""Layer: formats.vhd, above image.py.  Changing a VHD's metadata by switching its footer: the
one crash-safe step that reparent.py (a new parent) and resize.py (a new size, a larger BAT)
share.

Theory of operation (crash-safe)
--------------------------------
The footer is one sector, at the end of the file and (dynamic and differencing disks) copied
at offset 0; readers take the one at the end (cowd, qemu, libvhdi) and fall back to the copy.
The dynamic disk header is two sectors under one checksum and the BAT many: rewritten in
place, a power cut could tear them.  So new structures are written where nothing reads them
and the footer is switched to them:

1. New structures (a header, a BAT, locator data) go past the current trailing footer, which
   stays; a copy of the current footer is written first at the new end of the file, so the
   file ends in a valid footer all along, as when a block is allocated (image.py).  Synced.
   The disk reads as before: the footers name the old structures.
2. The trailing footer becomes the new one (one sector), synced: the disk has the new
   metadata from here on.
3. The copy at offset 0 becomes the same sector, synced.  Between 2 and 3 the two copies
   differ; ``check`` reports it and ``check --repair`` rewrites the copy from the footer in
   use, which is what 3 does.

What the old structures held stays in the file, unreferenced.
"""

from __future__ import annotations

from ..base import SECTOR
from .image import VhdImage
from .structures import FOOTER_SIZE, Footer


def free_offset(img: VhdImage) -> int:
    """Where new structures may go: past the trailing footer (or the file's end)."""
    tail = img._tail_footer_offset
    if tail is not None:
        return tail + FOOTER_SIZE
    return (img.file.size() + SECTOR - 1) // SECTOR * SECTOR


def switch_footer(img: VhdImage, footer: Footer, writes: list[tuple[int, bytes]]) -> None:
    """Write ``writes`` (file offset, bytes: past :func:`free_offset`), then switch to
    ``footer``, as the module says; the footer goes after the last write (in place when
    there is none).  Updates the image's footer state; the caller updates the rest."""
    if writes:
        end = max(off + len(blob) for off, blob in writes)
        end = (end + SECTOR - 1) // SECTOR * SECTOR
        img.file.pwrite(end, img._footer_bytes)  # 1: the file keeps ending in a footer
        for off, blob in writes:
            img.file.pwrite(off, blob)
        img.file.sync()
    else:
        tail = img._tail_footer_offset
        end = tail if tail is not None else free_offset(img)
    raw = footer.pack()
    img.file.pwrite(end, raw)  # 2
    img.file.sync()
    if not img.fixed:
        img.file.pwrite(0, raw)  # 3
        img.file.sync()
    # The codec's state (this module is part of the codec).
    img.footer, img._footer_bytes = footer, raw
    img._tail_footer_offset = img._data_end = end
