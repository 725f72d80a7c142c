"""Layer: cowd (CLI support).  The image commands — create, info, map, check, convert — as
functions that return data or write files; cli.py only parses arguments and prints.

These run synchronously on the format library; nothing here knows about the daemon.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import formats
from formats import HostFile, Image, Kind, OpenPolicy
from formats.qcow2 import layout as qcow2_layout

from . import imagelock, qemuout
from .errors import CommandFailed, UsageError

OVERLAY_SUFFIX = {"qcow2": ".qcow2", "vhd": ".vhd"}
# The cluster of an --extended-l2 overlay unless --cluster-size says otherwise: qemu's
# recommendation for extended L2 (4 KiB subclusters, a guest's page).
EXTENDED_L2_CLUSTER_SIZE = 128 << 10

# Convert works in chunks of this many guest bytes: large enough to amortise syscalls,
# small enough that memory stays bounded whatever the image size.
CONVERT_CHUNK_BYTES = 4 << 20


def overlay_format_name(name: str) -> str:
    """`qcow` on the command line means qcow2 (what qemu calls qcow2); `vhd` a differencing VHD."""
    key = name.lower()
    if key in ("qcow", "qcow2"):
        return "qcow2"
    if key in ("vhd", "vpc"):
        return "vhd"
    raise UsageError(f"--overlay: unknown overlay format {name!r} (use qcow or vhd)")


def default_overlay_path(base: str, fmt: str) -> str:
    """<base stem>-overlay.<ext>, or -overlay-2, -3 ... when taken (one overlay per VM)."""
    stem, _ = os.path.splitext(base)
    suffix = OVERLAY_SUFFIX[fmt]
    candidate = f"{stem}-overlay{suffix}"
    n = 2
    while os.path.exists(candidate):
        candidate = f"{stem}-overlay-{n}{suffix}"
        n += 1
    return candidate


def create(base: str, overlay: str, out: str | None, base_format: str | None,
           cluster_size: int | None = None, absolute: bool = False, *,
           policy: OpenPolicy | None = None, size: int | None = None,
           extended_l2: bool = False) -> str:
    fmt = overlay_format_name(overlay)
    from formats.remote import looks_remote

    if not looks_remote(base) and not os.path.exists(base):
        raise CommandFailed(f"{base}: base image not found")
    if base_format is not None:
        try:
            base_format = formats.canonical_format(base_format)
        except ValueError as e:
            raise UsageError(f"--base-format: {e}") from None
    if cluster_size is not None:
        if fmt != "qcow2":
            raise UsageError("--cluster-size: only for a qcow2 overlay (a differencing VHD's "
                             "block size is its parent's)")
        low, high = 1 << qcow2_layout.MIN_CLUSTER_BITS, 1 << qcow2_layout.MAX_CLUSTER_BITS
        if not low <= cluster_size <= high or cluster_size & (cluster_size - 1):
            raise UsageError(f"--cluster-size: must be a power of two from {low} to "
                             f"{high} (cluster_size={cluster_size})")
    if extended_l2:
        if fmt != "qcow2":
            raise UsageError("--extended-l2: only for a qcow2 overlay")
        if cluster_size is None:
            cluster_size = EXTENDED_L2_CLUSTER_SIZE
        elif cluster_size < 1 << qcow2_layout.MIN_CLUSTER_BITS_EXTL2:
            raise UsageError(f"--extended-l2: needs clusters of "
                             f"{1 << qcow2_layout.MIN_CLUSTER_BITS_EXTL2 >> 10}k or more "
                             f"(cluster_size={cluster_size})")
    if size is not None and fmt != "qcow2":
        raise UsageError("--size: only for a qcow2 overlay (a differencing VHD has its "
                         "parent's size)")
    path = out or default_overlay_path(base, fmt)
    if os.path.exists(path):
        raise UsageError(f"{path}: already exists (refusing to overwrite)")
    if fmt == "vhd":
        probe = formats.open_one(base, False, base_format, policy=policy)
        try:
            if probe.format_name != "vhd":
                raise UsageError(
                    f"{base}: --overlay vhd needs a VHD base, this is {probe.format_name} "
                    "(convert it with `cowd convert BASE base.vhd -O vhd`, or use --overlay qcow)"
                )
        finally:
            probe.close()
    try:
        formats.create_overlay(path, base, fmt, base_format, cluster_size=cluster_size,
                               absolute_backing=absolute, policy=policy, size=size,
                               extended_l2=extended_l2)
    except ValueError as e:  # the library's refusal of what was asked (a size too small)
        if os.path.exists(path):
            os.unlink(path)
        raise UsageError(str(e)) from None
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    return path


# ---- info ----------------------------------------------------------------------------------


def allocated_bytes(img: Image) -> int:
    """Guest bytes this layer holds as data: what qemu-img map shows at depth 0 with data
    and not zero (not zero clusters, not a raw file's holes, not the host file's holes
    under a layer whose holes qemu reports: :func:`reports_host_holes`)."""
    look_under = reports_host_holes(img)
    n = 0
    for e in img.extents():
        if e.kind is Kind.COMPRESSED or (e.kind is Kind.DATA and not look_under):
            n += e.length
        elif e.kind is Kind.DATA:
            n += sum(length for _, length, hole in host_runs(e) if not hole)
    return n


def reports_host_holes(layer: Image) -> bool:
    """Does qemu's block status look under this layer's data at its host file's holes (and
    call them zero)?  For a fixed VHD (vpc answers BDRV_BLOCK_RECURSE) and a qcow2 that looks
    metadata-preallocated (qcow2 answers it then); not for dynamic VHD, qcow or a qcow2
    whose clusters were all written.  Raw layers report their holes themselves."""
    if isinstance(layer, formats.VhdImage):
        return layer.fixed
    if isinstance(layer, formats.Qcow2Image):
        return layer.looks_metadata_preallocated()
    return False


def host_runs(ext: formats.Extent) -> Iterator[tuple[int, int, bool]]:
    """A DATA extent split where its host file's holes begin and end: (guest offset,
    length, is a hole).  One run, not a hole, where the file cannot tell."""
    assert ext.kind is Kind.DATA and ext.file is not None
    pos = 0
    while pos < ext.length:
        run = ext.file.hole_run(ext.file_offset + pos, ext.length - pos)
        if run is None:
            yield ext.guest_offset + pos, ext.length - pos, False
            return
        yield ext.guest_offset + pos, run[1], run[0]
        pos += run[1]


def lock_chain(img: Image, force_share: bool) -> None:
    """qemu's read locks on every layer (cowd/imagelock.py): an image another process
    writes is refused, as qemu-img refuses it, unless the user forces sharing (-U)."""
    if force_share:
        return
    layer: Image | None = img
    while layer is not None:
        try:
            imagelock.lock_image(layer.file.fd, layer.path, writable=False)
        except imagelock.ImageLocked as e:
            raise CommandFailed(f"{e}; pass -U (--force-share) to read it anyway") from None
        layer = layer.backing


def layer_facts(layer: Image, filename: str) -> qemuout.LayerFacts:
    """What info shows of one layer, in the library's terms."""
    facts = layer.info()
    actual = _disk_usage(layer.file)  # the image file's only, as qemu 7.2 counts it
    specific = qemuout.qcow2_specific(facts) if layer.format_name == "qcow2" else None
    snapshots = [qemuout.snapshot_info(sn.id, sn.name, sn.vm_state_size, sn.date_sec,
                                       sn.date_nsec, sn.vm_clock_nsec, sn.icount)
                 for sn in getattr(layer, "snapshots", [])]
    # qemu reports no cluster size for raw and for a fixed VHD (vpc_get_info sets it only
    # for a dynamic or differencing one, whose blocks are its clusters).
    no_clusters = layer.format_name == "raw" or (isinstance(layer, formats.VhdImage)
                                                 and layer.fixed)
    return qemuout.LayerFacts(
        filename=filename, format=layer.format_name, virtual_size=layer.virtual_size,
        cluster_size=None if no_clusters else layer.cluster_size,
        actual_size=actual, dirty=bool(facts.get("dirty", False)),
        backing_name=layer.backing_name, backing_format=layer.backing_format,
        snapshots=snapshots, specific=specific, allocated_bytes=allocated_bytes(layer),
        cowd_specific=facts)


def info(path: str, fmt: str | None = None, policy: OpenPolicy | None = None, *,
         force_share: bool = False) -> list[dict[str, Any]]:
    """qemu-img info's document of every layer of the chain, top first."""
    img = formats.open_image(path, False, fmt, policy=policy)
    try:
        lock_chain(img, force_share)
        docs = []
        layer: Image | None = img
        name = path
        while layer is not None:
            doc = qemuout.info_doc(layer_facts(layer, name))
            docs.append(doc)
            name = doc.get("full-backing-filename", "")
            layer = layer.backing
        return docs
    finally:
        img.close_chain()


def _disk_usage(file: HostFile) -> int:
    return os.fstat(file.fd).st_blocks * 512


# ---- map -----------------------------------------------------------------------------------


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool  # some layer of the chain has the bytes (qemu: allocated above the end)
    zero: bool
    data: bool
    compressed: bool
    offset: int | None
    filename: str | None

    def as_json(self) -> dict[str, Any]:
        """qemu-img map's MapEntry (qemu 7.2 has no member for compression: cowd's key)."""
        d: dict[str, Any] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        if self.compressed:
            d["cowd"] = {"compressed": True}
        return d


def chain_names(img: Image, top_name: str) -> list[str]:
    """Each layer's name as qemu shows it, by depth: the top as typed, each parent joined
    to its child's name."""
    names = [top_name]
    layer = img
    while layer.backing is not None:
        names.append(qemuout.path_combine(names[-1], layer.backing_name or ""))
        layer = layer.backing
    return names


def map_entries(img: Image, top_name: str | None = None) -> Iterator[MapEntry]:
    """The chain's map in qemu-img map's terms, merged into the longest equal runs."""
    names = chain_names(img, top_name or img.path)
    last_depth = len(names) - 1
    look_under: dict[int, bool] = {}  # reports_host_holes by depth, asked once a layer
    pending: MapEntry | None = None
    pos = 0
    while pos < img.virtual_size:
        placed = formats.resolve_in_chain(img, pos, img.virtual_size - pos)
        depth, layer, ext = placed.depth, placed.layer, placed.extent
        runs: list[MapEntry] = []
        if ext.kind is Kind.DATA:
            assert ext.file is not None
            name = names[depth]
            if ext.file is not layer.file:  # a qcow2's data file, named as qemu names it
                name = qemuout.path_combine(name, getattr(layer, "data_file_name", "") or "")
            if depth not in look_under:
                look_under[depth] = reports_host_holes(layer)
            if look_under[depth]:
                # qemu's data-and-zero: the host file's holes under the layer's data.
                runs = [MapEntry(start, n, depth, True, hole, True, False,
                                 ext.file_offset + start - pos, name)
                        for start, n, hole in host_runs(ext)]
            else:
                runs = [MapEntry(pos, ext.length, depth, True, False, True, False,
                                 ext.file_offset, name)]
        elif ext.kind is Kind.COMPRESSED:
            runs = [MapEntry(pos, ext.length, depth, True, False, True, True, None, None)]
        else:
            # ZERO: a zero flag or a hole in `layer` (with the file offset where the layer
            # has one, as qemu shows it), or nothing anywhere in the chain (not present).
            present = layer.resolve(pos, ext.length).kind is not Kind.UNALLOCATED
            if present and isinstance(layer, formats.Qcow2Image):
                runs = list(_qcow2_zero_runs(layer, pos, ext.length, depth, names[depth]))
            else:
                offset = pos if present and layer.format_name == "raw" else None  # a hole
                runs = [MapEntry(pos, ext.length, depth if present else last_depth, present,
                                 True, False, False, offset,
                                 names[depth] if offset is not None else None)]
        for e in runs:
            if pending and _continues(pending, e):
                pending.length += e.length
            else:
                if pending:
                    yield pending
                pending = e
        pos += ext.length
    if pending:
        yield pending


def _qcow2_zero_runs(layer: formats.Qcow2Image, pos: int, length: int, depth: int,
                     name: str) -> Iterator[MapEntry]:
    """A qcow2 layer's zero run, a cluster at a time: qemu shows the host offset of a zero
    cluster that keeps one (in the data file where there is one); the caller merges."""
    if layer.data_file_name:
        name = qemuout.path_combine(name, layer.data_file_name)
    cluster = layer.cluster_size
    end = pos + length
    while pos < end:
        n = min(end, (pos // cluster + 1) * cluster) - pos
        offset = layer.zero_host_offset(pos)
        yield MapEntry(pos, n, depth, True, True, False, False, offset,
                       name if offset is not None else None)
        pos += n


def _continues(a: MapEntry, b: MapEntry) -> bool:
    if (a.depth, a.present, a.zero, a.data, a.compressed, a.filename) != (
        b.depth, b.present, b.zero, b.data, b.compressed, b.filename
    ):
        return False
    if a.offset is None or b.offset is None:
        return a.offset is None and b.offset is None
    return a.offset + a.length == b.offset


def map_image(path: str, fmt: str | None = None, policy: OpenPolicy | None = None, *,
              force_share: bool = False) -> list[MapEntry]:
    img = formats.open_image(path, False, fmt, policy=policy)
    try:
        lock_chain(img, force_share)
        return list(map_entries(img, path))
    finally:
        img.close_chain()


def format_map(entries: list[MapEntry]) -> str:
    rows = [qemuout.map_text_header()]
    for e in entries:  # qemu's text shows data that does not read as zeroes
        if e.data and not e.zero and e.offset is not None and e.filename is not None:
            rows.append(qemuout.map_text_row(e.start, e.length, e.offset, e.filename))
    return "\n".join(rows)


# ---- check ---------------------------------------------------------------------------------


def check(path: str, repair: str | None, fmt: str | None = None,
          policy: OpenPolicy | None = None, *,
          force_share: bool = False) -> tuple[formats.CheckResult | None, str]:
    """qemu-img check of one image: its result (None: the format cannot be checked) and its
    format.  ``repair``: None, "leaks" or "all" (also raise refcounts that are too low)."""
    img = formats.open_one(path, repair is not None, fmt, policy=policy)
    try:
        if not type(img).checkable:
            return None, img.format_name
        try:
            if repair is not None:  # never repair an image someone else has open
                imagelock.lock_image(img.file.fd, path, writable=True)
            elif not force_share:
                imagelock.lock_image(img.file.fd, path, writable=False)
        except imagelock.ImageLocked as e:
            hint = "" if repair is not None else "; pass -U (--force-share) to read it anyway"
            raise CommandFailed(f"{e}{hint}") from None
        if repair == "all" and isinstance(img, formats.Qcow2Image):
            return img.check(repair=True, fix_errors=True), img.format_name
        return img.check(repair=repair is not None), img.format_name
    finally:
        img.close()


# ---- convert -------------------------------------------------------------------------------


Progress = Callable[[int, int], None]


def convert(src: str, out: str, out_format: str, src_format: str | None = None,
            progress: Progress | None = None, policy: OpenPolicy | None = None, *,
            force_share: bool = False, flush: bool = True) -> dict[str, Any]:
    """Copy the whole chain's guest bytes into a new standalone image; zeroes stay sparse.
    Returns what was done (cowd's JSON for convert: qemu-img convert prints none).

    Theory of operation (speed): the chain is walked in runs of up to CONVERT_CHUNK_BYTES
    that one layer answers (formats.resolve_in_chain); a run the metadata says reads as
    zeroes (zero clusters, unallocated with nothing beneath, a raw layer's holes) is never
    read nor written, nor are the host file's holes under a data run (SEEK_DATA/SEEK_HOLE);
    a data run is read from the layer that holds it straight into one reused buffer and
    written with one request, unless it is all zeroes (a memcmp).  The
    qcow2 writer takes a long write over fresh clusters in one allocation and one pwrite
    (formats/qcow2/writer.py).  ``flush`` (qemu-img's ``-t writeback``; its convert default
    is ``unsafe``, no flush) makes the output durable before returning."""
    try:
        out_format = formats.canonical_format(out_format)
    except ValueError as e:
        raise UsageError(f"-O: {e}") from None
    if out_format not in ("raw", "qcow2", "vhd"):
        raise UsageError(f"-O: cannot write {out_format} images (use raw, qcow2 or vhd)")
    if os.path.exists(out):
        raise UsageError(f"{out}: already exists (refusing to overwrite)")
    img = formats.open_image(src, False, src_format, policy=policy)
    try:
        lock_chain(img, force_share)
        size = img.virtual_size
        if out_format == "raw":
            with open(out, "wb") as f:
                f.truncate(size)
        elif out_format == "qcow2":
            formats.qcow2.create(out, size)
        else:
            formats.vhd.create(out, size, kind="dynamic")
        dst = formats.open_one(out, True, out_format)
        dst.file.skip_sync = not flush
        try:
            written = _copy_chain(img, dst, progress)
            # qcow2 and VHD disks are whole 512-byte sectors: a raw source of another size
            # gets its last sector zero-padded, as qemu-img convert does.
            if not size <= dst.virtual_size < size + 512:
                raise AssertionError(f"{out}: created with size {dst.virtual_size}, want {size}")
            dst.flush()
        finally:
            dst.close()
        return {"filename": out, "format": qemuout.qemu_format(out_format),
                "virtual-size": size, "bytes-written": written}
    except BaseException:
        if os.path.exists(out):
            os.unlink(out)
        raise
    finally:
        img.close_chain()


def _copy_chain(img: Image, dst: Image, progress: Progress | None) -> int:
    """convert's loop (see there); returns the guest bytes written as data."""
    size = img.virtual_size
    buf = bytearray(CONVERT_CHUNK_BYTES)
    zeroes = bytes(CONVERT_CHUNK_BYTES)
    written = 0
    pos = 0
    while pos < size:
        placed = formats.resolve_in_chain(img, pos, min(CONVERT_CHUNK_BYTES, size - pos))
        ext = placed.extent
        # A data run's host file may have holes under it (a qcow2's raw data file that
        # was never written there or was punched): they read as zeroes, so they are not
        # read nor written, as qemu-img convert leaves them sparse.  Two lseeks a chunk.
        runs: Iterable[tuple[int, int, bool]] = (
            () if ext.kind is Kind.ZERO
            else host_runs(ext) if ext.kind is Kind.DATA else ((pos, ext.length, False),))
        for start, n, hole in runs:
            if hole:
                continue
            view = memoryview(buf)[:n]
            formats.read_placed(placed, start, view)
            # bytearray == bytes is a memcmp; a memoryview compare goes byte by byte.
            full = n == CONVERT_CHUNK_BYTES
            if not ((buf == zeroes) if full else (buf[:n] == zeroes[:n])):
                dst.write(start, view)
                written += n
        pos += ext.length
        if progress:
            progress(pos, size)
    return written


def progress_printer(label: str, plain_out: TextIO) -> Progress:
    """What -p shows (and a terminal by default): a one-line bar on stderr when stderr is a
    terminal; otherwise qemu-img's plain form on ``plain_out`` — ``    (12.00/100%)\r`` at
    the start and each time more than a whole percent more is done, ``\n`` at the end —
    which qemu-img -p writes to stdout whether or not it is a terminal, and scripts read."""
    if sys.stderr.isatty():
        return _terminal_bar(label)
    return _qemu_plain_progress(plain_out)


def _qemu_plain_progress(out: TextIO) -> Progress:
    # qemu's util/qemu-progress.c with min_skip 1.0, as convert, commit and rebase use it.
    last = [-1.0]

    def show(done: int, total: int) -> None:
        pct = done * 100 / total if total else 100.0
        if last[0] < 0:
            out.write("    (0.00/100%)\r")
            last[0] = 0.0
        if pct > last[0] + 1.0 or (done >= total and last[0] < 100.0):
            out.write(f"    ({pct:3.2f}/100%)\r")
            last[0] = pct
        if done >= total:
            out.write("\n")
        out.flush()

    return show


def _terminal_bar(label: str) -> Progress:
    start = time.monotonic()
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(now - start, 1e-6) / (1 << 20)
        sys.stderr.write(f"\r{label} [{bar:<30}] {frac * 100:5.1f}% {rate:7.1f} MiB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
