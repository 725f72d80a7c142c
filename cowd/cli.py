"""Layer: cowd (the top: command line).  Parses arguments, calls the layer that does the work,
prints.  Every deliberate error becomes one line on stderr and a non-zero exit status:
1 for an image or I/O problem, 2 for bad usage; `check` exits like qemu-img check
(0 clean, 2 corruptions, 3 leaks only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import CowdError, UsageError

if TYPE_CHECKING:
    from formats.opener import OpenPolicy

    from .frontends.nbd.tls import TlsConfig

# Imports are made where a command needs them: the client commands (attach, detach, list,
# stats) need neither the format library nor trio, and a Python start that skips them is
# ~0.1 s natively but seconds in an emulated guest, where the kernel paths are tested.


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
    _outside_option(c)

    i = sub.add_parser("info", help="show an image and its backing chain")
    i.add_argument("image")
    i.add_argument("-f", "--format", help="image format (default: probed)")
    i.add_argument("--json", action="store_true")
    _outside_option(i)

    m = sub.add_parser("map", help="show where each guest range lives (like qemu-img map)")
    m.add_argument("image")
    m.add_argument("-f", "--format")
    m.add_argument("--json", action="store_true")
    _outside_option(m)

    k = sub.add_parser("check", help="check metadata consistency (like qemu-img check)")
    k.add_argument("image")
    k.add_argument("-f", "--format")
    k.add_argument("--repair", action="store_true", help="free leaked clusters")
    k.add_argument("--json", action="store_true")
    _outside_option(k)

    v = sub.add_parser("convert", help="write the whole chain into a new standalone image")
    v.add_argument("image")
    v.add_argument("output")
    v.add_argument("-O", dest="out_format", required=True, help="raw, qcow2 or vhd")
    v.add_argument("-f", "--format", help="source format (default: probed)")
    _outside_option(v)

    s = sub.add_parser("serve", help="serve images over NBD in the foreground")
    s.add_argument("images", nargs="+", metavar="IMAGE",
                   help="top images to serve; the NBD export name is the file name")
    s.add_argument("--nbd", action="append", required=True, metavar="ADDR",
                   help="unix:PATH or tcp:[HOST:]PORT (repeatable; HOST defaults to 127.0.0.1)")
    s.add_argument("--tls", choices=("off", "on", "require"), default="off",
                   help="NBD_OPT_STARTTLS, as nbdkit names it: off (default), on (TLS at the "
                   "client's choice; exports with --tls-authz are TLS-only), require (no "
                   "option but STARTTLS before TLS)")
    s.add_argument("--tls-certificates", metavar="DIR",
                   help="X.509 credentials: DIR/ca-cert.pem, server-cert.pem, server-key.pem "
                   "(qemu's and nbdkit's layout; ca-crl.pem optional)")
    s.add_argument("--tls-psk", metavar="FILE", help="PSK credentials: a psktool keys file")
    s.add_argument("--tls-verify-peer", action="store_true",
                   help="with --tls-certificates: clients must present a certificate signed "
                   "by DIR/ca-cert.pem")
    s.add_argument("--tls-authz", nargs=2, action="append", default=[],
                   metavar=("EXPORT", "IDENTITY"),
                   help="only IDENTITY may open EXPORT, over TLS (repeatable): a client "
                   "certificate's subject DN as qemu's --tls-authz compares it, in the "
                   "certificate's order (e.g. 'C=GB,O=Example,CN=laptop'), or a PSK username")
    _daemon_options(s)

    t = sub.add_parser("stats", help="cache counters of the running daemon, per disk")
    t.add_argument("--json", action="store_true")
    _run_dir_option(t)

    a = sub.add_parser("attach", help="make an image a block device (starts the daemon if "
                       "none runs); prints the device")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--via", choices=("auto", "kmod", "nbd", "fuse"), default="auto",
                   help="the kernel path: kmod (/dev/cowdN), nbd (/dev/nbdN) or fuse (a FUSE "
                   "file under a loop device, /dev/loopN); auto takes the first this kernel "
                   "supports and says which (default: auto)")
    a.add_argument("--readonly", action="store_true", help="attach read-only")
    a.add_argument("--kmod-entries", type=int, default=None, metavar="N",
                   help="--via kmod: the kernel's remap table bound in clusters (default "
                   "1048576, 4 to 4194304); a disk with more clusters is served with "
                   "evictions and misses")
    a.add_argument("--kmod-timeout", type=float, default=None, metavar="SECONDS",
                   help="--via kmod: how long the disk's misses wait for a new daemon when "
                   "its daemon dies, before they fail with EIO (default 120)")
    _outside_option(a)
    _run_dir_option(a)

    d = sub.add_parser("detach", help="flush and remove a device cowd attached")
    d.add_argument("target", metavar="DEVICE|IMAGE")
    _run_dir_option(d)

    li = sub.add_parser("list", help="attached disks: device, image, frontend, cache counters")
    li.add_argument("--json", action="store_true")
    _run_dir_option(li)

    dm = sub.add_parser("daemon", help="the daemon `cowd attach` starts, in the foreground; it "
                        "exits when it serves nothing")
    _daemon_options(dm)
    return p


def _outside_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-backing-outside", action="store_true",
                   help="open backing and data files that lie outside the image's directory "
                   "tree (refused by default: ../ names, absolute paths, symlinks out; also "
                   f"${ALLOW_OUTSIDE_ENV}=1)")
    p.add_argument("--allow-backing-device", action="store_true",
                   help="let an image name a block device as its backing or data file "
                   f"(refused by default; also ${ALLOW_DEVICE_ENV}=1)")


# The same permissions from the environment: how they reach the daemon `cowd attach` starts.
ALLOW_OUTSIDE_ENV = "COWD_ALLOW_BACKING_OUTSIDE"
ALLOW_DEVICE_ENV = "COWD_ALLOW_BACKING_DEVICE"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def open_policy(args: argparse.Namespace) -> OpenPolicy:
    """What the files an image names may reach (formats/opener.py), from the command line
    and the environment; also exported, so a daemon this command starts inherits it."""
    from formats.opener import OpenPolicy

    outside = getattr(args, "allow_backing_outside", False) or _env_flag(ALLOW_OUTSIDE_ENV)
    devices = getattr(args, "allow_backing_device", False) or _env_flag(ALLOW_DEVICE_ENV)
    if outside:
        os.environ[ALLOW_OUTSIDE_ENV] = "1"
    if devices:
        os.environ[ALLOW_DEVICE_ENV] = "1"
    return OpenPolicy(confine=not outside, allow_devices=devices)


def _run_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=_default_run_dir(),
                   help="the daemon's directory: control socket, pid file, log, FUSE mount "
                   "(default $COWD_RUN_DIR or /run/cowd)")


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
    _outside_option(p)


def run(args: argparse.Namespace) -> int:
    if args.command in ("create", "info", "map", "check", "convert"):
        return image_command(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "stats":
        from .control import control_path, request

        doc = request(control_path(args.run_dir), "stats")
        doc.pop("ok", None)
        print(json.dumps(doc, indent=2) if args.json else format_stats(doc))
        return 0
    if args.command == "attach":
        return attach_cmd(args)
    if args.command == "detach":
        return detach_cmd(args)
    if args.command == "list":
        return list_cmd(args)
    if args.command == "daemon":
        return serve(args, background=True)
    raise UsageError(f"unknown command {args.command!r}")


def image_command(args: argparse.Namespace) -> int:
    """create, info, map, check, convert: the image commands (cowd/imagecmds.py)."""

    from . import imagecmds

    policy = open_policy(args)
    if args.command == "create":
        path = imagecmds.create(args.base, args.overlay, args.output, args.base_format,
                                args.cluster_size, args.absolute, policy=policy)
        root = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if os.path.commonpath([os.path.realpath(args.base), root]) != root:
            _say(f"note: {args.base} lies outside {root}: opening {path} will need "
                 "--allow-backing-outside")
        print(path)
        return 0
    if args.command == "info":
        doc = imagecmds.info(args.image, args.format, policy)
        print(json.dumps(doc, indent=2) if args.json else imagecmds.format_info(doc))
        return 0
    if args.command == "map":
        entries = imagecmds.map_image(args.image, args.format, policy)
        if args.json:
            print(json.dumps([e.as_json() for e in entries], indent=1))
        else:
            print(imagecmds.format_map(entries))
        return 0
    if args.command == "check":
        res = imagecmds.check(args.image, args.repair, args.format, policy)
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
    imagecmds.convert(args.image, args.output, args.out_format, args.format,
                      imagecmds.terminal_progress(f"converting {args.image}"), policy)
    return 0


def _say(line: str) -> None:
    print(f"cowd: {line}", file=sys.stderr)


def attach_cmd(args: argparse.Namespace) -> int:
    import os

    from .attach import client
    from .attach.probes import choose_frontend
    from .rundir import RunDir

    kmod: dict[str, int] = {}
    if args.kmod_entries is not None:
        if not 4 <= args.kmod_entries <= 1 << 22:
            raise UsageError(f"--kmod-entries: expected 4..4194304 (got {args.kmod_entries})")
        kmod["kmod_entries"] = args.kmod_entries
    if args.kmod_timeout is not None:
        if not 0.001 <= args.kmod_timeout <= 86400:
            raise UsageError(f"--kmod-timeout: expected 0.001..86400 seconds "
                             f"(got {args.kmod_timeout:g})")
        kmod["kmod_timeout_ms"] = round(args.kmod_timeout * 1000)
    via, note = choose_frontend(args.via)
    if note:
        _say(note)
    if kmod and via != "kmod":
        raise UsageError(f"--kmod-entries/--kmod-timeout: only with the kernel shim "
                         f"(attaching via {via})")
    image = os.path.abspath(args.image)
    if not os.path.isfile(image):
        raise UsageError(f"{args.image}: no such image file")
    att = client.client_attach(RunDir.at(args.run_dir), image, via, args.readonly, _say, **kmod)
    print(att["device"])
    return 0


def detach_cmd(args: argparse.Namespace) -> int:
    from .attach import client
    from .attach.stale import matches
    from .control import DaemonUnavailable, request
    from .rundir import RunDir, holder_pid

    run = RunDir.at(args.run_dir)
    req = client.detach_target(args.target)
    try:
        client.ping(run)
    except DaemonUnavailable:
        # No daemon answers: clean up after a dead one, if that is what is left.
        done = client.cleanup_dead(run)
        if done is None:
            raise UsageError(f"{run.path}: a daemon owns this run dir but does not answer "
                             f"(pid={holder_pid(run.pid_file)})") from None
        for line in done.lines(run):
            _say(f"cleaned up after a dead daemon: {line}")
        if matches(done, req):
            return 0
        raise UsageError(f"{args.target}: not attached (no cowd daemon is running in "
                         f"{run.path})") from None
    reply = request(run.control, "detach", timeout=client.ATTACH_REQUEST_TIMEOUT_S, **req)
    rec = reply["detached"]
    print(f"detached {rec['device']} ({rec['image']})")
    if reply.get("exiting") and not client.wait_gone(run, client.EXIT_WAIT_S):
        _say(f"the daemon is still exiting after {client.EXIT_WAIT_S:.0f} s "
             f"(pid={holder_pid(run.pid_file)})")
    return 0


def list_cmd(args: argparse.Namespace) -> int:
    from .control import DaemonUnavailable, control_path, request

    try:
        disks = request(control_path(args.run_dir), "list")["disks"]
    except DaemonUnavailable:
        disks = []
    if args.json:
        print(json.dumps(disks, indent=2))
    elif disks:
        print(format_list(disks))
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_list(disks: list[dict[str, Any]]) -> str:
    rows = [("DEVICE", "FRONTEND", "SIZE", "HITS", "MISSES", "HIT%", "IMAGE")]
    for d in disks:
        r = d.get("remap", {})
        ro = " (ro)" if d.get("readonly") else ""
        rows.append((d.get("device") or "-", d["frontend"], _human(d["size"]),
                     str(r.get("hits", 0)), str(r.get("misses", 0)),
                     f"{100 * r.get('hit_rate', 0):.1f}", d["image"] + ro))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  "
                     + row[-1] for row in rows)


def serve(args: argparse.Namespace, background: bool = False) -> int:
    import logging

    import trio

    from .daemon import DaemonConfig, run_daemon
    from .rundir import PID_WAIT_S

    tls = None if background else tls_config(args)
    fmt = "cowd[%(process)d] %(levelname)s %(name)s: %(message)s"
    if background:  # its own log file: say when
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=fmt)
    config = DaemonConfig(images=[] if background else args.images,
                          nbd=[] if background else args.nbd, run_dir=args.run_dir,
                          readonly=args.readonly, cache_entries=args.cache_entries,
                          cache_max_age_s=args.cache_max_age,
                          readahead_clusters=args.readahead, prime=not args.no_prime,
                          exit_when_idle=background,
                          pid_wait_s=PID_WAIT_S if background else 1.0,
                          policy=open_policy(args), tls=tls)
    trio.run(run_daemon, config)
    return 0


def tls_config(args: argparse.Namespace) -> TlsConfig:
    """The NBD server's TLS configuration from serve's --tls flags (paths made absolute:
    the serving process may run elsewhere); UsageError for flags that do not fit."""
    from .frontends.nbd.tls import TlsConfig
    from .frontends.nbd.wire import TlsPolicy

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else None

    if args.tls_authz and args.tls == "off":
        raise UsageError("--tls-authz needs --tls=on or --tls=require")
    return TlsConfig(TlsPolicy(args.tls, frozenset((e, i) for e, i in args.tls_authz)),
                     certificates_dir=absolute(args.tls_certificates),
                     psk_file=absolute(args.tls_psk), verify_peer=args.tls_verify_peer)


def format_stats(doc: dict[str, object]) -> str:
    cache = doc["cache"]
    assert isinstance(cache, dict)
    lines = [f"daemon pid {doc['pid']}, up {doc['uptime_s']} s",
             "remap cache: " + ", ".join(f"{k}={v}" for k, v in cache.items())]
    disks = doc["disks"]
    assert isinstance(disks, dict)
    for name, d in disks.items():
        via = f", {d['frontend']}" if d.get("frontend") else ""
        dev = f" as {d['device']}" if d.get("device") else ""
        lines.append(f"disk {name}: {d['path']}{dev} ({d['size']} bytes{via}"
                     f"{', read-only' if d.get('readonly') else ''})")
        shared = [lay for lay in d.get("layers", [])[1:] if lay.get("shared_by", 1) > 1]
        for lay in shared:
            lines.append(f"  layer {lay['path']} shared by {lay['shared_by']} disks "
                         f"(layer id {lay['layer_id']})")
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
    except CowdError as e:
        print(f"cowd: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`cowd map IMAGE | head`): stop quietly, as a tool killed by
        # SIGPIPE would, and keep Python from complaining again when it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"cowd: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # last: a FormatError is no OSError
        # The format library's errors (imported only by the commands that use it: if it was
        # never imported, none of its errors can have been raised).
        fe = sys.modules.get("formats.errors")
        if fe is None or not isinstance(e, fe.FormatError):
            raise
        hint = "; pass --allow-backing-outside if you trust it" \
            if isinstance(e, fe.BackingOutside) else ""
        print(f"cowd: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cowd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
