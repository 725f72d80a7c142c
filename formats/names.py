"""Layer: formats, bottom.  The format names the library knows, and the names other tools
use for them: what a user types and what an image records as its backing format."""

from __future__ import annotations

# Probe order matters: raw accepts anything and goes last (formats/__init__.py's FORMATS
# follows this order).
FORMAT_NAMES = ("qcow2", "qcow", "vhd", "raw")
# Names other tools use for the same formats (qemu calls VHD "vpc").
FORMAT_ALIASES = {"vpc": "vhd", "qcow1": "qcow", "file": "raw"}


def canonical_format(name: str) -> str:
    """Map a user or on-disk format name to one of FORMAT_NAMES, or raise ValueError."""
    key = name.strip().lower()
    key = FORMAT_ALIASES.get(key, key)
    if key not in FORMAT_NAMES:
        raise ValueError(f"unknown image format {name!r} (known: {', '.join(FORMAT_NAMES)})")
    return key


__all__ = ["FORMAT_ALIASES", "FORMAT_NAMES", "canonical_format"]
