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

    s = sub.add_parser("serve", help="serve images over NBD in the foreground")
    s.add_argument("images", nargs="+", metavar="IMAGE",
                   help="top images to serve; the NBD export name is the file name")
    s.add_argument("--nbd", action="append", required=True, metavar="ADDR",
                   help="unix:PATH or tcp:HOST:PORT (repeatable)")
    _daemon_options(s)

    t = sub.add_parser("stats", help="cache counters of the running daemon, per disk")
    t.add_argument("--json", action="store_true")
    t.add_argument("--run-dir", default=_default_run_dir(), help=argparse.SUPPRESS)
    return p


def _default_run_dir() -> str:
    import os

    from .control import DEFAULT_RUN_DIR

    return os.environ.get("COWD_RUN_DIR", DEFAULT_RUN_DIR)


def _daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=_default_run_dir(),
                   help="where the control socket lives (default $COWD_RUN_DIR or /run/cowd)")
    p.add_argument("--readonly", action="store_true", help="serve read-only")
    p.add_argument("--cache-entries", type=int, default=1 << 18,
                   help="remap cache bound in entries (default 262144)")
    p.add_argument("--cache-max-age", type=float, default=600.0, metavar="SECONDS",
                   help="remap cache expiry (default 600 s)")
    p.add_argument("--readahead", type=int, default=16, metavar="CLUSTERS",
                   help="clusters resolved ahead on a sequential miss (default 16)")
    p.add_argument("--no-prime", action="store_true",
                   help="do not fill the remap cache from the metadata at start")
    p.add_argument("-v", "--verbose", action="store_true", help="log requests and events")


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
    if args.command == "serve":
        return serve(args)
    if args.command == "stats":
        from .control import control_path, request

        doc = request(control_path(args.run_dir), "stats")
        doc.pop("ok", None)
        print(json.dumps(doc, indent=2) if args.json else format_stats(doc))
        return 0
    raise UsageError(f"unknown command {args.command!r}")


def serve(args: argparse.Namespace) -> int:
    import logging

    import trio

    from .daemon import DaemonConfig, run_daemon

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="cowd[%(process)d] %(levelname)s %(name)s: %(message)s")
    config = DaemonConfig(images=args.images, nbd=args.nbd, run_dir=args.run_dir,
                          readonly=args.readonly, cache_entries=args.cache_entries,
                          cache_max_age_s=args.cache_max_age,
                          readahead_clusters=args.readahead, prime=not args.no_prime)
    trio.run(run_daemon, config)
    return 0


def format_stats(doc: dict[str, object]) -> str:
    cache = doc["cache"]
    assert isinstance(cache, dict)
    lines = [f"daemon pid {doc['pid']}, up {doc['uptime_s']} s",
             "remap cache: " + ", ".join(f"{k}={v}" for k, v in cache.items())]
    disks = doc["disks"]
    assert isinstance(disks, dict)
    for name, d in disks.items():
        lines.append(f"disk {name}: {d['path']} ({d['size']} bytes"
                     f"{', read-only' if d.get('readonly') else ''})")
        lines.append("  remap: " + ", ".join(f"{k}={v}" for k, v in d["remap"].items()))
        lines.append("  ops:   " + ", ".join(f"{k}={v}" for k, v in d["ops"].items()))
        if d.get("prime_seconds") is not None:
            lines.append(f"  primed in {d['prime_seconds']:.3f} s")
    return "\n".join(lines)


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
