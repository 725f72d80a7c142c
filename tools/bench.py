"""The benchmarks' one entry point: ``python -m tools.bench SUITE [ARGS]`` from the
repository's root (``SUITE --help`` for a suite's own flags).

Layer: tools.  It only picks the suite's module and hands it the rest of the command line;
what the suites share (the JSON header, fio, the page cache, clean-up) is
:mod:`tools.benchlib`.

    .venv/bin/python -m tools.bench all --quick        # every path against loop (bench_all.py)
    .venv/bin/python -m tools.bench nbd --quick        # cowd's NBD server against qemu-nbd
    .venv/bin/python -m tools.bench formats --quick    # formats/ against qemu-img bench
    .venv/bin/python -m tools.bench tls --quick        # TLS's cost, cowd and qemu-nbd
    .venv/bin/python -m tools.bench remote --quick     # bases on another machine (issue 17)
"""

from __future__ import annotations

import importlib
import sys

# suite -> (module, what it measures)
SUITES = {
    "all": ("tools.bench_all", "every path (loop, FUSE, NBD, qemu-nbd, kmod) against a plain "
            "loop device, results/bench/"),
    "nbd": ("tools.bench_nbd", "cowd's NBD server against qemu-nbd, fio's nbd engine"),
    "scale": ("tools.bench_scale", "cold random I/O and 1..16 overlays: loop, qemu-nbd, cowd "
              "in the daemon and with worker processes"),
    "fuse": ("tools.bench_fuse", "the FUSE frontend's mount options, loop on the FUSE file"),
    "kmod": ("tools.bench_kmod", "the kernel shim against a loop device, in a guest"),
    "attach": ("tools.bench_attach", "cowd attach --via fuse against a plain loop device"),
    "formats": ("tools.bench_formats", "the format library against qemu-img bench"),
    "tls": ("tools.bench_tls", "what TLS costs cowd's NBD server and qemu-nbd (nbdcopy, "
            "qemu-img bench)"),
    "convert": ("tools.bench_convert", "cowd convert against qemu-img convert (also: "
                "formats --convert)"),
    "boot": ("tools.vm.bench_boot", "VM boots from a cowd disk against a raw copy (--trace: "
             "with and without boot-trace priming, cache dropped)"),
    "remote": ("tools.bench_remote", "first boot and a small-file read over a remote base "
               "(nbdkit with 10/50 ms latency), cold and warm cache, against copying the "
               "base first and qemu alone"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:8} {what}" for name, (_, what) in SUITES.items())
    return f"usage: python -m tools.bench SUITE [ARGS]   (SUITE --help: its flags)\n{rows}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    suite, rest = args[0], args[1:]
    if suite not in SUITES:
        print(f"tools.bench: no suite {suite!r} (suite={suite})\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[suite][0])
    # the suites parse sys.argv: give them theirs, named as the user typed it
    sys.argv = [f"python -m tools.bench {suite}", *rest]
    rc = module.main()
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
