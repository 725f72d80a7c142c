"""Layer: cowd (the top: command line).  Parses arguments, calls the layer that does the work,
prints.  Every deliberate error becomes one line on stderr and a non-zero exit status:
1 for an image or I/O problem, 2 for bad usage; `check` exits like qemu-img check
(0 clean, 2 corruptions, 3 leaks only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .cliargs import ALLOW_DEVICE_ENV, ALLOW_OUTSIDE_ENV, build_parser, env_flag
from .errors import CommandFailed, CowdError, UsageError

if TYPE_CHECKING:
    from formats.opener import OpenPolicy

    from .frontends.nbd.tls import TlsConfig

# Imports are made where a command needs them: the client commands (attach, detach, list,
# stats) need neither the format library nor trio, and a Python start that skips them is
# ~0.1 s natively but seconds in an emulated guest, where the kernel paths are tested.


def open_policy(args: argparse.Namespace) -> OpenPolicy:
    """What the files an image names may reach (formats/opener.py), from the command line
    and the environment; also exported, so a daemon this command starts inherits it."""
    from formats.opener import OpenPolicy

    outside = getattr(args, "allow_backing_outside", False) or env_flag(ALLOW_OUTSIDE_ENV)
    devices = getattr(args, "allow_backing_device", False) or env_flag(ALLOW_DEVICE_ENV)
    if outside:
        os.environ[ALLOW_OUTSIDE_ENV] = "1"
    if devices:
        os.environ[ALLOW_DEVICE_ENV] = "1"
    from .remoteargs import remote_config
    from .trust import is_vouched

    return OpenPolicy(confine=not outside, allow_devices=devices, vouched=is_vouched,
                      remote=remote_config(args))


IMAGE_COMMANDS = ("create", "info", "map", "check", "convert", "commit", "rebase", "resize",
                  "snapshot")


def run(args: argparse.Namespace) -> int:
    if args.command in IMAGE_COMMANDS:
        from . import imagecli

        return imagecli.run(args, open_policy(args))
    if args.command == "serve":
        return serve(args)
    if args.command == "cache":
        from . import remotecmds

        return remotecmds.run(args, open_policy(args))
    if args.command == "stats":
        from .control import control_path, request

        doc = request(control_path(args.run_dir), "stats")
        doc.pop("ok", None)
        print(json.dumps(doc, indent=2) if args.output == "json" else format_stats(doc))
        return 0
    if args.command == "attach":
        return attach_cmd(args)
    if args.command == "detach":
        return detach_cmd(args)
    if args.command in ("list", "status", "stop"):
        from . import daemoncli

        return int(getattr(daemoncli, f"{args.command}_cmd")(args))
    if args.command == "daemon":
        return serve(args, background=True)
    raise UsageError(f"unknown command {args.command!r}")


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
    if args.kmod_pool is not None:
        kmod["kmod_pool"] = args.kmod_pool
    from .remoteargs import export_flags

    export_flags(args)  # remote-base settings, for the daemon this may start
    via, note = choose_frontend(args.via)
    if note:
        _say(note)
    if kmod and via != "kmod":
        raise UsageError(f"--kmod-entries/--kmod-timeout/--kmod-pool: only with the kernel shim "
                         f"(attaching via {via})")
    image = os.path.abspath(args.image)
    if not os.path.isfile(image):
        raise CommandFailed(f"{args.image}: no such image file")
    att = client.client_attach(RunDir.at(args.run_dir), image, via, args.readonly, _say,
                               not args.no_boot_trace, **kmod)
    print(json.dumps(att, indent=2) if args.output == "json" else att["device"])
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
            raise CommandFailed(f"{run.path}: a daemon owns this run dir but does not answer "
                             f"(pid={holder_pid(run.pid_file)})") from None
        for line in done.lines(run):
            _say(f"cleaned up after a dead daemon: {line}")
        if matches(done, req):
            return 0
        raise CommandFailed(f"{args.target}: not attached (no cowd daemon is running in "
                         f"{run.path})") from None
    reply = request(run.control, "detach", timeout=client.ATTACH_REQUEST_TIMEOUT_S, **req)
    rec = reply["detached"]
    if args.output == "json":
        print(json.dumps(rec, indent=2))
    else:
        print(f"detached {rec['device']} ({rec['image']})")
    if reply.get("exiting") and not client.wait_gone(run, client.EXIT_WAIT_S):
        _say(f"the daemon is still exiting after {client.EXIT_WAIT_S:.0f} s "
             f"(pid={holder_pid(run.pid_file)})")
    return 0


def serve(args: argparse.Namespace, background: bool = False) -> int:
    import logging

    import trio

    from .daemon import DaemonConfig, run_daemon
    from .process import settle_allocator
    from .rundir import PID_WAIT_S

    refuse_held_run_dir(args.run_dir)
    if args.fuse_io_uring not in ("auto", "off"):  # a default from the environment
        raise UsageError(f"COWD_FUSE_IO_URING: expected auto or off "
                         f"(COWD_FUSE_IO_URING={args.fuse_io_uring!r})")
    tls = None if background else tls_config(args)
    fmt = "cowd[%(process)d] %(levelname)s %(name)s: %(message)s"
    if background:  # its own log file: say when
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=fmt)
    settle_allocator()
    config = DaemonConfig(images=[] if background else args.images,
                          nbd=[] if background else args.nbd, run_dir=args.run_dir,
                          readonly=args.readonly, cache_entries=args.cache_entries,
                          cache_max_age_s=args.cache_max_age,
                          readahead_clusters=args.readahead, prime=not args.no_prime,
                          boot_trace=not args.no_boot_trace,
                          exit_when_idle=background and not args.no_idle_exit,
                          workers=args.workers,
                          fuse_io_uring=args.fuse_io_uring != "off",
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
        bt = d.get("boot_trace")
        if isinstance(bt, dict):
            lines.append(format_boot_trace(bt))
        km = d.get("kmod")
        touch = km.get("touch") if isinstance(km, dict) else None
        if isinstance(touch, dict):  # the kernel's share of the boot trace
            lines.append(f"  kernel first reads: {touch['state']}; {touch['records']} records "
                         f"in {touch['messages']} messages, {touch['deferred']} deferred")
    fuse = doc.get("fuse")
    ring = fuse.get("io_uring") if isinstance(fuse, dict) else None
    if isinstance(fuse, dict) and isinstance(ring, dict):
        if ring.get("active") and ring.get("uring_workers"):
            # Each worker process registers entries on every queue; the counts are theirs.
            links = doc.get("workers")
            procs = [w.get("worker") for w in links if isinstance(w, dict)] \
                if isinstance(links, list) else []
            mine = [p for p in procs if isinstance(p, dict) and p.get("fuse_ring")]
            taken = sum(int(p["fuse"].get("ring_requests", 0)) for p in mine)
            total = fuse["requests"] + sum(int(p["fuse"].get("requests", 0)) for p in mine)
            how = (f"io_uring ({ring['queues']} queues, each served by {len(mine)} worker "
                   f"processes, {taken} of {total} requests)")
        elif ring.get("active"):
            how = (f"io_uring ({ring['queues']} queues of {ring['entries_per_queue']} "
                   f"entries, {ring['ring_requests']} of {fuse['requests']} requests)")
        else:
            how = f"/dev/fuse reads ({ring.get('reason')})"
        lines.append(f"fuse {fuse['mountpoint']}: served over {how}")
    remote = doc.get("remote")
    if isinstance(remote, dict):
        for b in remote.get("bases", []):
            lines.append(f"remote base {b['url']}: hit rate {b['hit_rate']}, fetched "
                         f"{b['fetched_bytes']} bytes, saved {b['saved_bytes']} bytes, "
                         f"cache holds {b['held_bytes']} of {b['size']} bytes "
                         f"({b['cache']}), retries {b['retries']}, failures {b['failures']}")
    return "\n".join(lines)


def format_boot_trace(bt: dict[str, Any]) -> str:
    """One line of a disk's boot trace (cowd/disk/boottrace.py) for `cowd stats`."""
    def share(v: object) -> str:
        return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"

    return (f"  boot trace: {bt['state']}, {bt['entries']} entries; this boot read "
            f"{bt['base_granules_read']} base granules, {bt['covered']} traced "
            f"({share(bt['covered_share'])}), {bt['prefetched_before_read']} prefetched "
            f"before read ({share(bt['prefetched_before_read_share'])}); prefetch "
            f"{bt['prefetch']} ({bt['prefetched']} granules); saved: {bt['saved']}")


def version_text() -> str:
    """cowd's, the format library's and the kernel module ABI's versions (the ABI one is
    what a cowd.ko must speak: kmod/cowd_uapi.h, mirrored in frontends/kmod/abi.py)."""
    from importlib.metadata import PackageNotFoundError, version

    from formats import FORMATS, FORMATS_VERSION

    from .frontends.kmod.abi import ABI_VERSION

    try:
        ours = version("cowd")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    return (f"cowd {ours}\nformats {FORMATS_VERSION} ({', '.join(FORMATS)})\n"
            f"kernel module ABI {ABI_VERSION}")





def refuse_held_run_dir(run_dir: str) -> None:
    """`cowd daemon`/`serve` where a live daemon already owns the run dir: say who, at once,
    instead of waiting for it to exit (a daemon that owns it but does not answer is starting
    or exiting, and is waited for as before)."""
    from .control import DaemonUnavailable, request
    from .rundir import RunDir, holder_pid, pid_file_held

    run = RunDir.at(run_dir)
    if not pid_file_held(run.pid_file):
        return
    try:
        reply = request(run.control, "ping", timeout=5.0)
    except DaemonUnavailable:
        return
    raise CommandFailed(f"{run.path}: a cowd daemon is already running here "
                        f"(pid={reply.get('pid', holder_pid(run.pid_file))})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["resize"] and len(argv) > 2 and re.match(r"^-\d", argv[-1]):
        # A relative shrink ("-6M") is the size, not an option, as in qemu-img resize.
        argv[-1:] = ["--", argv[-1]]
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command is None:
        parser.error("a command is required")
    try:
        return run(args)
    except CowdError as e:  # UsageError 2, the others 1 (errors.py)
        print(f"cowd: {e}", file=sys.stderr)
        return e.exit_status
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
