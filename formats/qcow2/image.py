"""Layer: formats.qcow2, the top of the codec (above writer.py and check.py).
:class:`Qcow2Image`, the qcow2 codec: its life cycle — open (rebuilding a dirty image's
refcounts), flush and close in the order of the crash-safety rules (formats/qcow2/__init__.py)
— and check and info.

The state and the mapping are Qcow2Reader's (reader.py), the writes Qcow2Writer's (writer.py);
what they leave to this class is when the writes become durable:

- ``flush`` is rules 3 to 5: new L2 tables nothing reaches yet, then a sync of the data file
  and the image (data, copy-up, those tables and reserved refcounts are durable), then the
  reachable L2 tables and the L1 entries, a sync, and last the frees that wait for it.
- ``close`` flushes, gives back the clusters reserved and not used (rule 1's pool) and
  truncates the unreferenced tail of the file, never below its size at open.
- ``free_l2_tables`` and ``cut_unused_tail`` are the last steps of the changes that unlink
  whole L2 tables from the active L1 table (empty.py, resize.py's shrink): rule 4's frees,
  then the file cut after the last cluster still in use.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from ..base import CheckResult, HostFile, NearOpener
from ..errors import CorruptImage
from .check import Checker
from .header import check_table
from .layout import (
    COMPRESSION_NAMES,
    HEADER_INCOMPATIBLE_FEATURES_AT,
    L1E_OFFSET_MASK,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
    QCOW_OFLAG_COPIED,
    HostRange,
    div_round_up,
    words,
    words_bytes,
)
from .writer import Qcow2Writer


class Qcow2Image(Qcow2Writer):
    """A qcow2 image (compat 0.10 and 1.1): see formats/qcow2/__init__.py."""

    def __init__(self, path: str, file: HostFile, writable: bool):
        super().__init__(path, file, writable)
        self._closed = False
        self._metadata_preallocated: bool | None = None  # looks_metadata_preallocated's

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool,
             near: NearOpener | None = None) -> Qcow2Image:
        img = cls(path, file, writable)
        try:
            img._load(near)
            if img.incompatible_features & QCOW2_INCOMPAT_DIRTY and img.writable:
                img._repair_dirty()
        except BaseException:
            if img.data_file is not None:
                img.data_file.close()
            raise
        return img

    def _repair_dirty(self) -> None:
        """Lazy refcounts left the image dirty: rebuild its refcounts from the L1/L2 tables
        (like qemu does on open) and clear the bit; refcounts stay exact from then on."""
        res = self.check(repair=True, fix_errors=True)
        if res.corruptions:
            self.writable = False
            self.read_only_reason = ("dirty image whose refcounts could not be rebuilt: "
                                     + res.corruptions[0])
            return
        self.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY
        self.file.pwrite(HEADER_INCOMPATIBLE_FEATURES_AT,
                         struct.pack(">Q", self.incompatible_features))
        self.file.sync()

    # ---- flush and close -----------------------------------------------------------------

    def flush(self) -> None:
        """Rules 3-5: data and new L2 tables, sync, reachable L2 tables and L1, sync, frees."""
        if not self.writable:
            return
        if not self._modified:
            self._data_host().sync()
            if self.data_file is not None:
                self.file.sync()
            return
        self.l2_cache.write_unpublished()
        if self.data_file is not None:
            self.data_file.sync()
        self._data_dirty = False
        self._sync_image()
        wrote = self.l2_cache.write_dirty()
        if self._l1_dirty:
            self._write_l1_entries(sorted(self._l1_dirty))
            self._l1_dirty.clear()
            wrote = True
        if wrote:
            self.file.sync()
        self.l2_cache.all_published()
        if self._pending_free:  # rule 4
            pending, self._pending_free = self._pending_free, []
            self._cc_key = None  # a freed compressed cluster's bytes may be reused
            self.refcounts.apply_frees(pending)

    def _write_l1_entries(self, indices: list[int]) -> None:
        i = 0
        while i < len(indices):
            j = i
            while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
                j += 1
            lo, hi = indices[i], indices[j] + 1
            self.file.pwrite(self.l1_table_offset + 8 * lo, words_bytes(self.l1[lo:hi]))
            i = j + 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable and (self._modified or self.refcounts.touched):
                self.flush()
                self.refcounts.release_pool()
                self._truncate_tail()
                self.file.sync()
        finally:
            if self.data_file is not None:
                self.data_file.close()
            self.file.close()

    def _truncate_tail(self) -> None:
        """Drop unreferenced clusters at the end of the file (never below its size at open)."""
        try:
            end = (self.refcounts.highest_used() + 1) << self.cluster_bits
        except CorruptImage:
            return  # best effort: a damaged refcount table keeps the file as it is
        end = max(end, self._open_file_size)
        if self.file.size() > end:
            self.file.truncate(end)

    def free_l2_tables(self, dropped: list[tuple[int, int]]) -> None:
        """Rule 4, once the L1 entries that reached them are durably cleared: each table of
        ``dropped`` ((l1_index, the old L1 entry)) is read back from the file and its
        references dropped.  A table this layer owned alone (COPIED) gives back its data
        clusters and compressed streams and then its own cluster; a table shared with an
        internal snapshot loses one reference and its data stays the snapshot's.  A crash
        part way leaks what was not freed yet."""
        cs = self.cluster_size
        file_size = self.file.size()
        step = 2 if self.extended_l2 else 1
        for i, l1e in dropped:
            table = l1e & L1E_OFFSET_MASK
            self.l2_cache.drop(table)
            frees = []
            if l1e & QCOW_OFLAG_COPIED:
                check_table(self.path, cs, table, cs, file_size, "L2 table", f"l1[{i}]", l1e)
                entries = words(self.file.pread_exact(table, cs, "L2 table"))
                for e in entries[::step]:
                    held = self._host_range(e)
                    if held is not None:
                        frees.append(held)
            frees.append(HostRange(table, cs))
            self.refcounts.apply_frees(frees)
        self._cc_key = None  # a freed compressed cluster's bytes may be reused

    def cut_unused_tail(self) -> None:
        """Give back rule 1's reserved batch (unused, and nothing reaches it), make the
        refcounts durable, then cut the file after the last cluster still in use (nothing
        reaches past it, and no refcount on disk counts a cluster there)."""
        self.refcounts.release_pool()
        self.file.sync()
        end = (self.refcounts.highest_used() + 1) * self.cluster_size
        if self.file.size() > end:
            self.file.truncate(end)
            self.file.sync()

    # ---- inspection ----------------------------------------------------------------------

    def check(self, repair: bool = False, *, fix_errors: bool = False) -> CheckResult:
        """qemu-img check's walk (check.py).  ``repair`` fixes leaks; ``fix_errors`` also
        raises refcounts that are too low (what a dirty image needs)."""
        if repair or fix_errors:
            self.require_writable()
        if self.writable and self._modified:
            self.flush()
            self.refcounts.release_pool()
        return Checker(self).run(repair=repair, fix_errors=fix_errors)

    def looks_metadata_preallocated(self) -> bool:
        """Are noticeably more clusters in use than the file has on disk (qemu's
        qcow2_detect_metadata_preallocation: at least max(10/9 of them, 2 more))?  Then
        qemu's block status looks under allocated clusters at the file's holes and reports
        them as zero; so does cowd's map.  Asked once per open, by reporting only: the
        data path never needs it."""
        if self._metadata_preallocated is None:
            cb = self.cluster_bits
            real_clusters = (os.fstat(self.file.fd).st_blocks * 512) >> cb
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = div_round_up(self.file.size(), 1 << cb)
            self._metadata_preallocated = (
                self.refcounts.count_in_use(end_cluster) >= threshold)
        return self._metadata_preallocated

    def info(self) -> dict[str, Any]:
        return {
            "compat": "1.1" if self.version >= 3 else "0.10",
            "version": self.version,
            "cluster_size": self.cluster_size,
            "refcount_bits": self.refcounts.refcount_bits,
            "lazy_refcounts": bool(self.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS),
            "extended_l2": self.extended_l2,
            "compression_type": COMPRESSION_NAMES.get(self.compression_type, "?"),
            "data_file": self.data_file_name,
            "data_file_raw": bool(self.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW),
            "dirty": bool(self.incompatible_features & QCOW2_INCOMPAT_DIRTY),
            "corrupt": bool(self.incompatible_features & QCOW2_INCOMPAT_CORRUPT),
            "snapshots": len(self.snapshots),
            "backing_file": self.backing_name,
            "backing_format": self.backing_format,
            "l1_size": len(self.l1),
        }
