"""Smoke test of tools/bench_formats.py: a --quick run produces every figure.

Not a timing test: it checks that the benchmark runs end to end against the real peers
(qemu-img, qemu-io), that each figure it promises is in the JSON with one positive value per
repetition, that the Markdown table shows them, and that the work directory is gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.bench import tool_env
from tests.support.peers import need

SCRIPT = [sys.executable, "-m", "tools.bench", "formats"]

LOOKUP_TAGS = ("qcow2", "vhd-4k", "vhd-block")
LOOKUP_FIGURES = ("open.cold", "resolve.cold", "resolve.warm", "read.cold", "read.warm",
                  "qemu.read.cold", "qemu.read.warm")
LOOKUP_RATIOS = (("resolve.cold", "qemu.read.cold"), ("resolve.warm", "qemu.read.warm"),
                 ("read.cold", "qemu.read.cold"), ("read.warm", "qemu.read.warm"))
WRITE_TAGS = ("qcow2-overlay", "vhd-dynamic", "vhd-differencing")
WRITE_FIGURES = ("write.seq", "write.rand", "write.seq.flush", "write.rand.flush")


def expected_keys() -> set[str]:
    keys = set()
    for tag in LOOKUP_TAGS:
        keys |= {f"{tag}.{f}" for f in LOOKUP_FIGURES}
        keys |= {f"{tag}.{a}/{tag}.{b}" for a, b in LOOKUP_RATIOS}
    for tag in WRITE_TAGS:
        keys |= {f"{tag}.{f}" for f in WRITE_FIGURES}
        # qemu cannot write differencing VHDs: those rows stand beside qemu's dynamic VHD.
        peer = "vhd-dynamic" if tag == "vhd-differencing" else tag
        keys.add(f"{tag}.write.seq/{peer}.qemu.write.writeback")
        keys.add(f"{tag}.write.seq.vs_none/{peer}.qemu.write.none")
    for tag in ("qcow2-overlay", "vhd-dynamic"):
        keys |= {f"{tag}.qemu.write.writeback", f"{tag}.qemu.write.none"}
    return keys


@pytest.mark.qemu
def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    need("qemu-img")
    need("qemu-io")
    out = tmp_path / "bench-formats.json"
    # No cache drop: a smoke run must not slow down whatever else runs on the machine.
    p = subprocess.run([*SCRIPT, "--quick", "--no-drop-caches",
                        "--out", str(out)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=tool_env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"

    doc = json.loads(out.read_text())
    for key in ("date", "kernel", "machine", "commit", "qemu_img"):
        assert doc[key], key
    assert doc["params"]["reps"] == 1 and doc["params"]["quick"] is True
    assert doc["cache_dropped"] is False
    assert not Path(doc["workdir"]).exists(), "work directory left behind"

    figures = {f["key"]: f for f in doc["figures"]}
    missing = expected_keys() - figures.keys()
    assert not missing, f"figures missing: {sorted(missing)}"
    for key, f in figures.items():
        assert len(f["reps"]) == 1, key
        assert all(isinstance(v, float | int) and v > 0 for v in f["reps"]), (key, f["reps"])
        assert f["median"] > 0 and f["min"] <= f["median"] <= f["max"], key

    table = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| image | figure | cowd | qemu-img bench")
    shown = "\n".join(table)
    for f in figures.values():
        if f["unit"] != "ratio" and ".qemu." not in f["key"] and "vs_none" not in f["key"]:
            assert f["what"] in shown, f["key"]
    # every sequential first-write row carries both ratios
    assert sum(" vs -t writeback; " in line for line in table) == len(WRITE_TAGS)


@pytest.mark.qemu
def test_quick_convert_run_pairs_every_output(tmp_path: Path) -> None:
    """``formats --convert --quick``: every output format and durability pairing has one
    cowd and one qemu-img time and a ratio per repetition, and the table shows them."""
    need("qemu-img")
    need("qemu-io")
    out = tmp_path / "bench-convert.json"
    scratch = Path("/var/tmp")
    before = {n.name for n in scratch.iterdir() if n.name.startswith("cowd-bench-convert-")}
    p = subprocess.run([*SCRIPT, "--convert", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=tool_env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    doc = json.loads(out.read_text())
    for key in ("date", "commit", "machine", "qemu_img", "loadavg"):
        assert doc[key], key
    keys = {f["key"] for f in doc["figures"]}
    assert keys == {"raw.unsafe", "raw.writeback", "qcow2.unsafe", "qcow2.writeback"}
    for f in doc["figures"]:
        reps = doc["params"]["reps"]
        assert len(f["cowd_s"]) == len(f["qemu_s"]) == len(f["ratios"]) == reps >= 3
        assert all(v > 0 for v in f["cowd_s"] + f["qemu_s"])
        assert f["key"].replace(".", ", ") in p.stdout
    after = {n.name for n in scratch.iterdir() if n.name.startswith("cowd-bench-convert-")}
    assert after <= before, "work directory left behind"
