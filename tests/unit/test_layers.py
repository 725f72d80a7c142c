"""The data path runs one way (STYLE.md): a module imports only from layers below it.

Also the frontends' own rules: no frontend package imports another (cowd/attach/ is where they
meet), and the sans-I/O codecs (NBD protocol, FUSE protocol, kmod ABI) import no trio.  And
the tests' rule (tests/support/__init__.py): a test module imports helpers from tests/support,
never from another test module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

# cowd's modules by layer, bottom first, named relative to cowd/ (a package by its own name,
# for its __init__.py).  A module may import from its own layer or below.
COWD_LAYERS = [
    {"errors", "imagelock", "trust", "qemuout", "process", "sysmem", "frontends",
     "frontends.nbd", "frontends.fuse", "frontends.kmod", "disk.api", "disk.backing_io",
     "disk.locks", "workers", "workers.wire", "workers.channel"},
    {"remap", "disk.remote", "disk.pool"},
    {"disk.boottrace"},
    {"disk.chain"},
    {"disk.streams", "disk.hooks"},
    {"disk.lending", "disk.mapping"},
    {"disk", "disk.disk", "frontends.nbd.wire", "frontends.nbd.options", "frontends.nbd.protocol",
     "frontends.kmod.abi", "frontends.kmod.module", "frontends.fuse.protocol", "workers.mapped",
     "workers.served", "workers.gated"},
    {"frontends.nbd.tls", "frontends.nbd.server", "frontends.nbd.attach", "frontends.fuse.session",
     "frontends.fuse.server", "frontends.fuse.ring", "frontends.fuse.uring",
     "frontends.fuse.mount", "frontends.kmod.channel", "frontends.loop", "control"},
    {"workers.fuse"},
    {"workers.worker", "workers.host"},
    {"rundir"},
    {"attach", "attach.probes", "attach.stale", "attach.attacher", "attach.client"},
    {"daemon"},
    {"imagecmds", "imagecli", "lifecycle", "cliargs", "daemoncli", "cli", "__main__", "",
     "remoteargs", "remotecmds"},
]

# The frontend packages (cowd/frontends/NAME/ or cowd/frontends/NAME.py).
FRONTENDS = {"nbd", "fuse", "kmod", "loop"}
# The codecs: bytes in, events out, no event loop.
CODECS = ["frontends.nbd.wire", "frontends.nbd.options", "frontends.nbd.protocol",
          "frontends.fuse.protocol", "frontends.kmod.abi"]


def module_name(path: Path) -> str:
    """cowd/frontends/nbd/server.py -> 'frontends.nbd.server'; a package's __init__.py ->
    the package ('' for cowd itself)."""
    parts = list(path.relative_to(ROOT / "cowd").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and \
                node.test.id == "TYPE_CHECKING":
            for child in node.body:
                skip.update(ast.walk(child))
    return skip


def imports_of(path: Path, top: str = "cowd", runtime_only: bool = False) -> set[str]:
    """Absolute names of what ``path`` imports (relative imports resolved against its
    package; ``from TOP import x`` names TOP.x); ``runtime_only`` leaves out the imports
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    # The package relative imports start from: a module's, or for __init__.py its own.
    here = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
    return imported_names(tree, here, top, skip)


def imported_names(tree: ast.Module, here: list[str], top: str,
                   skip: set[ast.AST] | None = None) -> set[str]:
    """imports_of's walk over a parsed module (``here``: its package's name parts)."""
    skip = skip or set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x / from ..x import y
                base = here[:len(here) - (node.level - 1)]
                if node.module:
                    names.add(".".join([*base, node.module]))
                else:
                    names.update(".".join([*base, a.name]) for a in node.names)
            elif node.module == top:  # from cowd import x
                names.update(f"{top}.{a.name}" for a in node.names)
            elif node.module:
                names.add(node.module)
    return names


def cowd_modules() -> list[Path]:
    return sorted((ROOT / "cowd").rglob("*.py"))


def formats_modules() -> list[Path]:
    return sorted((ROOT / "formats").rglob("*.py"))


def test_formats_never_imports_cowd() -> None:
    for path in formats_modules():
        bad = {n for n in imports_of(path, "formats") if n == "cowd" or n.startswith("cowd.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: formats/ must stand alone"


# formats/ by layer, bottom first: the vocabulary, the chain's files and walker, the codecs,
# and the package's entry points (which no module inside formats/ imports).  A codec may be a
# package (formats/qcow2/): it takes its package's place here.
FORMATS_LAYERS = [
    {"errors", "names"},
    {"base"},
    {"remote"},
    {"opener", "chain"},
    {"raw", "qcow", "qcow2", "vhd"},
    {"lifecycle"},
    {"commit", "rebase"},
    {"__init__"},
]

# Inside a codec package, by layer, bottom first; its __init__.py (the codec's public names)
# on top.  A module imports only from a layer strictly below its own: never a sibling of its
# layer, never its package's __init__.py, and never formats/__init__.py.
PACKAGE_LAYERS: dict[str, list[set[str]]] = {
    "qcow2": [
        {"layout"},
        {"header", "compressed"},
        {"l2cache", "refcounts"},
        {"reader"},
        {"writer", "check"},
        {"image", "create"},
        {"resize", "empty", "backing", "snapshot", "lend"},
        {"__init__"},
    ],
    "remote": [
        {"url"},
        {"nbd", "http"},
        {"cache"},
        {"file"},
        {"__init__"},
    ],
    "vhd": [
        {"structures"},
        {"parents"},
        {"image"},
        {"create", "empty", "switch"},
        {"reparent", "resize"},
        {"__init__"},
    ],
}


def formats_target(name: str) -> tuple[str, str] | None:
    """('', module) for a module of formats/ ('formats.base.Kind' -> ('', 'base')), (package,
    module) inside a codec package ('formats.qcow2.header' -> ('qcow2', 'header'); the
    package's own names are its '__init__'); None when not formats'.  A name imported from
    formats itself (formats.Kind) is formats' '__init__'."""
    if name != "formats" and not name.startswith("formats."):
        return None
    parts = name.split(".")[1:]
    if not parts or parts[0] not in set().union(*FORMATS_LAYERS):
        return "", "__init__"
    if parts[0] not in PACKAGE_LAYERS:
        return "", parts[0]
    known = set().union(*PACKAGE_LAYERS[parts[0]])
    if len(parts) >= 2 and parts[1] in known - {"__init__"}:
        return parts[0], parts[1]
    return parts[0], "__init__"


def test_formats_imports_point_down() -> None:
    rank = {m: i for i, layer in enumerate(FORMATS_LAYERS) for m in layer}
    for path in formats_modules():
        rel = path.relative_to(ROOT / "formats")
        where = f"formats/{rel}"
        package = rel.parts[0] if len(rel.parts) > 1 else ""
        if package:
            assert package in PACKAGE_LAYERS, f"formats/{package}/ has no PACKAGE_LAYERS entry"
            inner = {m: i for i, layer in enumerate(PACKAGE_LAYERS[package]) for m in layer}
            mine_inner = inner.get(path.stem)
            assert mine_inner is not None, (
                f"{where} is in no layer: add it to PACKAGE_LAYERS[{package!r}]")
            mine = rank[package]
        else:
            mine_inner = None
            mine = rank.get(path.stem)
            assert mine is not None, f"{where} is in no layer: add it to FORMATS_LAYERS"
        for name in imports_of(path, "formats"):
            target = formats_target(name)
            if target is None:
                continue
            pkg, other = target
            if pkg and pkg == package:
                assert mine_inner is not None
                assert inner[other] < mine_inner, (
                    f"{where} imports {name}: formats/{pkg}/{other} is not below it")
                continue
            top = pkg or other
            assert rank[top] <= mine and not (package and top == "__init__"), (
                f"{where} imports {name}: formats/{top} is above it")


def layer_of(module: str) -> int:
    for rank, names in enumerate(COWD_LAYERS):
        if module in names:
            return rank
    raise AssertionError(f"cowd.{module} is in no layer: add it to COWD_LAYERS")


def cowd_target(name: str) -> str | None:
    """The cowd module an imported name refers to ('cowd.disk.Disk' -> 'disk'), or None."""
    if not name.startswith("cowd."):
        return None  # not cowd's; or `import cowd` for its __file__, which runs nothing
    parts = name.split(".")[1:]
    known = set().union(*COWD_LAYERS)
    while parts and ".".join(parts) not in known:
        parts.pop()  # from .x import SomeClass
    return ".".join(parts)


def test_cowd_imports_point_down() -> None:
    for path in cowd_modules():
        mine = layer_of(module_name(path))
        for name in imports_of(path):
            other = cowd_target(name)
            if other is None:
                continue
            assert layer_of(other) <= mine, (
                f"{path.relative_to(ROOT)} (layer {mine}) imports cowd.{other} "
                f"(layer {layer_of(other)})")


def frontend_of(module: str) -> str | None:
    """'frontends.nbd.server' -> 'nbd', 'frontends.loop' -> 'loop'; None outside."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "frontends" else None


def test_no_frontend_imports_another() -> None:
    seen = set()
    for path in cowd_modules():
        mine = frontend_of(module_name(path))
        if mine is None:
            continue
        seen.add(mine)
        for name in imports_of(path):
            other = cowd_target(name)
            theirs = frontend_of(other) if other else None
            assert theirs in (None, mine), (
                f"{path.relative_to(ROOT)} (frontend {mine}) imports cowd.{other} "
                f"(frontend {theirs}): frontends meet only in cowd/attach/")
    assert seen == FRONTENDS, seen


def test_no_frontend_imports_formats() -> None:
    """Frontends speak in guest offsets and the disk's Segment/ChainFile: the format
    library's vocabulary stays below cowd/disk/."""
    for path in cowd_modules():
        if frontend_of(module_name(path)) is None:
            continue
        bad = {n for n in imports_of(path) if n == "formats" or n.startswith("formats.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: go through cowd.disk"


def test_codecs_import_no_trio() -> None:
    """Directly or through the cowd modules they import (imports under ``if TYPE_CHECKING:``
    are annotations only and do not count)."""
    for module in CODECS:
        todo, done = [module], set()
        while todo:
            mod = todo.pop()
            if mod in done:
                continue
            done.add(mod)
            path = ROOT / "cowd" / mod.replace(".", "/")
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            for name in imports_of(path, runtime_only=True):
                assert name.split(".")[0] != "trio", (
                    f"cowd.{module} is a sans-I/O codec but {path.relative_to(ROOT)} "
                    "imports trio")
                other = cowd_target(name)
                if other is not None:
                    todo.append(other)


# ---- tests/: helpers live in tests/support, and no module imports a test module ---------------

def embedded_imports(tree: ast.Module) -> set[str]:
    """What the Python source in a module's string constants imports (code run with
    ``python -c``, e.g. a server started in a fresh interpreter); strings that do not parse
    as Python are passed over."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                "import " in node.value:
            try:
                code = ast.parse(node.value)
            except SyntaxError:
                continue
            names |= imported_names(code, [], "tests")
    return names


def is_test_module(name: str) -> bool:
    """Anything in the tests package but tests.support (tests.integration.test_x,
    tests.conftest, the tier packages themselves)."""
    return (name == "tests" or name.startswith("tests.")) and \
        name != "tests.support" and not name.startswith("tests.support.")


def test_the_cli_paths_of_attach_import_no_disk_stack() -> None:
    """`cowd attach`/`detach` (cowd/attach/client.py, probes.py, stale.py) talk to the daemon;
    importing the disk stack (formats, urllib3, cowd/disk) made each such command in the
    TCG guest 15 s slower than `cowd stats` (-X importtime: 15-28 s of imports)."""
    code = ("import sys, cowd.cli, cowd.attach.client, cowd.attach.probes, cowd.attach.stale;"
            "print(' '.join(m for m in sys.modules if m == 'formats' or "
            "m.startswith(('formats.', 'cowd.disk', 'urllib3'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    assert out == [], out


def test_no_module_imports_a_test_module() -> None:
    """A module under tests/ (a tier's test module, a support module, conftest.py) or tools/
    imports tests.support, cowd, formats, tools, the standard library and third parties,
    never a test module: what more than one test module uses moves to tests/support.  Code
    in strings counts too: test_corpus's fork server once ran
    ``import tests.integration.test_corpus`` in a fresh interpreter."""
    bad = []
    for top in ("tests", "tools"):
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            here = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
            names = imported_names(tree, here, top) | embedded_imports(tree)
            bad += [f"{path.relative_to(ROOT)} imports {n}" for n in sorted(names)
                    if is_test_module(n)]
    assert not bad, "\n".join(["import helpers from tests/support instead:", *bad])
