"""tools/bench_all.py's report: the records of a run turned into a summary (medians, ratios to
the loop device with their spread), Markdown tables and PNG plots.

Layer: tools.  Pure functions of the results document (no I/O but the plot files), so a
results.json can be reported again: ``python -m tools.bench_report results.json``.

Theory of operation: a record is one measurement (rep, workload, case, state, path, where,
figures) or a failure (the same with ``error``).  A summary row is one (where, workload,
case, state); its baseline is the loop device's record of the same rep, workload and case
(``loop`` on the host, ``guest-loop`` in the guest; the loop device has no cold or warm
state, so it is the baseline of both).  A ratio is taken per repetition and the table shows
the median with the min-max of those ratios; time workloads (copy, boot) are time ratios
(lower is better), the others throughput ratios (higher is better).  A path that has no
record for a row gets the reason it is unavailable, or 'failed' with the error.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

Record = dict[str, Any]

HOST = ("loop", "fuse", "nbd", "qemu-nbd")
GUEST = ("guest-loop", "kmod", "guest-nbd")
LABEL = {"loop": "loop (raw copy)", "fuse": "cowd fuse+loop", "nbd": "cowd nbd",
         "qemu-nbd": "qemu-nbd", "guest-loop": "loop in guest", "kmod": "cowd kmod",
         "guest-nbd": "cowd nbd (kernel client)"}
TIME_WORKLOADS = ("copy", "boot")
COWD_PATHS = ("fuse", "nbd", "kmod", "guest-nbd")


def metric(workload: str, case: str) -> str:
    if workload in TIME_WORKLOADS:
        return "seconds"
    if workload == "verify" or "-1M-" in case:
        return "MBps"
    return "iops"


def fmt(case: str, r: dict[str, float], workload: str = "fio") -> str:
    m = metric(workload, case)
    v = r[m]
    return {"seconds": f"{v:.2f} s", "MBps": f"{v:.0f} MB/s", "iops": f"{v / 1e3:.1f}k IOPS"}[m]


def _baseline(where: str) -> str:
    return "loop" if where == "host" else "guest-loop"


def _reason(doc: dict[str, Any], workload: str, path: str) -> str | None:
    for u in doc["unavailable"]:
        if u["path"] == path and u["workload"] in (workload, "*"):
            return str(u["reason"])
    return None


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    records: list[Record] = doc["records"]
    keys: list[tuple[str, str, str, str]] = []
    for r in records:
        if "error" in r and r["case"] == r["workload"] != "copy":
            continue  # a whole path's failure: marks that path's cells, makes no row
        k = (r["where"], r["workload"], r["case"], r["state"])
        if k not in keys:
            keys.append(k)
    # the loop device's own row only where no other path has a state for that case
    stated = {(w, wl, c) for w, wl, c, s in keys if s}
    keys = [k for k in keys if k[3] or k[:3] not in stated]
    rows = []
    for where, workload, case, state in keys:
        m = metric(workload, case)
        base = _baseline(where)
        base_by_rep = {r["rep"]: r[m] for r in records if r["path"] == base and "error" not in r
                       and r["workload"] == workload and r["case"] == case and r.get(m)}
        row: dict[str, Any] = {"where": where, "workload": workload, "case": case,
                               "state": state, "metric": m, "baseline": base,
                               "better": "lower" if workload in TIME_WORKLOADS else "higher",
                               "paths": {}}
        for path in (HOST if where == "host" else GUEST):
            mine = [r for r in records if r["path"] == path and r["workload"] == workload
                    and ((r["case"] == case and (r["state"] == state or path == base))
                         or ("error" in r and r["case"] == workload))]
            ok = [r for r in mine if "error" not in r]
            if not ok:
                errors = [r["error"] for r in mine if "error" in r]
                why = _reason(doc, workload, path)
                row["paths"][path] = ({"failed": errors[0]} if errors else
                                      {"unavailable": why or "not measured"})
                continue
            values = [float(r[m]) for r in ok]
            ratios = [float(r[m]) / base_by_rep[r["rep"]] for r in ok
                      if r["rep"] in base_by_rep]
            cell: dict[str, Any] = {"median": _median(values), "min": min(values),
                                    "max": max(values), "values": values}
            if ratios:
                cell.update(ratio=_median(ratios), ratio_min=min(ratios),
                            ratio_max=max(ratios), ratios=ratios)
            for fig in ("lat_p50_us", "lat_p99_us", "hit_rate", "prime_s",
                        "server_cpu_us_per_io", "machine_cpu_us_per_io"):
                xs = [float(r[fig]) for r in ok if r.get(fig) is not None]
                if xs:
                    cell[fig] = _median(xs)
            gib = [float(r["bytes"]) / (1 << 30) for r in ok if r.get("bytes")]
            if "misses_per_GiB" in ok[0]:  # the kernel shim's own miss counter (guest)
                cell["misses_per_GiB"] = _median([float(r["misses_per_GiB"]) for r in ok
                                                  if "misses_per_GiB" in r])
            elif "cache_misses" in ok[0] and gib:
                cell["misses_per_GiB"] = _median([float(r["cache_misses"]) / g
                                                  for r, g in zip(ok, gib, strict=False)])
                cell["metadata_lookups_per_request"] = _median(
                    [float(r["metadata_lookups"]) / max(1.0, float(r["requests"])) for r in ok])
            if "daemon_cpu_s" in ok[0] and ok[0].get("ios"):
                cell["daemon_cpu_us_per_io"] = _median(
                    [float(r["daemon_cpu_s"]) * 1e6 / max(1.0, float(r["ios"])) for r in ok])
            row["paths"][path] = cell
        rows.append(row)
    workloads = {}
    for w in doc["workloads"]:
        source = "fio" if w == "latency" else w
        figures = sum(1 for r in records if r["workload"] == source and "error" not in r)
        if w == "latency":
            figures = sum(1 for r in records if r["workload"] == "fio" and r.get("lat_p50_us"))
        workloads[w] = {"figures": figures,
                        "unavailable": [u for u in doc["unavailable"]
                                        if u["workload"] in (source, "*")],
                        "failed": [r for r in records if r["workload"] == source
                                   and "error" in r]}
    return {"rows": rows, "workloads": workloads}


# ---- Markdown ------------------------------------------------------------------------------

class Notes:
    """Footnotes: each distinct reason once, numbered."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def _cell(row: dict[str, Any], path: str, notes: Notes) -> str:
    c = row["paths"][path]
    if "unavailable" in c:
        return f"n/a {notes.ref('unavailable on ' + LABEL[path] + ': ' + c['unavailable'])}"
    if "failed" in c:
        return f"failed {notes.ref('failed on ' + LABEL[path] + ': ' + c['failed'])}"
    if path == row["baseline"]:
        return _value(row["metric"], c["median"])
    if "ratio" not in c:
        return f"{_value(row['metric'], c['median'])} (no baseline)"
    return f"{c['ratio']:.2f} ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})"


def _value(m: str, v: float) -> str:
    return {"seconds": f"{v:.2f} s", "MBps": f"{v:.0f} MB/s", "iops": f"{v / 1e3:.1f}k IOPS"}[m]


def _what(row: dict[str, Any], doc: dict[str, Any]) -> str:
    w, case, state = row["workload"], row["case"], row["state"]
    if w == "copy":
        t = doc["tree"] if row["where"] == "host" else doc.get("guest_tree") or {}
        if not t:
            return "copy a tree of small files (s)"
        return f"copy {t['files']} files / {t['bytes'] / 1e6:.0f} MB (s)"
    if w == "boot":
        return ("first boot to the marker (s; loop column: qemu on a raw copy, qemu-nbd "
                "column: qemu opening the qcow2 itself)")
    if w == "verify":
        return "fio verify 4k randwrite QD32 (MB/s)"
    if w == "scaling":
        return f"scaling {case} 4k randread QD32 (IOPS, all clients)"
    return f"fio {case}{' ' + state if state else ''}"


def markdown(doc: dict[str, Any]) -> str:
    s, p = doc["summary"], doc["params"]
    notes = Notes()
    out = [f"cowd benchmark, {doc['date']}, {doc['machine']}, kernel {doc['kernel']}, "
           f"commit {doc['commit']}, {doc['fio']}; {p['base_bytes'] >> 20} MiB disk "
           f"(qcow2 overlays over a raw base), median of {p['reps']} repetitions "
           f"(min-max of the per-repetition ratios), fio jobs one pass at most and at most "
           f"{p['runtime_s']} s, page cache {'dropped' if p['drop_caches'] else 'NOT dropped'}"
           f" before each job; {doc['duration_s']:.0f} s in all; machine idle during the host's "
           f"jobs (the benchmark's own load included): median {_idle(doc):.0f}%.", ""]
    for where, paths, title in (
            ("host", HOST, "On the host: ratio to a plain loop device on a raw copy "
             "(loop = 1.00; copy: time ratio, lower is better; fio: throughput ratio, higher "
             "is better; cold = empty overlay, every write a first write; warm = every "
             "cluster allocated)"),
            ("guest", GUEST, f"In a virtme-ng guest (TCG, {p['guest_base_bytes'] >> 20} MiB "
             "disk in the guest's RAM; loop = buffered loop device on a raw copy in the "
             "same guest = 1.00)")):
        rows = [r for r in s["rows"] if r["where"] == where and r["workload"] != "scaling"]
        out += [f"### {title}", "",
                "| workload | " + " | ".join(LABEL[x] for x in paths) + " |",
                "|---" * (len(paths) + 1) + "|"]
        for r in rows:
            out.append(f"| {_what(r, doc)} | "
                       + " | ".join(_cell(r, x, notes) for x in paths) + " |")
        for w in ("copy", "boot", "fio", "verify"):
            if not any(r["workload"] == w for r in rows):
                out.append(f"| {w} | " + " | ".join(_na(doc, w, x, notes) for x in paths)
                           + " |")
        out.append("")
    out += _latency(doc), "", _internals(doc), "", _scaling(doc, notes), ""
    out.append("Unavailable or failed:")
    out += [f"[{i + 1}] {t}" for i, t in enumerate(notes.texts)]
    return "\n".join(out)


def _idle(doc: dict[str, Any]) -> float:
    return _median([float(r["machine_idle_pct"]) for r in doc["records"]
                    if r["where"] == "host" and "machine_idle_pct" in r])


def _na(doc: dict[str, Any], workload: str, path: str, notes: Notes) -> str:
    why = _reason(doc, workload, path) or "not measured"
    return f"n/a {notes.ref('unavailable on ' + LABEL[path] + ': ' + why)}"


def _latency(doc: dict[str, Any]) -> str:
    rows = [r for r in doc["summary"]["rows"] if r["workload"] == "fio"]
    out = ["### Where the time goes: fio completion latency, p50 / p99 (µs)", "",
           "| job | " + " | ".join(LABEL[x] for x in (*HOST, *GUEST)) + " |",
           "|---" * (len(HOST) + len(GUEST) + 1) + "|"]
    keys: list[tuple[str, str]] = []
    for r in rows:
        if (r["case"], r["state"]) not in keys:
            keys.append((r["case"], r["state"]))
    for case, state in keys:
        cells = []
        for x in (*HOST, *GUEST):
            c: dict[str, Any] = next((r["paths"][x] for r in rows if r["case"] == case
                                      and r["state"] == state and x in r["paths"]), {})
            cells.append(f"{c['lat_p50_us']:.0f} / {c['lat_p99_us']:.0f}"
                         if "lat_p50_us" in c else "-")
        where = " (guest)" if not state else ""
        out.append(f"| {case}{' ' + state if state else where} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _internals(doc: dict[str, Any]) -> str:
    paths = [x for x in (*COWD_PATHS, "qemu-nbd")
             if any("median" in r["paths"].get(x, {}) for r in doc["summary"]["rows"])]
    cowd = [x for x in paths if x in COWD_PATHS]
    if not cowd:
        return "### Where the time goes in cowd: no cowd path measured"
    per = " / ".join(LABEL[x] for x in cowd)
    out = ["### Where the time goes in cowd (over each fio job's window)", "",
           f"| job | remap hit rate ({per}) | misses per GiB | metadata lookups per request "
           f"| server CPU µs per I/O ({' / '.join(LABEL[x] for x in paths)}) | priming (s) |",
           "|---|---|---|---|---|---|"]
    for r in doc["summary"]["rows"]:
        if r["workload"] != "fio" or not any("median" in r["paths"].get(x, {}) for x in cowd):
            continue

        def g(key: str, f: str, among: list[str], r: dict[str, Any] = r) -> str:
            return " / ".join(format(r["paths"][x][key], f) if key in r["paths"].get(x, {})
                              else "-" for x in among)
        where = " (in the guest)" if r["where"] == "guest" else ""
        out.append(f"| {r['case']} {r['state']}{where} | {g('hit_rate', '.3f', cowd)} | "
                   f"{g('misses_per_GiB', '.0f', cowd)} | "
                   f"{g('metadata_lookups_per_request', '.2f', cowd)} | "
                   f"{g('daemon_cpu_us_per_io', '.0f', paths)} | {g('prime_s', '.3f', cowd)} |")
    return "\n".join(out)


def _scaling(doc: dict[str, Any], notes: Notes) -> str:
    rows = [r for r in doc["summary"]["rows"] if r["workload"] == "scaling"]
    paths = ("loop", "nbd", "qemu-nbd")
    out = ["### Scaling: N overlays of one base, one client each, 4 KiB random read QD32 "
           "(aggregate IOPS; ratio to N loop devices on one raw copy; CPU µs per I/O of the "
           "server / of the whole machine)", "",
           "| overlays | " + " | ".join(LABEL[x] for x in paths) + " |",
           "|---" * (len(paths) + 1) + "|"]
    for r in sorted(rows, key=lambda r: int(r["case"][2:])):
        cells = []
        for x in paths:
            c = r["paths"][x]
            if "median" not in c:
                cells.append(_cell(r, x, notes))
                continue
            ratio = f" = {c['ratio']:.2f}" if "ratio" in c and x != "loop" else ""
            srv = (f"{c['server_cpu_us_per_io']:.0f} / " if "server_cpu_us_per_io" in c
                   else "- / ")
            cells.append(f"{c['median'] / 1e3:.1f}k{ratio}; {srv}"
                         f"{c.get('machine_cpu_us_per_io', 0):.0f} µs")
        out.append(f"| {r['case'][2:]} | " + " | ".join(cells) + " |")
    if not rows:
        out.append("| - | " + " | ".join(_na(doc, "scaling", x, notes) for x in paths) + " |")
    return "\n".join(out)


# ---- plots ---------------------------------------------------------------------------------

def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    title = f"{doc['date']}, {doc['machine']}, commit {doc['commit']}"
    rows = [r for r in doc["summary"]["rows"]
            if r["workload"] in ("copy", "boot", "fio", "verify")]
    fig, axes = plt.subplots(1, 2, figsize=(15, max(4, 0.32 * len(rows) + 2)),
                             gridspec_kw={"width_ratios": [3, 1]})
    for ax, where, paths in ((axes[0], "host", HOST[1:]), (axes[1], "guest", GUEST[1:])):
        mine = [r for r in rows if r["where"] == where]
        labels = [_what(r, doc).split(" (")[0] for r in mine]
        height = 0.8 / max(1, len(paths))
        if not any("ratio" in r["paths"].get(x, {}) for r in mine for x in paths):
            ax.text(0.5, 0.5, "no ratios: see table.md for why", transform=ax.transAxes,
                    ha="center")
        for i, x in enumerate(paths):
            ys, vals, lo, hi = [], [], [], []
            for j, r in enumerate(mine):
                c = r["paths"].get(x, {})
                if "ratio" in c:
                    ys.append(j + i * height)
                    vals.append(c["ratio"])
                    lo.append(c["ratio"] - c["ratio_min"])
                    hi.append(c["ratio_max"] - c["ratio"])
            ax.barh(ys, vals, height, xerr=[lo, hi], label=LABEL[x], capsize=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(mine))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ratio to loop (copy: time, lower is better; others: higher is better)")
        ax.set_title("host" if where == "host" else "guest (TCG)")
        ax.legend(fontsize=7)
    fig.suptitle(f"cowd / loop, median and min-max; {title}", fontsize=9)
    fig.tight_layout()
    made.append(out / "ratios.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    fio = [r for r in doc["summary"]["rows"] if r["workload"] == "fio" and r["where"] == "host"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(HOST)
    for i, x in enumerate(HOST):
        xs, p50, p99 = [], [], []
        for j, r in enumerate(fio):
            c = r["paths"].get(x, {})
            if "lat_p50_us" in c:
                xs.append(j + i * width)
                p50.append(max(c["lat_p50_us"], 0.1))
                p99.append(max(c["lat_p99_us"], 0.1))
        bars = ax.bar(xs, p99, width, alpha=0.35)
        ax.bar(xs, p50, width, label=LABEL[x], color=bars.patches[0].get_facecolor()[:3]
               if bars.patches else None)
    ax.set_yscale("log")
    ax.set_ylabel("completion latency, µs (solid p50, light p99)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fio))],
                  [f"{r['case']}\n{r['state']}" for r in fio], fontsize=6, rotation=45)
    ax.legend(fontsize=7)
    ax.set_title(f"fio latency per path; {title}", fontsize=9)
    fig.tight_layout()
    made.append(out / "latency.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    sc = sorted((r for r in doc["summary"]["rows"] if r["workload"] == "scaling"),
                key=lambda r: int(r["case"][2:]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for x in ("loop", "nbd", "qemu-nbd"):
        pts = [(int(r["case"][2:]), r["paths"][x]) for r in sc if "median" in r["paths"][x]]
        if not pts:
            continue
        a1.plot([n for n, _ in pts], [c["median"] for _, c in pts], marker="o", label=LABEL[x])
        a2.plot([n for n, _ in pts], [c.get("server_cpu_us_per_io",
                                            c.get("machine_cpu_us_per_io", 0)) for _, c in pts],
                marker="o", label=LABEL[x] + (" (machine)" if x == "loop" else " (server)"))
    for a, y in ((a1, "aggregate IOPS, 4k randread QD32"), (a2, "CPU µs per I/O")):
        a.set_xscale("log", base=2)
        a.set_xlabel("overlays (one client each)")
        a.set_ylabel(y)
        a.legend(fontsize=7)
    fig.suptitle(f"scaling; {title}", fontsize=9)
    fig.tight_layout()
    made.append(out / "scaling.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


if __name__ == "__main__":
    d = json.loads(Path(sys.argv[1]).read_text())
    d["summary"] = summarise(d)
    print(markdown(d))
