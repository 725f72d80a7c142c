"""Layer: formats.qcow2, above layout.py.  The refcount machinery: :class:`Refcounts`, held
by the image (``Qcow2Image.refcounts``).

Theory of operation
-------------------
Every host cluster of the image file has a refcount: how many references hold it (the header
and the tables it names, L1 and L2 entries, snapshots).  The refcount table is read whole at
open and kept in memory; it names refcount blocks, which are cached in a bounded LRU
(REFCOUNT_CACHE_BYTES).  A block holds ``2**rb_bits`` entries of ``refcount_bits`` each:
big-endian words from 8 bits up, packed from the low-order bit of each byte below that.

Invariants (the numbered rules are the crash-safety rules in formats/qcow2/__init__.py):

- Refcounts are exact, never lazy (rule 6): every change is written at once with pwrite
  (write-through), so a cached block is never newer than the file.
- Clusters are handed out from a pool that :meth:`Refcounts.alloc` refills in batches whose
  refcounts are already 1 (rule 1); the image syncs before any L2 or L1 entry reaches one
  (its ``_sync_data``, which clears :attr:`Refcounts.unsynced`).  :meth:`release_pool` gives
  back what is left.
- A new refcount block is placed inside the range it covers (so it counts itself) and a grown
  table in a contiguous run of free clusters; both are written and synced before the table
  entry or header field that publishes them, and the old table is freed after (rule 2).
- Decrements are applied only by :meth:`apply_frees`, which the image calls at the end of a
  flush, once the unlink is durable (rule 4).
- The image supplies what this class cannot know: ``in_use``, whether a cluster with refcount
  0 is in use by a structure the image knows of (qemu's "cached" overlap check), and
  ``corrupt``, which marks the image corrupt and raises.
"""

from __future__ import annotations

import errno as errno_mod
import struct
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import NamedTuple, NoReturn

from ..base import HostFile
from ..errors import CorruptImage, ImageIOError
from .header import check_table
from .layout import (
    HEADER_REFCOUNT_TABLE_AT,
    QCOW_MAX_HOST_OFFSET,
    QCOW_MAX_REFTABLE_SIZE,
    REFCOUNT_CACHE_BYTES,
    REFCOUNT_CACHE_MIN_BLOCKS,
    REFT_OFFSET_MASK,
    RESERVE_BATCH_BYTES,
    RESERVE_BATCH_MIN_CLUSTERS,
    HostRange,
    div_round_up,
    words_bytes,
)

# array typecodes of the word-sized refcount widths: a zero word is zero whatever the order.
_WORD_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


class Clash(NamedTuple):
    """A cluster with refcount 0 that a known structure uses."""

    cluster: int  # host cluster index
    what: str  # the structure, for the message


# clusters -> the first of them a known structure uses, or None
InUse = Callable[[list[int]], Clash | None]
# (what, field, value): mark the image corrupt, go read-only and raise CorruptImage
Corrupt = Callable[[str, str | None, object], NoReturn]


class StoredRefcounts(NamedTuple):
    refcounts: dict[int, int]  # host cluster index -> its refcount, where not 0
    problems: list[str]  # refcount blocks that could not be read


class Refcounts:
    """The refcounts of one image file: the table, a cache of its blocks, the pool of
    reserved clusters.  One caller at a time, like the image that holds it."""

    def __init__(self, path: str, file: HostFile, *, cluster_bits: int, refcount_order: int,
                 reftable: array[int], reftable_offset: int, reftable_clusters: int,
                 in_use: InUse, corrupt: Corrupt):
        self.path = path
        self.file = file
        self.cluster_bits = cluster_bits
        self.refcount_bits = 1 << refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order  # log2(entries per refcount block)
        self.reftable = reftable  # in memory, replaced whole when it grows
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()  # by file offset
        self._max_blocks = max(REFCOUNT_CACHE_MIN_BLOCKS,
                               REFCOUNT_CACHE_BYTES // (1 << cluster_bits))
        self._pool: deque[int] = deque()  # reserved host cluster indices, ascending
        self._free_hint = 0
        self._alloc_floor = 0
        self.touched = False  # refcounts were written: close gives back and truncates
        self.unsynced = False  # reserved refcounts not yet synced (rule 1); the image clears it
        self._in_use = in_use
        self._corrupt = corrupt

    # ---- blocks --------------------------------------------------------------------------

    def _block(self, rt_index: int) -> bytearray | None:
        if rt_index >= len(self.reftable):
            return None
        e = self.reftable[rt_index]
        off = e & REFT_OFFSET_MASK
        if not off:
            return None
        buf = self._blocks.get(off)
        if buf is not None:
            self._blocks.move_to_end(off)
            return buf
        cs = 1 << self.cluster_bits
        check_table(self.path, cs, off, cs, self.file.size(), "refcount block",
                    f"reftable[{rt_index}]", e)
        buf = bytearray(self.file.pread_exact(off, cs, "refcount block"))
        self._blocks[off] = buf
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        return buf

    def caches_block(self, file_offset: int) -> bool:
        """Is a refcount block at this file offset cached (so in use)?"""
        return file_offset in self._blocks

    def _entry(self, buf: bytearray | bytes, i: int) -> int:
        bits = self.refcount_bits
        if bits >= 8:
            w = bits >> 3
            return int.from_bytes(buf[i * w : i * w + w], "big")
        bit = i * bits
        return (buf[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)

    def _set(self, buf: bytearray, i: int, value: int) -> tuple[int, int]:
        """Set entry i; returns the byte span written."""
        bits = self.refcount_bits
        if bits >= 8:
            w = bits >> 3
            buf[i * w : i * w + w] = value.to_bytes(w, "big")
            return i * w, i * w + w
        bit = i * bits
        mask = ((1 << bits) - 1) << (bit & 7)
        b = bit >> 3
        buf[b] = (buf[b] & ~mask) | ((value << (bit & 7)) & mask)
        return b, b + 1

    def _find_zero(self, buf: bytearray, i: int) -> int | None:
        n = 1 << self.rb_bits
        bits = self.refcount_bits
        if bits >= 8:
            w = bits >> 3
            zero = bytes(w)
            p = i * w
            while True:
                p = buf.find(zero, p)
                if p < 0:
                    return None
                if p % w == 0:
                    return p // w
                p += w - p % w
        for j in range(i, n):
            bit = j * bits
            if buf[bit >> 3] == 0xFF:
                continue
            if not (buf[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1):
                return j
        return None

    def _has_block(self, r: int) -> bool:
        return r < len(self.reftable) and bool(self.reftable[r] & REFT_OFFSET_MASK)

    # ---- reading -------------------------------------------------------------------------

    def get(self, ci: int) -> int:
        """The refcount of host cluster ``ci``."""
        buf = self._block(ci >> self.rb_bits)
        if buf is None:
            return 0
        return self._entry(buf, ci & ((1 << self.rb_bits) - 1))

    def _find_free(self, count: int, taken: set[int], start: int,
                   contiguous: bool = False) -> list[int]:
        """``count`` free host clusters (refcount 0, not in ``taken``) from ``start`` up."""
        rbb = self.rb_bits
        limit = QCOW_MAX_HOST_OFFSET >> self.cluster_bits
        out: list[int] = []
        ci = max(start, self._alloc_floor, 1)
        while len(out) < count:
            if ci >= limit:
                raise ImageIOError(self.path, "no free host cluster below 64 PiB",
                                   errno_mod.ENOSPC)
            r = ci >> rbb
            rend = (r + 1) << rbb
            buf = self._block(r)
            if buf is None:
                c = ci
            else:
                i = self._find_zero(buf, ci & ((1 << rbb) - 1))
                if i is None:
                    ci = rend
                    continue
                c = (r << rbb) + i
            ci = c + 1
            if c in taken:
                continue
            if contiguous and out and c != out[-1] + 1:
                out = []
            out.append(c)
        return out

    def count_in_use(self, end_cluster: int) -> int:
        """How many host clusters below ``end_cluster`` have a refcount that is not 0
        (a block at a time: an array's count of zero words where the entries are words)."""
        rbb, bits = self.rb_bits, self.refcount_bits
        per_block = 1 << rbb
        n = 0
        for r in range(min(len(self.reftable), div_round_up(end_cluster, per_block))):
            buf = self._block(r)
            if buf is None:
                continue
            entries = min(per_block, end_cluster - (r << rbb))
            if bits >= 8:
                words_of = array(_WORD_TYPECODES[bits], buf[: entries * (bits >> 3)])
                n += entries - words_of.count(0)
            else:
                n += sum(1 for i in range(entries) if self._entry(buf, i))
        return n

    def highest_used(self) -> int:
        """The highest host cluster with a refcount (0 when none has)."""
        bits = self.refcount_bits
        for r in range(len(self.reftable) - 1, -1, -1):
            buf = self._block(r)
            if buf is None:
                continue
            n = len(buf.rstrip(b"\0"))
            if not n:
                continue
            last_byte = buf[n - 1]
            if bits >= 8:
                i = (n - 1) // (bits >> 3)
            else:
                i = ((n - 1) * 8 + last_byte.bit_length() - 1) // bits
            return (r << self.rb_bits) + i
        return 0

    def stored(self) -> StoredRefcounts:
        """Every refcount that is not 0, as the blocks hold them (for check)."""
        out: dict[int, int] = {}
        problems: list[str] = []
        rbb, bits = self.rb_bits, self.refcount_bits
        for r in range(len(self.reftable)):
            try:
                buf = self._block(r)
            except CorruptImage as e:
                problems.append(str(e))
                continue
            if buf is None:
                continue
            base = r << rbb
            if bits >= 8:
                w = bits >> 3
                for p in range(0, len(buf), w):
                    if any(buf[p : p + w]):
                        out[base + p // w] = int.from_bytes(buf[p : p + w], "big")
            else:
                per = 8 // bits
                for p, byte in enumerate(buf):
                    if byte:
                        for k in range(per):
                            v = (byte >> (k * bits)) & ((1 << bits) - 1)
                            if v:
                                out[base + p * per + k] = v
        return StoredRefcounts(out, problems)

    # ---- writing -------------------------------------------------------------------------

    def apply(self, updates: dict[int, int], *, durable: bool) -> None:
        """Set refcounts (write-through).  Creates refcount blocks, and grows and relocates
        the refcount table, where needed (rule 2).  ``durable`` syncs before returning."""
        maxval = (1 << self.refcount_bits) - 1
        for ci, v in updates.items():
            if v > maxval:
                raise ImageIOError(self.path, f"refcount overflow for cluster {ci} "
                                   f"(refcount_bits={self.refcount_bits})", errno_mod.EOVERFLOW)
        self.touched = True
        rbb = self.rb_bits
        missing = sorted({ci >> rbb for ci, v in updates.items()
                          if v and not self._has_block(ci >> rbb)})
        if missing:
            self._grow(updates, missing)
            return
        self._write_existing(updates)
        if durable:
            self.file.sync()

    def apply_above(self, updates: dict[int, int], floor: int) -> None:
        """``apply(updates, durable=True)``, taking the clusters of any new refcount
        structure from ``floor`` up: check's repair, where a cluster below may be in use
        though its refcount says otherwise."""
        self._alloc_floor = floor
        try:
            self.apply(updates, durable=True)
        finally:
            self._alloc_floor = 0

    def _write_existing(self, updates: dict[int, int]) -> None:
        rbb = self.rb_bits
        by_block: dict[int, list[tuple[int, int]]] = {}
        for ci, v in updates.items():
            by_block.setdefault(ci >> rbb, []).append((ci & ((1 << rbb) - 1), v))
        for r, items in sorted(by_block.items()):
            buf = self._block(r)
            if buf is None:
                continue  # every item sets 0 (checked by the caller): already 0
            lo, hi = len(buf), 0
            for i, v in items:
                a, b = self._set(buf, i, v)
                lo, hi = min(lo, a), max(hi, b)
            if lo < hi:
                self.file.pwrite((self.reftable[r] & REFT_OFFSET_MASK) + lo, buf[lo:hi])

    def _grow(self, updates: dict[int, int], missing: list[int]) -> None:
        cb, rbb = self.cluster_bits, self.rb_bits
        cs = 1 << cb
        taken = {ci for ci, v in updates.items() if v}
        new_blocks: dict[int, int] = {}  # reftable index -> host cluster of the new block
        table_run: list[int] = []
        table_entries = len(self.reftable)
        queue = list(missing)

        def covered(r: int) -> bool:
            return self._has_block(r) or r in new_blocks

        while True:
            while queue:
                r = queue.pop()
                if covered(r):
                    continue
                # Place the block inside the range it covers, so it counts itself.  Every
                # cluster of a range without a block has refcount 0.
                base = r << rbb
                c = next((x for x in range(max(base, 1, self._alloc_floor), base + (1 << rbb))
                          if x not in taken), None)
                if c is None:
                    c = self._find_free(1, taken, base + (1 << rbb))[0]
                    queue.append(c >> rbb)
                new_blocks[r] = c
                taken.add(c)
            need = max(new_blocks) + 1 if new_blocks else 0
            if need <= table_entries:
                break
            # Grow: a new, larger table in a contiguous run of free clusters.
            per_cluster = cs // 8
            grow = max(need, len(self.reftable) * 3 // 2, per_cluster)
            ntc = div_round_up(grow, per_cluster)
            if ntc * cs > QCOW_MAX_REFTABLE_SIZE:
                raise ImageIOError(self.path, "refcount table would exceed its maximum size",
                                   errno_mod.EFBIG)
            for c in table_run:
                taken.discard(c)
            table_run = self._find_free(ntc, taken, max(taken) + 1, contiguous=True)
            taken.update(table_run)
            table_entries = ntc * per_cluster
            queue.extend(c >> rbb for c in table_run)
        final = dict(updates)
        for c in new_blocks.values():
            final[c] = 1
        for c in table_run:
            final[c] = 1
        # Rule 2: unreachable new structures first, then updates of existing blocks (a
        # refcount that reaches the disk early only leaks), then sync, then publish.
        new_bufs: dict[int, bytearray] = {r: bytearray(cs) for r in new_blocks}
        existing: dict[int, int] = {}
        for ci, v in final.items():
            r = ci >> rbb
            if r in new_bufs:
                self._set(new_bufs[r], ci & ((1 << rbb) - 1), v)
            else:
                existing[ci] = v
        for r, c in new_blocks.items():
            self.file.pwrite(c << cb, new_bufs[r])
        self._write_existing(existing)
        new_table: array[int] | None = None
        if table_run:
            new_table = array("Q", self.reftable)
            new_table.extend([0] * (table_entries - len(new_table)))
            for r, c in new_blocks.items():
                new_table[r] = c << cb
            self.file.pwrite(table_run[0] << cb, words_bytes(new_table))
        self.file.sync()
        if new_table is not None:
            old_off, old_clusters = self.reftable_offset, self.reftable_clusters
            self.file.pwrite(HEADER_REFCOUNT_TABLE_AT,
                             struct.pack(">QI", table_run[0] << cb, len(table_run)))
            self.file.sync()
            self.reftable = new_table
            self.reftable_offset = table_run[0] << cb
            self.reftable_clusters = len(table_run)
            for r, c in new_blocks.items():
                self._blocks[c << cb] = new_bufs[r]
            if old_clusters:
                first = old_off >> cb
                frees = {ci: self.get(ci) - 1 for ci in range(first, first + old_clusters)}
                self.apply({ci: max(v, 0) for ci, v in frees.items()}, durable=False)
                self._free_hint = min(self._free_hint, first)
        else:
            for r, c in sorted(new_blocks.items()):
                self.reftable[r] = c << cb
                self._blocks[c << cb] = new_bufs[r]
                self.file.pwrite(self.reftable_offset + 8 * r, struct.pack(">Q", c << cb))
            self.file.sync()
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)

    # ---- allocation and frees ------------------------------------------------------------

    def take(self, n: int) -> list[int]:
        """Rule 1: ``n`` free host clusters (ascending, contiguous where free space allows)
        get refcount 1 before anyone may reference them.  Not synced here: :attr:`unsynced`
        says a sync is owed before an L2/L1 entry reaches one (the image's _sync_data), or
        the caller syncs itself (clusters lent to an outside writer: formats/qcow2/lend.py)."""
        chosen = self._find_free(n, set(), self._free_hint)
        clash = self._in_use(chosen)
        if clash is not None:
            self._corrupt(f"cluster with refcount 0 is in use by the {clash.what}",
                          "cluster", clash.cluster)
        self.apply(dict.fromkeys(chosen, 1), durable=False)
        self.unsynced = True
        self._free_hint = chosen[-1] + 1
        return chosen

    def give(self, clusters: list[int]) -> None:
        """Set back to 0 the refcounts of clusters :meth:`take` handed out and nothing
        references (never reached by an L2/L1 entry: no unlink to wait for, rule 4)."""
        if not clusters:
            return
        self.apply(dict.fromkeys(clusters, 0), durable=False)
        self._free_hint = min(self._free_hint, min(clusters))

    def _reserve(self, n: int) -> None:
        """Rule 1: refcount a batch of host clusters before any of them is handed out."""
        n = max(n, RESERVE_BATCH_MIN_CLUSTERS, RESERVE_BATCH_BYTES >> self.cluster_bits)
        self._pool.extend(self.take(n))

    def alloc(self) -> int:
        """A reserved host cluster's file offset."""
        if not self._pool:
            self._reserve(1)
        return self._pool.popleft() << self.cluster_bits

    def alloc_many(self, count: int) -> list[int]:
        """``count`` reserved host clusters' file offsets, in the order reserved (adjacent
        where the free space is: a long write goes out in few pwrites)."""
        if len(self._pool) < count:
            self._reserve(count - len(self._pool))
        pop = self._pool.popleft
        cb = self.cluster_bits
        return [pop() << cb for _ in range(count)]

    def alloc_run(self, count: int, floor: int = 0) -> int:
        """``count`` adjacent host clusters above every cluster in use (and ``floor``),
        refcount 1 and synced (rule 1), for a table that must be contiguous (an L1 table, a
        snapshot table): the first one's index."""
        start = max(self.highest_used() + 1, floor)
        self.apply({start + i: 1 for i in range(count)}, durable=True)
        if self.highest_used() >= start + count:
            # apply() placed a refcount block or a larger table there (rule 2): take
            # clusters above whatever is in use now.
            self.apply({start + i: 0 for i in range(count)}, durable=True)
            start = self.highest_used() + 1
            self.apply({start + i: 1 for i in range(count)}, durable=True)
        return start

    def release_pool(self) -> None:
        """Give back the reserved clusters not handed out (close, check)."""
        if not self._pool:
            return
        pool = sorted(self._pool)
        self._pool.clear()
        self.give(pool)

    def apply_frees(self, pending: list[HostRange]) -> None:
        """Drop one reference for each range (rule 4: the unlinks are durable by now)."""
        cb = self.cluster_bits
        dec: dict[int, int] = {}
        for off, n in pending:
            for ci in range(off >> cb, ((off + n - 1) >> cb) + 1):
                dec[ci] = dec.get(ci, 0) + 1
        newvals: dict[int, int] = {}
        for ci, k in dec.items():
            cur = self.get(ci)
            if cur < k:
                self._corrupt("refcount would drop below zero", "cluster", ci)
            newvals[ci] = cur - k
        self.apply(newvals, durable=False)
        freed = [ci for ci, v in newvals.items() if v == 0]
        if freed:
            self._free_hint = min(self._free_hint, min(freed))
