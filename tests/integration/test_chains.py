"""Backing chains that mix formats, read through formats/ and compared with qemu's reading."""

from __future__ import annotations

import os
from pathlib import Path

import formats
from tests.support.peers import qemu_check, qemu_img, qemu_io, qemu_raw, read_all, sha256

MiB = 1 << 20


def test_qcow2_over_qcow2_over_qcow_over_raw(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(6 * MiB))
    v1 = tmp_path / "mid.qcow"
    qemu_img("create", "-f", "qcow", "-b", base, "-F", "raw", v1)
    qemu_io(v1, "write -P 0x11 1M 512k", "write -P 0x12 4100k 3k", fmt="qcow")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", v1, "-F", "qcow", mid)
    qemu_io(mid, "write -P 0x21 1200k 8k", "write -z 2M 64k", "discard 5M 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x31 100 70000", "write -P 0x32 6143k 1k")

    img = formats.open_image(str(top))
    try:
        names = []
        layer: formats.Image | None = img
        while layer is not None:
            names.append(layer.format_name)
            layer = layer.backing
        assert names == ["qcow2", "qcow2", "qcow", "raw"]
        assert read_all(img) == qemu_raw(top, tmp_path)
    finally:
        img.close_chain()


def test_qcow2_over_dynamic_vhd_read_and_write(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=dynamic", base, "8M")
    qemu_io(base, "write -P 0x41 0 3M", "write -P 0x42 5M 100k", fmt="vpc")
    before = sha256(base)
    top = tmp_path / "top.qcow2"
    formats.create_overlay(str(top), str(base), "qcow2", "vhd")
    img = formats.open_image(str(top), writable=True)
    try:
        assert img.backing is not None and img.backing.format_name == "vhd"
        model = bytearray(qemu_raw(base, tmp_path, fmt="vpc"))
        for off, data in ((4096 * 3 + 7, os.urandom(9000)), (5 * MiB + 50, os.urandom(70000)),
                          (8 * MiB - 512, os.urandom(512))):
            img.write(off, data)
            model[off:off + len(data)] = data
        img.write_zeroes(2 * MiB, 128 * 1024)
        model[2 * MiB:2 * MiB + 128 * 1024] = bytes(128 * 1024)
        img.flush()
        assert read_all(img) == bytes(model)
    finally:
        img.close_chain()
    qemu_check(top)
    assert qemu_raw(top, tmp_path) == bytes(model)
    assert sha256(base) == before
