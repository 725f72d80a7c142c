"""An image file's fields read and written in place, by file offset and struct format: for
the tests that break images on purpose (tests/support/corpus.py, test_qcow.py)."""

from __future__ import annotations

import struct
from pathlib import Path


def poke(path: Path, file_offset: int, fmt: str, value: int | bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(file_offset)
        f.write(struct.pack(fmt, value))


def poke_bytes(path: Path, file_offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(file_offset)
        f.write(data)


def peek(path: Path, file_offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(file_offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def u64s(path: Path, file_offset: int, count: int) -> list[int]:
    with open(path, "rb") as f:
        f.seek(file_offset)
        return list(struct.unpack(f">{count}Q", f.read(8 * count)))
