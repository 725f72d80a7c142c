#!/usr/bin/env python3
"""Run a shell script inside a virtme-ng guest on Debian's kernel (the kernel shim's tests and
benchmark run there: the host kernel loads no modules).

The guest sees the host's filesystem as its root over 9p, which under TCG makes every file
operation a slow round trip: a Python start-up that touches a few hundred files took 20-45 s.
So the guest gets its own Python: this module packs the interpreter, its standard library and
cowd's runtime dependencies into one tar (built once, cached under build/guest/ by content
key), and the guest unpacks it into RAM before the script runs.  cowd itself is imported from
the checkout (a few dozen files).  In the script, ``python3`` and ``cowd`` are that runtime.

    tools/guest.py [--rwdir DIR] [--memory 1G] -- 'cowd attach ... --via kmod'

Functions for tests and tools: :func:`kernel` (the kernel with installed headers),
:func:`build_module`, :func:`run`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "guest"
KMOD = ROOT / "kmod"

# Parts of the standard library cowd never imports (with stripping, the tar is ~35 MB).
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
               "ensurepip", "lib2to3", "pydoc_data", "unittest", "__phello__"}
SKIP_PARTS = {"_tests", "tests"}
# Extension modules nobody in the guest imports: CPython's own test modules, GUI/terminal/db
# bindings, and zstandard's second (cffi) backend beside its C one.
SO_SKIP_PREFIXES = ("_test", "_xxtest", "_ctypes_test", "xxlimited", "xxsubtype", "_tkinter",
                    "_curses", "_sqlite3", "_dbm", "_gdbm", "_cffi.")
# Bumped when the way the tar is made changes (the content key covers only the sources).
TAR_FORMAT = "2: stripped ELF objects, one copy of libpython"
GUEST_PY = "/tmp/cowd-py"
DEFAULT_MEMORY = "1G"


def kernel() -> tuple[str, str]:
    """(version, vmlinuz path) of the newest installed kernel that has its headers."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        ver = vmlinuz.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / ver / "build" / "Makefile").exists():
            found.append((ver, str(vmlinuz)))
    if not found:
        raise RuntimeError("no kernel in /boot with headers under /lib/modules/VER/build "
                           "(Debian packages linux-image-amd64 and linux-headers-amd64)")
    found.sort(key=lambda v: [int(x) if x.isdigit() else 0
                              for x in v[0].replace("-", ".").split(".")])
    return found[-1]


def build_module(version: str | None = None) -> Path:
    """``make -C kmod`` for ``version`` (default: :func:`kernel`); returns the .ko."""
    ver = version or kernel()[0]
    subprocess.run(["make", "-s", "-C", str(KMOD), f"KVER={ver}"], check=True,
                   stdout=subprocess.DEVNULL)
    ko = KMOD / "cowd.ko"
    info = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True,
                          text=True, check=True).stdout
    if not info.startswith(ver + " "):
        raise RuntimeError(f"{ko}: built for {info.split()[0]!r}, not {ver!r}: run "
                           f"`make -C kmod clean`")
    return ko


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]


def runtime_packages() -> set[str]:
    """The top-level import names of cowd's runtime dependencies (pyproject.toml's
    ``dependencies``) and of theirs, transitively through their installed metadata
    (requirements whose environment marker does not hold here are left out): what the
    guest's Python is given, so a new dependency reaches the guest without an edit here (a
    fixed list once missed urllib3 and xxhash, and every guest attach failed on the import)."""
    from packaging.markers import Marker  # pytest's own dependency, in every venv we run in

    def name_of(req: str) -> str | None:
        spec, _, marker = req.partition(";")
        if marker and not Marker(marker).evaluate({"extra": ""}):
            return None
        m = re.match(r"[A-Za-z0-9_.-]+", spec.strip())
        return m.group(0) if m else None

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [n for r in project["dependencies"] if (n := name_of(r))]
    names: set[str] = set()
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        d = importlib.metadata.distribution(name)
        names.update(f.parts[0].removesuffix(".py") for f in d.files or ()
                     if len(f.parts) > 1 or f.parts[0].endswith((".py", ".so"))
                     if not f.parts[0].endswith((".dist-info", ".egg-info", ".pth"))
                     and f.parts[0] not in ("..", "__pycache__"))
        todo += [n for r in d.requires or () if (n := name_of(r))]
    return names


def _runtime_sources() -> list[tuple[Path, str]]:
    """(source, name in the tar) for everything the guest's Python needs."""
    out: list[tuple[Path, str]] = []
    exe = Path(os.path.realpath(sys.executable))
    out.append((exe, "bin/python3"))
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and (str(ldlib).endswith(".so") or ".so." in str(ldlib)):
        so = Path(libdir) / str(ldlib)
        real = Path(os.path.realpath(so))
        if real.exists():
            out.append((real, f"lib/{real.name}"))
            if so.name != real.name:
                out.append((real, f"lib/{so.name}"))
            instsoname = sysconfig.get_config_var("INSTSONAME")
            if instsoname and instsoname not in (so.name, real.name):
                out.append((real, f"lib/{instsoname}"))
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = next((Path(p) for p in sys.path if p.endswith("lib-dynload")),
                   stdlib / "lib-dynload")
    for base, dest in ((stdlib, f"lib/{ver}"), (dynload, f"lib/{ver}/lib-dynload")):
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if rel.parts[0] in STDLIB_SKIP or SKIP_PARTS & set(rel.parts) or \
                    rel.parts[0].startswith("config-") or path.is_dir():
                continue
            if (base == stdlib and rel.parts[0] == "lib-dynload") or ".opt-" in path.name or \
                    path.name.startswith(SO_SKIP_PREFIXES):
                continue
            out.append((path, f"{dest}/{rel}"))
    packages = runtime_packages()
    for site in _site_dirs():
        for entry in sorted(site.iterdir()):
            name = entry.name
            stem = name.split(".")[0].split("-")[0]
            if stem not in packages or name.endswith((".dist-info", ".pth")):
                continue
            files = [entry] if entry.is_file() else sorted(entry.rglob("*"))
            for path in files:
                rel = path.relative_to(site)
                if path.is_dir() or SKIP_PARTS & set(rel.parts) or ".opt-" in path.name or \
                        path.name.startswith(SO_SKIP_PREFIXES):
                    continue
                out.append((path, f"lib/{ver}/site-packages/{rel}"))
    return out


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def runtime_tar() -> Path:
    """The guest's Python as one tar, rebuilt when any file in it changes.

    Every 9p byte is slow in the guest, so the tar is kept small: ELF objects are stripped of
    symbols (libpython 23 -> 6 MB, zstandard's backend 12 -> 1 MB) and a file that appears
    under several names (libpython's sonames) is stored once, the other names as symlinks."""
    sources = _runtime_sources()
    key = hashlib.sha256(TAR_FORMAT.encode())
    for src, name in sources:
        st = src.stat()
        key.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest = key.hexdigest()[:16]
    tar = BUILD / f"pyrt-{digest}.tar"
    if tar.exists():
        return tar
    BUILD.mkdir(parents=True, exist_ok=True)
    for old in BUILD.glob("pyrt-*.tar"):
        old.unlink()
    tmp = tar.with_suffix(".tmp")
    strip = shutil.which("strip")
    stored: dict[Path, str] = {}
    scratch = BUILD / "strip.tmp"
    try:
        with tarfile.open(tmp, "w") as t:
            for src, name in sources:
                if src in stored:
                    link = tarfile.TarInfo(name)
                    link.type = tarfile.SYMTYPE
                    link.linkname = os.path.relpath(stored[src], os.path.dirname(name))
                    t.addfile(link)
                    continue
                stored[src] = name
                if strip and _is_elf(src) and subprocess.run(
                        [strip, "--strip-unneeded", "-o", str(scratch), str(src)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                    info = t.gettarinfo(str(src), arcname=name)
                    info.size = scratch.stat().st_size
                    with open(scratch, "rb") as f:
                        t.addfile(info, f)
                else:
                    t.add(src, arcname=name, recursive=False)
    finally:
        scratch.unlink(missing_ok=True)
    tmp.rename(tar)
    return tar


def prologue(tar: Path) -> str:
    """Shell lines that give the guest script its Python and `cowd`."""
    py = GUEST_PY
    return "\n".join([
        "set -u",
        f"mkdir -p {py} && tar -xf {shlex.quote(str(tar))} -C {py}",
        "echo \"guest: python unpacked at $(cut -d' ' -f1 /proc/uptime) s\"",
        f"export PYTHONHOME={py} LD_LIBRARY_PATH={py}/lib PYTHONPATH={shlex.quote(str(ROOT))}",
        f"export PYTHONDONTWRITEBYTECODE=1 PATH={py}/bin:$PATH",
        f"printf '#!/bin/sh\\nexec {py}/bin/python3 -m cowd.cli \"$@\"\\n' > {py}/bin/cowd",
        f"chmod +x {py}/bin/cowd",
        f"cd {shlex.quote(str(ROOT))}",
        # The device of the Nth disk run() attached (virtio-blk, named in order; no udev).
        "guest_disk() { local d; d=$(ls /sys/block | grep '^vd' | sort | sed -n \"${1}p\"); "
        "[ -n \"$d\" ] && echo /dev/$d; }",
    ]) + "\n"


def run(script: str, *, rwdirs: list[str] | None = None, memory: str = DEFAULT_MEMORY,
        cpus: int = 2, timeout: float = 900.0, log: Path | None = None,
        disks: list[Path] | None = None) -> subprocess.CompletedProcess[str]:
    """Boot the kernel with headers, run ``script`` (bash) in it, return its output (also
    written to ``log`` as it comes, default build/guest/last.log).  ``disks``: host files the
    guest sees as virtio-blk disks, in this order (``guest_disk N`` in the script prints the
    device of the Nth, from 1; the root is 9p, so they are the only ones).  The script's exit status
    is not passed out by vng: print markers and check for them.  On a timeout the guest is
    killed and what it printed so far is returned, with returncode -9."""
    _ver, vmlinuz = kernel()
    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    tar = runtime_tar()
    BUILD.mkdir(parents=True, exist_ok=True)
    body = prologue(tar) + script
    path = BUILD / f"script-{os.getpid()}.sh"
    path.write_text(body)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cmd = [vng, "--run", vmlinuz, "--disable-kvm", "--memory", memory, "--cpus", str(cpus)]
    for d in rwdirs or []:
        cmd += ["--rwdir", d]
    for file in disks or []:
        if "=" in str(file) or "," in str(file):
            raise ValueError(f"{file}: vng takes no disk path with '=' or ','")
        cmd += ["--disk", str(file)]
    cmd += ["--exec", f"bash {shlex.quote(str(path))} 2>&1"]
    log = log or BUILD / "last.log"
    try:
        with open(log, "w") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 stdin=subprocess.DEVNULL, cwd=str(BUILD),
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)  # qemu and virtiofsd are in vng's session
                p.wait()
                rc = -9
        text = log.read_text(errors="replace")
        return subprocess.CompletedProcess(cmd, rc, text, "")
    finally:
        path.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rwdir", action="append", default=[])
    p.add_argument("--memory", default=DEFAULT_MEMORY)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("script", nargs="+", help="shell commands to run in the guest")
    args = p.parse_args()
    build_module()
    res = run(" ".join(args.script), rwdirs=args.rwdir, memory=args.memory,
              timeout=args.timeout)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
