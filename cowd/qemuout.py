"""Layer: cowd (CLI support).  qemu-img's output for cowd's image commands: the JSON of
``qemu-img info/map/check --output=json`` (qemu 7.2's QAPI schema: ImageInfo, MapEntry,
ImageCheck; names, value types and which optional members appear) and the text qemu-img
prints, built from what the format library reports.  No I/O: data in, documents and lines
out.

What qemu has no name for goes under the key ``"cowd"`` of the document it belongs to (the
layer's own allocation, cowd's format name where qemu's differs, cowd's format-specific
facts, a map entry's compression), so a script written for qemu-img reads cowd's JSON as
qemu's and a script written for cowd finds the rest in one place.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from formats import CheckResult

# cowd's format names where qemu's differ (qemu calls VHD "vpc").
QEMU_FORMAT_NAMES = {"vhd": "vpc"}

# qemu-img's size_to_str: binary units, a unit change at 1000 of the smaller one.
_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def qemu_format(name: str) -> str:
    return QEMU_FORMAT_NAMES.get(name, name)


def size_to_str(n: int) -> str:
    """A size as qemu-img writes it: "10 MiB", "324 KiB", "0.977 KiB", "0 B"."""
    exp = math.frexp(n / (1000.0 / 1024))[1]
    i = min(max(int((exp - 1) / 10), 0), len(_SIZE_SUFFIXES) - 1)
    return f"{n / (1 << (i * 10)):0.3g} {_SIZE_SUFFIXES[i]}B"


def path_combine(base: str, name: str) -> str:
    """The name of a file that ``base`` records as ``name``, as qemu shows it: relative
    names joined to base's folder as written (not normalised), absolute ones as they are."""
    if name.startswith("/") or "/" not in base:
        return name
    return base[: base.rindex("/") + 1] + name


# ---- info ----------------------------------------------------------------------------------


@dataclass
class LayerFacts:
    """What ``info`` needs of one layer, gathered by imagecmds.py from the library."""

    filename: str  # as qemu would name it: the top as typed, parents by path_combine
    format: str  # cowd's name
    virtual_size: int
    cluster_size: int | None  # None: the format has none qemu reports (raw)
    actual_size: int  # host bytes allocated to the image's files
    dirty: bool
    backing_name: str | None
    backing_format: str | None
    snapshots: list[dict[str, Any]]  # qemu's SnapshotInfo members, already named
    specific: dict[str, Any] | None  # qemu's ImageInfoSpecific {"type", "data"}, or None
    allocated_bytes: int  # cowd: guest bytes this layer holds itself
    cowd_specific: dict[str, Any]  # cowd: the library's info() of the layer


def info_doc(f: LayerFacts) -> dict[str, Any]:
    """One layer as qemu-img info --output=json shows it (ImageInfo)."""
    doc: dict[str, Any] = {"filename": f.filename, "format": qemu_format(f.format),
                           "virtual-size": f.virtual_size, "actual-size": f.actual_size,
                           "dirty-flag": f.dirty}
    if f.cluster_size is not None:
        doc["cluster-size"] = f.cluster_size
    if f.backing_name:
        doc["backing-filename"] = f.backing_name
        doc["full-backing-filename"] = path_combine(f.filename, f.backing_name)
        if f.backing_format:
            doc["backing-filename-format"] = qemu_format(f.backing_format)
    if f.snapshots:
        doc["snapshots"] = f.snapshots
    if f.specific is not None:
        doc["format-specific"] = f.specific
    doc["cowd"] = {"format": f.format, "allocated-bytes": f.allocated_bytes,
                   "format-specific": f.cowd_specific}
    return doc


def qcow2_specific(facts: dict[str, Any]) -> dict[str, Any]:
    """ImageInfoSpecificQCow2 from the qcow2 codec's info(): version 2 images show only
    compat, compression type and refcount bits, as qemu does."""
    data: dict[str, Any] = {"compat": facts["compat"],
                            "compression-type": facts["compression_type"]}
    if facts["version"] >= 3:
        data["lazy-refcounts"] = facts["lazy_refcounts"]
    data["refcount-bits"] = facts["refcount_bits"]
    if facts["version"] >= 3:
        if facts["data_file"] is not None:
            data["data-file"] = facts["data_file"]
            data["data-file-raw"] = facts["data_file_raw"]
        data["corrupt"] = facts["corrupt"]
        data["extended-l2"] = facts["extended_l2"]
    return {"type": "qcow2", "data": data}


def snapshot_info(sid: str, name: str, vm_state_size: int, date_sec: int, date_nsec: int,
                  vm_clock_nsec: int, icount: int) -> dict[str, Any]:
    """SnapshotInfo (icount only where the snapshot recorded one)."""
    doc: dict[str, Any] = {"id": sid, "name": name, "vm-state-size": vm_state_size,
                           "date-sec": date_sec, "date-nsec": date_nsec,
                           "vm-clock-sec": vm_clock_nsec // 1_000_000_000,
                           "vm-clock-nsec": vm_clock_nsec % 1_000_000_000}
    if icount != -1:
        doc["icount"] = icount
    return doc


def info_text(doc: dict[str, Any]) -> str:
    """qemu-img info's text for one layer, from its JSON document."""
    lines = [f"image: {doc['filename']}",
             f"file format: {doc['format']}",
             f"virtual size: {size_to_str(doc['virtual-size'])} ({doc['virtual-size']} bytes)",
             f"disk size: {size_to_str(doc['actual-size'])}"]
    if "cluster-size" in doc:
        lines.append(f"cluster_size: {doc['cluster-size']}")
    if "backing-filename" in doc:
        line = f"backing file: {doc['backing-filename']}"
        if doc["full-backing-filename"] != doc["backing-filename"]:
            line += f" (actual path: {doc['full-backing-filename']})"
        lines.append(line)
    if "backing-filename-format" in doc:
        lines.append(f"backing file format: {doc['backing-filename-format']}")
    if doc.get("snapshots"):
        lines.append("Snapshot list:")
        lines += snapshot_table(doc["snapshots"])
    if doc.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "format-specific" in doc:
        lines.append("Format specific information:")
        for k, v in doc["format-specific"]["data"].items():
            lines.append(f"    {k.replace('-', ' ')}: {_word(v)}")
    extra = doc.get("cowd", {})
    if "allocated-bytes" in extra:
        lines.append(f"allocated in this layer: {size_to_str(extra['allocated-bytes'])}")
    return "\n".join(lines)


def _word(v: object) -> str:
    """A value in qemu's words: true/false, not Python's."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_word(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_word(x) for x in v)
    return "-" if v is None else str(v)


def snapshot_table(snapshots: list[dict[str, Any]]) -> list[str]:
    """qemu-img's snapshot list: ID, TAG, VM SIZE, DATE, VM CLOCK, ICOUNT."""
    rows = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
        secs = sn["vm-clock-sec"]
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{sn['vm-clock-nsec'] // 1_000_000:03d}")
        icount = str(sn["icount"]) if "icount" in sn else "--"
        size = size_to_str(sn["vm-state-size"])
        rows.append(f"{sn['id']:<9} {sn['name']:<16} {size:>8}{date:>20}{clock:>13}"
                    f"{icount:>11}")
    return rows


# ---- map -----------------------------------------------------------------------------------


def map_text_row(start: int, length: int, offset: int, filename: str) -> str:
    """One line of qemu-img map's text: %#-16x, where zero is written "0"."""
    return f"{_hex(start):<16}{_hex(length):<16}{_hex(offset):<16}{filename}"


def map_text_header() -> str:
    return f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"


def _hex(n: int) -> str:
    return f"{n:#x}" if n else "0"


# ---- check ---------------------------------------------------------------------------------

# qemu-img check's exit statuses (its man page).
CHECK_CLEAN = 0
CHECK_FAILED = 1  # the check could not be completed (check-errors)
CHECK_CORRUPT = 2
CHECK_LEAKS = 3
CHECK_UNSUPPORTED = 63


def check_status(res: CheckResult) -> int:
    if res.check_errors:
        return CHECK_FAILED
    if res.corruptions:
        return CHECK_CORRUPT
    return CHECK_LEAKS if res.leaks else CHECK_CLEAN


def check_doc(res: CheckResult, filename: str, fmt: str) -> dict[str, Any]:
    """ImageCheck: the counts, each optional member present only when it is not zero (as
    qemu-img sets them)."""
    doc: dict[str, Any] = {"filename": filename, "format": qemu_format(fmt),
                           "check-errors": res.check_errors}
    for key, n in (("image-end-offset", res.image_end_offset),
                   ("corruptions", len(res.corruptions)), ("leaks", len(res.leaks)),
                   ("corruptions-fixed", res.corruptions_fixed),
                   ("leaks-fixed", res.leaks_fixed),
                   ("total-clusters", res.total_clusters),
                   ("allocated-clusters", res.allocated_clusters),
                   ("fragmented-clusters", res.fragmented_clusters),
                   ("compressed-clusters", res.compressed_clusters)):
        if n:
            doc[key] = n
    return doc


def check_text(res: CheckResult) -> str:
    """qemu-img check's summary on stdout (the per-problem lines go to stderr)."""
    out = []
    if res.leaks_fixed or res.corruptions_fixed:
        out.append(f"The following inconsistencies were found and repaired:\n\n"
                   f"    {res.leaks_fixed} leaked clusters\n"
                   f"    {res.corruptions_fixed} corruptions\n")
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.")
    if res.corruptions:
        out.append(f"\n{len(res.corruptions)} errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.")
    if res.leaks:
        out.append(f"\n{len(res.leaks)} leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.")
    if res.check_errors:
        out.append(f"{res.check_errors} internal errors have occurred during the check.")
    if res.total_clusters and res.allocated_clusters:
        t, a = res.total_clusters, res.allocated_clusters
        out.append(f"{a}/{t} = {100 * a / t:0.2f}% allocated, "
                   f"{100 * res.fragmented_clusters / a:0.2f}% fragmented, "
                   f"{100 * res.compressed_clusters / a:0.2f}% compressed clusters")
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}")
    return "\n".join(out)
