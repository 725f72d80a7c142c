"""Layer: formats.qcow2, above image.py.  Lending host clusters to an outside writer: a
writer that is not this codec (the cowd kernel shim) writes whole clusters into the image
file itself, and the codec then records where they went.

Theory of operation
-------------------
:meth:`Lender.lend` reserves free host clusters and hands them out; the outside writer
fills one with a guest cluster's bytes (its copy-up and its new data, the whole cluster),
and only then reports "guest cluster G now lives at host offset H"; :meth:`Lender.adopt`
makes that an allocation of this image, as if :meth:`Qcow2Writer.allocate` had made it.
What was lent and never adopted is given back with :meth:`Lender.give_back`, once the
outside writer can no longer write it.

Crash-safety order (the package's rules, formats/qcow2/__init__.py; power loss at any point)
--------------------------------------------------------------------------------------------
1. ``lend``: the first modification's rule 6 (auto-clear bits cleared, header synced), then
   the clusters' refcounts are set to 1 (rule 1; a new refcount block or table follows rule
   2), and they are handed out.  No sync of its own, as for any reservation (rule 1): no L1
   or L2 entry names them before ``adopt``, and the flush (or table eviction) that writes
   the first such entry syncs the image first, refcounts included.  A crash before that
   sync finds each lent cluster with refcount 0 (free, whatever the outside writer put
   there: no entry reaches it) or 1 (a leak: ``qemu-img check`` counts it, ``cowd check
   --repair`` frees it).  (It synced here once: with the page cache full of an outside
   writer's data, that sync wrote all of it out and held every write of the disk meanwhile.)
2. The outside writer writes each lent cluster whole into the same image file (the same
   inode, so the image's fdatasync covers its writes) and reports it only after its writes
   returned.  Until ``adopt``, the cluster is garbage in a leaked cluster.
3. ``adopt``: the L2 entry of G is set to H in the cached table, marked dirty, as for any
   allocation (rule 3): flush — or the eviction of that table — syncs the file before it
   writes the entry, so an on-disk entry never reaches data that is not on disk.  The
   image's data is marked dirty, so that sync is never skipped.  What G's old entry
   referenced (a cluster shared with a snapshot, a compressed stream, a zero cluster's
   preallocation) loses its reference only after the next flush (rule 4).  A crash before
   the flush loses G's new data (it was never flushed) and leaks H.
4. ``give_back``: clusters lent and never adopted get refcount 0 again.  No entry ever
   reached them, so there is no unlink to wait for; a crash before leaks them.  The caller
   promises the outside writer is done with them (cowd revokes the kernel's pool and waits
   for its allocations under way first): a cluster given back may be handed out again.

Clusters still lent when the image closes stay refcounted: a leak, never a cluster that an
outside writer could still overwrite after the image reused it.

Not for images with an external data file (host offset = guest offset there: nothing to
lend); extended L2 images adopt whole clusters (every subcluster allocated) with ``adopt``.

Subclusters (extended L2): ``adopt_units``
-------------------------------------------
With extended L2 a write of whole subclusters copies nothing up, so the outside writer may
write such a write itself: each subcluster at its place in a host cluster, either the guest
cluster's own (owned by this image: COPIED) or a lent one when the guest cluster has none
yet.  ``adopt_units`` then sets their allocation bits (clearing their zero bits) — in the
owned cluster, or in a new entry naming the lent cluster, which keeps the old entry's zero
bits for the other subclusters.  It changes nothing and returns REFUSED when the image no
longer looks as the writer saw it: the guest cluster has another host cluster (or a
compressed or shared one), a subcluster is already allocated (another writer's copy-up may
have overwritten the bytes at that place after the outside writer wrote them, so they are
not known to be its), or the named cluster is neither the guest cluster's nor lent.  The
writer then does the write another way (cowd forwards it to the daemon).  Crash safety is
that of ``adopt`` (steps 2 and 3): the data went to the file before the call; the bitmap is
a cached L2 change, written by the next flush after its sync.  Before the call, bytes at an
unallocated subcluster's place of an owned cluster are never read (the bit says "below"),
so a crash leaves the image as it was.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from ..errors import UnsupportedImage
from .image import Qcow2Image
from .layout import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    HostRange,
    allocated,
    subclusters,
)
from .writer import TableChange

# The most clusters one image lends at a time: bounds the lent set's memory (a set entry per
# cluster) and what a crash can leak.  2^20 clusters is 64 GiB of 64 KiB clusters.
MAX_LENT_CLUSTERS = 1 << 20


class Units(enum.Enum):
    """What :meth:`Lender.adopt_units` made of an outside writer's subclusters."""

    OWNED = 1  # set in the guest cluster's own host cluster
    LENT = 2  # the lent cluster became the guest cluster's (no longer lent)
    REFUSED = 3  # nothing changed: the image is not as the writer saw it


def lend_problem(img: object) -> str | None:
    """Why clusters of ``img`` cannot be lent to an outside writer, or None."""
    if not isinstance(img, Qcow2Image):
        return "only qcow2 images lend clusters"
    if not img.writable:
        return "the image is read-only"
    if img.data_file is not None:
        return "the image has an external data file"
    return None


class Lender:
    """The clusters of one open, writable qcow2 image lent to an outside writer.  Used by the
    image's one caller at a time, like the image itself."""

    def __init__(self, img: Qcow2Image):
        why = lend_problem(img)
        if why is not None:
            raise UnsupportedImage(img.path, f"cannot lend clusters: {why}")
        self.img = img
        self.cluster_size = img.cluster_size
        self._lent: set[int] = set()  # host cluster indices lent and not adopted or given back
        self.adopted = 0  # clusters adopted so far
        self.given_back = 0

    @property
    def lent(self) -> int:
        """Clusters lent and not yet adopted or given back."""
        return len(self._lent)

    def lend(self, clusters: int) -> list[HostRange]:
        """Reserve ``clusters`` free host clusters for the outside writer (step 1 above);
        their runs, contiguous in the file, in file order."""
        img = self.img
        if clusters <= 0:
            return []
        if len(self._lent) + clusters > MAX_LENT_CLUSTERS:
            raise ValueError(f"{img.path}: lending {clusters} more clusters would exceed "
                             f"{MAX_LENT_CLUSTERS} (lent={len(self._lent)})")
        img.require_writable()
        img._begin_modify()  # rule 6
        chosen = img.refcounts.take(clusters)  # rule 1 (and rule 2 inside)
        self._lent.update(chosen)
        cb = img.cluster_bits
        runs: list[HostRange] = []
        start = prev = chosen[0]
        for ci in chosen[1:]:
            if ci != prev + 1:
                runs.append(HostRange(start << cb, (prev - start + 1) << cb))
                start = ci
            prev = ci
        runs.append(HostRange(start << cb, (prev - start + 1) << cb))
        return runs

    def adopt(self, guest_offset: int, length: int, host_offset: int) -> None:
        """Guest clusters [guest_offset, guest_offset + length) now live at ``host_offset``
        onwards, one after another, their data already written there by the outside writer
        (step 3 above).  Every host cluster must be lent and not yet adopted."""
        img = self.img
        cs = self.cluster_size
        cb = img.cluster_bits
        end = guest_offset + length
        if (guest_offset | length | host_offset) & (cs - 1) or length <= 0 or \
                guest_offset < 0 or end > -(-img.virtual_size // cs) * cs:
            raise ValueError(f"{img.path}: adopt: not whole clusters of the disk "
                             f"(guest_offset={guest_offset}, length={length}, "
                             f"host_offset={host_offset})")
        first = host_offset >> cb
        hosts = range(first, first + (length >> cb))
        missing = [h for h in hosts if h not in self._lent]
        if missing:
            raise ValueError(f"{img.path}: adopt: host cluster not lent "
                             f"(host_offset={missing[0] << cb:#x})")
        img.require_writable()
        img._begin_modify()
        # The outside writer's data went to the file behind the codec's back: the next L2
        # write must sync first (rule 3), even if the codec wrote nothing since its last sync.
        img._data_dirty = True
        bitmap = QCOW_L2_BITMAP_ALL_ALLOC if img.extended_l2 else 0
        l2_mask = (1 << img.l2_bits) - 1

        def one_table(l1i: int, start: int, tend: int) -> None:
            tbl = img._l2_for_write(l1i)
            change = TableChange(img, tbl)
            for ci in range(start >> cb, -(-tend // cs)):
                idx = ci & l2_mask
                entry, _bm = img._get_entry(tbl, idx)
                host = host_offset + (ci << cb) - guest_offset
                change.set_entry(idx, host | QCOW_OFLAG_COPIED, bitmap,
                                 img._host_range(entry))  # rule 4: freed after the flush
            change.commit()

        img._for_each_table(guest_offset, min(end, img.virtual_size), one_table)
        self._lent.difference_update(hosts)
        self.adopted += len(hosts)

    def adopt_units(self, guest_offset: int, length: int, host_offset: int,
                    may_take_lent: bool = True) -> Units:
        """Whole subclusters [guest_offset, +length) of one guest cluster were written by the
        outside writer at ``host_offset``, their place in a host cluster (see "Subclusters"
        above): make them allocated there, or refuse.  ``may_take_lent``: the caller lets a
        lent cluster become the guest cluster's (False: only its own cluster will do)."""
        img = self.img
        if not img.extended_l2:
            raise ValueError(f"{img.path}: adopt_units: the image has no subclusters")
        cs = self.cluster_size
        cb, sb = img.cluster_bits, img.subcluster_bits
        unit = 1 << sb
        cstart = guest_offset & ~(cs - 1)
        end = guest_offset + length
        host = host_offset - (guest_offset - cstart)
        if (guest_offset | length | host) & (unit - 1) or host & (cs - 1) or length <= 0 or \
                guest_offset < 0 or end > cstart + cs or \
                end > -(-img.virtual_size // unit) * unit:
            raise ValueError(f"{img.path}: adopt_units: not whole subclusters of one cluster "
                             f"(guest_offset={guest_offset}, length={length}, "
                             f"host_offset={host_offset})")
        units = subclusters((guest_offset - cstart) >> sb, (end - cstart) >> sb)
        ci = cstart >> cb
        l1i = ci >> img.l2_bits
        idx = ci & ((1 << img.l2_bits) - 1)
        l1e = img.l1[l1i] if l1i < len(img.l1) else 0
        table_owned = bool(l1e & L1E_OFFSET_MASK) and bool(l1e & QCOW_OFLAG_COPIED)
        entry = bitmap = 0
        if l1e & L1E_OFFSET_MASK:
            tbl = img._l2_get(l1i)
            assert tbl is not None
            entry, bitmap = img._get_entry(tbl, idx)
        if entry & QCOW_OFLAG_COMPRESSED:
            return Units.REFUSED
        img._check_bitmap(ci, entry, bitmap)
        if bitmap & units:
            return Units.REFUSED  # allocated meanwhile: the bytes there may not be the writer's
        if img._has_host(entry):
            if not (table_owned and entry & QCOW_OFLAG_COPIED) or \
                    entry & L2E_OFFSET_MASK != host:
                return Units.REFUSED
            new_entry, outcome = entry, Units.OWNED
        elif may_take_lent and host >> cb in self._lent:
            new_entry, outcome = host | QCOW_OFLAG_COPIED, Units.LENT
        else:
            return Units.REFUSED
        img.require_writable()
        img._begin_modify()
        img._data_dirty = True  # written behind the codec's back: sync before the L2 (rule 3)
        tbl = img._l2_for_write(l1i)
        change = TableChange(img, tbl)
        change.set_entry(idx, new_entry, allocated(bitmap, units))
        change.commit()
        if outcome is Units.LENT:
            self._lent.discard(host >> cb)
            self.adopted += 1
        return outcome

    def give_back(self, runs: Iterable[tuple[int, int]]) -> None:
        """Lent clusters of ``runs`` (file offset, length) that were never adopted get
        refcount 0 (step 4 above);
        clusters of the runs that are not lent (adopted, or never lent) are left alone."""
        cb = self.img.cluster_bits
        back = sorted({ci for off, n in runs for ci in range(off >> cb, (off + n) >> cb)}
                      & self._lent)
        if not back:
            return
        self.img.refcounts.give(back)
        self._lent.difference_update(back)
        self.given_back += len(back)

    def give_back_all(self) -> int:
        """Every cluster still lent (the outside writer is gone); returns how many."""
        cb = self.img.cluster_bits
        n = len(self._lent)
        self.give_back([HostRange(ci << cb, 1 << cb) for ci in self._lent])
        return n
