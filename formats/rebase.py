"""Layer: formats, above lifecycle.py.  Rebasing an overlay: recording another backing file
(or none) while the guest sees the same disk (``qemu-img rebase``'s safe mode; its unsafe
``-u`` is the last step alone, formats/lifecycle.py's ``set_backing``).

The caller opens the overlay's chain with the overlay writable (``open_image``), and the new
backing file's chain as the overlay would name it (``open_named_chain``), or passes None to
make the overlay standalone.

Theory of operation (crash-safe: a kill or a power loss at any point leaves the overlay
consistent and its guest view as it was)
--------------------------------------------------------------------------------------
1. Copy.  Where the overlay holds nothing of its own (UNALLOCATED), the guest sees the old
   backing chain; after the switch it will see the new one.  Every such range is compared,
   COMPARE_RUN_BYTES at a time and the overlay's cluster at a time, and where the two differ
   the old chain's bytes are written into the overlay (its codec's write, crash-safe by its
   own rules).  The overlay's view does not change while this runs: it holds now what it
   showed from the old chain.  Ranges the metadata says read as zeroes in both chains, and
   (when the new backing file is a layer of the old chain) ranges that no layer above it
   holds, are skipped without reading.  Flattening (no new backing file) compares with
   zeroes: everything not zero is copied.
2. The overlay is flushed: its data, then its metadata, durable.
3. Only then the backing file's record is switched, in one crash-safe step of the format
   (formats/qcow2/backing.py, formats/vhd/reparent.py).  Before it the overlay names the
   old chain, after it the new one, and both read the same disk.

A crash before 3 leaves the old backing file recorded and part of the differences copied:
rebase again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import NOTHING_BELOW, Below, Image, Kind
from .chain import ChainBelow, resolve_in_chain
from .lifecycle import set_backing

# Bytes compared per request (one read of each chain): bounds memory (two buffers).
COMPARE_RUN_BYTES = 4 << 20

# progress(done_bytes, total_bytes), called after each run.
Progress = Callable[[int, int], None]


@dataclass
class RebaseResult:
    """What one rebase did (cowd's JSON for rebase: qemu-img rebase prints none)."""

    bytes_compared: int  # guest bytes read from both chains and compared
    bytes_copied: int  # guest bytes written into the overlay because they differ


def _shared_depth(top: Image, new: Image | None) -> int | None:
    """The depth in ``top``'s chain of the file ``new`` is (None: not in it)."""
    if new is None:
        return None
    layer, depth = top.backing, 1
    while layer is not None:
        if layer.file.dev_ino == new.file.dev_ino:
            return depth
        layer, depth = layer.backing, depth + 1
    return None


def copy_differences(top: Image, new: Image | None,
                     progress: Progress | None = None) -> RebaseResult:
    """Step 1: make ``top`` hold every byte where its old chain and ``new`` differ."""
    top.require_writable()
    old_below = top.below
    new_below: Below = ChainBelow(new) if new is not None else NOTHING_BELOW
    shared = _shared_depth(top, new)
    result = RebaseResult(0, 0)
    size = top.virtual_size
    pos = 0
    while pos < size:
        ext = top.resolve(pos, min(size - pos, COMPARE_RUN_BYTES))
        n = ext.length
        if ext.kind is Kind.UNALLOCATED:
            _copy_run(top, old_below, new_below, shared, pos, n, result)
        pos += n
        if progress is not None:
            progress(pos, size)
    return result


def _copy_run(top: Image, old: Below, new: Below, shared: int | None, start: int,
              length: int, result: RebaseResult) -> None:
    pos, end = start, start + length
    while pos < end:
        n = end - pos
        skip = min(old.zero_prefix(pos, n), new.zero_prefix(pos, n))
        if not skip and shared is not None and top.backing is not None:
            placed = resolve_in_chain(top.backing, pos, n, shared - 1)
            if placed.depth == shared - 1 and placed.extent.kind is Kind.UNALLOCATED:
                skip = placed.extent.length  # the new backing file shows the same bytes
            else:
                n = placed.extent.length
        if skip:
            pos += skip
            continue
        _compare(top, old, new, pos, n, result)
        pos += n


def _compare(top: Image, old: Below, new: Below, start: int, length: int,
             result: RebaseResult) -> None:
    grain = top.cluster_size
    pos, end = start, start + length
    while pos < end:
        n = min(end - pos, COMPARE_RUN_BYTES)
        a, b = bytearray(n), bytearray(n)
        old.read_into(pos, memoryview(a))
        new.read_into(pos, memoryview(b))
        result.bytes_compared += n
        if a != b:  # a memcmp; then cluster by cluster, to copy only what differs
            i = 0
            while i < n:
                j = min(n, (pos + i) // grain * grain + grain - pos)
                if a[i:j] != b[i:j]:
                    k = j
                    while k < n:
                        m = min(n, k + grain)
                        if a[k:m] == b[k:m]:
                            break
                        k = m
                    top.write(pos + i, memoryview(a)[i:k])
                    result.bytes_copied += k - i
                    j = k
                i = j
        pos += n


def rebase(top: Image, new: Image | None, name: str | None, fmt: str | None,
           progress: Progress | None = None) -> RebaseResult:
    """Safe rebase, as the module says: copy, flush, then record ``name`` (of format
    ``fmt``; None and None: no backing file) as ``top``'s backing file."""
    if name is not None and new is None:
        raise ValueError(f"{top.path}: a safe rebase needs the new backing file open")
    if name is None and top.format_name == "vhd":  # refused before anything is copied
        set_backing(top, name, fmt, new)
    result = copy_differences(top, new, progress)  # 1
    top.flush()  # 2
    set_backing(top, name, fmt, new)  # 3
    return result
