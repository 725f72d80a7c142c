"""One way to run fio for the benchmarks: on block devices (libaio, O_DIRECT) or on NBD
exports (fio's nbd engine, the same client for cowd and qemu-nbd), one or many jobs at once.

Layer: tools (not a test; pytest does not collect it).  No cowd import: it drives fio and
parses its JSON.

Theory of operation: :func:`run` builds one fio command with one job per target (a job
section starts at ``--name``; the engine and its target follow it, so one process can drive
16 clients, each with its own connection or device).  Unless ``time_based`` is asked for,
a job ends after one pass over ``size`` bytes or at ``runtime_s``, whichever comes first: a
write job on a fresh overlay then writes each block at most once, so every write is a first
write.  ``verify`` writes with a crc32c header per block and reads every block back
(fio's do_verify), exiting non-zero on the first mismatch.  The figures of one job side
(read or write) come from :func:`figures`: bandwidth, IOPS, bytes, completion latency
percentiles.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

FIO_TIMEOUT_S = 900  # one fio command; a hung one is an error, not a hang


@dataclass(frozen=True)
class Job:
    rw: str  # fio's rw: read, write, randread, randwrite
    bs: str  # block size: 4k, 1M
    qd: int  # iodepth

    @property
    def side(self) -> str:
        return "read" if "read" in self.rw else "write"


def target_args(target: str) -> list[str]:
    """A block device path, or an NBD URI (nbd+unix://... or nbd://...)."""
    if target.startswith("nbd"):
        return ["--ioengine=nbd", f"--uri={target}"]
    return ["--ioengine=libaio", "--direct=1", f"--filename={target}"]


def figures(side: dict[str, object]) -> dict[str, float]:
    """The figures of one side (``job['read']`` or ``job['write']``) of fio's JSON."""
    clat = side["clat_ns"]
    assert isinstance(clat, dict)
    pct = clat.get("percentile", {})
    return {"MBps": float(side["bw_bytes"]) / 1e6,  # type: ignore[arg-type]
            "iops": float(side["iops"]),  # type: ignore[arg-type]
            "bytes": float(side["io_bytes"]),  # type: ignore[arg-type]
            "ios": float(side["total_ios"]),  # type: ignore[arg-type]
            "seconds": float(side["runtime"]) / 1000,  # type: ignore[arg-type]
            "lat_p50_us": pct.get("50.000000", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000}


def command(targets: list[str], job: Job, size: int | None, runtime_s: float | None,
            verify: bool = False, time_based: bool = False) -> list[str]:
    args = ["fio", "--output-format=json", f"--rw={job.rw}", f"--bs={job.bs}",
            f"--iodepth={job.qd}"]
    if size is not None:
        args.append(f"--size={size}")
    if runtime_s is not None:
        args.append(f"--runtime={runtime_s}")
        if time_based:
            args.append("--time_based")
    if job.rw.startswith("rand"):
        args.append("--randrepeat=0")
    if verify:
        # no verify state file: fio would leave it in the working directory
        args += ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0"]
    elif runtime_s is None:
        args.append("--end_fsync=1")
    for i, t in enumerate(targets):
        args += [f"--name=job{i}", *target_args(t)]
    return args


def run(targets: list[str], job: Job, size: int | None = None,
        runtime_s: float | None = None, verify: bool = False,
        time_based: bool = False) -> list[dict[str, float]]:
    """Run ``job`` on every target at once; the figures of each, in the targets' order.
    A fio that fails (a verify mismatch, an I/O error) is a RuntimeError with its output."""
    args = command(targets, job, size, runtime_s, verify, time_based)
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=FIO_TIMEOUT_S,
                           stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio {job}: no answer after {FIO_TIMEOUT_S} s") from None
    if p.returncode != 0:
        tail = " | ".join((p.stderr.strip() or p.stdout.strip()).splitlines()[-4:])
        raise RuntimeError(f"fio {job.rw} {job.bs} QD{job.qd} on {', '.join(targets)}: "
                           f"exit {p.returncode}: {tail}")
    text = p.stdout
    doc = json.loads(text[text.index("{"):])  # the nbd engine prints lines before the JSON
    jobs = sorted(doc["jobs"], key=lambda j: int(j["jobname"][3:]))
    out = []
    for j in jobs:
        f = figures(j[job.side])
        if verify:
            f["verified_bytes"] = float(j["read"]["io_bytes"])
        out.append(f)
    return out
