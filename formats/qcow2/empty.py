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

from .header import check_table
from .image import Qcow2Image
from .layout import (
    L1E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    HostRange,
    div_round_up,
    words,
)


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
    for l1e in old:
        img.l2_cache.drop(l1e & L1E_OFFSET_MASK)
    file_size = img.file.size()
    step = 2 if img.extended_l2 else 1
    for i, l1e in enumerate(old):  # 3 (rule 4)
        table = l1e & L1E_OFFSET_MASK
        if not table:
            continue
        frees = []
        if l1e & QCOW_OFLAG_COPIED:
            check_table(img.path, cs, table, cs, file_size, "L2 table", f"l1[{i}]", l1e)
            entries = words(img.file.pread_exact(table, cs, "L2 table"))
            for e in entries[::step]:
                held = img._host_range(e)
                if held is not None:
                    frees.append(held)
        frees.append(HostRange(table, cs))
        img.refcounts.apply_frees(frees)
    img._cc_key = None  # a freed compressed cluster's bytes may be reused
    img.refcounts.release_pool()  # rule 1's reserved batch: unused, and nothing reaches it
    img.file.sync()
    end = (img.refcounts.highest_used() + 1) * cs  # 4
    if img.file.size() > end:
        img.file.truncate(end)
        img.file.sync()

