"""The image commands through the real `cowd` console script, checked against qemu-img."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.peers import COWD, qemu_check, qemu_img, qemu_io, qemu_raw, sha256

MiB = 1 << 20


def cowd(*args: str | os.PathLike[str], rc: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*COWD, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, f"cowd {args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    return path


def test_create_qcow_overlay_is_a_qcow2_qemu_reads(base: Path, tmp_path: Path) -> None:
    before = sha256(base)
    p = cowd("create", "--base", base, "--overlay", "qcow")
    out = Path(p.stdout.strip())
    assert out == tmp_path / "base-overlay.qcow2"
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", out).stdout)
    assert info[0]["format"] == "qcow2"
    assert info[0]["backing-filename"] == "base.img"  # relative to the overlay
    assert info[0]["backing-filename-format"] == "raw"
    assert info[1]["filename"] == str(base)
    qemu_check(out)
    assert qemu_raw(out, tmp_path) == base.read_bytes()
    # A second overlay of the same base gets its own name.
    p2 = cowd("create", "--base", base, "--overlay", "qcow2")
    assert Path(p2.stdout.strip()) == tmp_path / "base-overlay-2.qcow2"
    assert sha256(base) == before


def test_create_size_larger_than_the_base_equals_qemu(base: Path, tmp_path: Path) -> None:
    """--size makes an overlay larger than its base, as `qemu-img create -b BASE -F raw
    OVERLAY SIZE`: the same virtual size, the range past the base reads as zeroes, and
    qemu-img check is clean."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    cowd("create", "--base", base, "--overlay", "qcow", "-o", ours, "--size", "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", theirs, "8M")
    sizes = [json.loads(qemu_img("info", "--output=json", f).stdout)["virtual-size"]
             for f in (ours, theirs)]
    assert sizes == [8 * MiB, 8 * MiB], sizes
    qemu_check(ours)
    data = qemu_raw(ours, tmp_path)
    assert data == qemu_raw(theirs, tmp_path)
    assert data == base.read_bytes() + bytes(8 * MiB - base.stat().st_size)


def test_create_extended_l2_is_what_qemu_makes(base: Path, tmp_path: Path) -> None:
    """--extended-l2: qemu's extended_l2=on with 128 KiB clusters unless --cluster-size says
    otherwise; qemu writes subclusters into it and reads it back.  Refused for a VHD and for
    clusters under 16 KiB, in one line, exit 2."""
    ov = tmp_path / "ext.qcow2"
    cowd("create", "--base", base, "--extended-l2", "-o", ov)
    info = json.loads(qemu_img("info", "--output=json", ov).stdout)
    assert info["cluster-size"] == 128 * 1024
    assert info["format-specific"]["data"]["extended-l2"] is True
    qemu_io(ov, "write -P 0x11 4k 4k", "write -P 0x22 300k 1000")
    qemu_check(ov)
    want = bytearray(base.read_bytes())
    want[4096:8192] = b"\x11" * 4096
    want[300 * 1024:300 * 1024 + 1000] = b"\x22" * 1000
    assert qemu_raw(ov, tmp_path) == bytes(want)
    ov2 = tmp_path / "ext64.qcow2"
    cowd("create", "--base", base, "--extended-l2", "--cluster-size", "64k", "-o", ov2)
    assert json.loads(qemu_img("info", "--output=json", ov2).stdout)["cluster-size"] == 65536
    for args, why in ((["--cluster-size", "8k"], "16k or more"),
                      (["--overlay", "vhd"], "only for a qcow2 overlay")):
        p = cowd("create", "--base", base, "--extended-l2", "-o", tmp_path / "no", *args,
                 rc=2)
        assert why in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "no").exists()


def test_info_and_map_match_qemu(base: Path, tmp_path: Path) -> None:
    ov = tmp_path / "ov.qcow2"
    cowd("create", "--base", base, "--overlay", "qcow", "-o", ov)
    qemu_io(ov, "write -P 0x11 64k 64k", "write -z 1M 128k", "write -P 0x22 2M 4k")
    doc = json.loads(cowd("info", "--json", ov).stdout)
    assert doc["format"] == "qcow2"
    assert doc["virtual-size"] == base.stat().st_size
    chain = json.loads(cowd("info", "--output=json", "--backing-chain", ov).stdout)
    assert chain[1]["format"] == "raw"
    assert doc["cowd"]["allocated-bytes"] == 64 * 1024 + 64 * 1024  # data: not the zeroes
    text = cowd("info", ov).stdout
    assert "backing file: base.img (actual path: " in text
    assert "backing file format: raw" in text

    ours = json.loads(cowd("map", "--json", ov).stdout)
    theirs = json.loads(qemu_img("map", "--output=json", ov).stdout)
    assert ours == theirs  # the raw base's holes too (SEEK_HOLE)
    assert sum(e["length"] for e in ours) == base.stat().st_size
    assert "0x10000" in cowd("map", ov).stdout


def test_convert_round_trips(base: Path, tmp_path: Path) -> None:
    ov = tmp_path / "ov.qcow2"
    cowd("create", "--base", base, "--overlay", "qcow", "-o", ov)
    qemu_io(ov, "write -P 0x33 100k 300k", "write -z 0 64k", "discard 2M 64k")
    want = qemu_raw(ov, tmp_path)
    for fmt, qfmt in (("raw", "raw"), ("qcow2", "qcow2"), ("vhd", "vpc")):
        out = tmp_path / f"out.{fmt}"
        cowd("convert", ov, out, "-O", fmt)
        assert qemu_raw(out, tmp_path, fmt=qfmt)[: len(want)] == want, fmt
        if fmt == "qcow2":
            qemu_check(out)
            assert json.loads(qemu_img("info", "--output=json", out).stdout).get(
                "backing-filename") is None


@pytest.mark.parametrize("flags", [[], ["-t", "unsafe"]], ids=["writeback", "unsafe"])
def test_convert_long_runs_stay_sparse(tmp_path: Path, flags: list[str]) -> None:
    """Runs longer than convert's chunk, zero clusters, a raw base's hole and an unaligned
    write: the output reads as qemu reads the chain, and only data is allocated in it."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-f", "raw", base, "24M")
    qemu_io(base, "write -P 1 0 12M", fmt="raw")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw",
             top)
    qemu_io(top, "write -P 2 5M 4M", "write -z 10M 1M", "write -P 3 20971520 5000")
    want = qemu_raw(top, tmp_path)
    data_bytes = 12 * MiB - MiB + 8192  # the base's data less the zeroed MiB, + the write
    for fmt, qfmt in (("raw", "raw"), ("qcow2", "qcow2"), ("vhd", "vpc")):
        out = tmp_path / f"out.{fmt}"
        cowd("convert", *flags, top, out, "-O", fmt)
        assert qemu_raw(out, tmp_path, fmt=qfmt)[: len(want)] == want, fmt
        if fmt == "qcow2":
            qemu_check(out)
        used = out.stat().st_blocks * 512
        assert used < data_bytes + 4 * MiB, (fmt, used)  # holes and zeroes not written


# qemu-img -p's plain progress, which it writes to stdout even when that is no terminal.
QEMU_PROGRESS = re.compile(r"    \(0\.00/100%\)\r(    \(\d{1,3}\.\d\d/100%\)\r)*"
                           r"    \(100\.00/100%\)\r\n")


def cowd_raw(*args: str | os.PathLike[str]) -> tuple[str, str]:
    """stdout and stderr with their carriage returns (text mode would make them newlines)."""
    p = subprocess.run([*COWD, *map(str, args)], capture_output=True, timeout=120, check=True)
    return p.stdout.decode(), p.stderr.decode()


def test_convert_progress_on_a_pipe_as_qemu(base: Path, tmp_path: Path) -> None:
    """convert -p with stdout and stderr on pipes prints what qemu-img convert -p prints
    there; -q and no flag print nothing; with --output=json the progress moves to stderr
    and stdout stays one JSON document."""
    q = qemu_img("convert", "-p", "-O", "qcow2", base, tmp_path / "theirs.qcow2")
    assert QEMU_PROGRESS.fullmatch(q.stdout.decode()), q.stdout
    out, err = cowd_raw("convert", "-p", "-O", "qcow2", base, tmp_path / "ours.qcow2")
    assert QEMU_PROGRESS.fullmatch(out), repr(out)
    assert err == ""
    for flags in (["-q"], []):
        p = cowd("convert", *flags, "-O", "raw", base, tmp_path / f"q{len(flags)}.raw")
        assert (p.stdout, p.stderr) == ("", "")
    out, err = cowd_raw("convert", "-p", "--output=json", "-O", "raw", base, tmp_path / "j.raw")
    assert json.loads(out)["virtual-size"] == 4 * MiB
    assert QEMU_PROGRESS.fullmatch(err), repr(err)
    assert qemu_raw(tmp_path / "ours.qcow2", tmp_path) == base.read_bytes()


def test_check_reports_clean_and_exit_codes(base: Path, tmp_path: Path) -> None:
    ov = tmp_path / "ov.qcow2"
    cowd("create", "--base", base, "--overlay", "qcow", "-o", ov)
    qemu_io(ov, "write -P 0x44 0 1M")
    assert "No errors" in cowd("check", ov).stdout
    res = json.loads(cowd("check", "--json", ov).stdout)
    assert "corruptions" not in res and "leaks" not in res and res["check-errors"] == 0


def test_errors_are_one_line(base: Path, tmp_path: Path) -> None:
    one_line_error(cowd("create", "--base", tmp_path / "nope.img", rc=1), "nope.img", "not found")
    one_line_error(cowd("create", "--base", base, "--overlay", "vhd", rc=2), "base.img",
                   "VHD base")
    one_line_error(cowd("create", "--base", base, "--overlay", "zip", rc=2), "--overlay")
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", bad, "1M")
    data = bytearray(bad.read_bytes())
    data[20:24] = (1 << 31).to_bytes(4, "big")  # cluster_bits: absurd
    bad.write_bytes(bytes(data))
    one_line_error(cowd("info", bad, rc=1), str(bad), "cluster_bits")
    one_line_error(cowd("convert", base, base, "-O", "raw", rc=2), "already exists")


def test_convert_odd_sized_raw(tmp_path: Path) -> None:
    """qcow2 and VHD disks are whole sectors: the last one is zero-padded, like qemu-img."""
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(100_000))
    for fmt, qfmt in (("qcow2", "qcow2"), ("vhd", "vpc")):
        out = tmp_path / f"odd.{fmt}"
        cowd("convert", src, out, "-O", fmt)
        data = qemu_raw(out, tmp_path, fmt=qfmt)
        assert data[:100_000] == src.read_bytes() and not any(data[100_000:]), fmt


def test_closed_stdout_is_quiet(base: Path, tmp_path: Path) -> None:
    """`cowd map IMAGE | head` must not print a traceback or an error when head exits."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before cowd writes
    p = subprocess.run([*COWD, "info", str(base)], stdout=w, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    os.close(w)
    assert p.returncode == 141 and p.stderr == "", (p.returncode, p.stderr)
