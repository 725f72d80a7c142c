"""Layer: cowd disk — below the frontends, above the remap cache and ``formats``.

A disk request goes down this package in one direction; each job has its module:

- :mod:`~cowd.disk.disk`: :class:`Disk`, the request API frontends call (read, write,
  write-zeroes, trim, flush, block status, prefetch, priming, the kernel shim's questions);
- :mod:`~cowd.disk.chain`: :class:`Chain`, the owner of one disk's layers and the only place
  that walks them: plans guest ranges into :class:`Segment` runs through the remap cache,
  and is the copy-up reader (``below``) the codecs write through;
- :mod:`~cowd.disk.pool`: :class:`ImagePool` and :class:`Layer`, parents opened once and
  shared between disks;
- :mod:`~cowd.disk.locks`: the range lock over a top layer's granules;
- :mod:`~cowd.disk.backing_io`: preadv/pwrite on the image files.
"""

from .backing_io import pread_into
from .chain import BELOW_CHAIN, Chain, ChainFile, Segment
from .disk import DEFAULT_READAHEAD_CLUSTERS, MAX_REQUEST_BYTES, Disk, DiskError
from .pool import ImagePool, Layer

__all__ = [
    "BELOW_CHAIN",
    "DEFAULT_READAHEAD_CLUSTERS",
    "MAX_REQUEST_BYTES",
    "Chain",
    "ChainFile",
    "Disk",
    "DiskError",
    "ImagePool",
    "Layer",
    "Segment",
    "pread_into",
]
