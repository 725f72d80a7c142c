"""Real peers (qemu-img, qemu-io) as oracles, the skip reasons when one is missing, and the
command a user types (:data:`COWD`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The console script a user types (installed editable into the venv by `make check`), or the
# module where no script is installed beside this interpreter.
_SCRIPT = Path(sys.executable).parent / "cowd"
COWD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cowd.cli"]


def need(tool: str) -> None:
    """Skip with the concrete reason when a peer tool is missing (make check installs it)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (make check installs it from packages.txt)")


def missing_tool(*tools: str) -> str | None:
    """The skip reason for the first tool not on PATH, or None."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (make check installs it from packages.txt)"
    return None


def run(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run([os.fspath(a) for a in args], capture_output=True, timeout=timeout,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {p.returncode}:\n"
            f"{p.stdout.decode(errors='replace')}\n{p.stderr.decode(errors='replace')}"
        )
    return p


def qemu_img(*args: str | os.PathLike[str],
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
    need("qemu-img")
    return run("qemu-img", *args, check=check)


def qemu_io(image: str | os.PathLike[str], *cmds: str, fmt: str | None = None) -> None:
    need("qemu-io")
    args: list[str | os.PathLike[str]] = ["qemu-io"]
    if fmt:
        args += ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    args.append(image)
    p = run(*args)
    out = p.stdout.decode(errors="replace")
    if "error" in out.lower() or "failed" in out.lower():
        raise AssertionError(f"qemu-io {cmds}: {out}")


def qemu_raw(image: str | os.PathLike[str], tmp: Path, fmt: str | None = None) -> bytes:
    """The oracle: the virtual disk as qemu-img convert -O raw reads it."""
    out = tmp / f"oracle-{hashlib.sha1(os.fsencode(image)).hexdigest()[:8]}.raw"
    # -U: also while a daemon serves it (cowd holds qemu's image locks, cowd/imagelock.py).
    args: list[str | os.PathLike[str]] = ["convert", "-U"]
    if fmt:
        args += ["-f", fmt]
    args += ["-O", "raw", image, out]
    qemu_img(*args)
    data = out.read_bytes()
    out.unlink()
    return data


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_all(img: object) -> bytes:
    """Every guest byte through formats/, in chunks that straddle clusters."""
    from formats import Image

    assert isinstance(img, Image)
    out = bytearray()
    step = 3 * 65536 + 4096  # deliberately unaligned to cluster boundaries
    pos = 0
    while pos < img.virtual_size:
        n = min(step, img.virtual_size - pos)
        out += img.read(pos, n)
        pos += n
    return bytes(out)


def qemu_check(image: str | os.PathLike[str],
               fmt: str = "qcow2") -> subprocess.CompletedProcess[bytes]:
    """qemu-img check must report no errors and no leaks."""
    p = qemu_img("check", "-f", fmt, image, check=False)
    assert p.returncode == 0, (
        f"qemu-img check {image}: rc={p.returncode}\n{p.stdout.decode()}{p.stderr.decode()}")
    return p
