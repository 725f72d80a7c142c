"""Layer: formats.qcow2, above reader.py.  :class:`Checker`: qemu-img check's walk over one
image, and its repair.

Theory of operation
-------------------
Every structure that holds a reference to host clusters is walked — the header, the active
and every snapshot's L1 table and their L2 tables (data and compressed clusters), the
snapshot table, the refcount table and blocks, and the bitmaps while their auto-clear bit
vouches for them — and the references are counted per host cluster.  Those counts are the
refcounts the file should store; they are compared with the ones it does store:

- stored > expected: a leak (harmless; ``repair`` lowers the refcount);
- stored < expected: a corruption, a cluster that could be handed out twice (``fix_errors``
  raises the refcount, which is how a dirty image with lazy refcounts is rebuilt);
- then, in the active tables, the COPIED flag must be set exactly where the refcount is 1
  (both repairs fix it, since writing in place depends on it).

Invariant: a repair never takes a cluster below everything in use for a new refcount
structure (:meth:`~.refcounts.Refcounts.apply_above`): a cluster whose refcount is wrong may
be in use.  The checker reads the image's state and helpers directly: it is part of the
image's package, and the image (image.py) flushes before it runs.
"""

from __future__ import annotations

from array import array

from ..base import CheckResult
from .layout import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW2_AUTOCLEAR_BITMAPS,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
    compressed_range,
    div_round_up,
    words,
    words_bytes,
)
from .reader import Qcow2Reader


class Checker:
    """One run of the walk: the references counted so far and what was found."""

    def __init__(self, img: Qcow2Reader):
        self.img = img
        self.res = CheckResult(img.path)
        self.file_size = img.file.size()
        self.expected: dict[int, int] = {}  # host cluster index -> references found

    def run(self, *, repair: bool, fix_errors: bool) -> CheckResult:
        img, res = self.img, self.res
        cs = img.cluster_size
        self._count(0, cs, "header")
        if len(img.l1):
            self._count(img.l1_table_offset, len(img.l1) * 8, "L1 table")
        allocated = self._walk_l1(img.l1, "active")
        if img.snapshots_size:
            self._count(img.snapshots_offset, img.snapshots_size, "snapshot table")
        for i, sn in enumerate(img.snapshots):
            if not sn.l1_size:
                continue
            self._count(sn.l1_table_offset, sn.l1_size * 8, f"snapshot[{i}] L1 table")
            l1 = words(img.file.pread_exact(sn.l1_table_offset, sn.l1_size * 8, "L1 table"))
            self._walk_l1(l1, f"snapshot[{i}]")
        rc = img.refcounts
        if rc.reftable_clusters:
            self._count(rc.reftable_offset, rc.reftable_clusters * cs, "refcount table")
        for r, e in enumerate(rc.reftable):
            off = e & REFT_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                res.corruptions.append(f"refcount block {r} offset 0x{off:x} unaligned")
                continue
            self._count(off, cs, f"refcount block {r}")
        self._count_bitmaps()

        actual, problems = rc.stored()
        res.corruptions += problems
        expected = self.expected
        fixes: dict[int, int] = {}
        maxval = (1 << rc.refcount_bits) - 1
        # Refcounts are compared up to the end of the file or of the last cluster something
        # references, whichever is further, as qemu-img check does: a refcount set beyond
        # both (a reserved batch the file never grew into, rule 1) is no leak, as nothing
        # can reach it and the file does not hold it.
        horizon = max(div_round_up(self.file_size, cs), max(expected, default=-1) + 1)
        for ci in sorted(set(expected) | {c for c in actual if c < horizon}):
            want, have = expected.get(ci, 0), actual.get(ci, 0)
            if want > maxval:
                res.corruptions.append(f"cluster {ci}: {want} references exceed the "
                                       f"{rc.refcount_bits}-bit refcount")
            elif have < want:
                res.corruptions.append(f"cluster {ci}: refcount={have} but {want} "
                                       "references (refcount too low)")
                if fix_errors:
                    fixes[ci] = want
            elif have > want:
                res.leaks.append(f"cluster {ci}: refcount={have} but {want} references "
                                 "(leaked)")
                if repair:
                    fixes[ci] = want
        if fixes:
            used = max(list(expected) + list(actual) + [0]) + 1
            rc.apply_above(fixes, max(used, div_round_up(self.file_size, cs)))
            if repair:
                res.leaks_fixed = len(res.leaks)
                res.leaks = []
            if fix_errors:
                low = [c for c in res.corruptions if "refcount too low" in c]
                res.corruptions_fixed += len(low)
                res.corruptions = [c for c in res.corruptions if "refcount too low" not in c]
        self._check_copied(repair or fix_errors)
        res.allocated_clusters = allocated
        res.total_clusters = div_round_up(img.virtual_size, cs)
        # qemu's image end: past the last cluster in use or counted, within the horizon.
        in_use = [c for c in expected] + [c for c, n in actual.items() if n and c < horizon]
        res.image_end_offset = (max(in_use) + 1) * cs if in_use else 0
        return res

    def _count(self, file_offset: int, length: int, what: str) -> None:
        """One reference to every cluster of [file_offset, +length)."""
        if length <= 0:
            return
        cb = self.img.cluster_bits
        if file_offset + length - self.file_size >= 1 << cb:
            self.res.corruptions.append(f"{what} at 0x{file_offset:x} lies past the end of "
                                        "the file")
        for ci in range(file_offset >> cb, ((file_offset + length - 1) >> cb) + 1):
            self.expected[ci] = self.expected.get(ci, 0) + 1

    def _walk_l1(self, l1: array[int], which: str) -> int:
        """Count what an L1 table reaches; returns how many guest clusters it allocates.

        For the active table it also counts, as qemu-img check does, the fragmented
        clusters (a data cluster not right after the previous one in the file, and every
        compressed cluster) and the compressed ones."""
        img, res = self.img, self.res
        cs = img.cluster_size
        active = which == "active"
        allocated = 0
        next_contiguous = 0  # where the next data cluster lies if it follows the last one
        step = 2 if img.extended_l2 else 1
        for i, l1e in enumerate(l1):
            off = l1e & L1E_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                res.corruptions.append(f"{which} l1[{i}]: L2 table offset 0x{off:x} unaligned")
                continue
            self._count(off, cs, f"{which} L2 table l1[{i}]")
            if off + cs > self.file_size:
                continue
            l2 = words(img.file.pread_exact(off, cs, "L2 table"))
            for j in range(0, len(l2), step):
                e = l2[j]
                if not e and (step == 1 or not l2[j + 1]):
                    continue
                where = f"{which} l1[{i}] l2[{j // step}]"
                if e & QCOW_OFLAG_COMPRESSED:
                    if img.data_file is not None:
                        res.corruptions.append(f"{where}: compressed cluster with a data file")
                        continue
                    coff, clen = compressed_range(e, img.cluster_bits)
                    self._count(coff, clen, f"{where} compressed cluster")
                    allocated += 1
                    if active:
                        res.compressed_clusters += 1
                        res.fragmented_clusters += 1  # compressed: never contiguous
                    continue
                if step == 2:
                    bm = l2[j + 1]
                    if (bm >> 32) & bm & QCOW_L2_BITMAP_ALL_ALLOC:
                        res.corruptions.append(f"{where}: subcluster allocated and zero")
                    if bm & QCOW_L2_BITMAP_ALL_ALLOC and not img._has_host(e):
                        res.corruptions.append(f"{where}: allocated subclusters, no cluster")
                if not img._has_host(e):
                    continue  # unallocated, or a zero cluster with no host cluster
                host = e & L2E_OFFSET_MASK
                if host % cs:
                    res.corruptions.append(f"{where}: data offset 0x{host:x} unaligned")
                    continue
                # A host cluster (zero-flagged or not) is an allocated guest cluster.
                allocated += 1
                if active:
                    if next_contiguous and host != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = host + cs
                if img.data_file is None:
                    self._count(host, cs, f"{where} data cluster")
        return allocated

    def _count_bitmaps(self) -> None:
        # Like qemu: bitmaps count only while their auto-clear bit vouches for them.
        if not self.img.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
            return
        found = self.img._bitmap_regions(self.file_size)
        self.res.corruptions += found.problems
        for r in found.regions:
            self._count(r.file_offset, r.length, r.what)

    def _check_copied(self, repair: bool) -> None:
        """In the active tables, COPIED must be set exactly where the refcount is 1."""
        img, res = self.img, self.res
        if img.data_file is not None:
            return
        cb, cs = img.cluster_bits, img.cluster_size
        step = 2 if img.extended_l2 else 1
        l1_fixed = False
        for i, l1e in enumerate(img.l1):
            off = l1e & L1E_OFFSET_MASK
            if not off or off % cs or off + cs > img.file.size():
                continue
            rc = img.refcounts.get(off >> cb)
            if (rc == 1) != bool(l1e & QCOW_OFLAG_COPIED):
                res.corruptions.append(f"l1[{i}]: COPIED flag wrong for refcount {rc}")
                if repair:
                    img.l1[i] = off | (QCOW_OFLAG_COPIED if rc == 1 else 0)
                    l1_fixed = True
                    res.corruptions_fixed += 1
                    res.corruptions.pop()
            l2 = words(img.file.pread_exact(off, cs, "L2 table"))
            changed = False
            for j in range(0, len(l2), step):
                e = l2[j]
                host = e & L2E_OFFSET_MASK
                if e & QCOW_OFLAG_COMPRESSED or not host or host % cs:
                    continue
                rc = img.refcounts.get(host >> cb)
                if (rc == 1) != bool(e & QCOW_OFLAG_COPIED):
                    res.corruptions.append(f"l1[{i}] l2[{j // step}]: COPIED flag wrong for "
                                           f"refcount {rc}")
                    if repair:
                        l2[j] = (e & ~QCOW_OFLAG_COPIED) | (QCOW_OFLAG_COPIED if rc == 1
                                                               else 0)
                        changed = True
                        res.corruptions_fixed += 1
                        res.corruptions.pop()
            if changed:
                img.file.pwrite(off, words_bytes(l2))
                img.l2_cache.drop(off)
        if l1_fixed:
            img.file.pwrite(img.l1_table_offset, words_bytes(img.l1))
        if repair:
            img.file.sync()
