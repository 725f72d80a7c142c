"""Layer: formats.qcow2, above layout.py.  The header cluster and the structures it names
directly but does not serve I/O through: the header extensions, the snapshot table and the
persistent-bitmap directory.

Invariants:

- Every count, length and offset the file controls is checked against a named limit
  (layout.py) and against the file's size before anything is read or allocated; malformed
  metadata raises CorruptImage, features this code does not implement UnsupportedImage.
- :func:`parse_header` does no I/O: it takes the header cluster's bytes.  The snapshot table
  and the bitmap directory are read through the image's :class:`~formats.base.HostFile` and
  only bounds-checked: only the active L1 serves I/O (reader.py).
- Like qemu, names recorded in the header (backing file, backing format, data file, feature
  names) are C strings: a NUL ends them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from ..base import HostFile, require
from ..errors import UnsupportedImage
from .layout import (
    BITMAP_DIR_ENTRY,
    BME_TABLE_ENTRY_OFFSET_MASK,
    COMPRESSION_NAMES,
    FEATURE_NAME_ENTRY_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_CLUSTER_BITS_EXTL2,
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_BITMAPS,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_COMPRESSION,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    QCOW2_INCOMPAT_MASK,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    QCOW2_MAX_BITMAPS,
    QCOW2_V2_HEADER_LENGTH,
    QCOW2_V3_HEADER_MIN_LENGTH,
    QCOW_MAGIC,
    QCOW_MAX_BACKING_FILE_NAME,
    QCOW_MAX_DATA_FILE_NAME,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    QCOW_MAX_SNAPSHOTS,
    QCOW_MAX_SNAPSHOTS_SIZE,
    SNAPSHOT_HEADER,
    Region,
    words,
)

# ---- the header cluster ------------------------------------------------------------------

# qemu's names for formats recorded in the backing-format extension.
QEMU_FORMAT_NAMES = {"raw": "raw", "qcow2": "qcow2", "qcow": "qcow", "vhd": "vpc"}

# The feature name table qemu writes (type, bit, name): only a help for other tools.
FEATURE_TABLE = b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
])


def pack_extension(etype: int, data: bytes) -> bytes:
    """A header extension as stored: type, length, the data padded to 8 bytes."""
    return struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)


class Extension(NamedTuple):
    etype: int
    data: bytes


class ExtensionArea(NamedTuple):
    """The header extensions as found (no end marker), and where the area ends: past the
    end marker, or where the walk stopped (the backing file name or the cluster's end)."""

    extensions: list[Extension]
    end: int


def read_extensions(head: bytes, header_length: int, stop: int) -> ExtensionArea:
    """The extensions of an already validated header cluster (parse_header checked them),
    in order, unknown ones included, for rewriting the area."""
    out = []
    pos = header_length
    while pos + 8 <= stop:
        etype, elen = struct.unpack_from(">II", head, pos)
        pos += 8
        if etype == QCOW2_EXT_MAGIC_END:
            break
        out.append(Extension(etype, bytes(head[pos : pos + elen])))
        pos += (elen + 7) & ~7
    return ExtensionArea(out, min(pos, stop))



class BitmapsExtension(NamedTuple):
    """The bitmaps header extension: where the bitmap directory is."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


@dataclass
class Qcow2Header:
    """The parsed header and header extensions (no I/O: see :func:`parse_header`)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = QCOW2_V2_HEADER_LENGTH
    compression_type: int = QCOW2_COMPRESSION_TYPE_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps: BitmapsExtension | None = None


def _feature_list(hdr: Qcow2Header, ftype: int, bits: int) -> str:
    names = []
    for bit in range(64):
        if bits >> bit & 1:
            names.append(hdr.feature_names.get((ftype, bit), f"bit {bit}"))
    return ", ".join(names)


def _decode_name(raw: bytes) -> str:
    # qemu treats these as C strings: a NUL ends the name.
    return os.fsdecode(raw.split(b"\0", 1)[0])


def parse_header(path: str, head: bytes, file_size: int) -> Qcow2Header:
    """Parse and validate the header cluster.

    ``head`` is the file's first cluster (zero-padded where the file is shorter, as qemu reads
    past the end of file as zeroes), or at least its first 104 bytes when cluster_bits is bad.
    """
    require(file_size >= QCOW2_V2_HEADER_LENGTH and len(head) >= QCOW2_V2_HEADER_LENGTH,
            path, "file too short for a qcow2 header", "file_size", file_size)
    (magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", head)
    require(magic == QCOW_MAGIC, path, "not a qcow2 image (bad magic)", "magic", magic)
    if version not in (2, 3):
        raise UnsupportedImage(path, "unsupported qcow2 version", "version", version)
    if cluster_bits > MAX_CLUSTER_BITS:
        raise UnsupportedImage(path, "cluster size larger than 2 MiB", "cluster_bits", cluster_bits)
    require(cluster_bits >= MIN_CLUSTER_BITS, path, "cluster size below 512 bytes",
            "cluster_bits", cluster_bits)
    cs = 1 << cluster_bits
    require(len(head) >= cs, path, "header cluster not supplied", "cluster_bits", cluster_bits)
    hdr = Qcow2Header(version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
                      rt_clusters, nb_snap, snap_off)
    if version >= 3:
        require(file_size >= QCOW2_V3_HEADER_MIN_LENGTH, path,
                "file too short for a version 3 header", "file_size", file_size)
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = struct.unpack_from(">QQQII", head, 72)
        require(hdr.header_length >= QCOW2_V3_HEADER_MIN_LENGTH, path,
                "header_length too small", "header_length", hdr.header_length)
        require(hdr.header_length % 8 == 0, path, "header_length not a multiple of 8",
                "header_length", hdr.header_length)
        require(hdr.header_length <= cs, path, "header_length larger than a cluster",
                "header_length", hdr.header_length)
        require(hdr.header_length <= file_size, path, "header past end of file",
                "header_length", hdr.header_length)
        require(hdr.refcount_order <= 6, path, "refcount width above 64 bits",
                "refcount_order", hdr.refcount_order)
        if hdr.header_length > 104:
            hdr.compression_type = head[104]
    # Header extensions run from the end of the header to the backing file name (or to the
    # end of the header cluster).
    ext_end = bfo if bfo else cs
    require(ext_end <= cs, path, "backing file name offset outside the header cluster",
            "backing_file_offset", bfo)
    pos = hdr.header_length
    while pos + 8 <= ext_end:
        etype, elen = struct.unpack_from(">II", head, pos)
        pos += 8
        if etype == QCOW2_EXT_MAGIC_END:
            break
        require(elen <= ext_end - pos, path, "header extension too large",
                f"extension 0x{etype:08x} length", elen)
        data = bytes(head[pos : pos + elen])
        if etype == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            hdr.backing_format = _decode_name(data)
        elif etype == QCOW2_EXT_MAGIC_FEATURE_TABLE:
            for i in range(0, elen - FEATURE_NAME_ENTRY_SIZE + 1, FEATURE_NAME_ENTRY_SIZE):
                ftype, bit = data[i], data[i + 1]
                hdr.feature_names[(ftype, bit)] = _decode_name(data[i + 2 : i + 48])
        elif etype == QCOW2_EXT_MAGIC_DATA_FILE:
            require(elen <= QCOW_MAX_DATA_FILE_NAME, path, "data file name too long",
                    "length", elen)
            hdr.data_file = _decode_name(data)
        elif etype == QCOW2_EXT_MAGIC_BITMAPS:
            require(elen == 24, path, "bitmaps extension has a bad length", "length", elen)
            nb, _reserved, dsize, doff = struct.unpack(">IIQQ", data)
            hdr.bitmaps = BitmapsExtension(nb, dsize, doff)
        # crypto header and unknown extensions: ignored (encryption is refused at open)
        pos += (elen + 7) & ~7
    if bfo:
        require(bfs <= QCOW_MAX_BACKING_FILE_NAME, path, "backing file name too long",
                "backing_file_size", bfs)
        require(bfo + bfs <= cs and bfo + bfs <= file_size, path,
                "backing file name outside the header cluster", "backing_file_offset", bfo)
        name = _decode_name(bytes(head[bfo : bfo + bfs]))
        hdr.backing_file = name or None
    if version < 3:
        return hdr
    unknown = hdr.incompatible_features & ~QCOW2_INCOMPAT_MASK
    if unknown:
        raise UnsupportedImage(path, "unsupported incompatible features: "
                               + _feature_list(hdr, 0, unknown), "incompatible_features",
                               hdr.incompatible_features)
    if hdr.incompatible_features & QCOW2_INCOMPAT_COMPRESSION:
        require(hdr.compression_type != QCOW2_COMPRESSION_TYPE_ZLIB, path,
                "compression type bit set but compression_type is zlib",
                "compression_type", hdr.compression_type)
    else:
        require(hdr.compression_type == QCOW2_COMPRESSION_TYPE_ZLIB, path,
                "compression_type set without the compression type bit",
                "compression_type", hdr.compression_type)
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedImage(path, "unknown compression type", "compression_type",
                               hdr.compression_type)
    if hdr.incompatible_features & QCOW2_INCOMPAT_EXTL2:
        require(cluster_bits >= MIN_CLUSTER_BITS_EXTL2, path,
                "extended L2 entries need clusters of 16 KiB or more", "cluster_bits",
                cluster_bits)
    if hdr.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        require(bool(hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE), path,
                "data_file_raw set without an external data file", "autoclear_features",
                hdr.autoclear_features)
    return hdr


def check_table(path: str, cluster_size: int, file_offset: int, length: int,
                file_size: int, what: str, fieldname: str, value: object = None) -> None:
    """A table the metadata places (the header, the snapshot table, an L1 or the refcount
    table): cluster aligned and inside the file.  ``fieldname`` = ``value`` (by default the
    offset) names where the offset was found, for the message."""
    value = file_offset if value is None else value
    require(file_offset % cluster_size == 0, path, f"{what} offset not cluster aligned",
            fieldname, value)
    require(file_offset + length <= file_size, path, f"{what} past end of file",
            fieldname, value)


# ---- the snapshot table ------------------------------------------------------------------


@dataclass
class Qcow2Snapshot:
    """One entry of the snapshot table (only bounds-checked: only the active L1 serves I/O)."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    disk_size: int | None
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int = -1  # instructions executed at the snapshot (extra data); -1: not recorded


class SnapshotTable(NamedTuple):
    snapshots: list[Qcow2Snapshot]
    size_bytes: int  # of the table in the file (0: no snapshots)


def read_snapshots(path: str, file: HostFile, hdr: Qcow2Header,
                   file_size: int) -> SnapshotTable:
    """Read and bounds-check the snapshot table the header names."""
    require(hdr.nb_snapshots <= QCOW_MAX_SNAPSHOTS, path, "too many snapshots",
            "nb_snapshots", hdr.nb_snapshots)
    if not hdr.nb_snapshots:
        return SnapshotTable([], 0)
    cs = 1 << hdr.cluster_bits
    require(hdr.snapshots_offset % cs == 0 and hdr.snapshots_offset != 0, path,
            "snapshot table offset invalid", "snapshots_offset", hdr.snapshots_offset)
    snapshots = []
    pos = hdr.snapshots_offset
    for i in range(hdr.nb_snapshots):
        require(pos + SNAPSHOT_HEADER.size <= file_size, path,
                "snapshot table past end of file", "snapshot", i)
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32,
         extra) = SNAPSHOT_HEADER.unpack(file.pread_exact(pos, SNAPSHOT_HEADER.size,
                                                          "snapshot table"))
        require(extra <= QCOW_MAX_SNAPSHOT_EXTRA_DATA, path,
                "snapshot extra data too large", f"snapshot[{i}].extra_data_size", extra)
        body_len = extra + id_len + name_len
        entry_len = (SNAPSHOT_HEADER.size + body_len + 7) & ~7
        require(pos + entry_len - hdr.snapshots_offset <= QCOW_MAX_SNAPSHOTS_SIZE, path,
                "snapshot table too large", "nb_snapshots", hdr.nb_snapshots)
        require(pos + SNAPSHOT_HEADER.size + body_len <= file_size, path,
                "snapshot table past end of file", "snapshot", i)
        body = file.pread_exact(pos + SNAPSHOT_HEADER.size, body_len, "snapshot table")
        vm_state = vm_state32
        disk_size = None
        if extra >= 8:
            vm_state = struct.unpack_from(">Q", body, 0)[0]
        if extra >= 16:
            disk_size = struct.unpack_from(">Q", body, 8)[0]
        icount = struct.unpack_from(">q", body, 16)[0] if extra >= 24 else -1
        sid = body[extra : extra + id_len].decode("utf-8", "replace")
        name = body[extra + id_len :].decode("utf-8", "replace")
        require(l1_size <= QCOW_MAX_L1_SIZE // 8, path, "snapshot L1 table too large",
                f"snapshot[{i}].l1_size", l1_size)
        if l1_size:
            check_table(path, cs, l1_off, l1_size * 8, file_size, "snapshot L1 table",
                        f"snapshot[{i}].l1_table_offset")
        snapshots.append(Qcow2Snapshot(sid, name, l1_off, l1_size, vm_state, disk_size,
                                       date_sec, date_nsec, vm_clock, icount))
        pos += entry_len
    return SnapshotTable(snapshots, pos - hdr.snapshots_offset)


# ---- persistent bitmaps ------------------------------------------------------------------


class BitmapRegions(NamedTuple):
    regions: list[Region]  # every structure the bitmaps extension reaches
    problems: list[str]  # why part of it could not be walked


def bitmap_regions(file: HostFile, hdr: Qcow2Header, file_size: int) -> BitmapRegions:
    """The directory, the bitmap tables and the bitmap data clusters the bitmaps extension
    reaches (this code keeps no bitmaps: check counts them, the first write frees them)."""
    if hdr.bitmaps is None:
        return BitmapRegions([], [])
    nb, dsize, doff = hdr.bitmaps
    cs = 1 << hdr.cluster_bits
    if (nb > QCOW2_MAX_BITMAPS or dsize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE or doff % cs
            or doff + dsize > file_size):
        return BitmapRegions([], [f"bitmap directory invalid (offset 0x{doff:x}, size "
                                  f"{dsize}, count {nb})"])
    out = [Region("bitmap directory", doff, dsize)]
    problems = []
    directory = file.pread_exact(doff, dsize, "bitmap directory")
    pos = 0
    for k in range(nb):
        if pos + BITMAP_DIR_ENTRY.size > dsize:
            problems.append(f"bitmap directory entry {k} truncated")
            break
        toff, tsize, _flags, _type, _gran, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(
            directory, pos)
        pos += (BITMAP_DIR_ENTRY.size + extra + name_size + 7) & ~7
        if toff % cs or tsize * 8 > QCOW_MAX_L1_SIZE or toff + tsize * 8 > file_size:
            problems.append(f"bitmap {k} table invalid (offset 0x{toff:x})")
            continue
        out.append(Region(f"bitmap {k} table", toff, tsize * 8))
        table = words(file.pread_exact(toff, tsize * 8, "bitmap table"))
        for bte in table:
            boff = bte & BME_TABLE_ENTRY_OFFSET_MASK
            if boff:
                out.append(Region(f"bitmap {k} data", boff, cs))
    return BitmapRegions(out, problems)
