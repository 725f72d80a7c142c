"""Layer: formats.qcow2, above image.py.  Growing a qcow2 image's virtual size.

Theory of operation (crash-safe by the package's rules, formats/qcow2/__init__.py)
----------------------------------------------------------------------------------
The virtual size lives in the header; the L1 table must have an entry for every
``cluster_size * l2_entries`` bytes of it.  When the L1 table already has room, growing
writes the new size (one 8-byte field, sector-atomic) and syncs.  Otherwise, in this order:

1. Rule 1 (refcounts before references): the new table's clusters, taken above every
   cluster in use, get refcount 1 (``Refcounts.apply``, which itself follows rule 2 when a
   refcount block or a larger refcount table is needed), synced.
2. Rule 3 (the table before what reaches it): the new L1 table — the old entries, then
   zeroes — is written there and synced.  A crash up to here leaks the new clusters (check
   finds leaks, never a corruption) and leaves the old size and table.
3. The header's size, l1_size and l1_table_offset (bytes 24 to 48 of the first sector) in
   one write, synced: the image now has the new size and table, or (crash) the old ones.
4. Rule 4 (frees after the unlink is durable): the old table's clusters get refcount 0.
   A crash before this leaks them.

Nothing else changes: no L2 table or data cluster moves, so no guest byte changes place.
Snapshots keep their own L1 tables and sizes.
"""

from __future__ import annotations

import struct
from array import array

from ..errors import UnsupportedImage
from .image import Qcow2Image
from .layout import QCOW_MAX_L1_SIZE, div_round_up, words_bytes

# Header fields rewritten together (qcow2.txt): size at 24 (u64), crypt_method at 32 (u32,
# written back unchanged), l1_size at 36 (u32), l1_table_offset at 40 (u64).
HEADER_SIZE_OFFSET = 24
HEADER_SIZE_FIELDS = struct.Struct(">QIIQ")


def grow(img: Qcow2Image, new_size: int) -> None:
    """Grow ``img`` (open writable, flushed) to ``new_size`` bytes, as the module says."""
    img.require_writable()
    if new_size < img.virtual_size:
        raise ValueError(f"{img.path}: grow() cannot shrink (size={new_size})")
    cs = img.cluster_size
    per_l2 = cs << img.l2_bits
    needed = div_round_up(new_size, per_l2)
    if needed * 8 > QCOW_MAX_L1_SIZE:
        raise UnsupportedImage(img.path, "virtual size too large for this cluster size",
                               "size", new_size)
    img.flush()
    header = img.file.pread_exact(0, HEADER_SIZE_OFFSET + HEADER_SIZE_FIELDS.size, "header")
    _, crypt, l1_size, l1_offset = HEADER_SIZE_FIELDS.unpack_from(header, HEADER_SIZE_OFFSET)
    if needed <= l1_size:
        img.file.pwrite(HEADER_SIZE_OFFSET, struct.pack(">Q", new_size))
        img.file.sync()
        img.virtual_size = new_size
        return
    rc = img.refcounts
    old_clusters = div_round_up(l1_size * 8, cs) if l1_size else 0
    new_clusters = div_round_up(needed * 8, cs)
    start = rc.alloc_run(new_clusters, div_round_up(img.file.size(), cs))  # 1 (rule 1)
    new_offset = start * cs
    table = array("Q", img.l1) + array("Q", bytes(8 * (needed - len(img.l1))))
    body = words_bytes(table)
    img.file.pwrite(new_offset, body + bytes(new_clusters * cs - len(body)))  # 2 (rule 3)
    img.file.sync()
    img.file.pwrite(HEADER_SIZE_OFFSET,  # 3
                    HEADER_SIZE_FIELDS.pack(new_size, crypt, needed, new_offset))
    img.file.sync()
    img.l1 = table
    img.l1_table_offset = new_offset
    img.virtual_size = new_size
    if old_clusters:  # 4 (rule 4)
        first = l1_offset // cs
        rc.apply({first + i: 0 for i in range(old_clusters)}, durable=True)
