"""The kernel shim against a plain loop device, in one guest, on the same data (issue 5).

Boots Debian's kernel once under virtme-ng (tools/guest.py) and, inside, compares
/dev/cowdN (``cowd attach OVERLAY --via kmod``: a qcow2 overlay over a raw base full of data,
every remap primed) with /dev/loopN on a raw copy of the same disk, both files in the guest's
RAM, round robin, ``--reps`` times:

- seqread: fio 1 MiB sequential reads, QD1, direct I/O, the whole disk (MB/s)
- randread: fio 4 KiB random reads, QD32, direct I/O, ``--runtime`` seconds (IOPS)
- copy: mkfs.ext4 on a fresh empty disk (a new overlay over an empty base for cowd), mount,
  copy a generated tree of small files (~2000 files, ~20 MB), sync, umount (seconds)
- firstwrite: fio 4 KiB random writes at QD32, direct I/O, one into each cluster of a fresh
  overlay in a random order (a replayed I/O log), so every write allocates: in the kernel from
  the daemon's pool, or a round trip to the daemon without it; loop writes the same offsets
  of its raw file in place (IOPS)
- round trips: the kernel's miss counter per GiB read by seqread, after priming; and per MiB
  of first writes, the daemon round trips the writes cost (write misses plus pool refills)

``--v1`` adds the path ``kmod-v1``: the same disk served by a daemon that speaks the kernel's
version-1 ABI (no allocation pool: every first write is a miss), what cowd did before.  The
first-write job also runs as ``kmod-4k``: an overlay with 4 KiB clusters, whose first writes
need no copy-up (what the pool costs without the 60 KiB each 64 KiB cluster copies up).

Prints a Markdown table of medians (min-max) and the median (min-max) of the per-repetition
ratios against loop, and writes JSON (``--table-from JSON`` prints the table of a saved run).
Under TCG absolute figures are small; the ratios are what this measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

from tools import benchlib, guest

MiB = 1 << 20

SCRIPT = r"""
D=/tmp/b; S={share}; RUN=/run/cowd-bench; RUN1=/run/cowd-bench-v1; MB={disk_mib}
mkdir -p $D/mnt; modprobe loop 2>/dev/null
insmod kmod/cowd.ko || {{ echo "BENCH-FAIL insmod"; exit 1; }}
dd if=/dev/urandom of=$D/raw.img bs=1M count=$MB status=none
cp $D/raw.img $D/base.img
truncate -s ${{MB}}M $D/empty.img $D/empty-raw.img
u() {{ echo "U $(cut -d' ' -f1 /proc/uptime) $*"; }}  # where the time goes
u setup
python3 - $D/tree <<'EOF'
import os, random, sys
rng = random.Random(7)
for d in range({dirs}):
    os.makedirs(f"{{sys.argv[1]}}/d{{d}}")
    for f in range(100):
        with open(f"{{sys.argv[1]}}/d{{d}}/f{{f}}", "wb") as fh:
            fh.write(rng.randbytes(rng.randrange(0, 20000)))
EOF
echo "T $(find $D/tree -type f -printf '%s\n' | awk '{{ n++; s += $1 }} END {{ print n, s }}')"
python3 - $D/first.iolog {disk_mib} <<'PYEOF'
import random, sys
rng = random.Random(16)  # one 4 KiB write into every 64 KiB cluster, clusters in random order
clusters = list(range(int(sys.argv[2]) * 16))
rng.shuffle(clusters)
with open(sys.argv[1], "w") as f:
    f.write("fio version 2 iolog\nDEV add\nDEV open\n")
    f.writelines(f"DEV write {{c * 65536 + rng.randrange(16) * 4096}} 4096\n" for c in clusters)
    f.write("DEV close\n")
PYEOF
u attach
cowd create --base $D/base.img -o $D/ov.qcow2 >/dev/null
kdev=$(cowd attach $D/ov.qcow2 --via kmod --run-dir $RUN) || {{ echo "BENCH-FAIL attach"; exit 1; }}
echo "S $(cowd stats --run-dir $RUN --json | python3 $S/h.py stats)"
ldev=$(losetup --find --show $D/raw.img)
# cowd's NBD server under the kernel's nbd client: the third path, where the guest has nbd
paths="loop kmod"
[ {v1} = 1 ] && paths="$paths kmod-v1"
if [ {nbd} = 1 ]; then
  cp $D/ov.qcow2 $D/ovn.qcow2
  if ! modprobe nbd nbds_max=4 2>$S/nbd.err; then
    echo "BENCH-NOTE nbd: modprobe nbd failed: $(head -1 $S/nbd.err)"
  elif ndev=$(cowd attach $D/ovn.qcow2 --via nbd --run-dir $RUN 2>$S/nbd.err); then
    paths="loop kmod nbd"
  else
    echo "BENCH-NOTE nbd: cowd attach --via nbd failed: $(tail -1 $S/nbd.err)"
  fi
fi
# fio's terse (v3) line, read side: 7 bandwidth KiB/s, 8 IOPS, 24 and 30 the 50th and 99th
# completion-latency percentiles as "P%=usec" (awk, not a Python start: slow under TCG)
fiojob() {{ fio --name=j --filename=$1 --direct=1 --ioengine=libaio --output-format=terse \
  --terse-version=3 "${{@:2}}" 2>/dev/null | \
  awk -F';' '{{ split($24, a, "="); split($30, b, "="); print $7 * 1024, $8, a[2], b[2] }}'; }}
misses() {{ cowd stats --run-dir $RUN --json | python3 $S/h.py misses; }}
# the kmod disk on $1 in run dir $2: "write_misses refills pool_allocs alloc_msgs"
pool() {{ cowd stats --run-dir $2 --json | python3 $S/h.py pool $1; }}
attachas() {{  # attachas PATH IMAGE: attach through PATH's frontend (kmod-v1: a v1 daemon)
  case $1 in
    kmod-v1) COWD_KMOD_ABI=1 cowd attach $2 --via kmod --run-dir $RUN1;;
    kmod-*) cowd attach $2 --via kmod --run-dir $RUN;;
    *) cowd attach $2 --via $1 --run-dir $RUN;;
  esac
}}
runof() {{ if [ $1 = kmod-v1 ]; then echo $RUN1; else echo $RUN; fi; }}
copyrun() {{
  mkfs.ext4 -q -E nodiscard $1 && t0=$(date +%s.%N) && mount $1 $D/mnt && \
    cp -a $D/tree $D/mnt/ && sync && umount $D/mnt && t1=$(date +%s.%N) && \
    awk "BEGIN {{ print $t1 - $t0 }}"
}}
u measure
for rep in $(seq {reps}); do
  u "rep $rep"
  for path in $paths; do
    [ $path = kmod-v1 ] && continue  # the same reads as kmod: only its writes differ
    dev=$ldev; [ $path = kmod ] && dev=$kdev; [ $path = nbd ] && dev=$ndev
    [ $path = kmod ] && m0=$(misses)
    echo "R $rep $path seqread $(fiojob $dev --rw=read --bs=1M --iodepth=1 --size=${{MB}}M)"
    [ $path = kmod ] && echo "R $rep $path misses $(($(misses) - m0))"
    echo "R $rep $path randread $(fiojob $dev --rw=randread --bs=4k --iodepth=32 \
      --time_based --runtime={runtime} --randrepeat=0)"
  done
  u "rep $rep"
  for path in $paths; do
    if [ $path = loop ]; then
      cp --sparse=always $D/empty-raw.img $D/copy-raw.img
      dev=$(losetup --find --show $D/copy-raw.img)
    else
      rm -f $D/copy-$path.qcow2
      cowd create --base $D/empty.img -o $D/copy-$path.qcow2 >/dev/null
      dev=$(attachas $path $D/copy-$path.qcow2)
    fi
    echo "R $rep $path copy $(copyrun $dev)"
    # (--quick leaves cowd's disks attached: a detach is a Python start, seconds under TCG,
    # and the guest powers off with them)
    if [ $path = loop ]; then losetup -d $dev
    elif [ {quick} = 0 ]; then cowd detach $dev --run-dir $(runof $path) >/dev/null; fi
  done
  [ {firstwrite} = 1 ] || continue
  u "rep $rep firstwrite"
  for path in $paths kmod-4k; do
    [ $path = nbd ] && continue
    if [ $path = loop ]; then dev=$ldev
    else
      cs=64k; [ $path = kmod-4k ] && cs=4k
      cowd create --base $D/base.img -o $D/fw.qcow2 --cluster-size $cs >/dev/null
      dev=$(attachas $path $D/fw.qcow2)
      p0=$(pool $dev $(runof $path))
    fi
    # fio's terse line, write side: 48 bandwidth KiB/s, 49 IOPS
    echo "R $rep $path firstwrite $(fio --name=fw --filename=$dev --direct=1 \
      --ioengine=libaio --iodepth=32 --read_iolog=$D/first.iolog --replay_redirect=$dev \
      --replay_no_stall=1 --output-format=terse --terse-version=3 2>/dev/null | \
      awk -F';' '{{ print $49 }}')"
    if [ $path != loop ]; then  # (detached and removed: a first-written overlay is big)
      echo "R $rep $path fwpool $p0 $(pool $dev $(runof $path))"
      cowd detach $dev --run-dir $(runof $path) >/dev/null; rm -f $D/fw.qcow2
    fi
  done
done
u detach
if [ {quick} = 0 ]; then
  cowd detach $kdev --run-dir $RUN >/dev/null; losetup -d $ldev
  [ "$paths" = "loop kmod nbd" ] && cowd detach $ndev --run-dir $RUN >/dev/null
fi
echo "BENCH-DONE at $(cut -d' ' -f1 /proc/uptime) s"
"""


HELPER = r"""
import json, sys
if sys.argv[1] == "misses":
    d = json.load(sys.stdin)["disks"]
    print(sum(v["kmod"]["kernel"]["misses"] for v in d.values() if "kmod" in v))
elif sys.argv[1] == "pool":
    d = json.load(sys.stdin)["disks"]
    k = next((v["kmod"] for v in d.values() if v.get("device") == sys.argv[2]), None)
    if k is None:
        print("- - - -")
    else:
        print(k["ops"]["write_misses"], k["pool"]["refills"], k["kernel"]["pool_allocs"],
              k["kernel"]["alloc_msgs"])
elif sys.argv[1] == "stats":
    d = json.load(sys.stdin)["disks"]
    k = next((v["kmod"] for v in d.values() if "kmod" in v), {})
    print(json.dumps({x: k.get(x) for x in ("prime_seconds", "primed_entries", "kernel")}))
"""


def script(share: Path, disk_mib: int, reps: int, runtime: int, dirs: int = 20,
           nbd: bool = True, quick: bool = False, firstwrite: bool = False,
           v1: bool = False) -> str:
    """The guest script: ``share`` (a --rwdir) must hold :data:`HELPER` as h.py; ``dirs``
    directories of 100 files make the copied tree (20: ~2000 files, ~20 MB); ``nbd``: also
    measure ``cowd attach --via nbd`` (the kernel's nbd client on cowd's NBD server);
    ``quick``: detach nothing (the guest powers off with the disks attached);
    ``firstwrite``: the first-write job (this tool's own runs; bench_all leaves it out);
    ``v1``: also the path kmod-v1 (no pool)."""
    return SCRIPT.format(share=share, disk_mib=disk_mib, reps=reps, runtime=runtime, dirs=dirs,
                         nbd=int(nbd), quick=int(quick), firstwrite=int(firstwrite),
                         v1=int(v1))


def notes(out: str) -> list[str]:
    """Why a path did not run in the guest (``BENCH-NOTE`` lines)."""
    return re.findall(r"^BENCH-NOTE (.*)$", out, re.M)


def stats(out: str) -> dict[str, object]:
    """The kmod disk's ``cowd stats --json`` figures right after the attach (priming)."""
    m = re.search(r"^S (\{.*\})$", out, re.M)
    return json.loads(m.group(1)) if m else {}


def tree(out: str) -> dict[str, int]:
    """The copied tree's size in the guest: {"files": N, "bytes": B} (empty if not printed)."""
    m = re.search(r"^T (\d+) (\d+)$", out, re.M)
    return {"files": int(m.group(1)), "bytes": int(m.group(2))} if m else {}


Figures = dict[str, dict[str, dict[int, float]]]  # path -> figure -> repetition -> value


def parse(out: str) -> Figures:
    """The guest's ``R rep path what figures`` lines, keyed by repetition number (so a step
    that failed in one repetition does not shift the pairing of the others)."""
    res: Figures = {}
    for m in re.finditer(r"^R (\d+) (\S+) (\S+) (.+)$", out, re.M):
        rep_s, path, what, vals = m.groups()
        rep = int(rep_s)
        try:
            nums = [float(x) for x in vals.split()]
        except ValueError:
            continue  # a step that failed printed no figures
        if not nums:
            continue
        d = res.setdefault(path, {})
        if what in ("seqread", "randread") and len(nums) >= 4:
            d.setdefault(f"{what}_lat_p50_us", {})[rep] = nums[2]
            d.setdefault(f"{what}_lat_p99_us", {})[rep] = nums[3]
        if what == "seqread":
            d.setdefault("seqread_MBps", {})[rep] = nums[0] / 1e6
        elif what == "randread":
            d.setdefault("randread_iops", {})[rep] = nums[1]
        elif what == "copy":
            d.setdefault("copy_s", {})[rep] = nums[0]
        elif what == "misses":
            d.setdefault("misses", {})[rep] = nums[0]
        elif what == "firstwrite":
            d.setdefault("firstwrite_iops", {})[rep] = nums[0]
        elif what == "fwpool" and len(nums) == 8:
            # before and after: write misses, pool refills, kernel allocations, ALLOC messages
            for i, key in enumerate(("fw_write_misses", "fw_refills", "fw_kernel_allocs",
                                     "fw_alloc_msgs")):
                d.setdefault(key, {})[rep] = nums[4 + i] - nums[i]
    return res


def figures_from_json(saved: dict[str, dict[str, object]]) -> Figures:
    """Saved results (repetition keys become strings in JSON; runs before 2026-11-24 saved
    lists, repetition i at index i - 1) as :data:`Figures`."""
    out: Figures = {}
    for path, figs in saved.items():
        for key, vals in figs.items():
            by_rep = (dict(enumerate(vals, 1)) if isinstance(vals, list) else
                      {int(k): float(v) for k, v in vals.items()} if isinstance(vals, dict)
                      else {})
            out.setdefault(path, {})[key] = by_rep
    return out


def _ratio(a: dict[int, float], b: dict[int, float]) -> str:
    """Median (min-max) of a / b, paired per repetition (the paths of one repetition ran
    back to back: on a shared machine the load moves more between repetitions)."""
    ratios = [a[rep] / b[rep] for rep in sorted(a.keys() & b.keys()) if b[rep]]
    return (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            if ratios else "-")


def table(res: Figures, disk_mib: int) -> str:
    def cell(by_rep: dict[int, float] | None) -> str:
        if not by_rep:
            return "-"
        vals = list(by_rep.values())
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    extra = [p for p in ("kmod-v1", "kmod-4k", "nbd") if p in res]
    lines = ["| workload | loop | kmod | kmod / loop | target |"
             + "".join(f" {p} | {p} / loop |" for p in extra),
             "|---|---|---|---|---|" + "---|---|" * len(extra)]
    targets = {"seqread_MBps": ("1 MiB seq read, MB/s", ">= 0.9"),
               "randread_iops": ("4 KiB rand read QD32, IOPS", ">= 0.8"),
               "copy_s": ("small-file copy, s (lower is better)", "<= 1.1"),
               "firstwrite_iops": ("4 KiB rand first writes QD32, IOPS", ">= 0.8")}
    for key, (label, target) in targets.items():
        lo = res.get("loop", {}).get(key)
        km = res.get("kmod", {}).get(key)
        row = (f"| {label} | {cell(lo)} | {cell(km)} | "
               f"{_ratio(km, lo) if lo and km else 'unavailable'} | {target} |")
        for p in extra:
            v = res.get(p, {}).get(key)
            row += f" {cell(v)} | {_ratio(v, lo) if lo and v else '-'} |"
        lines.append(row)
    dashes = " - | - |" * len(extra)
    miss = res.get("kmod", {}).get("misses")
    if miss:
        per_gib = statistics.median(miss.values()) * 1024 / disk_mib
        lines.append(f"| daemon round trips per GiB read after priming | - | {per_gib:.0f} | - "
                     f"| 0 |{dashes}")
    # First writes: 16 clusters per MiB of disk, one 4 KiB write each (16 MiB of writes per
    # 256 MiB disk); round trips are write misses plus pool refills.
    written_mib = disk_mib * 16 * 4096 / MiB
    trips = {p: _trips(res.get(p, {})) for p in ("kmod", *extra)}
    if trips["kmod"] is not None:
        row = (f"| daemon round trips per MiB of first writes (misses + refills) | - | "
               f"{trips['kmod'] / written_mib:.3f} | - | one per refill |")
        for p in extra:
            t = trips.get(p)
            row += f" {'-' if t is None else f'{t / written_mib:.3f}'} | - |"
        lines.append(row)
    return "\n".join(lines)


def _trips(figs: dict[str, dict[int, float]]) -> float | None:
    """Median over repetitions of the first-write job's write misses plus pool refills."""
    wm, rf = figs.get("fw_write_misses"), figs.get("fw_refills")
    if not wm or not rf:
        return None
    return statistics.median(wm[r] + rf.get(r, 0) for r in wm)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per random-read job")
    ap.add_argument("--out", default="results/bench_kmod.json")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--v1", action="store_true",
                    help="also a daemon speaking the version-1 ABI (no allocation pool)")
    ap.add_argument("--no-nbd", action="store_true", help="leave out the nbd path")
    ap.add_argument("--table-from", metavar="JSON", help="print the table of a saved run")
    args = ap.parse_args()
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(f"kernel shim vs loop, guest {saved['guest_kernel']}, {saved['disk_mib']} MiB "
              f"disk, median of {saved['reps']} (min-max), commit {saved['commit']}, "
              f"{saved['date']}")
        print(table(figures_from_json(saved["results"]), saved["disk_mib"]))
        return 0
    guest.build_module()
    share = Path(tempfile.mkdtemp(prefix="bench-kmod-"))
    (share / "h.py").write_text(HELPER)
    res_run = guest.run(script(share, args.disk_mib, args.reps, args.runtime,
                               nbd=not args.no_nbd, firstwrite=True, v1=args.v1),
                        rwdirs=[str(share)], memory=args.memory, timeout=3600,
                        log=share / "guest.log")
    if "BENCH-DONE" not in res_run.stdout:
        sys.stderr.write(res_run.stdout[-4000:])
        print("bench_kmod: the guest did not finish (output above)", file=sys.stderr)
        return 1
    res = parse(res_run.stdout)
    ver, _ = guest.kernel()
    head = benchlib.header()
    commit = head["commit"]
    meta = {**head, "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "host": platform.node(), "guest_kernel": ver,
            "disk_mib": args.disk_mib, "reps": args.reps, "results": res}
    benchlib.write_json(args.out, meta, indent=2)
    print(f"kernel shim vs loop, guest {ver} under TCG, {args.disk_mib} MiB disk, "
          f"median of {args.reps} (min-max), commit {commit}, {meta['date']}")
    print(table(res, args.disk_mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
