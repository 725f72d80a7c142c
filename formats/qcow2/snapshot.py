"""Layer: formats.qcow2, above image.py.  Internal snapshots: create, delete, apply
(``qemu-img snapshot -c/-d/-a``; listing is the header's snapshot table, reader.py).

Refcounts count references by L1 table (qemu's rule, which check.py walks): a data cluster
that two L1 tables reach through one shared L2 table has refcount 2.  An L2 entry (an L1
entry) of the active layer carries QCOW_OFLAG_COPIED exactly when its cluster's refcount is 1
(the writer writes in place only there).  A snapshot records a copy of the active L1 table,
the date and qemu's extra data (VM state size 0, the disk size, icount 0: what qemu-img
snapshot -c writes).  The disk's data is never copied.

Theory of operation (crash-safe by the package's rules, formats/qcow2/__init__.py)
----------------------------------------------------------------------------------
Create:

1. Everything pending is flushed (rules 3-5).
2. COPIED is cleared in every active L2 table and in the active L1 table, in place, synced.
   Clearing it is harmless whatever follows: a writer then copies a cluster it could have
   written in place.
3. Every L2 table and data cluster the active L1 reaches gets one more reference, synced.
4. Rule 1 / rule 3: the snapshot's L1 table (a copy of the active one, COPIED clear) and the
   new snapshot table (the old entries, then the new one) are written to new clusters,
   refcounted first, synced.
5. The header's nb_snapshots and snapshots_offset (bytes 60 to 72: one sector) switch to
   the new table, synced: the snapshot exists from here on.
6. Rule 4: the old snapshot table's clusters are freed.

A crash before 5 leaves the old snapshot list and the same guest view; the references of 3
are leaks, and the COPIED flags of 2 are cleared on clusters counted once, which qemu-img
check counts as errors and ``-r all`` repairs (they cost nothing but a copy on the next
write).  Delete:

1. The new snapshot table (without the entry) in new clusters, synced; the header switch
   (one sector), synced: the snapshot is gone.  2. Rule 4: each L2 table and data cluster
   its L1 table reached loses one reference, then its L1 table and the old snapshot table
   are freed.  3. COPIED is set again where the active layer's references are now the only
   ones (L2 tables written in place, then the L1 table), synced.  A crash after 1 leaks what
   2 had not freed, and leaves COPIED clear where 3 had not set it (qemu-img check counts
   those as errors, harmless as in create, that ``-r all`` repairs; no order avoids both
   that and the opposite error, COPIED set on a cluster still counted twice).

Apply (revert the active layer to a snapshot):

1. Everything pending is flushed.  2. Every L2 table and data cluster the snapshot's L1
reaches gets one more reference, synced.  3. Rule 1 / rule 3: a new active L1 table (the
snapshot's, COPIED clear, zero-padded to the size the disk needs) in new clusters, synced.
4. The header's l1_size and l1_table_offset (bytes 36 to 48: one sector) switch to it,
synced: the disk reads as the snapshot from here on.  5. Rule 4: everything the old active
L1 reached loses one reference, and its table is freed.  6. COPIED is set where the new
active layer holds the only reference.  A crash before 4 leaves the old disk (the
references of 2 leaked), after it the snapshot's (what 5 had not freed leaked).
"""

from __future__ import annotations

import struct
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UnsupportedImage
from .header import check_table
from .image import Qcow2Image
from .layout import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_MAX_SNAPSHOTS,
    QCOW_MAX_SNAPSHOTS_SIZE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    SNAPSHOT_HEADER,
    HostRange,
    div_round_up,
    words,
    words_bytes,
)

# Header fields switched in one sector write: l1_size (u32) and l1_table_offset (u64) at
# 36; nb_snapshots (u32) and snapshots_offset (u64) at 60.
HEADER_L1_AT = 36
HEADER_L1_FIELDS = struct.Struct(">IQ")
HEADER_SNAPSHOTS_AT = 60
HEADER_SNAPSHOTS_FIELDS = struct.Struct(">IQ")
# The extra data qemu 7.2 writes after an entry's fixed part: VM state size (u64), the disk
# size (u64), icount (i64).
SNAPSHOT_EXTRA = struct.Struct(">QQq")
# A snapshot's ID and name are stored with 16-bit lengths; qemu bounds names to 256 bytes.
MAX_SNAPSHOT_NAME_BYTES = 256


@dataclass
class SnapshotInfo:
    """What create/delete/apply say they did (cowd's JSON for snapshot)."""

    id: str
    name: str
    action: str  # "created", "deleted", "applied"


def _entry_bytes(sid: str, name: str, l1_offset: int, l1_size: int, disk_size: int,
                 now: float) -> bytes:
    ident, tag = sid.encode(), name.encode()
    extra = SNAPSHOT_EXTRA.pack(0, disk_size, 0)
    fixed = SNAPSHOT_HEADER.pack(l1_offset, l1_size, len(ident), len(tag), int(now),
                                 int(now % 1 * 1e9) // 1000 * 1000, 0, 0, len(extra))
    body = fixed + extra + ident + tag
    return body + bytes(-len(body) % 8)


def _raw_entries(img: Qcow2Image) -> list[bytes]:
    """The snapshot table's entries as stored (unknown extra data kept), in order."""
    if not img.snapshots:
        return []
    table = img.file.pread_exact(img.snapshots_offset, img.snapshots_size, "snapshot table")
    out, pos = [], 0
    for _ in img.snapshots:
        fields = SNAPSHOT_HEADER.unpack_from(table, pos)
        id_len, name_len, extra = fields[2], fields[3], fields[8]
        n = (SNAPSHOT_HEADER.size + extra + id_len + name_len + 7) & ~7
        out.append(table[pos : pos + n])
        pos += n
    return out


def find(img: Qcow2Image, key: str) -> int:
    """The index of the snapshot whose ID is ``key``, else the first named ``key``
    (qemu's bdrv_snapshot_find)."""
    for i, sn in enumerate(img.snapshots):
        if sn.id == key:
            return i
    for i, sn in enumerate(img.snapshots):
        if sn.name == key:
            return i
    raise UnsupportedImage(img.path, "no such snapshot", "snapshot", key)


def _contiguous(img: Qcow2Image, nbytes: int) -> int:
    """File offset of ``nbytes`` (rounded up to clusters) of new adjacent clusters above
    every cluster in use, refcounted and synced first (rule 1)."""
    return img.refcounts.alloc_run(div_round_up(nbytes, img.cluster_size),
                                   div_round_up(img.file.size(), img.cluster_size)) \
        << img.cluster_bits


def _tables(img: Qcow2Image, l1: array[int], what: str) -> Iterator[tuple[int, int, int]]:
    """(l1 index, L1 entry, table file offset) of every L2 table ``l1`` reaches."""
    file_size = img.file.size()
    for i, l1e in enumerate(l1):
        off = l1e & L1E_OFFSET_MASK
        if off:
            check_table(img.path, img.cluster_size, off, img.cluster_size, file_size,
                        "L2 table", f"{what}[{i}]", l1e)
            yield i, l1e, off


def _entry_step(img: Qcow2Image) -> int:
    return 2 if img.extended_l2 else 1


def _adjust(img: Qcow2Image, l1: array[int], delta: int, what: str) -> None:
    """One reference more (+1) or less (-1) for every L2 table and data cluster ``l1``
    reaches (one per L2 entry), table by table; a drop to 0 frees."""
    rc = img.refcounts
    for _, _, off in _tables(img, l1, what):
        held = [HostRange(off, img.cluster_size)]
        entries = words(img.file.pread_exact(off, img.cluster_size, "L2 table"))
        for e in entries[::_entry_step(img)]:
            r = img._host_range(e)
            if r is not None:
                held.append(r)
        if delta < 0:
            rc.apply_frees(held)
            continue
        counts: dict[int, int] = {}
        cb = img.cluster_bits
        for foff, n in held:
            for ci in range(foff >> cb, ((foff + n - 1) >> cb) + 1):
                counts[ci] = counts.get(ci, 0) + 1
        rc.apply({ci: rc.get(ci) + k for ci, k in counts.items()}, durable=False)
    img.file.sync()


def _set_copied(img: Qcow2Image, clear_all: bool) -> None:
    """Make the active layer's COPIED flags say whether its reference is the only one:
    L2 tables in place first (those the active layer alone reaches), then the L1 table;
    synced.  ``clear_all``: clear every flag (create's step 2, before the counts change)."""
    rc = img.refcounts
    step = _entry_step(img)
    new_l1 = array("Q", img.l1)
    for i, l1e, off in list(_tables(img, img.l1, "l1")):
        alone = not clear_all and rc.get(off >> img.cluster_bits) == 1
        new_l1[i] = (l1e | QCOW_OFLAG_COPIED) if alone else (l1e & ~QCOW_OFLAG_COPIED)
        entries = words(img.file.pread_exact(off, img.cluster_size, "L2 table"))
        changed = False
        for j in range(0, len(entries), step):
            e = entries[j]
            if e & QCOW_OFLAG_COMPRESSED:
                continue
            host = e & L2E_OFFSET_MASK
            want = alone and bool(host) and img.data_file is None and \
                rc.get(host >> img.cluster_bits) == 1
            if img.data_file is not None:
                want = alone and bool(e & QCOW_OFLAG_COPIED)  # never refcounted: keep
            new = (e | QCOW_OFLAG_COPIED) if want else (e & ~QCOW_OFLAG_COPIED)
            if new != e:
                entries[j] = new
                changed = True
        if changed:
            img.file.pwrite(off, words_bytes(entries))
    if new_l1 != img.l1:
        img.file.pwrite(img.l1_table_offset, words_bytes(new_l1))
        img.l1 = new_l1
    img.file.sync()


def _switch_table(img: Qcow2Image, entries: list[bytes]) -> None:
    """Write ``entries`` as the new snapshot table (rule 1/3), switch the header to it in
    one sector, free the old table (rule 4); reload the parsed list."""
    old_off, old_size = img.snapshots_offset, img.snapshots_size
    blob = b"".join(entries)
    if len(blob) > QCOW_MAX_SNAPSHOTS_SIZE or len(entries) > QCOW_MAX_SNAPSHOTS:
        raise UnsupportedImage(img.path, "snapshot table too large", "nb_snapshots",
                               len(entries))
    new_off = 0
    if entries:
        new_off = _contiguous(img, len(blob))
        img.file.pwrite(new_off, blob + bytes(-len(blob) % img.cluster_size))
        img.file.sync()
    img.file.pwrite(HEADER_SNAPSHOTS_AT, HEADER_SNAPSHOTS_FIELDS.pack(len(entries), new_off))
    img.file.sync()
    if old_size:
        img.refcounts.apply_frees([HostRange(old_off, div_round_up(old_size, img.cluster_size)
                                             * img.cluster_size)])
        img.file.sync()
    assert img.hdr is not None
    img.hdr.nb_snapshots, img.hdr.snapshots_offset = len(entries), new_off
    from .header import read_snapshots

    table = read_snapshots(img.path, img.file, img.hdr, img.file.size())
    img.snapshots, img.snapshots_offset, img.snapshots_size = (
        table.snapshots, new_off, table.size_bytes)


def _prepare(img: Qcow2Image) -> None:
    img.require_writable()
    if img.data_file is not None:
        raise UnsupportedImage(img.path, "internal snapshots of an image with an external "
                               "data file are not supported (qemu refuses them too)",
                               "data_file", img.data_file_name)
    img.flush()
    img.refcounts.release_pool()
    img.l2_cache.tables.clear()  # clean after flush; tables are rewritten in place below
    img._begin_modify()


def create(img: Qcow2Image, name: str) -> SnapshotInfo:
    """A new internal snapshot of the active layer named ``name``, as the module says."""
    raw_name = name.encode()
    if not raw_name or len(raw_name) > MAX_SNAPSHOT_NAME_BYTES:
        raise ValueError(f"{img.path}: a snapshot name is 1 to {MAX_SNAPSHOT_NAME_BYTES} "
                         f"bytes (name={name!r})")
    _prepare(img)
    ids = [int(sn.id) for sn in img.snapshots if sn.id.isdigit()]
    sid = str(max(ids, default=0) + 1)
    _set_copied(img, clear_all=True)  # 2
    l1 = array("Q", (e & ~QCOW_OFLAG_COPIED for e in img.l1))
    _adjust(img, l1, +1, "l1")  # 3
    l1_off = _contiguous(img, max(1, len(l1)) * 8) if len(l1) else 0  # 4
    if len(l1):
        body = words_bytes(l1)
        img.file.pwrite(l1_off, body + bytes(-len(body) % img.cluster_size))
    entry = _entry_bytes(sid, name, l1_off, len(l1), img.virtual_size, time.time())
    _switch_table(img, [*_raw_entries(img), entry])  # 4-6
    return SnapshotInfo(sid, name, "created")


def delete(img: Qcow2Image, key: str) -> SnapshotInfo:
    """Delete the snapshot ``key`` (ID or name), as the module says."""
    i = find(img, key)
    _prepare(img)
    sn = img.snapshots[i]
    entries = _raw_entries(img)
    del entries[i]
    l1 = (words(img.file.pread_exact(sn.l1_table_offset, sn.l1_size * 8, "snapshot L1 table"))
          if sn.l1_size else array("Q"))
    _switch_table(img, entries)  # 1
    _adjust(img, l1, -1, f"snapshot[{i}].l1")  # 2
    if sn.l1_size:
        img.refcounts.apply_frees([HostRange(
            sn.l1_table_offset,
            div_round_up(sn.l1_size * 8, img.cluster_size) * img.cluster_size)])
    _set_copied(img, clear_all=False)  # 3
    return SnapshotInfo(sn.id, sn.name, "deleted")


def apply(img: Qcow2Image, key: str) -> SnapshotInfo:
    """Revert the active layer to the snapshot ``key`` (ID or name), as the module says."""
    i = find(img, key)
    sn = img.snapshots[i]
    if sn.disk_size is not None and sn.disk_size != img.virtual_size:
        raise UnsupportedImage(img.path, "the snapshot has another disk size: resize the "
                               "image to it first", "disk_size", sn.disk_size)
    _prepare(img)
    snap_l1 = (words(img.file.pread_exact(sn.l1_table_offset, sn.l1_size * 8,
                                          "snapshot L1 table")) if sn.l1_size else array("Q"))
    # Entries past the disk (a VM state qemu saved there) stay the snapshot's alone.
    needed = div_round_up(img.virtual_size, img.cluster_size << img.l2_bits)
    new_l1 = array("Q", (e & ~QCOW_OFLAG_COPIED for e in snap_l1[:needed]))
    new_l1.extend([0] * (needed - len(new_l1)))
    _adjust(img, new_l1, +1, f"snapshot[{i}].l1")  # 2
    old_l1, old_off = array("Q", img.l1), img.l1_table_offset
    new_off = _contiguous(img, max(1, len(new_l1)) * 8)  # 3
    body = words_bytes(new_l1)
    img.file.pwrite(new_off, body + bytes(-len(body) % img.cluster_size))
    img.file.sync()
    img.file.pwrite(HEADER_L1_AT, HEADER_L1_FIELDS.pack(len(new_l1), new_off))  # 4
    img.file.sync()
    img.l1, img.l1_table_offset = new_l1, new_off
    _adjust(img, old_l1, -1, "l1")  # 5
    if len(old_l1):
        img.refcounts.apply_frees([HostRange(
            old_off, div_round_up(len(old_l1) * 8, img.cluster_size) * img.cluster_size)])
    _set_copied(img, clear_all=False)  # 6
    img._cc_key = None
    return SnapshotInfo(sn.id, sn.name, "applied")
