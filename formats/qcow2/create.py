"""Layer: formats.qcow2, beside image.py (it needs only layout.py).  Creating an empty
qcow2 image, as ``qemu-img create -f qcow2`` does.

The new file holds the header cluster (header, extensions, backing file name), a refcount
table, the refcount blocks that count every metadata cluster, and an empty L1 table, and is
synced before ``create`` returns.  Like qemu-img create, the virtual size is rounded up to a
whole 512-byte sector.  Options that cannot be combined (compat 0.10 with v3 features,
extended L2 entries below 16 KiB clusters, ...) raise ValueError before anything is written.
"""

from __future__ import annotations

import os
import struct
from array import array

from ..base import SECTOR
from ..names import canonical_format
from ..opener import PROTOCOL_RE
from .header import FEATURE_TABLE, QEMU_FORMAT_NAMES, pack_extension
from .layout import (
    DEFAULT_CLUSTER_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    MIN_CLUSTER_BITS_EXTL2,
    QCOW2_COMPAT_LAZY_REFCOUNTS,
    QCOW2_EXT_MAGIC_BACKING_FORMAT,
    QCOW2_EXT_MAGIC_DATA_FILE,
    QCOW2_EXT_MAGIC_END,
    QCOW2_EXT_MAGIC_FEATURE_TABLE,
    QCOW2_INCOMPAT_DATA_FILE,
    QCOW2_INCOMPAT_EXTL2,
    QCOW2_V2_HEADER_LENGTH,
    QCOW2_V3_HEADER_LENGTH,
    QCOW_MAGIC,
    QCOW_MAX_BACKING_FILE_NAME,
    QCOW_MAX_L1_SIZE,
    div_round_up,
    words_bytes,
)


def create(path: str, virtual_size: int, *, backing_name: str | None = None,
           backing_format: str | None = None, cluster_size: int = DEFAULT_CLUSTER_SIZE,
           compat: str = "1.1", refcount_bits: int = 16, extended_l2: bool = False,
           lazy_refcounts: bool = False, data_file: str | None = None) -> None:
    """Create an empty qcow2 image (optionally over a backing file, or with an external
    data file).  Raises ValueError for options that cannot be combined."""
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise ValueError(f"{path}: unknown compat level {compat!r} (use 0.10 or 1.1)")
    if cluster_size < 1 << MIN_CLUSTER_BITS or cluster_size > 1 << MAX_CLUSTER_BITS or (
            cluster_size & (cluster_size - 1)):
        raise ValueError(f"{path}: cluster size must be a power of two from 512 B to 2 MiB "
                         f"(cluster_size={cluster_size})")
    cb = cluster_size.bit_length() - 1
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"{path}: refcount width must be a power of two up to 64 "
                         f"(refcount_bits={refcount_bits})")
    if version == 2 and (refcount_bits != 16 or extended_l2 or lazy_refcounts or data_file):
        raise ValueError(f"{path}: compat 0.10 supports none of refcount_bits!=16, "
                         "extended_l2, lazy_refcounts, data_file")
    if extended_l2 and cb < MIN_CLUSTER_BITS_EXTL2:
        raise ValueError(f"{path}: extended L2 entries need clusters of 16 KiB or more")
    if virtual_size < 0:
        raise ValueError(f"{path}: negative size")
    virtual_size = div_round_up(virtual_size, SECTOR) * SECTOR  # like qemu-img create
    if data_file and PROTOCOL_RE.match(data_file):
        raise ValueError(f"{path}: data file names a protocol, not a file ({data_file!r})")
    fmt_name = None
    if backing_format:
        fmt_name = QEMU_FORMAT_NAMES[canonical_format(backing_format)]
    name_bytes = os.fsencode(backing_name) if backing_name else b""
    if len(name_bytes) > QCOW_MAX_BACKING_FILE_NAME:
        raise ValueError(f"{path}: backing file name longer than 1023 bytes")

    l2_bits = cb - (4 if extended_l2 else 3)
    l1_entries = div_round_up(virtual_size, cluster_size << l2_bits)
    if l1_entries * 8 > QCOW_MAX_L1_SIZE:
        raise ValueError(f"{path}: virtual size too large for this cluster size "
                         f"(size={virtual_size}, cluster_size={cluster_size})")
    l1_clusters = max(1, div_round_up(l1_entries * 8, cluster_size))
    refcount_order = refcount_bits.bit_length() - 1
    epb = cluster_size * 8 // refcount_bits
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        rb_new = div_round_up(total, epb)
        rt_new = max(1, div_round_up(rb_new * 8, cluster_size))
        if (rb_new, rt_new) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = rb_new, rt_new
    rt_off = cluster_size
    rb_off = rt_off + rt_clusters * cluster_size
    l1_off = rb_off + rb_count * cluster_size

    incompat = compat_bits = 0
    if extended_l2:
        incompat |= QCOW2_INCOMPAT_EXTL2
    if data_file:
        incompat |= QCOW2_INCOMPAT_DATA_FILE
    if lazy_refcounts:
        compat_bits |= QCOW2_COMPAT_LAZY_REFCOUNTS
    header_length = QCOW2_V3_HEADER_LENGTH if version == 3 else QCOW2_V2_HEADER_LENGTH
    exts = b""
    if fmt_name:
        exts += pack_extension(QCOW2_EXT_MAGIC_BACKING_FORMAT, fmt_name.encode())
    if data_file:
        exts += pack_extension(QCOW2_EXT_MAGIC_DATA_FILE, os.fsencode(data_file))
    feature_ext = pack_extension(QCOW2_EXT_MAGIC_FEATURE_TABLE,
                                 FEATURE_TABLE) if version == 3 else b""
    end_ext = pack_extension(QCOW2_EXT_MAGIC_END, b"")
    if header_length + len(exts) + len(feature_ext) + len(end_ext) + len(name_bytes) <= (
            cluster_size):
        exts += feature_ext  # only a help for other tools: dropped when space is short
    exts += end_ext
    backing_off = header_length + len(exts) if name_bytes else 0
    if header_length + len(exts) + len(name_bytes) > cluster_size:
        raise ValueError(f"{path}: header, extensions and backing name do not fit in one "
                         f"cluster (cluster_size={cluster_size})")
    head = struct.pack(">4sIQIIQIIQQIIQ", QCOW_MAGIC, version, backing_off, len(name_bytes), cb,
                       virtual_size, 0, l1_entries, l1_off, rt_off, rt_clusters, 0, 0)
    if version == 3:
        head += struct.pack(">QQQII", incompat, compat_bits, 0, refcount_order, header_length)
        head += bytes(header_length - len(head))  # compression_type 0 (zlib) + padding
    head += exts + name_bytes

    reftable = array("Q", [rb_off + i * cluster_size for i in range(rb_count)])
    reftable.extend([0] * (rt_clusters * cluster_size // 8 - rb_count))
    blocks = bytearray(rb_count * cluster_size)
    for ci in range(total):  # every metadata cluster has refcount 1
        bit = ci * refcount_bits
        if refcount_bits >= 8:
            w = refcount_bits // 8
            blocks[ci * w + w - 1] = 1
        else:
            blocks[bit >> 3] |= 1 << (bit & 7)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.pwrite(fd, words_bytes(reftable), rt_off)
        os.pwrite(fd, bytes(blocks), rb_off)
        os.ftruncate(fd, l1_off + l1_clusters * cluster_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if data_file:
        full = data_file if os.path.isabs(data_file) else os.path.join(
            os.path.dirname(os.path.abspath(path)), data_file)
        dfd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(dfd).st_size < virtual_size:
                os.ftruncate(dfd, virtual_size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
