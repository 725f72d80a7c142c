"""Layer: cowd (the top: command line).  The argument parser: every command, flag and the
checks of their values, so that a bad value is one line on stderr and exit status 2 before
any command runs.  The man page and the shell completion are generated from this parser
(tools/gen_manpage.py), so a flag's help here is its documentation.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from fractions import Fraction
from typing import NoReturn

# Values a flag may take.  Each bound says what makes a larger value a typo rather than a
# machine: the daemon's structures are sized from these.
MAX_CACHE_ENTRIES = 1 << 26  # remap cache entries: 64 Mi entries is ~10 GiB of Python
MAX_READAHEAD_CLUSTERS = 1 << 16  # one sequential miss resolves at most this much ahead
MAX_CACHE_AGE_S = 365 * 86400.0  # a year: "never expire" without infinity
MAX_WORKERS = 256  # more worker processes than this is a typo, not a machine
MAX_SIZE_BYTES = 1 << 63  # sizes on the command line (qemu's limit too: int64)

# The same permissions from the environment: how they reach the daemon `cowd attach` starts.
ALLOW_OUTSIDE_ENV = "COWD_ALLOW_BACKING_OUTSIDE"
ALLOW_DEVICE_ENV = "COWD_ALLOW_BACKING_DEVICE"
# The default of --fuse-io-uring (so a daemon that `cowd attach` starts can be told too).
FUSE_IO_URING_ENV = "COWD_FUSE_IO_URING"

OUTPUT_FORMATS = ("human", "json")
# convert -t: qemu-img's cache modes that say whether the output is flushed at the end.
CONVERT_CACHE_MODES = ("writeback", "unsafe")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``cowd: create: argument --size: ...``) with
    exit status 2, as every other usage error of cowd's."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("cowd").strip()
        prefix = f"cowd: {where}: " if where else "cowd: "
        self.exit(2, f"{prefix}{message} (see `{self.prog} --help`)\n")


def parse_size(text: str) -> int:
    """A byte count as qemu-img takes it: 1048576, 64k, 1M, 2G, 1T, 1.5G (binary units; an
    optional B or iB after the unit)."""
    m = _SIZE_RE.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64k, 10G)")
    num, unit = m.group(1), m.group(2).lower()
    scaled = Fraction(num) * (1 << _UNIT_SHIFT[unit])
    if scaled.denominator != 1 or scaled > MAX_SIZE_BYTES:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes below 8 EiB: {text!r}")
    return int(scaled)


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)(?:i?[bB])?$")
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def _count(low: int, high: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {n}")
        return n
    return parse


def _seconds(high: float):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (math.isfinite(v) and 0 < v <= high):
            raise argparse.ArgumentTypeError(f"expected more than 0 and at most {high:g} "
                                             f"seconds, got {text}")
        return v
    return parse


def _workers(text: str) -> int:
    """--workers: a count, or auto (one per core; none on a single core)."""
    if text == "auto":
        cores = len(os.sched_getaffinity(0))
        return cores if cores > 1 else 0
    if text.isdigit() and int(text) <= MAX_WORKERS:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a count from 0 to {MAX_WORKERS} or auto, "
                                     f"got {text!r}")


def _resize_size(text: str) -> tuple[str, int]:
    """resize's SIZE: an absolute size, or +N / -N relative to the current one."""
    sign = text[:1] if text[:1] in "+-" else ""
    return sign, parse_size(text[len(sign):])


def default_run_dir() -> str:
    from .control import DEFAULT_RUN_DIR

    return os.environ.get("COWD_RUN_DIR", DEFAULT_RUN_DIR)


def build_parser() -> Parser:
    p = Parser(prog="cowd", description="copy-on-write block devices over qcow2 and VHD "
               "overlays; image commands that read and write like qemu-img's")
    p.add_argument("--version", action="store_true",
                   help="print cowd's, the format library's and the kernel module ABI's "
                   "versions and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("create", help="create an overlay over a base image")
    c.add_argument("--base", required=True, help="the base image (raw, qcow, qcow2 or VHD)")
    c.add_argument("--overlay", default="qcow", help="qcow (= qcow2) or vhd (default: qcow)")
    c.add_argument("--base-format", help="the base's format (default: probed)")
    c.add_argument("-o", dest="out", metavar="OUT",
                   help="overlay path (default: <base>-overlay.<ext>)")
    c.add_argument("--cluster-size", type=parse_size,
                   help="qcow2 cluster size, a power of two from 512 to 2M (default 64k; "
                   "128k with --extended-l2)")
    c.add_argument("--extended-l2", action="store_true",
                   help="qcow2 extended L2 entries (qemu's extended_l2=on): 32 subclusters "
                   "per cluster, so a first write of whole subclusters copies nothing from "
                   "the base (clusters of 16k or more)")
    c.add_argument("--size", type=parse_size,
                   help="the overlay's virtual size, at least the base's (default: the "
                   "base's); qcow2 only")
    c.add_argument("--absolute", action="store_true",
                   help="record the base's absolute path instead of a relative one; cowd "
                   "remembers that you chose it, so it opens the overlay without "
                   "--allow-backing-outside")
    _output_option(c)
    _outside_option(c)

    i = sub.add_parser("info", help="show an image and its backing chain (qemu-img info)")
    i.add_argument("image")
    i.add_argument("-f", "--format", help="image format (default: probed)")
    i.add_argument("--backing-chain", action="store_true",
                   help="every layer of the chain (JSON: qemu's top-level array)")
    _output_option(i)
    _share_option(i)
    _outside_option(i)

    m = sub.add_parser("map", help="where each guest range lives (qemu-img map)")
    m.add_argument("image")
    m.add_argument("-f", "--format")
    _output_option(m)
    _share_option(m)
    _outside_option(m)

    k = sub.add_parser("check", help="check metadata consistency (qemu-img check): exit 0 "
                       "clean, 2 corruptions, 3 leaks only, 63 not checkable, 1 could not "
                       "check")
    k.add_argument("image")
    k.add_argument("-f", "--format")
    rep = k.add_mutually_exclusive_group()
    rep.add_argument("--repair", dest="repair", action="store_const", const="leaks",
                     help="free leaked clusters (the same as -r leaks)")
    rep.add_argument("-r", dest="repair", choices=("leaks", "all"),
                     help="repair leaks, or all: also raise refcounts that are too low "
                     "(qemu-img check -r)")
    _output_option(k)
    _share_option(k)
    _outside_option(k)

    v = sub.add_parser("convert", help="write the whole chain into a new standalone image")
    v.add_argument("image")
    v.add_argument("output_path", metavar="OUTPUT")
    v.add_argument("-O", dest="out_format", required=True, help="raw, qcow2 or vhd")
    v.add_argument("-f", "--format", help="source format (default: probed)")
    v.add_argument("-t", dest="cache", choices=CONVERT_CACHE_MODES, default="writeback",
                   help="writeback (default): the output is flushed to disk before convert "
                   "returns; unsafe: it is left in the page cache (qemu-img convert's "
                   "default)")
    _progress_options(v)
    _output_option(v)
    _share_option(v)
    _outside_option(v)

    cm = sub.add_parser("commit", help="merge an overlay into its backing file (qemu-img "
                        "commit)")
    cm.add_argument("image", metavar="OVERLAY")
    cm.add_argument("-f", "--format", help="the overlay's format (default: probed)")
    cm.add_argument("-b", dest="base", metavar="BASE",
                    help="commit down to this image of the chain (default: the overlay's "
                    "backing file)")
    cm.add_argument("-d", dest="keep", action="store_true",
                    help="leave the overlay as it is (default: empty it, as qemu-img does)")
    _progress_options(cm)
    _output_option(cm)
    _outside_option(cm)

    rb = sub.add_parser("rebase", help="change an overlay's backing file (qemu-img rebase)")
    rb.add_argument("image", metavar="OVERLAY")
    rb.add_argument("-b", dest="backing", required=True, metavar="NEW",
                    help="the new backing file, relative to the overlay's folder as qemu "
                    "takes it; an empty string makes the overlay standalone")
    rb.add_argument("-F", dest="backing_format", metavar="FMT",
                    help="the new backing file's format (default: probed)")
    rb.add_argument("-f", "--format", help="the overlay's format (default: probed)")
    rb.add_argument("-u", dest="unsafe", action="store_true",
                    help="unsafe: rewrite the name only (the new backing must hold the same "
                    "bytes); default: copy into the overlay what differs, so the guest sees "
                    "the same disk")
    _progress_options(rb)
    _output_option(rb)
    _outside_option(rb)

    rs = sub.add_parser("resize", help="change an image's virtual size (qemu-img resize)")
    rs.add_argument("--shrink", action="store_true",
                    help="allow making the image smaller (the data past the end is lost)")
    rs.add_argument("-f", "--format", help="the image's format (default: probed)")
    rs.add_argument("image", metavar="IMAGE")
    rs.add_argument("size", type=_resize_size, metavar="[+|-]SIZE")
    _progress_options(rs)
    _output_option(rs)
    _outside_option(rs)

    sn = sub.add_parser("snapshot", help="list, create, delete or apply a qcow2 image's "
                        "internal snapshots (qemu-img snapshot)")
    act = sn.add_mutually_exclusive_group(required=True)
    act.add_argument("-l", dest="list", action="store_true",
                     help="list the snapshots (qemu-img snapshot -l's table; --output=json: "
                     "qemu's SnapshotInfo list)")
    act.add_argument("-c", dest="create", metavar="SNAPSHOT",
                     help="create a snapshot of the disk as it is now, named SNAPSHOT")
    act.add_argument("-d", dest="delete", metavar="SNAPSHOT",
                     help="delete the snapshot with this ID or name")
    act.add_argument("-a", dest="apply", metavar="SNAPSHOT",
                     help="revert the disk to the snapshot with this ID or name")
    sn.add_argument("-f", "--format", help="the image's format (default: probed)")
    sn.add_argument("image", metavar="IMAGE")
    _output_option(sn)
    _share_option(sn)
    _outside_option(sn)

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

    from .remoteargs import add_cache_command

    add_cache_command(sub)
    t = sub.add_parser("stats", help="cache counters of the running daemon, per disk")
    _output_option(t)
    _run_dir_option(t)

    a = sub.add_parser("attach", help="make an image a block device (starts the daemon if "
                       "none runs); prints the device")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--via", choices=("auto", "kmod", "nbd", "fuse"), default="auto",
                   help="the kernel path: kmod (/dev/cowdN), nbd (/dev/nbdN) or fuse (a FUSE "
                   "file under a loop device, /dev/loopN); auto takes the first this kernel "
                   "supports and says which (default: auto)")
    a.add_argument("--readonly", action="store_true", help="attach read-only")
    _boot_trace_option(a)
    a.add_argument("--kmod-entries", type=_count(4, 1 << 22), default=None, metavar="N",
                   help="--via kmod: the kernel's remap table bound in clusters (default "
                   "1048576, 4 to 4194304); a disk with more clusters is served with "
                   "evictions and misses")
    a.add_argument("--kmod-timeout", type=_seconds(86400.0), default=None, metavar="SECONDS",
                   help="--via kmod: how long the disk's misses wait for a new daemon when "
                   "its daemon dies, before they fail with EIO (default 120)")
    a.add_argument("--kmod-pool", type=_count(0, 1 << 15), default=None, metavar="CLUSTERS",
                   help="--via kmod: clusters of a qcow2 overlay lent to the kernel at a time "
                   "for the first writes it allocates itself (default: 32 MiB of them, at most "
                   "a quarter of the table; 0: none, every first write asks the daemon); a "
                   "killed daemon leaks at most this many (cowd check --repair frees them)")
    _output_option(a)
    _outside_option(a)
    _run_dir_option(a)

    d = sub.add_parser("detach", help="flush and remove a device cowd attached")
    d.add_argument("target", metavar="DEVICE|IMAGE")
    _output_option(d)
    _run_dir_option(d)

    li = sub.add_parser("list", help="attached disks: device, image, frontend, cache "
                        "counters; a dead daemon's leftovers")
    _output_option(li)
    _run_dir_option(li)

    st = sub.add_parser("status", help="is a daemon running in the run dir: its pid, uptime "
                        "and disks (exit 0 running, 3 not running, 1 dead or not answering)")
    _output_option(st)
    _run_dir_option(st)

    sp = sub.add_parser("stop", help="drain and stop the daemon of the run dir (SIGTERM, then "
                        "wait): every disk is flushed and closed. A device still in use does "
                        "not stop it: a loop or NBD device is detached or disconnected anyway, "
                        "with a warning in the daemon's log (its I/O fails from then on); a "
                        "kernel-shim device is left for a new daemon to take over")
    sp.add_argument("--timeout", type=_seconds(3600.0), default=60.0, metavar="SECONDS",
                    help="how long to wait for it to exit (default 60)")
    _run_dir_option(sp)

    dm = sub.add_parser("daemon", help="the daemon `cowd attach` starts, in the foreground; it "
                        "exits when it serves nothing")
    dm.add_argument("--no-idle-exit", action="store_true",
                    help="keep running when no disk is attached (for a service manager: "
                    "contrib/cowd.service)")
    _daemon_options(dm)
    return p


def _output_option(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--output", choices=OUTPUT_FORMATS, default="human",
                   help="human (default) or json (qemu-img's JSON where qemu-img has the "
                   "command)")
    g.add_argument("--json", dest="output", action="store_const", const="json",
                   help="the same as --output=json")


def _share_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-U", "--force-share", action="store_true",
                   help="read the image even while another process writes it (qemu-img's "
                   "-U); what is read may be inconsistent")


def _progress_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-p", dest="progress", action="store_const", const=True,
                   help="show progress: a bar on stderr when it is a terminal (the "
                   "default there), else qemu-img's plain lines on stdout (on stderr with "
                   "--output=json)")
    g.add_argument("-q", dest="progress", action="store_const", const=False,
                   help="quiet: no progress and no 'Image ...' line")


def _outside_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-backing-outside", action="store_true",
                   help="open backing and data files that lie outside the image's directory "
                   "tree (refused by default: ../ names, absolute paths, symlinks out; also "
                   f"${ALLOW_OUTSIDE_ENV}=1)")
    p.add_argument("--allow-backing-device", action="store_true",
                   help="let an image name a block device as its backing or data file "
                   f"(refused by default; also ${ALLOW_DEVICE_ENV}=1)")
    from .remoteargs import add_remote_options

    add_remote_options(p)


def _run_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=default_run_dir(),
                   help="the daemon's directory: control socket, pid file, log, FUSE mount "
                   "(default $COWD_RUN_DIR or /run/cowd)")


def _boot_trace_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-boot-trace", action="store_true",
                   help="neither record the base's first reads into BASE.cowd-trace nor "
                   "prefetch from that trace (default: both, where the base's folder is "
                   "writable)")


def _daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=default_run_dir(),
                   help="where the control socket lives (default $COWD_RUN_DIR or /run/cowd)")
    p.add_argument("--readonly", action="store_true", help="serve read-only")
    p.add_argument("--cache-entries", type=_count(1, MAX_CACHE_ENTRIES), default=1 << 18,
                   metavar="N", help="remap cache bound in entries (default 262144)")
    p.add_argument("--cache-max-age", type=_seconds(MAX_CACHE_AGE_S), default=600.0,
                   metavar="SECONDS", help="remap cache expiry (default 600 s)")
    p.add_argument("--readahead", type=_count(0, MAX_READAHEAD_CLUSTERS), default=16,
                   metavar="CLUSTERS",
                   help="clusters resolved ahead on a sequential miss (default 16)")
    p.add_argument("--no-prime", action="store_true",
                   help="do not fill the remap cache from the metadata at start")
    _boot_trace_option(p)
    p.add_argument("--workers", type=_workers, default="auto", metavar="N|auto",
                   help="serve NBD connections (and --via nbd devices) from N worker "
                   "processes; 0 serves them in the daemon itself (default auto: one per "
                   "core, none on a single core)")
    p.add_argument("--fuse-io-uring", choices=("auto", "off"),
                   default=os.environ.get(FUSE_IO_URING_ENV) or "off",
                   help="auto: the FUSE mount takes its requests from an io_uring where the "
                   "kernel offers FUSE-over-io_uring (Linux 6.14+ with the fuse module's "
                   "enable_uring=Y), from /dev/fuse reads elsewhere; off: always /dev/fuse "
                   f"(default off, or ${FUSE_IO_URING_ENV}: not faster yet, see the README)")
    p.add_argument("-v", "--verbose", action="store_true", help="log requests and events")
    _outside_option(p)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def wants_progress(args: argparse.Namespace) -> bool:
    """-p / -q, or a terminal on stderr when neither was given."""
    chosen = getattr(args, "progress", None)
    return sys.stderr.isatty() if chosen is None else bool(chosen)
