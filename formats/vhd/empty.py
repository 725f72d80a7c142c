"""Layer: formats.vhd, above image.py.  Emptying a differencing VHD: every block unallocated
again, so the whole disk reads from the parent (what ``commit`` does to the overlay it has
merged; qemu's bdrv_make_empty, which qemu's own vpc driver lacks).

Theory of operation (crash-safe)
--------------------------------
The caller has already written what the child holds into the parent and synced it, so every
guest byte the child holds reads the same from the parent: dropping any subset of the
child's blocks leaves the guest view unchanged.  In this order:

1. Everything pending is flushed (image.py: data, then bitmaps and BAT, synced).
2. The BAT is written with every entry unused, in place, and synced.  A crash during the
   write leaves each 512-byte sector of it old or new: each entry is its old block or
   nothing, and both read the same.  The blocks no longer referenced are free space.
3. The file is cut after its metadata (footer copy, header, BAT, parent locators): a footer
   is written where the new end will be, synced, then the file truncated after it and
   synced.  Until the truncate the old trailing footer still ends the file, after it the
   new one does: the file always ends in a valid footer.
"""

from __future__ import annotations

from ..base import SECTOR
from ..errors import UnsupportedImage
from .image import VhdImage
from .structures import BAT_ENTRY_UNUSED, FOOTER_SIZE, bat_to_bytes


def make_empty(img: VhdImage) -> None:
    """Unallocate every block of the differencing disk ``img``, as the module says."""
    img.require_writable()
    if not img.differencing or img.header is None:
        raise UnsupportedImage(img.path, "only a differencing VHD can be emptied (its "
                               "blocks would read as zeroes, not as a parent)", "disk_type",
                               img.disk_type)
    img.flush()  # 1
    if any(e != BAT_ENTRY_UNUSED for e in img.bat):
        for i in range(len(img.bat)):
            img.bat[i] = BAT_ENTRY_UNUSED
        img.file.pwrite(img.header.table_offset, bat_to_bytes(img.bat))  # 2
        img.file.sync()
    # The codec's own state of blocks (this module is part of the codec).
    img._bitmaps.clear()
    img._dirty_bitmaps.clear()
    img._dirty_bat.clear()
    end = max(r.file_end for r in img._metadata_regions)  # 3
    end = (end + SECTOR - 1) // SECTOR * SECTOR
    if end + FOOTER_SIZE >= img.file.size():
        return
    img.file.pwrite(end, img._footer_bytes)
    img.file.sync()
    img.file.truncate(end + FOOTER_SIZE)
    img.file.sync()
    img._tail_footer_offset = img._data_end = end
