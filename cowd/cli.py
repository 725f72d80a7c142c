"""Layer: cowd (the top: command line).  Parses arguments, calls the layer that does the work,
prints.  Every deliberate error becomes one line on stderr and a non-zero exit status:
1 for an image or I/O problem, 2 for bad usage; `check` exits like qemu-img check
(0 clean, 2 corruptions, 3 leaks only).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from formats.errors import FormatError

from . import imagecmds
from .errors import CowdError, UsageError


def _size(text: str) -> int:
    units = {"k": 10, "m": 20, "g": 30, "t": 40}
    t = text.strip().lower().rstrip("b").rstrip("i")
    shift = units.get(t[-1:]) if t else None
    try:
        return int(t[:-1]) << shift if shift is not None else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cowd", description="copy-on-write block devices over "
                                "qcow2 and VHD overlays")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("create", help="create an overlay over a base image")
    c.add_argument("--base", required=True, help="the base image (raw, qcow, qcow2 or VHD)")
    c.add_argument("--overlay", default="qcow", help="qcow (= qcow2) or vhd (default: qcow)")
    c.add_argument("--base-format", help="the base's format (default: probed)")
    c.add_argument("-o", "--output", help="overlay path (default: <base>-overlay.<ext>)")
    c.add_argument("--cluster-size", type=_size, help="qcow2 cluster size (default 64k)")
    c.add_argument("--absolute", action="store_true",
                   help="record the base's absolute path instead of a relative one")

    i = sub.add_parser("info", help="show an image and its backing chain")
    i.add_argument("image")
    i.add_argument("-f", "--format", help="image format (default: probed)")
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("map", help="show where each guest range lives (like qemu-img map)")
    m.add_argument("image")
    m.add_argument("-f", "--format")
    m.add_argument("--json", action="store_true")

    k = sub.add_parser("check", help="check metadata consistency (like qemu-img check)")
    k.add_argument("image")
    k.add_argument("-f", "--format")
    k.add_argument("--repair", action="store_true", help="free leaked clusters")
    k.add_argument("--json", action="store_true")

    v = sub.add_parser("convert", help="write the whole chain into a new standalone image")
    v.add_argument("image")
    v.add_argument("output")
    v.add_argument("-O", dest="out_format", required=True, help="raw, qcow2 or vhd")
    v.add_argument("-f", "--format", help="source format (default: probed)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.command == "create":
        path = imagecmds.create(args.base, args.overlay, args.output, args.base_format,
                                args.cluster_size, args.absolute)
        print(path)
        return 0
    if args.command == "info":
        doc = imagecmds.info(args.image, args.format)
        print(json.dumps(doc, indent=2) if args.json else imagecmds.format_info(doc))
        return 0
    if args.command == "map":
        entries = imagecmds.map_image(args.image, args.format)
        if args.json:
            print(json.dumps([e.as_json() for e in entries], indent=1))
        else:
            print(imagecmds.format_map(entries))
        return 0
    if args.command == "check":
        res = imagecmds.check(args.image, args.repair, args.format)
        if args.json:
            print(json.dumps({"filename": res.path, "corruptions": res.corruptions,
                              "leaks": res.leaks, "corruptions-fixed": res.corruptions_fixed,
                              "leaks-fixed": res.leaks_fixed,
                              "allocated-clusters": res.allocated_clusters,
                              "total-clusters": res.total_clusters,
                              "image-end-offset": res.image_end_offset}, indent=2))
        else:
            for line in res.corruptions:
                print(f"ERROR {line}")
            for line in res.leaks:
                print(f"Leaked cluster {line}")
            if res.leaks_fixed or res.corruptions_fixed:
                print(f"Repaired {res.leaks_fixed} leak(s) and "
                      f"{res.corruptions_fixed} corruption(s).")
            if res.corruptions:
                print(f"{len(res.corruptions)} errors were found on the image.")
            elif res.leaks:
                print(f"{len(res.leaks)} leaked clusters were found on the image.\n"
                      "This means waste of disk space, but no harm to data.")
            else:
                print("No errors were found on the image.")
        if res.corruptions:
            return 2
        return 3 if res.leaks else 0
    if args.command == "convert":
        imagecmds.convert(args.image, args.output, args.out_format, args.format,
                          imagecmds.terminal_progress(f"converting {args.image}"))
        return 0
    raise UsageError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"cowd: {e}", file=sys.stderr)
        return 2
    except (FormatError, CowdError) as e:
        print(f"cowd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"cowd: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cowd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
