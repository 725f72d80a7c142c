"""Random corruption of a valid image, drawn by hypothesis: the fuzz tests' inputs
(test_qcow2.py reads such images, test_qcow2_write.py writes to them)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from tests.support.peers import qemu_img, qemu_io

MiB = 1 << 20


def corrupted_copy(tmp_path: Path, data: st.DataObject, max_flips: int) -> Path:
    """A small qcow2 (data, zero clusters, a snapshot) with 1..max_flips random bytes of its
    first six clusters (header, tables) overwritten."""
    src = tmp_path / "fuzz-src.qcow2"
    if not src.exists():
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", src, str(MiB))
        qemu_io(src, "write -P 0x31 0 20000", "write -z 40000 9000", fmt="qcow2")
        qemu_img("snapshot", "-c", "s", src)
    raw = bytearray(src.read_bytes())
    limit = min(len(raw), 6 * 4096)
    for _ in range(data.draw(st.integers(1, max_flips))):
        at = data.draw(st.integers(0, limit - 1))
        raw[at] = data.draw(st.integers(0, 255))
    p = tmp_path / "fuzz.qcow2"
    p.write_bytes(bytes(raw))
    return p
