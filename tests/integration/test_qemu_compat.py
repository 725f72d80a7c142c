"""cowd's info/map/check JSON against qemu-img 7.2's on a corpus, key by key and value by
value; check's counts on images with leaks and corruptions; the JSON of create, convert,
resize, commit, rebase and snapshot -l against what qemu-img reads back; and every
subcommand with bad values: one line on stderr, no traceback, the README's exit status."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowd.qemuout import size_to_str
from formats.qcow2 import parse_header
from tests.support.peers import COWD, qemu_img, qemu_io

MiB = 1 << 20


def run_in(cwd: Path, *args: str, rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    """cowd in ``cwd`` with relative names, as a user types them (qemu opens a relative
    data file from its current folder: both tools are run from the images' folder)."""
    p = subprocess.run([*COWD, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert "Traceback" not in p.stderr, p.stderr
    if rc is not None:
        assert p.returncode == rc, (args, p.returncode, p.stdout, p.stderr)
    return p


def qemu_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("corpus")

    def q(*args: str) -> None:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, cwd=d)

    def io(name: str, *cmds: str, fmt: str | None = None) -> None:
        args = ["qemu-io", *(["-f", fmt] if fmt else [])]
        for c in cmds:
            args += ["-c", c]
        subprocess.run([*args, name], check=True, capture_output=True, cwd=d)

    (d / "full.raw").write_bytes(os.urandom(2 * MiB))
    with open(d / "sparse.raw", "wb") as f:  # data in the middle, holes around it
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    q("create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "8M")
    io("v2.qcow2", "write -P 1 0 128k", "write -P 2 1M 64k")
    q("create", "-f", "qcow2", "v3.qcow2", "8M")
    # A zero cluster over written data keeps its host cluster: map shows its offset.
    io("v3.qcow2", "write -P 3 64k 192k", "write -z 2M 64k", "write -P 4 4M 4k",
       "write -P 20 6M 128k", "write -z 6M 64k")
    q("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "extl2.qcow2", "8M")
    io("extl2.qcow2", "write -P 5 4k 8k", "write -z 1M 16k", "write -P 6 3M 128k",
       "write -P 21 5M 256k", "write -z 5M 32k")
    q("create", "-f", "qcow2", "-o", "data_file=dat.raw", "datafile.qcow2", "8M")
    io("datafile.qcow2", "write -P 7 0 64k", "write -P 8 5M 64k")
    q("convert", "-c", "-f", "raw", "-O", "qcow2", "sparse.raw", "compressed.qcow2")
    q("create", "-f", "qcow2", "snap.qcow2", "8M")
    io("snap.qcow2", "write -P 9 0 64k")
    q("snapshot", "-c", "first", "snap.qcow2")
    io("snap.qcow2", "write -P 10 0 64k")
    q("create", "-f", "qcow2", "-b", "sparse.raw", "-F", "raw", "over-raw.qcow2")
    io("over-raw.qcow2", "write -P 11 3M 64k", "write -z 5M 64k")
    q("create", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", "over-qcow2.qcow2")
    io("over-qcow2.qcow2", "write -P 12 64k 4k")
    q("create", "-f", "vpc", "-o", "subformat=dynamic", "dynamic.vhd", "8M")
    io("dynamic.vhd", "write -P 13 0 64k", "write -P 14 4M 64k", fmt="vpc")
    q("create", "-f", "qcow", "v1.qcow", "8M")
    io("v1.qcow", "write -P 15 0 64k", fmt="qcow")
    # A fixed VHD is a raw file with a footer: holes where nothing was written, which
    # qemu's map reports as zero (vpc asks the file beneath: BDRV_BLOCK_RECURSE).
    q("create", "-f", "vpc", "-o", "subformat=fixed", "fixed.vhd", "8M")
    io("fixed.vhd", "write -P 16 1M 64k", "write -P 17 6M 4k", fmt="vpc")
    # Every cluster allocated, few written: qemu finds the holes under allocated clusters.
    q("create", "-f", "qcow2", "-o", "preallocation=metadata", "prealloc.qcow2", "8M")
    io("prealloc.qcow2", "write -P 18 2M 64k", "write -P 19 5M 128k")
    names = ["full.raw", "sparse.raw", "v2.qcow2", "v3.qcow2", "extl2.qcow2",
             "datafile.qcow2", "compressed.qcow2", "snap.qcow2", "over-raw.qcow2",
             "over-qcow2.qcow2", "dynamic.vhd", "fixed.vhd", "v1.qcow", "prealloc.qcow2"]
    return d, names


def fmt_args(name: str) -> list[str]:
    """A VHD named for both tools: a fixed one probes as raw (its footer is at the end)."""
    return ["-f", "vpc"] if name.endswith(".vhd") else []


def qemu_data_bytes(d: Path, name: str) -> int:
    """The bytes the top layer holds as data, by qemu-img map: what cowd's "allocated in
    this layer" must count (not holes, not zero clusters)."""
    entries = json.loads(qemu_in(d, "map", "--output=json", *fmt_args(name), name).stdout)
    return sum(e["length"] for e in entries if e["depth"] == 0 and e["data"] and not e["zero"])


def without_cowd(doc: object) -> object:
    """qemu's part of a cowd document: every "cowd" key dropped."""
    if isinstance(doc, dict):
        return {k: without_cowd(v) for k, v in doc.items() if k != "cowd"}
    if isinstance(doc, list):
        return [without_cowd(v) for v in doc]
    return doc


def compare(ours: object, theirs: object, where: str) -> None:
    """Key by key, value by value (and type by type: 1 is not True)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), (where, ours)
        assert sorted(ours) == sorted(theirs), (where, sorted(ours), sorted(theirs))
        for k in theirs:
            compare(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), (where, ours, theirs)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            compare(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, (where, ours, theirs)


def test_info_json_equals_qemu(corpus: tuple[Path, list[str]]) -> None:
    d, names = corpus
    for name in names:
        fmt = fmt_args(name)
        theirs = json.loads(qemu_in(d, "info", "--output=json", *fmt, name).stdout)
        ours = json.loads(run_in(d, "info", "--output=json", *fmt, name).stdout)
        assert ours["cowd"]["allocated-bytes"] == qemu_data_bytes(d, name), name
        compare(without_cowd(ours), theirs, name)
        chain_theirs = json.loads(qemu_in(d, "info", "--output=json", "--backing-chain", *fmt,
                                          name).stdout)
        chain_ours = json.loads(run_in(d, "info", "--output=json", "--backing-chain", *fmt,
                                       name).stdout)
        compare(without_cowd(chain_ours), chain_theirs, f"{name} --backing-chain")


def test_info_text_has_no_python_reprs(corpus: tuple[Path, list[str]]) -> None:
    d, names = corpus
    for name in names:
        fmt = fmt_args(name)
        text = run_in(d, "info", "--backing-chain", *fmt, name).stdout
        for word in ("None", "True", "False", "{", "'"):
            assert word not in text, (name, word, text)
        theirs = qemu_in(d, "info", *fmt, name).stdout.splitlines()
        ours = run_in(d, "info", *fmt, name).stdout.splitlines()
        # qemu's lines in qemu's order, then cowd's own line: the top layer's data.
        allocated = f"allocated in this layer: {size_to_str(qemu_data_bytes(d, name))}"
        assert ours == [*theirs, allocated], (name, ours, theirs)


def test_map_json_equals_qemu(corpus: tuple[Path, list[str]]) -> None:
    d, names = corpus
    for name in names:
        fmt = fmt_args(name)
        theirs = json.loads(qemu_in(d, "map", "--output=json", *fmt, name).stdout)
        ours = json.loads(run_in(d, "map", "--output=json", *fmt, name).stdout)
        if name == "extl2.qcow2":
            # qemu gives unallocated subclusters of an allocated cluster the cluster's host
            # offset (and so splits the run there); cowd has no offset for what is not
            # there.  The rest must agree.
            theirs = merge_unallocated(theirs)
        compare(without_cowd(ours), theirs, name)
        assert run_in(d, "map", *fmt, name).stdout == qemu_in(d, "map", *fmt, name).stdout, name


def test_map_holes_under_qcow2_data_as_qemu(tmp_path: Path) -> None:
    """qemu looks at the host file's holes under allocated clusters only when the image
    looks metadata-preallocated (far more clusters in use than on disk): both sides of that
    threshold, and the refcount widths counted bit by bit and word by word."""
    def punched(name: str, size: str, written: str) -> None:
        qemu_img("create", "-f", "qcow2", tmp_path / name, size)
        qemu_io(tmp_path / name, f"write -P 1 0 {written}")
        host = json.loads(qemu_img("map", "--output=json", tmp_path / name).stdout)[0]
        with open(tmp_path / name, "r+b") as f:  # a hole under the third data cluster
            assert fallocate_punch(f.fileno(), host["offset"] + 128 * 1024, 64 * 1024)

    punched("few.qcow2", "8M", "1M")  # metadata clusters are sparse: looks preallocated
    punched("many.qcow2", "16M", "8M")  # far more data than metadata: it does not
    names = ["few.qcow2", "many.qcow2"]
    for bits in (1, 4, 64):
        name = f"prealloc-{bits}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o",
                 f"preallocation=metadata,refcount_bits={bits}", tmp_path / name, "64M")
        qemu_io(tmp_path / name, "write -P 2 1M 64k")
        names.append(name)
    for name in names:
        theirs = json.loads(qemu_in(tmp_path, "map", "--output=json", name).stdout)
        ours = json.loads(run_in(tmp_path, "map", "--output=json", name).stdout)
        compare(without_cowd(ours), theirs, name)
        assert run_in(tmp_path, "map", name).stdout == qemu_in(tmp_path, "map", name).stdout


def test_raw_data_file_holes_in_map_and_convert_as_qemu(tmp_path: Path) -> None:
    """A qcow2 with an external data file (data_file_raw on and off, 64 KiB and 4 KiB
    clusters) whose data file has holes under allocated clusters: never written (qemu
    preallocates the metadata for data_file_raw) and punched under written data.  qemu 7.2
    does not look into the data file in map (its data clusters are not refcounted, so the
    image never looks metadata-preallocated): cowd's map must not either; a zero cluster
    over written data shows its offset in the data file.  convert -O raw
    must leave those holes sparse as qemu-img convert does: the same bytes, the same
    st_blocks (cowd wrote every data cluster of the data file out)."""
    variants = {"raw-on.qcow2": "data_file_raw=on", "raw-off.qcow2": "data_file_raw=off",
                "raw-on-4k.qcow2": "data_file_raw=on,cluster_size=4096"}
    for name, opts in variants.items():
        data = tmp_path / (name + ".data")
        # qemu opens a relative data file from its current folder: run it from tmp_path.
        assert qemu_in(tmp_path, "create", "-q", "-f", "qcow2", "-o",
                       f"data_file={data.name},{opts}", name, "8M").returncode == 0
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 1M",
                        "-c", "write -P 0x32 3M 192k", "-c", "write -P 0x33 5M 64k",
                        "-c", "write -P 0x34 6M 128k", "-c", "write -z 6M 64k", name],
                       check=True, capture_output=True, cwd=tmp_path, timeout=60)
        with open(data, "r+b") as f:  # under written clusters: data clusters read zeroes
            fallocate_punch(f.fileno(), 256 << 10, 256 << 10)
            fallocate_punch(f.fileno(), 3 * MiB + (64 << 10), 64 << 10)
        theirs = json.loads(qemu_in(tmp_path, "map", "--output=json", name).stdout)
        ours = json.loads(run_in(tmp_path, "map", "--output=json", name).stdout)
        compare(without_cowd(ours), theirs, name)
        assert run_in(tmp_path, "map", name).stdout == qemu_in(tmp_path, "map", name).stdout
        q_out, c_out = tmp_path / (name + ".q.raw"), tmp_path / (name + ".c.raw")
        assert qemu_in(tmp_path, "convert", "-O", "raw", name, q_out.name).returncode == 0
        run_in(tmp_path, "convert", "-O", "raw", name, c_out.name)
        assert c_out.read_bytes() == q_out.read_bytes(), name
        # The same data and holes (SEEK_DATA/SEEK_HOLE, read by qemu-img map), and the
        # same space within a few file system blocks (extent tree blocks differ with the
        # order of the writes).
        assert raw_layout(c_out) == raw_layout(q_out), name
        q_bytes, c_bytes = os.stat(q_out).st_blocks * 512, os.stat(c_out).st_blocks * 512
        assert q_bytes < 2 * MiB, (name, q_bytes)  # qemu did keep the holes
        assert abs(c_bytes - q_bytes) <= 16 << 10, (name, c_bytes, q_bytes)


def raw_layout(path: Path) -> list[tuple[int, int, bool]]:
    """(start, length, is zero) of a raw file, as qemu-img map finds its holes."""
    entries = json.loads(qemu_img("map", "--output=json", "-f", "raw", path).stdout)
    return [(e["start"], e["length"], e["zero"]) for e in entries]


def fallocate_punch(fd: int, offset: int, length: int) -> bool:
    from formats.base import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        pytest.skip(f"the test folder cannot punch holes ({e})")
    return True


def merge_unallocated(entries: list[dict[str, object]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for e in entries:
        e = dict(e)
        if not e["present"]:
            e.pop("offset", None)
        last = out[-1] if out else None
        if (last is not None and not last["present"] and not e["present"]
                and last["depth"] == e["depth"]):
            last["length"] = int(last["length"]) + int(e["length"])  # type: ignore[call-overload]
        else:
            out.append(e)
    return out


def test_check_json_equals_qemu(corpus: tuple[Path, list[str]]) -> None:
    d, names = corpus
    for name in names:
        theirs = qemu_in(d, "check", "--output=json", name)
        ours = run_in(d, "check", "--output=json", name, rc=None)
        if theirs.returncode == 63:  # qemu cannot check raw or qcow v1 (cowd can check v1)
            assert name.endswith((".raw", ".qcow", ".vhd")), name
            if name.endswith(".raw"):
                assert ours.returncode == 63 and len(ours.stderr.splitlines()) == 1, ours
            continue
        assert ours.returncode == theirs.returncode, (name, ours.stderr)
        compare(json.loads(ours.stdout), json.loads(theirs.stdout), name)
        assert run_in(d, "check", name).stdout == qemu_in(d, "check", name).stdout, name


# ---- check counts on damaged images ----------------------------------------------------------


def refcount_entry_offset(path: Path, cluster: int) -> int:
    """Where cluster's 16-bit refcount lives (in the first refcount block)."""
    data = path.read_bytes()
    hdr = parse_header(str(path), data[:65536], len(data))
    reftable = hdr.refcount_table_offset
    block = struct.unpack_from(">Q", data, reftable)[0] & ~0x1FF
    assert cluster < (1 << hdr.cluster_bits) // 2
    return block + 2 * cluster


def set_refcount(path: Path, cluster: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(refcount_entry_offset(path, cluster))
        f.write(struct.pack(">H", value))


def damaged(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    def fresh(name: str) -> Path:
        p = tmp_path / name
        qemu_img("create", "-f", "qcow2", p, "16M")
        qemu_io(p, "write -P 1 0 256k", "write -P 2 4M 64k")
        return p

    # Leaks inside the file (the file grown, refcounts set) and past its end (refcounts of
    # clusters the file never reached: qemu ignores them, as cowd must).
    p = fresh("leaks.qcow2")
    end = p.stat().st_size // 65536
    with open(p, "r+b") as f:
        f.truncate((end + 3) * 65536)
    for c in (end, end + 1, end + 2, end + 10, end + 11):
        set_refcount(p, c, 1)
    yield "leaks", p
    # Refcount too low on a data cluster (a corruption, and a COPIED flag now wrong).
    p = fresh("low.qcow2")
    data_cluster = json.loads(qemu_img("map", "--output=json", p).stdout)[0]["offset"] // 65536
    set_refcount(p, data_cluster, 0)
    yield "refcount-too-low", p
    # Refcount 2 on a data cluster: a leak of 1 and a wrong COPIED flag.
    p = fresh("high.qcow2")
    set_refcount(p, data_cluster, 2)
    yield "refcount-too-high", p


def test_check_counts_equal_qemu_on_damaged_images(tmp_path: Path) -> None:
    for what, p in damaged(tmp_path):
        theirs = qemu_img("check", "--output=json", p, check=False)
        ours = run_in(tmp_path, "check", "--output=json", str(p), rc=None)
        assert ours.returncode == theirs.returncode, (what, ours.stderr, theirs.stdout)
        compare(json.loads(ours.stdout), json.loads(theirs.stdout), what)


# ---- the other commands' --output=json, against what qemu-img reads back ---------------------

# id: (cowd arguments, run with --output=json in the images' folder; {key of cowd's document:
# (image, key of `qemu-img info --output=json` of it, read before or after the command)}).
# "-p" where a command has progress: it must go to stderr, never into the document.
LIFECYCLE_JSON_CASES: dict[str, tuple[list[str], dict[str, tuple[str, str, str]]]] = {
    "create": (["create", "--base", "c-base.raw", "-o", "c-new.qcow2", "--size", "3M"],
               {k: ("c-new.qcow2", k, "after")
                for k in ("filename", "format", "virtual-size", "backing-filename",
                          "full-backing-filename", "backing-filename-format")}),
    "convert": (["convert", "-p", "-O", "qcow2", "v-over.qcow2", "v-out.qcow2"],
                {k: ("v-out.qcow2", k, "after") for k in ("filename", "format",
                                                          "virtual-size")}),
    "resize": (["resize", "-p", "r.qcow2", "+1536k"],
               {"filename": ("r.qcow2", "filename", "after"),
                "format": ("r.qcow2", "format", "after"),
                "virtual-size": ("r.qcow2", "virtual-size", "after"),
                "old-size": ("r.qcow2", "virtual-size", "before")}),
    "commit": (["commit", "-p", "m-over.qcow2"],
               {"filename": ("m-over.qcow2", "filename", "after"),
                "base": ("m-over.qcow2", "full-backing-filename", "after"),
                "grown-from": ("m-base.raw", "virtual-size", "before")}),
    "rebase": (["rebase", "-p", "-b", "b-new.qcow2", "-F", "qcow2", "b-over.qcow2"],
               {"filename": ("b-over.qcow2", "filename", "after"),
                "backing-filename": ("b-over.qcow2", "backing-filename", "after"),
                "backing-format": ("b-over.qcow2", "backing-filename-format", "after")}),
    "rebase-unsafe": (["rebase", "-u", "-b", "u-new.raw", "-F", "raw", "u-over.qcow2"],
                      {"filename": ("u-over.qcow2", "filename", "after"),
                       "backing-filename": ("u-over.qcow2", "backing-filename", "after"),
                       "backing-format": ("u-over.qcow2", "backing-filename-format",
                                          "after")}),
}


def lifecycle_json_images(d: Path) -> None:
    """Small images, made by qemu-img and qemu-io, for LIFECYCLE_JSON_CASES (and snapshot -l:
    s.qcow2 with two snapshots, s.raw with none)."""
    def q(*args: str) -> None:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, cwd=d)

    def io(name: str, *cmds: str) -> None:
        subprocess.run(["qemu-io", *(a for c in cmds for a in ("-c", c)), name],
                       check=True, capture_output=True, cwd=d)

    for base in ("c-base.raw", "v-base.raw", "m-base.raw", "b-old.raw", "u-old.raw",
                 "u-new.raw", "s.raw"):
        q("create", "-f", "raw", base, "2M")
    q("create", "-f", "qcow2", "-b", "v-base.raw", "-F", "raw", "v-over.qcow2", "3M")
    io("v-over.qcow2", "write -P 1 64k 64k")
    q("create", "-f", "qcow2", "-o", "cluster_size=4k", "r.qcow2", "1M")
    io("r.qcow2", "write -P 2 0 8k")
    q("create", "-f", "qcow2", "-b", "m-base.raw", "-F", "raw", "m-over.qcow2", "3M")
    io("m-over.qcow2", "write -P 3 2560k 64k")
    q("create", "-f", "qcow2", "b-new.qcow2", "2M")
    q("create", "-f", "qcow2", "-b", "b-old.raw", "-F", "raw", "b-over.qcow2")
    io("b-over.qcow2", "write -P 4 0 4k")
    q("create", "-f", "qcow2", "-b", "u-old.raw", "-F", "raw", "u-over.qcow2")
    q("create", "-f", "qcow2", "s.qcow2", "1M")
    q("snapshot", "-c", "first", "s.qcow2")
    io("s.qcow2", "write -P 5 0 4k")
    q("snapshot", "-c", "second one", "s.qcow2")


def qemu_snapshot_ids_names(d: Path, name: str) -> list[tuple[str, str]]:
    """(ID, TAG) of each row of `qemu-img snapshot -l`'s table (a tag may hold spaces: the
    columns after it are VM SIZE (2 words), DATE (2), VM CLOCK and ICOUNT)."""
    out = qemu_in(d, "snapshot", "-l", name).stdout.splitlines()
    if not out:
        return []
    assert out[0] == "Snapshot list:" and out[1].split()[:2] == ["ID", "TAG"], out
    rows = []
    for line in out[2:]:
        words = line.split()
        rows.append((words[0], " ".join(words[1:-6])))
    return rows


def test_lifecycle_json_as_qemu_reads_the_result(tmp_path: Path) -> None:
    """create, convert, resize, commit, rebase and snapshot -l with --output=json: stdout is
    one JSON document (progress on stderr), and its values are what qemu-img reads back from
    the result (`qemu-img info --output=json`; `qemu-img snapshot -l`'s IDs and tags).
    qemu-img 7.2 has no JSON for any of these commands (only info, map, check and measure
    have --output), so the documents are cowd's own schema, in qemu's key spelling: what is
    compared is their values, not their shape."""
    d = tmp_path
    lifecycle_json_images(d)

    def qemu_info(name: str) -> dict[str, object]:
        doc = json.loads(qemu_in(d, "info", "--output=json", name).stdout)
        assert isinstance(doc, dict)
        return doc

    for case, (args, truth) in LIFECYCLE_JSON_CASES.items():
        before = {img: qemu_info(img) for img, _, when in truth.values() if when == "before"}
        p = run_in(d, *args, "--output=json")
        try:  # only the document: anything else around it fails to parse
            ours = json.loads(p.stdout)
        except json.JSONDecodeError as e:
            pytest.fail(f"{case}: stdout is not one JSON document ({e}): {p.stdout!r}")
        after = {img: qemu_info(img) for img, _, when in truth.values() if when == "after"}
        for key, (img, qemu_key, when) in truth.items():
            theirs = (before if when == "before" else after)[img][qemu_key]
            mine = ours[key]
            if key in ("base", "full-backing-filename"):  # a path: the same file
                assert os.path.samefile(d / mine, d / str(theirs)), (case, key, mine, theirs)
            else:
                assert type(mine) is type(theirs) and mine == theirs, (case, key, mine, theirs)
    for name in ("s.qcow2", "s.raw"):
        ours = json.loads(run_in(d, "snapshot", "-l", "--output=json", name).stdout)
        mine = [(sn["id"], sn["name"]) for sn in ours]
        assert mine == qemu_snapshot_ids_names(d, name), (name, ours)
    assert len(mine) == 0 and len(qemu_snapshot_ids_names(d, "s.qcow2")) == 2


# ---- bad values: one line, no traceback, the README's exit status ----------------------------


def test_every_subcommand_with_bad_values(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    ov = tmp_path / "ov.qcow2"
    run_in(tmp_path, "create", "--base", "base.raw", "-o", "ov.qcow2")
    missing = str(tmp_path / "missing.qcow2")
    snapped = tmp_path / "snapped.qcow2"  # a shrink is refused while it has snapshots
    qemu_img("create", "-f", "qcow2", snapped, "1M")
    qemu_img("snapshot", "-c", "s", snapped)
    run_dir = str(tmp_path / "run")
    usage = [  # exit 2: the command line asks for something impossible
        ("create", "--base", "base.raw", "--cluster-size", "4M", "-o", "a.qcow2"),
        ("create", "--base", "base.raw", "--cluster-size", "3000", "-o", "a.qcow2"),
        ("create", "--base", "base.raw", "--cluster-size", "lots", "-o", "a.qcow2"),
        ("create", "--base", "base.raw", "--overlay", "zip"),
        ("create", "--base", "base.raw", "--size", "1k", "-o", "a.qcow2"),
        ("create", "--base", "base.raw", "-o", "ov.qcow2"),
        ("create",),
        ("info",), ("info", "--output=yaml", str(ov)), ("info", "-f", "zip", str(ov)),
        ("map", "--output", "xml", str(ov)),
        ("check", "-r", "some", str(ov)),
        ("convert", str(ov), str(ov), "-O", "raw"), ("convert", str(ov), "x", "-O", "zip"),
        ("commit",), ("rebase", str(ov)), ("resize", str(ov), "big"),
        ("resize", str(ov)),
        ("commit", "-b", "base-missing.raw", str(ov)), ("commit", "-b", str(ov), str(ov)),
        ("rebase", "-u", "-b", "later.raw", str(ov)),
        ("convert", "-t", "none", str(ov), "x.raw", "-O", "raw"),
        ("snapshot", str(ov)), ("snapshot", "-l", "-c", "x", str(ov)),
        ("snapshot", "-U", "-c", "x", str(ov)), ("snapshot", "-c", "", str(ov)),
        ("daemon", "--no-idle-exit", "--workers", "x", "--run-dir", run_dir),
        ("resize", str(ov), "-1M"),
        ("serve", str(ov), "--nbd", "ftp:x", "--run-dir", run_dir),
        ("serve", str(ov), "--nbd", "tcp:1", "--cache-entries", "-5", "--run-dir", run_dir),
        ("serve", str(ov), "--nbd", "tcp:1", "--cache-max-age", "nan", "--run-dir", run_dir),
        ("daemon", "--readahead", "x", "--run-dir", run_dir),
        ("daemon", "--workers", "9999", "--run-dir", run_dir),
        ("attach", str(ov), "--via", "floppy", "--run-dir", run_dir),
        ("attach", str(ov), "--kmod-entries", "2", "--run-dir", run_dir),
        ("attach", str(ov), "--kmod-timeout", "-1", "--run-dir", run_dir),
        ("stats", "--output", "csv", "--run-dir", run_dir),
        ("stop", "--timeout", "0", "--run-dir", run_dir),
        ("list", "--bogus"), ("frobnicate",), (),
        ("status", "--output", "csv", "--run-dir", run_dir),
        ("cache", "show", "--range", "x"), ("cache", "verify", "--range", "0:4k", str(ov)),
        ("cache", "drop", "--all", "--range", "0:4k"),
        ("cache", "prefetch", "nbd://127.0.0.1:1/x", "--range", "1M"),
        ("cache", "prefetch", "nbd://127.0.0.1:1/x", "--range", "1M:lots"),
        ("cache", "prefetch", "nbd://127.0.0.1:1/x", "--range", "1M:0"),
        ("cache", "frobnicate"),
    ]
    failed = [  # exit 1: well formed, but an image is missing or no daemon runs
        ("info", missing), ("map", missing), ("check", missing), ("commit", missing),
        ("rebase", "-b", "base.raw", missing), ("resize", missing, "+1M"),
        ("commit", str(tmp_path / "base.raw")), ("rebase", "-b", "nothere.raw", str(ov)),
        ("rebase", "-b", "../x.raw", str(ov)), ("snapshot", "-c", "x", missing),
        ("snapshot", "-d", "nothere", str(ov)), ("snapshot", "-c", "x", "base.raw"),
        ("resize", "--shrink", str(snapped), "-512k"),
        ("convert", missing, str(tmp_path / "out.raw"), "-O", "raw"),
        ("create", "--base", missing),
        ("detach", "/dev/loop999", "--run-dir", run_dir),
        ("stats", "--run-dir", run_dir), ("stop", "--run-dir", run_dir),
        ("attach", missing, "--via", "fuse", "--run-dir", run_dir),
        ("cache", "show", "base.raw"), ("cache", "show", missing),
    ]
    for rc, cases in ((2, usage), (1, failed)):
        for args in cases:
            p = run_in(tmp_path, *args, rc=None)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == rc and len(lines) == 1, (args, p.returncode, p.stderr)
            assert lines[0].startswith("cowd"), (args, lines)


def test_absolute_overlay_outside_its_folder_opens_without_allowing(tmp_path: Path) -> None:
    """--absolute: the user chose the name, so cowd opens what it created (trust.py); the
    same image copied by someone else (another inode) is still refused."""
    (tmp_path / "bases").mkdir()
    (tmp_path / "vms").mkdir()
    base = tmp_path / "bases" / "base.raw"
    base.write_bytes(os.urandom(MiB))
    env = dict(os.environ, COWD_STATE_DIR=str(tmp_path / "state"))

    def cowd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*COWD, *args], capture_output=True, text=True, timeout=60,
                              env=env)

    ov = tmp_path / "vms" / "ov.qcow2"
    p = cowd("create", "--base", str(base), "--absolute", "-o", str(ov))
    assert p.returncode == 0 and not p.stderr, p
    p = cowd("info", "--output=json", str(ov))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["backing-filename"] == str(base)
    out = tmp_path / "vms" / "out.raw"
    assert cowd("convert", str(ov), str(out), "-O", "raw").returncode == 0
    assert out.read_bytes() == base.read_bytes()
    copy = tmp_path / "vms" / "copy.qcow2"
    copy.write_bytes(ov.read_bytes())
    p = cowd("info", str(copy))
    assert p.returncode == 1 and "outside" in p.stderr, p
    # Without --absolute the note says what to do.
    p = cowd("create", "--base", str(base), "-o", str(tmp_path / "vms" / "rel.qcow2"))
    assert p.returncode == 0 and "--absolute" in p.stderr, p
