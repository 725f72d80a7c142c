"""Layer: formats.qcow2, above image.py.  Growing and shrinking a qcow2 image's virtual size.

Theory of operation (crash-safe by the package's rules, formats/qcow2/__init__.py)
----------------------------------------------------------------------------------
Growing.
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

Shrinking (``qemu-img resize --shrink``; refused while the image has internal snapshots, as
qemu refuses it).  The invariant kept at every instant: nothing is mapped past the virtual
size in the header, so a later grow shows zeroes there, never the dropped bytes.  Hence the
header's size is written last, once everything past the new end is unlinked (written first,
a crash would leave clusters mapped past the end for a later grow to show again).  In order:

1. Everything pending is flushed (rules 3-5) and rule 6 is done.
2. The partial last cluster (a size that is not cluster-aligned): its bytes past the new end
   are zeroed through the writer (zero bits, zeroes written or copied up, by rules 1, 3, 4)
   and flushed.  The cluster keeps its data within the new size, as qemu keeps it; qemu
   leaves the bytes past the end in it, which a later grow of its image shows again.
3. The L2 table that holds the new end: its entries past the end are cleared (L2 entry 0,
   bitmap 0: unallocated, as qemu's full discard leaves them) in the cached table and
   flushed, so the table is written and synced before the clusters it reached are freed
   (rule 4).  Each entry is 8 bytes (16 with extended L2) in one sector: a torn write
   leaves each one old or cleared.
4. The L1 entries of tables wholly past the end are cleared in place and synced; then
   (rule 4) those tables' data clusters and compressed streams are freed, and the tables.
   The L1 table keeps its size (qemu's does too), so growing back needs no new table.
   A crash in 2-4 leaves the old size, every byte within the new size as it was, and part
   of the dropped range reading as unallocated (zeroes, or the backing file as qemu's own
   shrink leaves it), with leaks at worst.
5. The header's size (8 bytes, sector-atomic), synced: the new size, or (crash) the old.
6. The reserved batch given back, and the file cut after the last cluster in use (as qemu
   does; a crash before leaves leaks past the end).
"""

from __future__ import annotations

import struct
from array import array

from ..errors import UnsupportedImage
from .image import Qcow2Image
from .layout import L1E_OFFSET_MASK, QCOW_MAX_L1_SIZE, div_round_up, words_bytes
from .writer import TableChange

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


def shrink(img: Qcow2Image, new_size: int) -> None:
    """Shrink ``img`` (open writable; its backing chain open, for the copy-up of a partial
    last cluster) to ``new_size`` bytes, dropping what lies past it, as the module says."""
    img.require_writable()
    if new_size > img.virtual_size:
        raise ValueError(f"{img.path}: shrink() cannot grow (size={new_size})")
    if img.snapshots:
        raise UnsupportedImage(img.path, "cannot shrink an image which has internal "
                               "snapshots (as qemu-img: delete them first)", "snapshots",
                               len(img.snapshots))
    img.flush()  # 1
    img._begin_modify()
    cs = img.cluster_size
    tail_end = min(div_round_up(new_size, cs) * cs, img.virtual_size)
    if tail_end > new_size:  # 2
        img.write_zeroes(new_size, tail_end - new_size)
        img.flush()
    kept = div_round_up(new_size, cs)  # guest clusters kept, the partial one included
    per_table = 1 << img.l2_bits
    tables = div_round_up(kept, per_table)
    tbl = img._l2_get(tables - 1) if kept % per_table else None
    if tbl is not None:  # 3
        first = kept % per_table
        if any(tbl.entries[first * (2 if img.extended_l2 else 1):]):
            tbl = img._l2_for_write(tables - 1)  # ours already: no snapshot shares it
            change = TableChange(img, tbl)
            for idx in range(first, per_table):
                e, bm = img._get_entry(tbl, idx)
                if e or bm:
                    change.set_entry(idx, 0, 0, img._host_range(e))
            change.commit()
            img.flush()  # the table, synced; then the frees (rule 4)
    dropped = [(i, e) for i, e in enumerate(img.l1) if i >= tables and e & L1E_OFFSET_MASK]
    if dropped:  # 4
        for i, _ in dropped:
            img.l1[i] = 0
        img._write_l1_entries([i for i, _ in dropped])
        img.file.sync()
        img.free_l2_tables(dropped)  # rule 4
    img.file.pwrite(HEADER_SIZE_OFFSET, struct.pack(">Q", new_size))  # 5
    img.file.sync()
    img.virtual_size = new_size
    img.cut_unused_tail()  # 6
