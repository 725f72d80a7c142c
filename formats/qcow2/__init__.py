"""Layer: formats.  qcow2 images, compat 0.10 (version 2) and 1.1 (version 3): read, write,
check and create.  Imports nothing from ``cowd``.

Spec: qemu's docs/interop/qcow2.txt.  On-disk constants keep the spec's (and qemu's) names.

This package's names are its public API: :class:`Qcow2Image` (the codec), :func:`create`,
:func:`parse_header` and the on-disk constants callers use.  Its modules, bottom first (a
module imports only from the lines before its own; tests/unit/test_layers.py checks):

- ``layout``: the spec's constants, the limits, the tunables, the table word codec;
- ``header``: the header and its extensions, the snapshot table, the bitmap directory;
  ``compressed``: decoding compressed clusters;
- ``l2cache``: :class:`~.l2cache.L2Cache`, the write-back LRU of L2 tables (rule 3);
  ``refcounts``: :class:`~.refcounts.Refcounts`, the refcount table and blocks, reserving
  (rule 1), growing (rule 2) and frees (rule 4);
- ``reader``: ``Qcow2Reader``, the open image's state, opening and validating, the active
  L1 table and ``resolve`` (the daemon's hot path);
- ``writer``: ``Qcow2Writer``, write / write_zeroes / discard / allocate and copy-up (rules 3,
  4, 6); ``check``: ``Checker``, qemu-img check's walk and repair;
- ``image``: :class:`Qcow2Image`, the codec: open (a dirty image's refcounts rebuilt), flush
  and close (rules 3 to 5), check, info; ``create``: a new, empty image;
- ``resize``: growing the virtual size (a larger L1 table: rules 1 to 4); ``empty``: every
  cluster of the active layer unallocated (commit: the L1 table cleared, then rule 4);
  ``backing``: another backing file recorded (rebase: the name first, then one switch);
  ``snapshot``: internal snapshots created, deleted, applied (new tables apart, one header
  sector switched, frees after); ``lend``: :class:`~.lend.Lender`, host clusters lent to an
  outside writer (the kernel shim) and adopted as allocations once written, with its own
  crash-safety order (rules 1, 3, 4 and 6 as they apply to it).

The image's job is split by layer of one class (reader, writer, image) because each layer
needs the state of the one below, and by component where a job has state of its own (the
refcounts, the L2 cache, a check's counts), which the image holds.

Crash-safety ordering (power loss at any instant)
-------------------------------------------------
The promise: ``qemu-img check`` accepts the image (leaked clusters at worst), and no guest
range that held an acknowledged, flushed write ever shows garbage, stale data or the parent's
data.  The rules; the code that follows one cites it ("rule 3") where it applies:

1. Refcounts before references.  Host clusters are *reserved* in batches
   (RESERVE_BATCH_BYTES): their refcounts are set to 1 (pwrite), then clusters are handed
   out from the batch.  No L2 or L1 entry is ever written before an fdatasync of the image
   that follows those refcount writes: flush syncs before it writes any L2/L1 entry, and the
   eviction of a dirty table syncs first too (``_sync_data`` in reader.py).  So the sync
   rule 1 needs is the one rule 3 needs anyway, and allocation costs no fdatasync of its own.
   A crash leaks the unused part of the batch; close gives it back and truncates the file.
2. New refcount structures before they are published.  A new refcount block (placed inside
   the range it covers, so it counts itself) or a relocated, grown refcount table is written
   and synced before the refcount-table entry or the header field that makes it reachable is
   written (and synced).  The old table is freed only after the header switch is durable.
3. Data before the metadata that reaches it.  Guest data and copied-up head/tail bytes are
   written with pwrite at once, but the L2 entries that point at them are kept in the L2
   cache (dirty) and L1 changes in memory.  ``flush`` (and the eviction of a dirty L2 table
   from the cache) first writes L2 tables that no on-disk L1 entry reaches yet, syncs the data
   file and the image (data, copy-up and those new tables are now durable), then writes the
   reachable L2 tables and the L1 entries, and syncs again.  So an on-disk L2 entry never
   points at data that is not yet on disk, and an on-disk L1 entry never points at an L2
   table that is not yet on disk.
4. Frees after the unlink is durable.  When a write, discard or copy-on-write drops this
   layer's reference to a host cluster (or to an L2 table), the refcount decrement is queued
   and applied only at the end of the next ``flush``, after the L2/L1 change is durable.  A
   crash before that leaks the cluster; the cluster cannot be reused (and so cannot show one
   guest cluster's new data at another guest address, or be overwritten while an on-disk L2
   entry still points at it) before then.
5. flush = fdatasync of the data file and of the image, in the order of rule 3.
6. The first modification clears the auto-clear feature bits this code does not maintain
   (bitmaps, unknown bits; data_file_raw is honoured by writing zeroes to the data file) and
   syncs the header before anything else is written.  Persistent bitmaps are inconsistent
   from then on and every reader ignores them, so their clusters are freed (rule 4) rather
   than leaked.  The dirty bit is never set: refcounts are kept exact (rule 1) rather than
   lazily, which lazy_refcounts permits.
"""

from .create import create
from .header import Qcow2Header, Qcow2Snapshot, parse_header
from .image import Qcow2Image
from .layout import (
    DEFAULT_CLUSTER_SIZE,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_DIRTY,
    QCOW2_INCOMPAT_EXTL2,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    REFT_OFFSET_MASK,
)
from .lend import Lender, Units, lend_problem

__all__ = [
    "DEFAULT_CLUSTER_SIZE",
    "L1E_OFFSET_MASK",
    "L2E_OFFSET_MASK",
    "QCOW2_AUTOCLEAR_BITMAPS",
    "QCOW2_AUTOCLEAR_DATA_FILE_RAW",
    "QCOW2_COMPAT_LAZY_REFCOUNTS",
    "QCOW2_INCOMPAT_COMPRESSION",
    "QCOW2_INCOMPAT_CORRUPT",
    "QCOW2_INCOMPAT_DATA_FILE",
    "QCOW2_INCOMPAT_DIRTY",
    "QCOW2_INCOMPAT_EXTL2",
    "QCOW_OFLAG_COMPRESSED",
    "QCOW_OFLAG_COPIED",
    "QCOW_OFLAG_ZERO",
    "REFT_OFFSET_MASK",
    "Lender",
    "Qcow2Header",
    "Qcow2Image",
    "Qcow2Snapshot",
    "Units",
    "create",
    "lend_problem",
    "parse_header",
]
