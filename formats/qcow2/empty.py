"""Layer: formats.qcow2, above image.py.  Emptying a qcow2 overlay: every cluster of the
active layer unallocated again, so the whole disk reads from the backing file (what
``qemu-img commit`` does to the overlay it has merged; qemu's bdrv_make_empty).

Theory of operation (crash-safe by the package's rules, formats/qcow2/__init__.py)
----------------------------------------------------------------------------------
The caller has already written what the overlay holds into the backing file and synced it,
so every guest byte the overlay holds reads the same from the backing file: dropping any
subset of the overlay's L2 tables leaves the guest view unchanged.  In this order:

1. Everything pending is flushed (rules 3-5), and rule 6 is done (auto-clear bits).
2. The active L1 table is written as zeroes in place and synced.  A crash during the write
   leaves some sectors of the table old and some new: each L1 entry is either its old
   table or nothing, and both read the same bytes (see above); the tables and clusters no
   longer reached are leaks, which check reports and repairs, never corruption.
3. Rule 4 (frees after the unlink is durable): each table the old L1 reached is read back
   from the file and its references dropped: a table this layer owned alone (COPIED) gives
   back its data clusters and compressed streams and then its own cluster; a table shared
   with an internal snapshot loses one reference and its data stays the snapshot's.
   A crash part way leaks what was not freed yet.
4. Once those refcounts are durable, the file is cut after the last cluster still in use
   (nothing reaches past it, and no refcount on disk counts a cluster there).

Internal snapshots keep their own L1 tables and are untouched.
"""

from __future__ import annotations

from array import array

from .image import Qcow2Image
from .layout import L1E_OFFSET_MASK, div_round_up


def make_empty(img: Qcow2Image) -> None:
    """Unallocate every cluster of ``img``'s active layer, as the module says."""
    img.flush()  # 1
    img._begin_modify()
    old = array("Q", img.l1)
    if not any(e & L1E_OFFSET_MASK for e in old):
        return
    cs = img.cluster_size
    table_bytes = div_round_up(len(old) * 8, cs) * cs if len(old) else 0
    img.file.pwrite(img.l1_table_offset, bytes(table_bytes))  # 2
    img.file.sync()
    img.l1 = array("Q", bytes(8 * len(old)))
    img.free_l2_tables([(i, e) for i, e in enumerate(old) if e & L1E_OFFSET_MASK])  # 3
    img.cut_unused_tail()  # 4
