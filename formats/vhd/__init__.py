"""Layer: formats.  VHD images (Virtual PC / Hyper-V, qemu's "vpc"): fixed, dynamic and
differencing disks: read, write, check and create.  Imports nothing from ``cowd``.

Spec: the "Virtual Hard Disk Image Format Specification", 1.0; on-disk constants keep its
names.  This package's names are its public API: :class:`VhdImage` (the codec),
:func:`create`, :func:`create_differencing`, the structures and sizing rules callers use.
Its modules, bottom first (a module imports only from the lines before its own;
tests/unit/test_layers.py checks):

- ``structures``: the on-disk layout — footer, dynamic disk header, parent locator entries,
  the BAT and sector bitmaps, checksums — and the size and CHS geometry rules (no I/O);
- ``parents``: a differencing disk's parent — reading its locators, the paths to try, and
  the locators to write for a new one;
- ``image``: :class:`VhdImage`, the codec — open and validate, resolve, write (new blocks
  after the trailing footer, metadata written at flush), flush, check, info;
- ``create``: new fixed, dynamic and differencing disks; ``empty``: a differencing disk's
  blocks all dropped (commit); ``switch``: new metadata written apart, then the footer
  switched to it (the crash-safe step of the two below);
- ``reparent``: another parent recorded (rebase); ``resize``: a larger virtual size (a
  larger BAT; a fixed disk's footer moved).
"""

from .create import create, create_differencing
from .image import VhdImage
from .structures import (
    DEFAULT_BLOCK_SIZE,
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    DynamicHeader,
    Footer,
    Geometry,
    check_footer,
    size_for_create,
    spec_geometry,
    vhd_checksum,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DISK_TYPE_DIFFERENCING",
    "DISK_TYPE_DYNAMIC",
    "DISK_TYPE_FIXED",
    "DynamicHeader",
    "Footer",
    "Geometry",
    "VhdImage",
    "check_footer",
    "create",
    "create_differencing",
    "size_for_create",
    "spec_geometry",
    "vhd_checksum",
]
