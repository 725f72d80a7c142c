"""What TLS costs cowd's NBD server, against what it costs qemu-nbd with the same credentials.

Layer: tools.  Both servers serve a fresh qcow2 overlay of the same raw base on 127.0.0.1,
three ways each: plaintext, TLS with X.509 (the server asks for a client certificate: qemu's
tls-creds-x509 default, ``--tls-verify-peer`` for cowd) and TLS with PSK, credentials made at
run time by certtool and psktool (tools/tlscreds.py).  The clients speak TLS themselves, the
same one for both servers: libnbd's nbdcopy on one connection, the whole disk read to
``null:`` in 1 MiB requests and a file of the disk's size written onto a fresh overlay; and,
for the per-request cost, 4 KiB random reads with 32 in flight for 5 s from libnbd's own
asynchronous API (a small Python client, :data:`RANDREAD_CLIENT`, run by the system Python
that has libnbd's binding; it reaches ~37k requests/s against plaintext qemu-nbd here, so
it does not hide the servers' TLS cost).  Not used: fio's nbd engine cannot name TLS
credentials (libnbd refuses local files in a URI unless the program allows them, and fio
does not), and through a qemu-nbd relay qemu-nbd's own figures collapsed to ~750
requests/s; nbdcopy rounds its request size up to the server's preferred block size (64 KiB
for cowd on a qcow2 overlay, 4 KiB for qemu-nbd); qemu-img bench 7.2 takes no
``--object``.

All six servers of one workload run back to back in each repetition, so the ratios are
paired in time: for each server its TLS/plaintext ratio (the cost of TLS), and cowd's TLS
figure over qemu-nbd's (how cowd's TLS compares).  Medians over ``--reps`` (at least 3 for a
figure worth quoting) with the min-max of the per-repetition ratios; server CPU seconds per
GiB.  The page cache is not dropped: the base stays cached, so the figures are the servers'
and TLS's, not the disk's.

Usage: python -m tools.bench tls [--quick] [--size 512M] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tools import benchlib, tlscreds

ROOT = Path(__file__).resolve().parent.parent
COWD = benchlib.cowd_command()
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 600.0
SERVERS = ("qemu-nbd", "cowd")
MODES = ("plain", "x509", "psk")
WORKLOADS = ("read-1M", "write-1M", "randread-4k-qd32")
RANDREAD_S = 5.0  # randread-4k-qd32 (quick: 1.5 s)
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter with libnbd's binding (python3-libnbd)
# argv: URI SECONDS QUEUE_DEPTH; prints requests per second.
RANDREAD_CLIENT = r"""
import nbd, random, sys, time
uri, seconds, qd = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
blocks = h.get_size() // 4096
buf = nbd.Buffer(4096)
rng = random.Random(1)
done = 0
def completed(err):
    global done
    done += 1
    return 1
t0 = time.monotonic()
end = t0 + seconds
while True:
    while h.aio_in_flight() < qd:
        h.aio_pread(buf, rng.randrange(blocks) * 4096, completion=completed)
    if time.monotonic() >= end:
        break
    h.poll(-1)
elapsed = time.monotonic() - t0
while h.aio_in_flight():
    h.poll(-1)
print(done / elapsed)
h.shutdown()
"""
NBDCOPY = ["nbdcopy", "--connections=1", "--no-extents"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Creds:
    def __init__(self, work: Path):
        ca = tlscreds.make_ca(work / "ca")
        self.server = tlscreds.server_dir(ca, work / "server")
        self.client = tlscreds.client_dir(ca, work / "client", "bench")
        self.psk = tlscreds.psk_file(work / "keys.psk", "bench")
        self.psk_dir = work / "psk"  # qemu's layout: DIR/keys.psk
        self.psk_dir.mkdir()
        shutil.copy(self.psk, self.psk_dir / "keys.psk")


class Server:
    """One server on 127.0.0.1:PORT serving ``image`` as export ``image.name``."""

    def __init__(self, kind: str, mode: str, image: Path, creds: Creds, work: Path):
        self.kind, self.mode, self.name = kind, mode, image.name
        self.port = free_port()
        self.creds = creds
        if kind == "qemu-nbd":
            cmd = ["qemu-nbd", "-f", "qcow2", "-x", image.name, "-b", "127.0.0.1", "-p",
                   str(self.port), "--shared", "8", "--persistent"]
            if mode == "x509":
                cmd += ["--object", f"tls-creds-x509,id=tls0,dir={creds.server},"
                        "endpoint=server,verify-peer=on", "--tls-creds", "tls0"]
            elif mode == "psk":
                cmd += ["--object", f"tls-creds-psk,id=tls0,dir={creds.psk_dir},"
                        "endpoint=server", "--tls-creds", "tls0"]
            cmd.append(str(image))
        else:
            benchlib.forget_boot_trace(image)
            cmd = [*COWD, "serve", str(image), "--nbd", f"tcp:{self.port}", "--run-dir",
                   str(work / f"run-{mode}")]
            if mode == "x509":
                cmd += ["--tls", "require", "--tls-certificates", str(creds.server),
                        "--tls-verify-peer"]
            elif mode == "psk":
                cmd += ["--tls", "require", "--tls-psk", str(creds.psk)]
        self.log = work / f"{kind}-{mode}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"{kind} ({mode}) did not listen: {tail}")
            time.sleep(0.05)

    def uri(self) -> str:
        base = f"127.0.0.1:{self.port}/{self.name}"
        if self.mode == "x509":
            return f"nbds://{base}?tls-certificates={self.creds.client}"
        if self.mode == "psk":
            return f"nbds://bench@{base}?tls-psk-file={self.creds.psk}"
        return f"nbd://{base}"

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(args: list[str]) -> float:
    t0 = time.monotonic()
    p = benchlib.bounded(args, RUN_TIMEOUT_S, args[0])
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
    return took


def one_run(workload: str, srv: Server, size: int, src: Path,
            runtime: float) -> dict[str, float]:
    if workload == "randread-4k-qd32":
        cpu0 = benchlib.cpu_seconds(srv.proc.pid)
        p = benchlib.bounded([SYSTEM_PYTHON, "-c", RANDREAD_CLIENT, srv.uri(), str(runtime),
                              "32"], RUN_TIMEOUT_S, "the libnbd random-read client")
        if p.returncode != 0:
            raise RuntimeError(f"randread client: exit {p.returncode}: {p.stderr[-500:]}")
        cpu = benchlib.cpu_seconds(srv.proc.pid) - cpu0
        iops = float(p.stdout.strip())
        moved = iops * runtime * 4096
        return {"MBps": iops * 4096 / 1e6, "iops": iops, "seconds": runtime,
                "cpu_s_per_GiB": cpu / (moved / (1 << 30))}
    cpu0 = benchlib.cpu_seconds(srv.proc.pid)
    if workload == "read-1M":
        took = timed([*NBDCOPY, "--request-size=1048576", srv.uri(), "null:"])
        moved = size
    else:
        took = timed([*NBDCOPY, "--request-size=1048576", "--flush", str(src), srv.uri()])
        moved = size
    cpu = benchlib.cpu_seconds(srv.proc.pid) - cpu0
    return {"MBps": moved / took / 1e6, "seconds": took,
            "cpu_s_per_GiB": cpu / (moved / (1 << 30))}


Rep = dict[str, dict[str, dict[str, dict[str, float]]]]  # workload -> server -> mode -> fig


def one_rep(work: Path, base: Path, src: Path, creds: Creds, size: int,
            runtime: float) -> Rep:
    out: Rep = {}
    for workload in WORKLOADS:
        for kind in SERVERS:
            for mode in MODES:
                ov = work / f"{kind}-{mode}.qcow2"
                with contextlib.suppress(FileNotFoundError):
                    ov.unlink()
                benchlib.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F",
                            "raw", str(ov))
                srv = Server(kind, mode, ov, creds, work)
                try:
                    r = one_run(workload, srv, size, src, runtime)
                finally:
                    srv.stop()
                out.setdefault(workload, {}).setdefault(kind, {})[mode] = r
                ov.unlink()
    return out


def summarise(reps: list[Rep]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for w in WORKLOADS:
        for mode in ("x509", "psk"):
            row: dict[str, float] = {}
            for kind in SERVERS:
                row[f"{kind}.plain"] = statistics.median(r[w][kind]["plain"]["MBps"]
                                                         for r in reps)
                row[f"{kind}.tls"] = statistics.median(r[w][kind][mode]["MBps"] for r in reps)
                row[f"{kind}.tls_cpu_s_per_GiB"] = statistics.median(
                    r[w][kind][mode]["cpu_s_per_GiB"] for r in reps)
                ratios = [r[w][kind][mode]["MBps"] / r[w][kind]["plain"]["MBps"] for r in reps]
                row[f"{kind}.tls/plain"] = statistics.median(ratios)
                row[f"{kind}.tls/plain.min"] = min(ratios)
                row[f"{kind}.tls/plain.max"] = max(ratios)
            vs = [r[w]["cowd"][mode]["MBps"] / r[w]["qemu-nbd"][mode]["MBps"] for r in reps]
            row["cowd/qemu-nbd.tls"] = statistics.median(vs)
            row["cowd/qemu-nbd.tls.min"] = min(vs)
            row["cowd/qemu-nbd.tls.max"] = max(vs)
            out[f"{w}.{mode}"] = row
    return out


def markdown(doc: dict[str, object]) -> str:
    rows = [f"TLS benchmark, {doc['date']}, {doc['machine']}, kernel {doc['kernel']}, commit "
            f"{doc['commit']}, {doc['size']} B disk, median of {doc['reps']} repetitions, "
            f"machine idle {doc['idle_percent']:.0f}% during the run",
            "",
            "| workload | TLS | qemu-nbd plain / TLS (MB/s) | qemu-nbd TLS/plain | cowd plain "
            "/ TLS (MB/s) | cowd TLS/plain | cowd / qemu-nbd, TLS | CPU s/GiB TLS qemu-nbd / "
            "cowd |",
            "|---|---|---|---|---|---|---|---|"]
    summary = doc["summary"]
    assert isinstance(summary, dict)
    for key, s in summary.items():
        w, mode = key.rsplit(".", 1)
        q, c = "qemu-nbd", "cowd"
        rows.append(
            f"| {w} | {mode} | {s[q + '.plain']:.0f} / {s[q + '.tls']:.0f} | "
            f"{s[q + '.tls/plain']:.2f} ({s[q + '.tls/plain.min']:.2f}-"
            f"{s[q + '.tls/plain.max']:.2f}) | {s[c + '.plain']:.0f} / {s[c + '.tls']:.0f} | "
            f"{s[c + '.tls/plain']:.2f} ({s[c + '.tls/plain.min']:.2f}-"
            f"{s[c + '.tls/plain.max']:.2f}) | {s['cowd/qemu-nbd.tls']:.2f} "
            f"({s['cowd/qemu-nbd.tls.min']:.2f}-{s['cowd/qemu-nbd.tls.max']:.2f}) | "
            f"{s[q + '.tls_cpu_s_per_GiB']:.2f} / {s[c + '.tls_cpu_s_per_GiB']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small and short (about a minute)")
    ap.add_argument("--size", default=None, help="disk size (default 512M, quick 64M)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench-tls.json"))
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    problem = tlscreds.tls_tools_problem()
    for tool in ("qemu-nbd", "qemu-img", "nbdcopy"):
        if problem is None and shutil.which(tool) is None:
            problem = f"{tool} not installed (make deps installs it)"
    if problem is None and subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"],
                                          capture_output=True).returncode != 0:
        problem = f"{SYSTEM_PYTHON} cannot import nbd (python3-libnbd, in packages.txt)"
    if problem:
        print(f"bench_tls: {problem}", file=sys.stderr)
        return 1
    size = benchlib.parse_size(args.size or ("64M" if args.quick else "512M"))
    reps = args.reps or (1 if args.quick else 3)
    runtime = 1.5 if args.quick else RANDREAD_S
    reps_out = []
    idle0 = benchlib.idle_ticks()
    head = benchlib.header()  # the date and the load before the run (the run loads it)
    with benchlib.scratch_dir("cowd-bench-tls-", keep=args.dir) as work:
        creds = Creds(work)
        base = work / "base.raw"
        src = work / "src.raw"
        for path in (base, src):
            with open(path, "wb") as f:
                chunk = os.urandom(1 << 20)
                for i in range(size >> 20):
                    f.write(chunk[i % 7:] + chunk[: i % 7])
        for i in range(reps):
            print(f"rep {i + 1}/{reps} ...", file=sys.stderr, flush=True)
            reps_out.append(one_rep(work, base, src, creds, size, runtime))
    idle1 = benchlib.idle_ticks()
    idle = 100 * (idle1[0] - idle0[0]) / max(idle1[1] - idle0[1], 1)
    doc = {**head, "size": size, "reps": reps, "randread_s": runtime,
           "idle_percent": idle, "load_average": os.getloadavg(), "repetitions": reps_out,
           "summary": summarise(reps_out)}
    benchlib.write_json(args.out, doc)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
