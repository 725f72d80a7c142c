"""Layer: cowd disk — below the frontends, above the remap cache and ``formats``.

A disk request goes down this package in one direction; each job has its module:

- :mod:`~cowd.disk.api`: :class:`BlockDisk`, what a frontend may call on a disk, and
  :class:`DiskError`, the errno it gets back;
- :mod:`~cowd.disk.disk`: :class:`Disk`, the request API frontends call (read, write,
  write-zeroes, trim, flush, block status, prefetch, priming, the kernel shim's questions);
- :mod:`~cowd.disk.mapping`: :class:`DiskMap` (``disk.mapping``), the questions that move
  no guest bytes: segments for remaps, block status, prefetch, priming;
- :mod:`~cowd.disk.lending`: :class:`Lending` (``disk.lending``), the top layer's clusters
  lent to an outside writer (the kernel shim's allocation pool), adopted when written;
- :mod:`~cowd.disk.hooks`: :class:`DiskHooks`, what a disk hands those two parts of it;
- :mod:`~cowd.disk.chain`: :class:`Chain`, the owner of one disk's layers and the only place
  that walks them: plans guest ranges into :class:`Segment` runs through the remap cache,
  and is the copy-up reader (``below``) the codecs write through;
- :mod:`~cowd.disk.streams`: what a disk remembers between reads (sequential streams,
  plans kept across a page-cache miss);
- :mod:`~cowd.disk.pool`: :class:`ImagePool` and :class:`Layer`, parents opened once and
  shared between disks;
- :mod:`~cowd.disk.remote`: the fetcher of remote bases' missing blocks;
- :mod:`~cowd.disk.locks`: the range lock over a top layer's granules;
- :mod:`~cowd.disk.backing_io`: preadv/pwrite on the image files.
"""

from .api import DiskError
from .backing_io import pread_into
from .chain import BELOW_CHAIN, Chain, ChainFile, Segment
from .disk import DEFAULT_READAHEAD_CLUSTERS, MAX_REQUEST_BYTES, Disk
from .hooks import DiskHooks
from .lending import Adoption, FileRange, Lending, LentRun
from .mapping import DiskMap
from .pool import ImagePool, Layer

__all__ = [
    "BELOW_CHAIN",
    "DEFAULT_READAHEAD_CLUSTERS",
    "MAX_REQUEST_BYTES",
    "Adoption",
    "Chain",
    "ChainFile",
    "Disk",
    "DiskError",
    "DiskHooks",
    "DiskMap",
    "FileRange",
    "ImagePool",
    "Layer",
    "Lending",
    "LentRun",
    "Segment",
    "pread_into",
]
