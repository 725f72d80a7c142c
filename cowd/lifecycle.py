"""Layer: cowd (CLI support).  The image lifecycle commands: commit, rebase, resize,
snapshot.

Every command here opens the images it writes writable and takes qemu's writer lock bytes
on them first, and the reader's on the layers it only reads (cowd/imagelock.py), so an
image that a cowd daemon serves or a qemu process has open is refused in one line, exit 1,
before anything is written.  The on-disk order of each change is the format library's:
formats/commit.py says it for commit, formats/rebase.py for rebase, formats/lifecycle.py
names each format's resize, and formats/qcow2/snapshot.py says it for internal snapshots.
"""

from __future__ import annotations

import argparse
import json
import os

import formats
from formats import Image, OpenPolicy
from formats.commit import Progress

from . import imagelock
from .errors import CommandFailed, UsageError


def run(args: argparse.Namespace, policy: OpenPolicy, progress: Progress | None) -> int:
    quiet = getattr(args, "progress", None) is False
    if args.command == "commit":
        doc = commit(args.image, args.base, args.keep, args.format, policy, progress)
        if args.output == "json":
            print(json.dumps(doc, indent=4))
        elif not quiet:
            print("Image committed.")
        return 0
    if args.command == "rebase":
        doc = rebase(args.image, args.backing, args.backing_format, args.unsafe, args.format,
                     policy, progress)
        if args.output == "json":
            print(json.dumps(doc, indent=4))
        return 0
    if args.command == "snapshot":
        return snapshot(args, policy)
    if args.command == "resize":
        doc = resize(args.image, args.size, args.shrink, args.format, policy, progress)
        if args.output == "json":
            print(json.dumps(doc, indent=4))
        elif not quiet:
            print("Image resized.")
        return 0
    raise UsageError(f"unknown command {args.command!r}")


def _lock_writer(img: Image) -> None:
    try:
        imagelock.lock_image(img.file.fd, img.path, writable=True)
    except imagelock.ImageLocked as e:
        raise CommandFailed(str(e)) from None


def _lock_chain(top: Image) -> None:
    """qemu's lock bytes on every layer: a writer's on the layers open writable, a
    reader's on the rest (no -U here: what is read is written somewhere)."""
    layer: Image | None = top
    while layer is not None:
        try:
            imagelock.lock_image(layer.file.fd, layer.path, writable=layer.writable)
        except imagelock.ImageLocked as e:
            raise CommandFailed(str(e)) from None
        layer = layer.backing


def _chain_ids(top: Image) -> list[tuple[int, int]]:
    ids = []
    layer: Image | None = top
    while layer is not None:
        ids.append(layer.file.dev_ino)
        layer = layer.backing
    return ids


def _depth_of(path: str, top: Image, name: str) -> int:
    """The depth of the image ``name`` in ``top``'s chain (the same file, whatever the
    name), as ``-b`` names it."""
    try:
        st = os.stat(name)
    except OSError as e:
        raise UsageError(f"{name}: -b: cannot find it: {e.strerror}") from None
    for depth, ident in enumerate(_chain_ids(top)):
        if ident == (st.st_dev, st.st_ino):
            if depth == 0:
                raise UsageError(f"{name}: -b names the image itself, not one of its backing "
                                 f"files (image={path})")
            return depth
    raise UsageError(f"{name}: not in the backing chain of {path} (-b={name})")


def commit(path: str, base: str | None, keep: bool, fmt: str | None, policy: OpenPolicy,
           progress: Progress | None = None) -> dict[str, object]:
    """Merge ``path`` into its backing file, or down to ``base`` (every layer between too).
    As qemu-img commit: the overlay is emptied afterwards unless ``keep`` (-d) or ``base``
    (-b implies -d: the layers between would show through an empty top)."""
    probe = formats.open_image(path, False, fmt, policy=policy)
    try:
        if probe.backing is None:
            raise CommandFailed(f"{path}: has no backing file: nothing to commit into")
        depth = 1 if base is None else _depth_of(path, probe, base)
        ids = _chain_ids(probe)
    finally:
        probe.close_chain()
    empty = not keep and base is None
    img = formats.open_image(path, empty, fmt, policy=policy,
                             writable_depths=frozenset({depth}))
    try:
        if _chain_ids(img) != ids:
            raise CommandFailed(f"{path}: its backing chain changed while it was opened; "
                                "try again")
        _lock_chain(img)
        from formats.commit import commit as commit_chain

        done = commit_chain(img, depth, empty_top=empty, progress=progress)
    finally:
        img.close_chain()
    return {"filename": path, "base": done.target, "depth": done.depth,
            "grown-from": done.grown_from, "bytes-copied": done.bytes_copied,
            "bytes-zeroed": done.bytes_zeroed, "emptied": done.emptied}


def resize(path: str, size: tuple[str, int], shrink: bool, fmt: str | None,
           policy: OpenPolicy, progress: Progress | None = None) -> dict[str, object]:
    """Set the virtual size: absolute, or +N/-N relative to the current one
    (formats/lifecycle.py: raw: ftruncate; qcow2: the header, a larger L1 table when
    growing needs one, and the clusters past the new end dropped when shrinking).
    Shrinking needs ``shrink`` (as qemu-img).  The backing chain is opened, as qemu-img
    opens it: a shrink copies a partial last cluster up through it.  ``progress`` sees
    one step: the format's resize is one metadata change (qemu-img resize has no -p)."""
    img = formats.open_image(path, True, fmt, policy=policy)
    try:
        _lock_chain(img)
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
        from formats.lifecycle import grow
        from formats.lifecycle import shrink as shrink_image

        if progress is not None:
            progress(0, 1)
        if new >= old:
            grow(img, new)
        else:
            shrink_image(img, new)
        if progress is not None:
            progress(1, 1)
        return {"filename": path, "format": img.format_name, "old-size": old,
                "virtual-size": new}
    finally:
        img.close_chain()


def _confined_name(path: str, name: str, policy: OpenPolicy) -> None:
    """A name that names no file yet (rebase -u): refused where it would leave the
    overlay's folder, as the opener would refuse it once the file exists."""
    if not policy.confine:
        return
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith("../"):
        raise CommandFailed(f"{path}: the new backing file lies outside the overlay's folder "
                            f"(backing_file={name!r}); pass --allow-backing-outside if you "
                            "mean it")


def rebase(path: str, backing: str, backing_fmt: str | None, unsafe: bool, fmt: str | None,
           policy: OpenPolicy, progress: Progress | None = None) -> dict[str, object]:
    """Record ``backing`` ("": none) as ``path``'s backing file, as qemu-img rebase: safe
    mode copies into the overlay every range where the old chain and the new one differ
    first (formats/rebase.py), ``unsafe`` (-u) rewrites the record only.  The new name is
    taken relative to the overlay's folder and confined to it like every backing name."""
    name = backing or None
    if unsafe:
        img = formats.open_one(path, True, fmt, policy=policy)
    else:
        img = formats.open_image(path, True, fmt, policy=policy)
    new: Image | None = None
    try:
        _lock_chain(img)
        if name is not None:
            new = formats.open_named_chain(img, name, backing_fmt, policy=policy)
            if new is None:
                where = os.path.dirname(os.path.abspath(path))
                if not unsafe:
                    raise CommandFailed(f"{path}: the new backing file does not exist "
                                        f"(backing_file={name!r}, relative to {where})")
                if backing_fmt is None:
                    raise UsageError(f"{path}: the new backing file does not exist, so its "
                                     f"format cannot be probed: give it with -F "
                                     f"(backing_file={name!r})")
                _confined_name(path, name, policy)
            else:
                _lock_chain(new)
                backing_fmt = backing_fmt or new.format_name
        from formats.lifecycle import set_backing
        from formats.rebase import rebase as rebase_chain

        compared = copied = 0
        if unsafe:
            set_backing(img, name, backing_fmt if name else None, new)
        else:
            done = rebase_chain(img, new, name, backing_fmt if name else None, progress)
            compared, copied = done.bytes_compared, done.bytes_copied
    finally:
        if new is not None:
            new.close_chain()
        img.close_chain()
    return {"filename": path, "backing-filename": name, "backing-format":
            backing_fmt if name else None, "unsafe": unsafe, "bytes-compared": compared,
            "bytes-copied": copied}


def snapshot(args: argparse.Namespace, policy: OpenPolicy) -> int:
    """qemu-img snapshot: -l lists (nothing for a format without snapshots, as qemu), -c,
    -d and -a change a qcow2 image's internal snapshots (formats/qcow2/snapshot.py)."""
    from . import qemuout

    path = args.image
    if args.list:
        img = formats.open_one(path, False, args.format, policy=policy)
        try:
            if not args.force_share:
                try:
                    imagelock.lock_image(img.file.fd, path, writable=False)
                except imagelock.ImageLocked as e:
                    raise CommandFailed(f"{e}; pass -U (--force-share) to read it "
                                        "anyway") from None
            docs = [qemuout.snapshot_info(sn.id, sn.name, sn.vm_state_size, sn.date_sec,
                                          sn.date_nsec, sn.vm_clock_nsec, sn.icount)
                    for sn in getattr(img, "snapshots", [])]
        finally:
            img.close()
        if args.output == "json":
            print(json.dumps(docs, indent=4))
        elif docs:
            print("\n".join(["Snapshot list:", *qemuout.snapshot_table(docs)]))
        return 0
    if args.force_share:
        raise UsageError(f"{path}: -U (--force-share) only reads: it goes with -l")
    from formats.qcow2 import snapshot as snapshots

    img = formats.open_image(path, True, args.format, policy=policy)
    try:
        _lock_chain(img)
        if not isinstance(img, formats.Qcow2Image):
            raise CommandFailed(f"{path}: {img.format_name} images have no internal "
                                f"snapshots (qcow2 has; format={img.format_name})")
        try:
            if args.create is not None:
                done = snapshots.create(img, args.create)
            elif args.delete is not None:
                done = snapshots.delete(img, args.delete)
            else:
                done = snapshots.apply(img, args.apply)
        except ValueError as e:
            raise UsageError(str(e)) from None
    finally:
        img.close_chain()
    if args.output == "json":
        print(json.dumps({"filename": path, "id": done.id, "name": done.name,
                          "action": done.action}, indent=4))
    return 0
