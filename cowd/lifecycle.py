"""Layer: cowd (CLI support).  The image lifecycle commands: resize (commit and rebase are
not written yet: issue 13).

Every command here opens the image writable and takes qemu's writer lock bytes first
(cowd/imagelock.py), so an image that a cowd daemon serves or a qemu process has open is
refused in one line, exit 1, before anything is written.  The on-disk order of each change
is the codec's (formats/qcow2/resize.py says it for growing a qcow2).
"""

from __future__ import annotations

import argparse
import json

import formats
from formats import Image, OpenPolicy

from . import imagelock
from .errors import CommandFailed, UsageError


def run(args: argparse.Namespace, policy: OpenPolicy) -> int:
    if args.command == "resize":
        doc = resize(args.image, args.size, args.shrink, args.format, policy)
        if args.output == "json":
            print(json.dumps(doc, indent=4))
        else:
            print("Image resized.")
        return 0
    raise CommandFailed(f"{args.command}: not written yet (issue 13); use qemu-img "
                        f"{args.command} meanwhile")


def _lock_writer(img: Image) -> None:
    try:
        imagelock.lock_image(img.file.fd, img.path, writable=True)
    except imagelock.ImageLocked as e:
        raise CommandFailed(str(e)) from None


def resize(path: str, size: tuple[str, int], shrink: bool, fmt: str | None,
           policy: OpenPolicy) -> dict[str, object]:
    """Set the virtual size: absolute, or +N/-N relative to the current one.  Growing: raw
    (ftruncate) and qcow2 (the header, and a larger L1 table when needed).  Shrinking: raw
    only, and only with ``shrink`` (as qemu-img)."""
    img = formats.open_one(path, True, fmt, policy=policy)
    try:
        _lock_writer(img)
        old = img.virtual_size
        sign, n = size
        new = old + n if sign == "+" else old - n if sign == "-" else n
        if new < 0:
            raise UsageError(f"{path}: the new size would be negative (size={old}-{n})")
        if img.format_name != "raw" and new % 512:
            raise UsageError(f"{path}: a {img.format_name} size must be whole 512-byte "
                             f"sectors (size={new})")
        if new < old and not shrink:
            raise UsageError(f"{path}: shrinking loses the data past the new end: pass "
                             f"--shrink if you mean it (size={new}, current={old})")
        if img.format_name == "raw":
            img.file.truncate(new)
            img.file.sync()
        elif isinstance(img, formats.Qcow2Image) and new >= old:
            from formats.qcow2.resize import grow

            grow(img, new)
        else:
            what = "shrinking" if new < old else "growing"
            raise CommandFailed(f"{path}: {what} a {img.format_name} image is not supported "
                                f"yet (size={new}, current={old})")
        return {"filename": path, "format": img.format_name, "old-size": old,
                "virtual-size": new}
    finally:
        img.close()
