"""File trees a test writes onto a disk's file system and compares with what comes back
(test_fuse.py through ext4 on the FUSE file, test_attach.py through ``cowd attach``)."""

from __future__ import annotations

import filecmp
import random
from pathlib import Path

KiB = 1024


def make_tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    for d in range(4):
        sub = root / f"dir{d}" / "deeper"
        sub.mkdir(parents=True)
        for i in range(12):
            (sub.parent / f"f{i}.bin").write_bytes(rng.randbytes(rng.randrange(0, 40 * KiB)))
        (sub / "big.bin").write_bytes(rng.randbytes(700 * KiB + 123))
    (root / "empty").write_bytes(b"")


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _match, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)
