"""NBD path benchmark: cowd's NBD server against qemu-nbd serving the same qcow2 chain.

Measured with fio's nbd engine (the same client for both servers), in one run, on the same
data: 1 MiB sequential read and write at QD1, 4 KiB random read and write at QD32.  Writes run
on fresh overlays (every write allocates: the copy-on-write cost).  Each workload is repeated
(--reps) and the median reported with its spread; the ratio is cowd / qemu-nbd (higher is
better).  Also reported: server CPU seconds per GiB moved, and cowd's remap-cache hit rate per
workload.  The page cache is dropped before each run (root only); both servers use the page
cache (qemu-nbd's default cache mode), since cowd's data path is buffered pread/pwrite.

A/B: ``--against OTHER/.venv/bin/cowd`` also runs another checkout's cowd (say, the commit
before a change) in every repetition, right after this one on a fresh overlay of the same
base, and reports this cowd / that cowd per workload: a paired ratio from one run.  The
command runs as given (``--workers`` applies to this cowd only: give the other its own
options in a wrapper script), started in the work directory.

Usage: python -m tools.bench nbd [--quick] [--size 1G] [--reps 3] [--against COWD]
                                 [--out results/bench-nbd.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools import benchlib

ROOT = Path(__file__).resolve().parent.parent
COWD = benchlib.cowd_command()
# A server's start (Python imports, priming) on a machine busy with other tests took over
# 30 s once; a start that never comes still ends in an error.
START_TIMEOUT_S = 90.0

WORKLOADS = {
    # name: (fio rw, block size, iodepth, needs a fresh overlay)
    "seqread-1M-qd1": ("read", "1M", 1, False),
    "randread-4k-qd32": ("randread", "4k", 32, False),
    "seqwrite-1M-qd1": ("write", "1M", 1, True),
    "randwrite-4k-qd32": ("randwrite", "4k", 32, True),
}


def sh(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=True, capture_output=True, text=True,
                          **kw)  # type: ignore[call-overload]


def drop_caches() -> None:
    with contextlib.suppress(OSError):  # not root: the runs are warm, not cold
        benchlib.drop_caches()


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


class Server:
    """qemu-nbd serving one image, or one cowd daemon serving ``images`` (one export each,
    named by file name; ``uris`` in the same order).  ``run_dir``: cowd's (default
    WORK/run); ``tag`` tells apart the sockets of servers that run at the same time."""

    def __init__(self, kind: str, image: Path, work: Path, images: list[Path] | None = None,
                 run_dir: Path | None = None, tag: str = "", cowd: list[str] | None = None,
                 extra: tuple[str, ...] = ()):
        self.kind = kind
        self.cowd = cowd or COWD  # the command, for kind "cowd" (another checkout's: A/B)
        self.sock = work / f"{kind}{tag}.sock"
        self.run_dir = run_dir or work / "run"
        images = images or [image]
        if kind == "qemu-nbd":
            if len(images) != 1:
                raise ValueError("qemu-nbd serves one image")
            cmd = ["qemu-nbd", "--socket", str(self.sock), "--format", "qcow2", "--export-name",
                   "bench", "--shared", "8", "--persistent", str(image)]
            self.uris = [f"nbd+unix:///bench?socket={self.sock}"]
        else:
            benchlib.forget_boot_trace(images[0])
            cmd = [*self.cowd, "serve", *map(str, images), "--nbd", f"unix:{self.sock}",
                   "--run-dir", str(self.run_dir), *extra]
            self.uris = [f"nbd+unix:///{im.name}?socket={self.sock}" for im in images]
        self.uri = self.uris[0]
        self.log = work / f"{kind}{tag}.log"
        with open(self.log, "wb") as log:
            # cwd: the work dir, never a checkout: ``python -m cowd.cli`` puts the cwd first
            # on sys.path, so an --against command started in this repo would run this code.
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=work)
        try:
            wait_socket(self.sock, self.proc, START_TIMEOUT_S)
        except RuntimeError as e:
            self.stop()
            last = self.log.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{kind}: {e}{': ' + last[0] if last else ''}") from None
        except BaseException:
            self.stop()
            raise
        if kind != "qemu-nbd":  # cowd's NBD socket comes before its control socket: wait
            wait_socket(self.run_dir / "control.sock", self.proc, START_TIMEOUT_S)

    def stats(self) -> dict[str, float]:
        if self.kind == "qemu-nbd":
            return {}
        doc = json.loads(sh(*self.cowd, "stats", "--json", "--run-dir", str(self.run_dir)).stdout)
        return {k: doc["cache"][k] for k in ("hits", "misses")}

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_fio(uri: str, rw: str, bs: str, qd: int, size: int, runtime: float) -> dict[str, float]:
    [f] = benchlib.run([uri], benchlib.Job(rw, bs, qd), size=size, runtime_s=runtime,
                       time_based=True, ramp_s=0.5)
    return {"bw_MBps": f["MBps"], "iops": f["iops"], "bytes": f["bytes"],
            "lat_p50_us": f["lat_p50_us"], "lat_p99_us": f["lat_p99_us"]}


Results = dict[str, dict[str, dict[str, float]]]  # workload -> server -> metric -> value


# The server measured against in an A/B run (--against).
AGAINST = "cowd-against"


def one_rep(work: Path, base: Path, size: int, runtime: float, names: list[str],
            against: list[str] | None = None, workers: str | None = None) -> Results:
    out: Results = {}
    kinds = ["qemu-nbd", "cowd"] + ([AGAINST] if against else [])
    for name in names:  # the servers of one workload back to back: paired in time
        for kind in kinds:
            rw, bs, qd, _fresh = WORKLOADS[name]  # every run gets a fresh overlay
            ov = work / f"{kind}-{name}.qcow2"
            if ov.exists():
                ov.unlink()
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(ov))
            drop_caches()
            extra = ("--workers", workers) if kind == "cowd" and workers is not None else ()
            srv = Server(kind, ov, work, cowd=against if kind == AGAINST else None,
                         extra=extra)
            try:
                cpu0, st0 = benchlib.tree_cpu_seconds(srv.proc.pid), srv.stats()
                r = run_fio(srv.uri, rw, bs, qd, size, runtime)
                cpu1, st1 = benchlib.tree_cpu_seconds(srv.proc.pid), srv.stats()
            finally:
                srv.stop()
            r["cpu_s_per_GiB"] = (cpu1 - cpu0) / max(r["bytes"] / (1 << 30), 1e-9)
            if st0:
                hits = st1["hits"] - st0["hits"]
                misses = st1["misses"] - st0["misses"]
                r["hit_rate"] = hits / max(hits + misses, 1)
            out.setdefault(name, {})[kind] = r
            ov.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small and short (under a minute)")
    ap.add_argument("--size", default=None, help="disk size (default 1G, quick 128M)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio run")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench-nbd.json"))
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--only", action="append", choices=list(WORKLOADS),
                    help="run only this workload (repeatable)")
    ap.add_argument("--workers", default=None, metavar="N|auto",
                    help="this cowd's --workers (default: its own default, auto)")
    ap.add_argument("--against", default=None, metavar="COWD",
                    help="another cowd command (e.g. an older checkout's .venv/bin/cowd) to "
                         "run in every repetition too: reports this cowd / that one")
    args = ap.parse_args()
    against = [args.against] if args.against else None
    size = benchlib.parse_size(args.size or ("128M" if args.quick else "1G"))
    reps = args.reps or (1 if args.quick else 3)
    runtime = args.runtime or (1.5 if args.quick else 5.0)
    for tool in ("fio", "qemu-nbd", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"bench_nbd: {tool} not installed (make deps installs it)", file=sys.stderr)
            return 1
    names = args.only or list(WORKLOADS)
    reps_out = []
    head = benchlib.header()  # the date and the load before the run (the run loads it)
    with benchlib.scratch_dir("cowd-bench-", keep=args.dir) as work:
        base = work / "base.raw"
        with open(base, "wb") as f:
            chunk = os.urandom(1 << 20)
            for i in range(size >> 20):
                f.write(chunk[i % 7:] + chunk[: i % 7])  # distinct-ish blocks, cheap to make
        for i in range(reps):
            print(f"rep {i + 1}/{reps} ...", file=sys.stderr, flush=True)
            reps_out.append(one_rep(work, base, size, runtime, names, against, args.workers))
    table = summarise(reps_out, names)
    doc = {**head, "loadavg_after": list(os.getloadavg()), "size": size, "reps": reps,
           "runtime_s": runtime, "workers": args.workers, "against": args.against,
           "repetitions": reps_out, "summary": table}
    benchlib.write_json(args.out, doc)
    print(markdown(doc))
    return 0


def summarise(reps: list[Results], names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        metric = "bw_MBps" if "1M" in name else "iops"
        q = [r[name]["qemu-nbd"][metric] for r in reps]
        c = [r[name]["cowd"][metric] for r in reps]
        ratios = [ci / qi for ci, qi in zip(c, q, strict=True) if qi]
        out[name] = {
            "metric": metric, "qemu_nbd": statistics.median(q), "cowd": statistics.median(c),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "qemu_cpu_s_per_GiB": statistics.median(
                r[name]["qemu-nbd"]["cpu_s_per_GiB"] for r in reps),
            "cowd_cpu_s_per_GiB": statistics.median(
                r[name]["cowd"]["cpu_s_per_GiB"] for r in reps),
            "cowd_hit_rate": statistics.median(r[name]["cowd"].get("hit_rate", 0) for r in reps),
        }
        if AGAINST in reps[0][name]:
            ab = [r[name]["cowd"][metric] / r[name][AGAINST][metric] for r in reps
                  if r[name][AGAINST][metric]]
            out[name].update(ab_ratio=statistics.median(ab), ab_min=min(ab), ab_max=max(ab),
                             against=statistics.median(r[name][AGAINST][metric] for r in reps))
    return out  # type: ignore[return-value]


def markdown(doc: dict[str, object]) -> str:
    rows = [f"NBD benchmark, {doc['date']}, {doc['machine']}, kernel {doc['kernel']}, "
            f"commit {doc['commit']}, {doc['size']} B disk, median of {doc['reps']} runs",
            "",
            "| workload | qemu-nbd | cowd | cowd / qemu-nbd (min-max) | CPU s/GiB qemu-nbd "
            "| CPU s/GiB cowd | cowd cache hit rate |",
            "|---|---|---|---|---|---|---|"]
    summary = doc["summary"]
    assert isinstance(summary, dict)
    for name, s in summary.items():
        unit = "MB/s" if s["metric"] == "bw_MBps" else "IOPS"
        rows.append(f"| {name} | {s['qemu_nbd']:.0f} {unit} | {s['cowd']:.0f} {unit} | "
                    f"{s['ratio']:.2f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | "
                    f"{s['qemu_cpu_s_per_GiB']:.2f} | {s['cowd_cpu_s_per_GiB']:.2f} | "
                    f"{s['cowd_hit_rate']:.3f} |")
    if doc.get("against"):
        rows += ["", f"A/B against {doc['against']} (paired by repetition):", "",
                 "| workload | this cowd | that cowd | this / that (min-max) |",
                 "|---|---|---|---|"]
        for name, s in summary.items():
            unit = "MB/s" if s["metric"] == "bw_MBps" else "IOPS"
            rows.append(f"| {name} | {s['cowd']:.0f} {unit} | {s['against']:.0f} {unit} | "
                        f"{s['ab_ratio']:.2f} ({s['ab_min']:.2f}-{s['ab_max']:.2f}) |")
    return "\n".join(rows)



if __name__ == "__main__":
    sys.exit(main())
