"""Layer: formats.qcow2, above image.py.  Recording another backing file: the backing file
name and the backing format extension of the header cluster (``qemu-img rebase``'s header
switch; the caller has already made the old and the new backing file show the same bytes
through this image, so either record reads the same disk).

Theory of operation (crash-safe)
--------------------------------
The header names the backing file by ``backing_file_offset`` and ``backing_file_size``
(bytes 8 to 20 of the first sector); the name itself lies in the header cluster after the
header extensions, among which is the backing format.  The new header area is built from the
header as it is (only those two fields change), the extensions in their order with the
backing format replaced in place, removed, or added first (where qemu writes it), and the end
marker.  The feature name table (only a help for other tools) is left out when keeping it
would spill the change past the first sector.  Then, in this order:

1. The new name is written into the header cluster's free space, past the old extension
   area, the new one and the old name, and synced: nothing reaches it yet.
2. The switch.  When every byte of the new area that differs from the file lies in the first
   512 bytes (the usual case: the backing format extension comes first), one sector write,
   synced: atomic even against a power cut; the bytes past the new end marker are left as
   they are and no reader looks at them.  Otherwise (a format extension added to an area
   that spans sectors, or a name with no free space left for step 1) the area and the name
   are written in one write of at most a page, synced: a killed process never leaves it
   half written, a power cut could tear it across sectors (as it could tear qemu's own
   header rewrite).

Nothing else changes: no L1, L2 or refcount structure, so ``qemu-img check`` sees the same
image before and after, and the open image keeps serving the same clusters.
"""

from __future__ import annotations

import os
import struct

from ..base import SECTOR
from ..errors import UnsupportedImage
from ..names import canonical_format
from .header import (
    QEMU_FORMAT_NAMES,
    Extension,
    pack_extension,
    read_extensions,
)
from .image import Qcow2Image
from .layout import (
    QCOW2_AUTOCLEAR_DATA_FILE_RAW,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW_MAX_BACKING_FILE_NAME,
)

# backing_file_offset (u64) and backing_file_size (u32): bytes 8 to 20 of the header.
HEADER_BACKING_AT = 8
HEADER_BACKING_FIELDS = struct.Struct(">QI")
# One write of at most this much is never torn by a killed process (the kernel copies a
# write into the page cache page by page and checks for a fatal signal between pages).
ATOMIC_WRITE_BYTES = 4096
# New names are placed at this alignment (qemu's extensions are 8-byte aligned too).
NAME_ALIGNMENT = 8


def _align(n: int) -> int:
    return -(-n // NAME_ALIGNMENT) * NAME_ALIGNMENT


def _area(head: bytes, header_length: int, exts: list[Extension]) -> bytes:
    return (head[:header_length] + b"".join(pack_extension(e.etype, e.data) for e in exts)
            + pack_extension(QCOW2_EXT_MAGIC_END, b""))


def set_backing(img: Qcow2Image, name: str | None, fmt: str | None) -> None:
    """Record ``name`` (None: no backing file) of format ``fmt`` (cowd's name; None: none
    recorded) as the module says."""
    img.require_writable()
    assert img.hdr is not None
    raw_name = os.fsencode(name) if name else b""
    if len(raw_name) > QCOW_MAX_BACKING_FILE_NAME:
        raise UnsupportedImage(img.path, "backing file name longer than 1023 bytes",
                               "backing_file", name)
    if raw_name and img.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        raise UnsupportedImage(img.path, "an image whose data file is raw cannot have a "
                               "backing file", "autoclear_features", img.autoclear_features)
    img.flush()
    cs = img.cluster_size
    head = img.file.pread_data(0, cs)
    old_off, old_len = HEADER_BACKING_FIELDS.unpack_from(head, HEADER_BACKING_AT)
    hlen = img.hdr.header_length
    found = read_extensions(head, hlen, old_off or cs)
    fmt_data = QEMU_FORMAT_NAMES[canonical_format(fmt)].encode() if fmt and raw_name else None
    exts: list[Extension] = []
    placed = False
    for e in found.extensions:
        if e.etype == QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if fmt_data is not None:
                exts.append(Extension(e.etype, fmt_data))
            placed = True
        else:
            exts.append(e)
    if fmt_data is not None and not placed:
        exts.insert(0, Extension(QCOW2_EXT_MAGIC_BACKING_FORMAT, fmt_data))
    lean = [e for e in exts if e.etype != QCOW2_EXT_MAGIC_FEATURE_TABLE]
    old_used = max(found.end, old_off + old_len if old_off else 0)
    choice = None
    for candidate in (exts, lean):
        area = bytearray(_area(head, hlen, candidate))
        name_at = _align(max(len(area), old_used))
        if name_at + len(raw_name) > cs:
            continue
        HEADER_BACKING_FIELDS.pack_into(area, HEADER_BACKING_AT,
                                        name_at if raw_name else 0, len(raw_name))
        if area[SECTOR:] == head[SECTOR:len(area)]:
            choice = (area, name_at)
            break
    if choice is not None:
        area, name_at = choice
        if raw_name:
            img.file.pwrite(name_at, raw_name)  # 1
            img.file.sync()
        img.file.pwrite(0, bytes(area[:SECTOR]))  # 2: one sector
        img.file.sync()
    else:
        area = bytearray(_area(head, hlen, exts))
        if len(area) + len(raw_name) > cs:
            area = bytearray(_area(head, hlen, lean))
        name_at = len(area)
        if name_at + len(raw_name) > cs:
            raise UnsupportedImage(img.path, "header, extensions and backing file name do not "
                                   "fit in the header cluster", "cluster_size", cs)
        HEADER_BACKING_FIELDS.pack_into(area, HEADER_BACKING_AT,
                                        name_at if raw_name else 0, len(raw_name))
        img.file.pwrite(0, bytes(area) + raw_name)  # 2: one write (<= a page as a rule)
        img.file.sync()
    img.backing_name = name or None
    img.backing_format = fmt if name else None
    img.hdr.backing_file = img.backing_name
    img.hdr.backing_format = img.backing_format
