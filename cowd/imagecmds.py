"""Layer: cowd (CLI support).  The image commands — create, info, map, check, convert — as
functions that return data or write files; cli.py only parses arguments and prints.

These run synchronously on the format library; nothing here knows about the daemon.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import formats
from formats import Image, Kind, OpenPolicy

from . import imagelock
from .errors import UsageError

OVERLAY_SUFFIX = {"qcow2": ".qcow2", "vhd": ".vhd"}

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
           policy: OpenPolicy | None = None) -> str:
    fmt = overlay_format_name(overlay)
    if not os.path.exists(base):
        raise UsageError(f"{base}: base image not found")
    if base_format is not None:
        try:
            base_format = formats.canonical_format(base_format)
        except ValueError as e:
            raise UsageError(f"--base-format: {e}") from None
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
                               absolute_backing=absolute, policy=policy)
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)
        raise
    return path


# ---- info ----------------------------------------------------------------------------------


def allocated_bytes(img: Image) -> int:
    """Guest bytes this layer holds itself (DATA, COMPRESSED or ZERO: not falling through)."""
    return sum(e.length for e in img.extents() if e.kind is not Kind.UNALLOCATED)


def info(path: str, fmt: str | None = None, policy: OpenPolicy | None = None) -> dict[str, Any]:
    img = formats.open_image(path, False, fmt, policy=policy)
    try:
        chain = []
        layer: Image | None = img
        while layer is not None:
            chain.append({
                "filename": layer.path,
                "format": layer.format_name,
                "virtual-size": layer.virtual_size,
                "cluster-size": layer.cluster_size,
                "actual-size": _disk_usage(layer.path),
                "allocated-bytes": allocated_bytes(layer),
                "backing-filename": layer.backing_name,
                "backing-format": layer.backing_format,
                "full-backing-filename": layer.backing_path,
                "read-only-reason": layer.read_only_reason,
                "format-specific": layer.info(),
            })
            layer = layer.backing
        return {**chain[0], "backing-chain": chain[1:]}
    finally:
        img.close_chain()


def _disk_usage(path: str) -> int:
    return os.stat(path).st_blocks * 512


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.3g} {unit}" if v != int(v) else f"{int(v)} {unit}"
    return f"{n} B"


def format_info(doc: dict[str, Any]) -> str:
    lines = []
    layers = [doc, *doc["backing-chain"]]
    for i, layer in enumerate(layers):
        if i:
            lines.append("")
        lines += [
            f"image: {layer['filename']}",
            f"file format: {layer['format']}",
            f"virtual size: {human_size(layer['virtual-size'])} ({layer['virtual-size']} bytes)",
            f"disk size: {human_size(layer['actual-size'])}",
            f"cluster size: {layer['cluster-size']}",
            f"allocated in this layer: {human_size(layer['allocated-bytes'])}",
        ]
        if layer["backing-filename"]:
            fmt = f" (format {layer['backing-format']})" if layer["backing-format"] else ""
            lines.append(f"backing file: {layer['backing-filename']}{fmt}")
            lines.append(f"backing file (resolved): {layer['full-backing-filename']}")
        if layer["read-only-reason"]:
            lines.append(f"read-only: {layer['read-only-reason']}")
        for k, v in layer["format-specific"].items():
            lines.append(f"    {k}: {v}")
    return "\n".join(lines)


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
        d: dict[str, Any] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
            "compressed": self.compressed,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def chain_depth(img: Image) -> int:
    n = 0
    layer = img.backing
    while layer is not None:
        n += 1
        layer = layer.backing
    return n


def map_entries(img: Image) -> Iterator[MapEntry]:
    """The chain's map in qemu-img map's terms, merged into the longest equal runs."""
    last_depth = chain_depth(img)
    pending: MapEntry | None = None
    pos = 0
    while pos < img.virtual_size:
        placed = formats.resolve_in_chain(img, pos, img.virtual_size - pos)
        depth, layer, ext = placed.depth, placed.layer, placed.extent
        if ext.kind is Kind.DATA:
            assert ext.file is not None
            e = MapEntry(pos, ext.length, depth, True, False, True, False,
                         ext.file_offset, ext.file.path)
        elif ext.kind is Kind.COMPRESSED:
            e = MapEntry(pos, ext.length, depth, True, False, True, True, None, None)
        else:
            # ZERO: a zero flag in `layer`, or nothing anywhere in the chain (not present).
            present = layer.resolve(pos, ext.length).kind is not Kind.UNALLOCATED
            e = MapEntry(pos, ext.length, depth if present else last_depth, present, True,
                         False, False, None, None)
        if pending and _continues(pending, e):
            pending.length += e.length
        else:
            if pending:
                yield pending
            pending = e
        pos += ext.length
    if pending:
        yield pending


def _continues(a: MapEntry, b: MapEntry) -> bool:
    if (a.depth, a.present, a.zero, a.data, a.compressed, a.filename) != (
        b.depth, b.present, b.zero, b.data, b.compressed, b.filename
    ):
        return False
    if a.offset is None or b.offset is None:
        return a.offset is None and b.offset is None
    return a.offset + a.length == b.offset


def map_image(path: str, fmt: str | None = None,
              policy: OpenPolicy | None = None) -> list[MapEntry]:
    img = formats.open_image(path, False, fmt, policy=policy)
    try:
        return list(map_entries(img))
    finally:
        img.close_chain()


def format_map(entries: list[MapEntry]) -> str:
    rows = [f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File"]
    for e in entries:
        if e.data and e.offset is not None:
            rows.append(f"{e.start:<#20x}{e.length:<#20x}{e.offset:<#20x}{e.filename}")
    return "\n".join(rows)


# ---- check ---------------------------------------------------------------------------------


def check(path: str, repair: bool, fmt: str | None = None,
          policy: OpenPolicy | None = None) -> formats.CheckResult:
    img = formats.open_one(path, repair, fmt, policy=policy)
    try:
        if repair:  # never repair an image a daemon or qemu is writing (cowd/imagelock.py)
            try:
                imagelock.lock_image(img.file.fd, path, writable=True)
            except imagelock.ImageLocked as e:
                raise UsageError(str(e)) from None
        return img.check(repair=repair)
    finally:
        img.close()


# ---- convert -------------------------------------------------------------------------------


Progress = Callable[[int, int], None]


def convert(src: str, out: str, out_format: str, src_format: str | None = None,
            progress: Progress | None = None, policy: OpenPolicy | None = None) -> None:
    """Copy the whole chain's guest bytes into a new standalone image; zeroes stay sparse."""
    try:
        out_format = formats.canonical_format(out_format)
    except ValueError as e:
        raise UsageError(f"-O: {e}") from None
    if out_format not in ("raw", "qcow2", "vhd"):
        raise UsageError(f"-O: cannot write {out_format} images (use raw, qcow2 or vhd)")
    if os.path.exists(out):
        raise UsageError(f"{out}: already exists (refusing to overwrite)")
    img = formats.open_image(src, False, src_format,
                             policy=policy)
    try:
        size = img.virtual_size
        if out_format == "raw":
            with open(out, "wb") as f:
                f.truncate(size)
        elif out_format == "qcow2":
            formats.qcow2.create(out, size)
        else:
            formats.vhd.create(out, size, kind="dynamic")
        dst = formats.open_one(out, True, out_format)
        try:
            pos = 0
            zero = bytes(CONVERT_CHUNK_BYTES)
            while pos < size:
                n = min(CONVERT_CHUNK_BYTES, size - pos)
                if not _all_unallocated_or_zero(img, pos, n):
                    data = img.read(pos, n)
                    if data != zero[:n]:
                        dst.write(pos, data)
                pos += n
                if progress:
                    progress(pos, size)
            # qcow2 and VHD disks are whole 512-byte sectors: a raw source of another size
            # gets its last sector zero-padded, as qemu-img convert does.
            if not size <= dst.virtual_size < size + 512:
                raise AssertionError(f"{out}: created with size {dst.virtual_size}, want {size}")
            dst.flush()
        finally:
            dst.close()
    except BaseException:
        if os.path.exists(out):
            os.unlink(out)
        raise
    finally:
        img.close_chain()


def _all_unallocated_or_zero(img: Image, pos: int, n: int) -> bool:
    end = pos + n
    while pos < end:
        ext = formats.resolve_in_chain(img, pos, end - pos).extent
        if ext.kind is not Kind.ZERO:
            return False
        pos += ext.length
    return True


def terminal_progress(label: str) -> Progress | None:
    """A one-line progress bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None
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
