"""Layer: tools.  Remote bases (issue 17): ``python -m tools.bench remote [--quick]``.

The golden image is tools/mkbase's bootable base (build/vm/base.img), exported by nbdkit's
file plugin with its delay filter adding ``--latency`` to every read (10 ms and 50 ms by
default: a WAN's round trip) and its rate filter capping the bandwidth (``--rate``, 100
Mbit/s), on loopback.  For each latency, paired in each repetition:

- *first boot*, through ``cowd serve`` of a fresh qcow2 overlay over the remote base
  (qemu's NBD client on the daemon's socket), with a cold cache, with a warm one (the
  same cache after the cold boot, a fresh overlay), and with the cache dropped but the boot
  trace the cold boot recorded kept (``cowd cache drop`` keeps it: the daemon fills the
  cache in trace order while the guest boots; its share of the boot's reads fetched before
  they were asked for is in the JSON);
- *copy first*: ``qemu-img convert`` of the whole base from the same server, then a boot of
  the local copy (the time of both);
- *qemu alone*: qemu opens the overlay itself and reads the remote base with its own NBD
  client (no cache);
- *small-file read*: ``cowd attach --via fuse`` of a fresh overlay, mount, read every file
  (tar to /dev/null), cold and warm; against copy-first (convert, then loop-mount the copy).

Figures: seconds (median, min-max), bytes the server sent per boot (cowd's ``fetched_bytes``
and the copy's size) against the base's size.  JSON and a table in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools import benchlib
from tools.vm import boot

NBDKIT_START_S = 15.0


@contextlib.contextmanager
def delayed_server(base: Path, latency_ms: int, rate: str, work: Path) -> Iterator[str]:
    """nbdkit exporting ``base`` with ``latency_ms`` added to every read and its bandwidth
    capped at ``rate`` bits per second (nbdkit's delay and rate filters); its URL."""
    sock = work / f"nbdkit-{latency_ms}.sock"
    sock.unlink(missing_ok=True)
    log = open(work / "nbdkit.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), "--filter=delay",
                             "--filter=rate", "file", f"file={base}",
                             f"delay-read={latency_ms}ms", f"rate={rate}"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + NBDKIT_START_S
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not start: {(work / 'nbdkit.log').read_text()}")
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _cowd(*args: str, env: dict[str, str]) -> str:
    p = subprocess.run([*boot.cowd_command(), *args], capture_output=True, text=True,
                       timeout=600, env=env, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"cowd {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def _boot(drive: str, image: Path, initrd: Path) -> float:
    res = boot.boot(boot.qemu_command(drive, boot.DEFAULT_KERNEL, initrd,
                                      boot.DEFAULT_MEMORY_MIB), str(image), "bench")
    if not res.ok or res.seconds is None:
        raise RuntimeError(f"boot of {image}: {res.reason}")
    return res.seconds


def cowd_boot(url: str, work: Path, initrd: Path, env: dict[str, str],
              tag: str) -> dict[str, Any]:
    ov = work / f"{tag}.qcow2"
    ov.unlink(missing_ok=True)
    _cowd("create", "--base", url, "--overlay", "qcow", "-o", str(ov), env=env)
    run_dir = work / f"{tag}.run"
    old = dict(os.environ)
    os.environ.update(env)
    try:
        t0 = time.monotonic()
        with boot.cowd_serve([ov], run_dir, ["--allow-remote-backing"]) as served:
            seconds = _boot(served.drive(ov), ov, initrd)
            stats = json.loads(_cowd("stats", "--json", "--run-dir", str(run_dir), env=env))
        wall = time.monotonic() - t0
    finally:
        os.environ.clear()
        os.environ.update(old)
    (b,) = stats["remote"]["bases"]
    trace = stats["disks"][ov.name]["boot_trace"]
    shutil.rmtree(run_dir, ignore_errors=True)
    ov.unlink()
    return {"seconds": seconds, "total_seconds": wall, "fetched_bytes": b["fetched_bytes"],
            "trace": {k: trace.get(k) for k in ("state", "entries", "prefetched",
                                                "prefetched_before_read",
                                                "prefetched_before_read_share")}}


def copy_first_boot(url: str, work: Path, initrd: Path) -> dict[str, Any]:
    local = work / "copy.img"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(local)],
                   check=True, capture_output=True, timeout=1800)
    copy_s = time.monotonic() - t0
    seconds = _boot(f"file={local},format=raw,if=virtio", local, initrd)
    size = local.stat().st_size
    local.unlink()
    return {"seconds": seconds, "total_seconds": copy_s + seconds, "copy_seconds": copy_s,
            "fetched_bytes": size}


def qemu_alone_boot(url: str, work: Path, initrd: Path) -> dict[str, Any]:
    ov = work / "qemu.qcow2"
    ov.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", url,
                    str(ov)], check=True, capture_output=True)
    seconds = _boot(f"file={ov},format=qcow2,if=virtio", ov, initrd)
    ov.unlink()
    return {"seconds": seconds, "total_seconds": seconds, "fetched_bytes": None}


def _read_files(dev: str, mnt: Path) -> float:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "ro,noload", dev, str(mnt)], check=True)
    try:
        t0 = time.monotonic()
        subprocess.run(["tar", "-cf", "/dev/null", "-C", str(mnt), "."], check=True)
        return time.monotonic() - t0
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def cowd_files(url: str, work: Path, env: dict[str, str], tag: str) -> dict[str, Any]:
    ov = work / f"{tag}.qcow2"
    ov.unlink(missing_ok=True)
    _cowd("create", "--base", url, "--overlay", "qcow", "-o", str(ov), env=env)
    run_dir = work / f"{tag}.run"
    benchlib.drop_caches()
    t0 = time.monotonic()
    dev = _cowd("attach", str(ov), "--via", "fuse", "--allow-remote-backing", "--run-dir",
                str(run_dir), env=env).strip()
    try:
        read_s = _read_files(dev, work / "mnt")
        stats = json.loads(_cowd("stats", "--json", "--run-dir", str(run_dir), env=env))
    finally:
        _cowd("detach", dev, "--run-dir", str(run_dir), env=env)
    total = time.monotonic() - t0
    (b,) = stats["remote"]["bases"]
    ov.unlink()
    return {"seconds": read_s, "total_seconds": total, "fetched_bytes": b["fetched_bytes"]}


def copy_first_files(url: str, work: Path) -> dict[str, Any]:
    local = work / "copy.img"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(local)],
                   check=True, capture_output=True, timeout=1800)
    copy_s = time.monotonic() - t0
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", str(local)],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        read_s = _read_files(dev, work / "mnt")
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    total = time.monotonic() - t0
    size = local.stat().st_size
    local.unlink()
    return {"seconds": read_s, "total_seconds": total, "copy_seconds": copy_s,
            "fetched_bytes": size}


def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = Path(args.base).resolve()
    initrd = base.parent / "initramfs.img"
    if not base.is_file() or not initrd.is_file():
        raise SystemExit(f"{base}: build it first with tools/mkbase")
    results: list[dict[str, Any]] = []
    for latency in args.latency:
        for rep in range(args.reps):
            cache = work / f"cache-{latency}-{rep}"
            env = {**os.environ, "COWD_REMOTE_CACHE_DIR": str(cache)}
            with delayed_server(base, latency, args.rate, work) as url:
                row: dict[str, Any] = {"latency_ms": latency, "rep": rep,
                                       "loadavg": os.getloadavg()[0]}
                if not args.no_boot:
                    row["boot_cold"] = cowd_boot(url, work, initrd, env, "cold")
                    row["boot_warm"] = cowd_boot(url, work, initrd, env, "warm")
                    # The cache's blocks go, the boot trace the cold boot left beside it
                    # stays: a host that booted this base before, its cache since dropped.
                    _cowd("cache", "drop", url, env=env)
                    row["boot_traced"] = cowd_boot(url, work, initrd, env, "traced")
                    row["boot_copy_first"] = copy_first_boot(url, work, initrd)
                    row["boot_qemu_alone"] = qemu_alone_boot(url, work, initrd)
                shutil.rmtree(cache, ignore_errors=True)
                row["files_cold"] = cowd_files(url, work, env, "fcold")
                row["files_warm"] = cowd_files(url, work, env, "fwarm")
                row["files_copy_first"] = copy_first_files(url, work)
                shutil.rmtree(cache, ignore_errors=True)
            print(json.dumps(row), flush=True)
            results.append(row)
    return {"header": benchlib.header("tools/bench_remote.py"), "base": str(base),
            "base_bytes": base.stat().st_size, "results": results}


WHAT = {"boot_cold": "first boot, cowd serve, cold cache",
        "boot_warm": "first boot, cowd serve, warm cache",
        "boot_traced": "first boot, cowd serve, cold cache, boot trace of an earlier boot",
        "boot_qemu_alone": "first boot, qemu reads the remote chain itself",
        "boot_copy_first": "qemu-img convert the base, then boot the copy",
        "files_cold": "read all files, cowd attach --via fuse, cold cache",
        "files_warm": "read all files, cowd attach --via fuse, warm cache",
        "files_copy_first": "qemu-img convert the base, then loop-mount and read"}


def table(doc: dict[str, Any]) -> str:
    size = doc["base_bytes"]
    keys = [k for k in ("boot_cold", "boot_warm", "boot_traced", "boot_qemu_alone",
                        "boot_copy_first",
                        "files_cold", "files_warm", "files_copy_first")
            if any(k in r for r in doc["results"])]
    out = ["| latency | workload | boot or read, s: median (min-max) | with start-up or "
           "copy, s | bytes fetched / base size |", "|---|---|---|---|---|"]
    for latency in sorted({r["latency_ms"] for r in doc["results"]}):
        rows = [r for r in doc["results"] if r["latency_ms"] == latency]
        for k in keys:
            secs = [r[k]["seconds"] for r in rows]
            fetched = [r[k]["fetched_bytes"] for r in rows]
            frac = "-" if fetched[0] is None else \
                f"{statistics.median(fetched) / size:.3f}"
            total = statistics.median(r[k]["total_seconds"] for r in rows)
            out.append(f"| {latency} ms | {WHAT[k]} | {statistics.median(secs):.2f} "
                       f"({min(secs):.2f}-{max(secs):.2f}) | {total:.2f} | {frac} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="build/vm/base.img",
                   help="the golden image (tools/mkbase; default build/vm/base.img)")
    p.add_argument("--latency", type=int, action="append",
                   help="added read latency in ms (repeatable; default 10 and 50)")
    p.add_argument("--rate", default="100M",
                   help="the server's bandwidth in bits per second (nbdkit rate filter; "
                   "default 100M)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repetition at 10 ms")
    p.add_argument("--no-boot", action="store_true", help="the small-file read only")
    p.add_argument("--out", default="results/bench-remote")
    args = p.parse_args()
    if args.quick:
        args.latency = args.latency or [10]
        args.reps = 1
    args.latency = args.latency or [10, 50]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {}

    def body(work: Path) -> None:
        doc.update(run_bench(args, work))

    def cleanup() -> list[str]:
        return []  # every step undoes itself (detach, umount, losetup -d, servers)

    rc = benchlib.in_work_dir("cowd-bench-remote-", "/var/tmp", body, cleanup,
                              lambda m: print(f"bench remote: {m}", flush=True))
    if rc or not doc:
        return rc or 1
    benchlib.write_json(out / "results.json", doc)
    text = table(doc)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
