"""Layer: formats.qcow2, above layout.py.  Decoding compressed clusters (zlib or zstd).

No I/O: the image reads the stream (its length from the L2 entry is an upper bound, so it may
carry sector padding or the start of the next cluster's stream) and decodes it here.

Invariants: a stream must decode to exactly one cluster, like qemu requires; what follows
the data that completes the cluster is ignored.  The output is bounded before it is made:
zlib is asked for one cluster at most, and zstd is fed ZSTD_FEED_BYTES at a time, so that a
hostile stream cannot make one call produce unbounded output.
"""

from __future__ import annotations

import zlib

from ..base import require
from ..errors import CorruptImage
from .layout import QCOW2_COMPRESSION_TYPE_ZLIB, ZSTD_FEED_BYTES


def decompress(path: str, compression_type: int, stream: bytes, cluster_size: int,
               file_offset: int) -> bytes:
    """One cluster's bytes from its stream (found at ``file_offset``, for messages)."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        # Raw deflate, 4 KiB window.  Like qemu, the output must fill the cluster exactly;
        # trailing input (sector padding, the next cluster's stream) is ignored.
        try:
            out = zlib.decompressobj(-12).decompress(stream, cluster_size)
        except zlib.error as e:
            raise CorruptImage(path, f"bad zlib stream in compressed cluster ({e})",
                               "offset", file_offset) from None
        require(len(out) == cluster_size, path, "compressed cluster decodes to too few bytes",
                "offset", file_offset)
        return out
    return _zstd_decompress(path, stream, cluster_size, file_offset)


def _zstd_decompress(path: str, stream: bytes, cluster_size: int, file_offset: int) -> bytes:
    import zstandard

    cs = cluster_size
    out = bytearray()
    rest = memoryview(stream)
    try:
        dctx = zstandard.ZstdDecompressor()
        # One or more whole frames must decode to exactly one cluster; what follows the
        # frame that completes the cluster is padding (or the next cluster's stream).
        while len(out) < cs:
            dobj = dctx.decompressobj()
            fed = 0
            while not dobj.eof:
                if fed >= len(rest):
                    raise CorruptImage(path, "truncated zstd stream in compressed cluster",
                                       "offset", file_offset)
                chunk = rest[fed : fed + ZSTD_FEED_BYTES]
                fed += len(chunk)
                out += dobj.decompress(bytes(chunk))
                require(len(out) <= cs, path, "compressed cluster decodes to more than a "
                        "cluster", "offset", file_offset)
            used = fed - len(dobj.unused_data)
            if used <= 0:
                raise CorruptImage(path, "empty zstd frame in compressed cluster", "offset",
                                   file_offset)
            rest = rest[used:]
    except zstandard.ZstdError as e:
        raise CorruptImage(path, f"bad zstd stream in compressed cluster ({e})",
                           "offset", file_offset) from None
    return bytes(out)
