"""Layer: formats, above lifecycle.py.  Committing an overlay: what the layers above one of
its backing files hold, merged into that backing file (``qemu-img commit``).

The chain is opened by the caller with the target writable (``open_image(...,
writable_depths={depth})``) and, when the top is to be emptied, the top writable too.

Theory of operation (crash-safe: a kill or a power loss at any point leaves every image
consistent by its own format's rules — ``qemu-img check`` clean, leaks allowed — and the
top's guest view as it was)
--------------------------------------------------------------------------------------
1. The target grows to the top's virtual size when it is smaller (as qemu-img commit
   does), by its codec's crash-safe grow (formats/lifecycle.py).  The top's view does not
   change: past the target's old end it read zeroes, and the grown target reads zeroes there.
2. Copy.  Every run of guest bytes that a layer *above* the target answers (data,
   compressed or zero) is written into the target through its codec, in runs of at most
   COPY_RUN_BYTES; zeroes (zero clusters, holes, all-zero data) are written as zeroes, so
   the target stays sparse.  The top's view does not change while this runs: every byte
   written lies under a layer above the target that answers it.  The codec's own order
   makes each write crash-safe (the target's L2 entries and BAT reach the file only after
   the data they point at).
3. The target is flushed: its data, then its metadata, durable.
4. Only then, when asked (``empty_top``, the default of qemu-img commit without ``-b``),
   the top is emptied (formats/lifecycle.py: its L1 table, or BAT, cleared; the frees after
   that is durable).  Every byte the top held reads the same from the target by now, so any
   crash point inside it leaves the guest view unchanged.

A crash before 4 has finished leaves the commit half done and the top whole: commit again.
Emptying is refused when the target is not the top's own backing file: the layers between
would show through (qemu-img commit -b implies -d for the same reason).  The layers between
are not changed; like qemu's, they no longer read as before (their backing file changed
under them) and are meant to be dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import Image, Kind
from .chain import read_placed, resolve_in_chain
from .errors import UnsupportedImage
from .lifecycle import grow, make_empty

# Bytes copied per request (a read of the top's chain, a write into the target): large
# enough that a 1 GiB commit is a few hundred requests, small enough to bound memory.
COPY_RUN_BYTES = 8 << 20

# progress(done_bytes, total_bytes), called after each run.
Progress = Callable[[int, int], None]


@dataclass
class CommitResult:
    """What one commit did (cowd's JSON for commit: qemu-img commit prints none)."""

    target: str  # the path of the layer written into
    depth: int  # its depth below the top (1: the top's backing file)
    grown_from: int | None  # the target's old virtual size, when it grew
    bytes_copied: int  # guest bytes written as data
    bytes_zeroed: int  # guest bytes written as zeroes
    emptied: bool  # the top was emptied afterwards


def layer_at(top: Image, depth: int) -> Image:
    layer = top
    for _ in range(depth):
        if layer.backing is None:
            raise ValueError(f"{top.path}: the chain has no layer at depth {depth}")
        layer = layer.backing
    return layer


def commit(top: Image, depth: int = 1, *, empty_top: bool = True,
           progress: Progress | None = None) -> CommitResult:
    """Merge the layers above depth ``depth`` into the layer there, as the module says."""
    if depth < 1:
        raise ValueError(f"{top.path}: commit needs a target below the top (depth={depth})")
    target = layer_at(top, depth)
    target.require_writable()
    if empty_top:
        if depth != 1:
            raise ValueError(f"{top.path}: emptying the top after committing below its own "
                             f"backing file would show the layers between (depth={depth})")
        top.require_writable()
        if top.format_name not in ("qcow2", "vhd"):
            raise UnsupportedImage(top.path, f"emptying a {top.format_name} image is not "
                                   "supported (commit it with -d to keep it)", "format",
                                   top.format_name)
    size = top.virtual_size
    old_size = target.virtual_size
    result = CommitResult(target.path, depth, None, 0, 0, False)
    if old_size < size:
        _check_growable(target)
        grow(target, size)  # 1
        result.grown_from = old_size
    _copy_above(top, target, depth, old_size, result, progress)  # 2
    target.flush()  # 3
    if empty_top:
        make_empty(top)  # 4
        result.emptied = True
    return result


def _check_growable(target: Image) -> None:
    below = target.below.size
    if below > target.virtual_size:
        # Growing would show the backing file's bytes past the target's old end, which
        # read as zeroes through the top until now.
        raise UnsupportedImage(target.path, "cannot grow a layer whose own backing file is "
                               "larger than it: the backing file would show through",
                               "size", target.virtual_size)


def _copy_above(top: Image, target: Image, depth: int, old_size: int, result: CommitResult,
                progress: Progress | None) -> None:
    size = top.virtual_size
    zeroes = bytes(COPY_RUN_BYTES)
    buf = bytearray(COPY_RUN_BYTES)
    pos = 0
    while pos < size:
        placed = resolve_in_chain(top, pos, min(size - pos, COPY_RUN_BYTES), depth)
        ext = placed.extent
        n = ext.length
        if placed.depth < depth:
            if ext.kind is Kind.ZERO:
                past_end = placed.layer.resolve(pos, n).kind is Kind.UNALLOCATED
                if not (past_end and pos >= old_size):  # a grown target reads zeroes there
                    target.write_zeroes(pos, n, may_unmap=True)
                    result.bytes_zeroed += n
            else:
                read_placed(placed, pos, memoryview(buf)[:n])
                # bytearray == bytes is a memcmp; a memoryview compare goes byte by byte.
                data = buf if n == len(buf) else buf[:n]
                if data == (zeroes if n == len(zeroes) else zeroes[:n]):
                    target.write_zeroes(pos, n, may_unmap=True)
                    result.bytes_zeroed += n
                else:
                    target.write(pos, data)
                    result.bytes_copied += n
        pos += n
        if progress is not None:
            progress(pos, size)
