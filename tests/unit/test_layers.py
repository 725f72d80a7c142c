"""The data path runs one way (STYLE.md): a module imports only from layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# cowd's modules by layer, bottom first.  A module may import from its own layer or below.
COWD_LAYERS = [
    {"errors", "imagelock"},
    {"remap"},
    {"disk", "nbd_proto", "kmod_abi"},
    {"nbd", "fuse", "kmodfront", "nbdattach", "control"},
    {"daemon", "attach"},
    {"imagecmds", "cli", "__main__", "__init__"},
]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                pkg = path.parent.name
                if node.module:
                    names.add(f"{pkg}.{node.module}")
                else:
                    names.update(f"{pkg}.{a.name}" for a in node.names)
            elif node.module:
                names.add(node.module)
    return names


def test_formats_never_imports_cowd() -> None:
    for path in (ROOT / "formats").glob("*.py"):
        bad = {n for n in imports_of(path) if n == "cowd" or n.startswith("cowd.")}
        assert not bad, f"{path.name} imports {bad}: formats/ must stand alone"


def layer_of(module: str) -> int:
    for rank, names in enumerate(COWD_LAYERS):
        if module in names:
            return rank
    raise AssertionError(f"cowd.{module} is in no layer: add it to COWD_LAYERS")


def test_cowd_imports_point_down() -> None:
    for path in (ROOT / "cowd").glob("*.py"):
        mine = layer_of(path.stem)
        for name in imports_of(path):
            if not name.startswith("cowd."):
                continue
            other = name.split(".")[1]
            assert layer_of(other) <= mine, (
                f"cowd/{path.name} (layer {mine}) imports cowd.{other} (layer {layer_of(other)})"
            )
