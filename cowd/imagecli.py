"""Layer: cowd (the top: command line).  The image commands' printing: create, info, map,
check, convert, commit, rebase, resize call imagecmds.py / lifecycle.py, which return data,
and print it as qemu-img does (text, or --output=json in qemu-img's schema, qemuout.py).

Exit statuses: 0 done; 1 an image or I/O problem; 2 bad usage; ``check`` exits as qemu-img
check (0 clean, 1 the check could not be completed, 2 corruptions, 3 leaks only, 63 the
format has nothing to check) — and exits 1, never a check status, when it could not even
start (the image is in use, missing, unreadable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from formats import OpenPolicy, canonical_format

from . import imagecmds, qemuout, trust
from .cliargs import wants_progress
from .errors import UsageError


def _say(line: str) -> None:
    print(f"cowd: {line}", file=sys.stderr)


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=4))


def run(args: argparse.Namespace, policy: OpenPolicy) -> int:
    cmd = args.command
    for opt in ("format", "backing_format"):
        if getattr(args, opt, None):
            try:
                setattr(args, opt, canonical_format(getattr(args, opt)))
            except ValueError as e:
                raise UsageError(f"-{'f' if opt == 'format' else 'F'}: {e}") from None
    if cmd == "create":
        return create(args, policy)
    if cmd == "info":
        docs = imagecmds.info(args.image, args.format, policy, force_share=args.force_share)
        if args.output == "json":
            _print_json(docs if args.backing_chain else docs[0])
        else:
            shown = docs if args.backing_chain else docs[:1]
            print("\n\n".join(qemuout.info_text(d) for d in shown))
        return 0
    if cmd == "map":
        entries = imagecmds.map_image(args.image, args.format, policy,
                                      force_share=args.force_share)
        if args.output == "json":
            # qemu-img's layout: one entry per line, inside one array.
            print("[" + ",\n".join(json.dumps(e.as_json()) for e in entries) + "]")
        else:
            print(imagecmds.format_map(entries))
        return 0
    if cmd == "check":
        return check(args, policy)
    if cmd == "convert":
        progress = _progress(args, f"converting {args.image}")
        stats = imagecmds.convert(args.image, args.output_path, args.out_format, args.format,
                                  progress, policy, force_share=args.force_share,
                                  flush=args.cache != "unsafe")
        if args.output == "json":
            _print_json(stats)
        return 0
    from . import lifecycle

    verb = {"commit": "committing", "rebase": "rebasing", "resize": "resizing"}.get(cmd)
    progress = _progress(args, f"{verb} {args.image}") if verb else None
    return lifecycle.run(args, policy, progress)


def _progress(args: argparse.Namespace, label: str) -> imagecmds.Progress | None:
    """-p (or a terminal): qemu-img's plain progress goes to stdout as qemu-img writes it,
    unless stdout carries --output=json."""
    if not wants_progress(args):
        return None
    plain_out = sys.stderr if getattr(args, "output", None) == "json" else sys.stdout
    return imagecmds.progress_printer(label, plain_out)


def create(args: argparse.Namespace, policy: OpenPolicy) -> int:
    path = imagecmds.create(args.base, args.overlay, args.out, args.base_format,
                            args.cluster_size, args.absolute, policy=policy, size=args.size,
                            extended_l2=args.extended_l2)
    root = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    outside = os.path.commonpath([os.path.realpath(args.base), root]) != root
    if args.absolute and outside:
        # The user chose this absolute name: cowd remembers it, so that it opens what it
        # created (trust.py; README "Security").
        trust.vouch(path)
    elif outside:
        _say(f"note: {args.base} lies outside {root}: opening {path} will need "
             "--allow-backing-outside (or create it with --absolute)")
    if args.output == "json":
        docs = imagecmds.info(path, None, policy)
        _print_json(docs[0])
    else:
        print(path)
    return 0


def check(args: argparse.Namespace, policy: OpenPolicy) -> int:
    res, fmt = imagecmds.check(args.image, args.repair, args.format, policy,
                               force_share=args.force_share)
    if res is None:
        _say(f"{args.image}: this image format does not support checks (format="
             f"{qemuout.qemu_format(fmt)})")
        return qemuout.CHECK_UNSUPPORTED
    for line in res.corruptions:
        print(f"ERROR {line}", file=sys.stderr)
    for line in res.leaks:
        print(f"Leaked cluster {line}", file=sys.stderr)
    if args.output == "json":
        doc: dict[str, Any] = qemuout.check_doc(res, args.image, fmt)
        _print_json(doc)
    else:
        print(qemuout.check_text(res))
    return qemuout.check_status(res)
