"""What the guest tests share (tests/guest/test_kmod.py, test_nbd_attach.py): each boots one
virtme-ng guest of Debian's kernel (tools/guest.py), runs a shell script that prints
``CHECK name ok|fail ...`` lines, then compares the images it wrote on the host.

- :data:`SHELL` defines the script's ``check NAME RC [NOTE]`` and ``t LABEL`` (a timestamp).
- :func:`skip_without_guest` skips the test where no guest can boot (tools, vng, kernel).
- :func:`patterned_base`, :func:`small_tree`: the inputs; :func:`parse_checks`: the output;
  :func:`raw_of`: an image as qemu-img reads it (the host's oracle).
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.support.peers import missing_tool, qemu_img
from tools import guest

MiB = 1 << 20

# Put into a script with str.format (as a value, so its braces are not format fields).
# check NAME RC [DETAIL]: a CHECK line for parse_checks, and a T line with the guest's
# uptime (where a boot's minutes go: the guest logs say, for trimming the suite's time).
SHELL = r"""t() { echo "T $(cut -d' ' -f1 /proc/uptime) $*"; }
check() {
  t "$1"
  if [ "$2" = 0 ]; then echo "CHECK $1 ok ${3:-}"; else echo "CHECK $1 fail rc=$2 ${3:-}"; fi
}
"""


def skip_without_guest(*tools: str) -> str:
    """Skip unless ``tools``, virtme-ng and a kernel with headers are here; the kernel's
    version."""
    for tool in ("qemu-system-x86_64", *tools):
        if missing_tool(tool):
            pytest.skip(f"{tool} not installed")
    if shutil.which("vng") is None and not (Path(sys.executable).parent / "vng").exists():
        pytest.skip("virtme-ng (vng) not installed")
    try:
        return guest.kernel()[0]
    except RuntimeError as e:
        pytest.skip(str(e))


def patterned_base(path: Path, size: int, rng: random.Random) -> str:
    """A raw base of ``size`` bytes with 1 MiB of random data every 4 MiB; its sha256."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4 * MiB):
            f.seek(off)
            f.write(rng.randbytes(MiB))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_tree(root: Path, rng: random.Random, dirs: int, files: int) -> None:
    """``dirs`` directories of ``files`` random files (0-24 KiB each) and a symlink."""
    for d in range(dirs):
        sub = root / f"dir{d}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"f{f}.bin").write_bytes(rng.randbytes(rng.randrange(0, 24 << 10)))
    (root / "link").symlink_to("dir0/f0.bin")


def parse_checks(out: str) -> dict[str, str]:
    """The script's CHECK lines: name -> "ok ..." or "fail rc=N ..."."""
    return {m.group(1): m.group(2) + m.group(3)
            for m in re.finditer(r"^CHECK (\S+) (ok|fail)(.*)$", out, re.M)}


def raw_of(d: Path, name: str, fmt: str = "qcow2") -> bytes:
    """``d/name`` converted to raw by qemu-img (once; kept beside it as NAME.raw)."""
    out = d / (name + ".raw")
    if not out.exists():
        qemu_img("convert", "-f", fmt, "-O", "raw", str(d / name), str(out))
    return out.read_bytes()
