"""Layer: formats.  vhd images (placeholder until the codec lands)."""

from __future__ import annotations

from .base import HostFile, Image

DEFAULT_CLUSTER_SIZE = 65536


class VhdImage(Image):
    format_name = "vhd"

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> bool:
        return False

    @classmethod
    def open(cls, path: str, file: HostFile, writable: bool) -> VhdImage:
        raise NotImplementedError
