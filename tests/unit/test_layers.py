"""The dependency order of the package's folders (README, Layout): an import scan of every module, lazy imports
included, finds no arrow from a layer to a later one, and none between the peers of the inputs layer.

Imports by computed name (``importlib.import_module``: the registry's plug-ins, the command table of ``cli.py``, class
paths from a config) are not arrows the scan sees; the modules that make them are in the front layer or load
Lightning's own classes."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "drifting_lightning"

# Each layer may import from itself and the layers before it (README, Layout). A unit is a folder or a top-level file.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"drift", "models", "sampling", "parallel.py", "rng.py", "files.py", "console.py", "checkpoints"}),
    ("inputs", {"encoders", "data", "export.py"}),  # peers: none imports another
    ("measures", {"metrics"}),
    ("training", {"module.py", "fit_checks.py", "step_failures.py"}),
    ("observers", {"callbacks"}),
    ("front", {"registry.py", "official", "commands", "cli.py", "__init__.py", "__main__.py"}),
]
# Upward arrows the README names, each allowed only as a lazy import (inside a function).
LAZY_UPWARD = {("checkpoints/loading.py", "registry.py")}


def unit_of(module: str) -> str | None:
    """The unit of a dotted module name under the package: its folder, or its top-level file; None outside it."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name or len(parts) < 2:
        return None
    return parts[1] if (PACKAGE / parts[1]).is_dir() else f"{parts[1]}.py"


def imports(path: Path) -> set[tuple[str, bool]]:
    """(unit imported, whether the import is lazy, i.e. inside a function) for every import of ours in ``path``."""
    found: set[tuple[str, bool]] = set()

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: relative import (the scan reads absolute ones)"
                names = [child.module or ""] + [f"{child.module}.{alias.name}" for alias in child.names]
            found.update((unit, lazy) for unit in map(unit_of, names) if unit is not None)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), lazy=False)
    return found


def arrows() -> set[tuple[str, str, str, bool]]:
    """(file relative to the package, its unit, unit it imports, lazy) for every import between different units."""
    out = set()
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        src = name.split("/")[0] if "/" in name else name
        out.update((name, src, dst, lazy) for dst, lazy in imports(path) if dst != src)
    return out


def layer_index() -> dict[str, int]:
    return {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def test_every_folder_and_file_has_a_layer():
    units = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    placed = [unit for _, members in LAYERS for unit in members]
    assert len(placed) == len(set(placed)), "a unit is in two layers"
    assert units == set(placed), f"not placed: {units - set(placed)}; placed but absent: {set(placed) - units}"


def test_the_scan_sees_top_level_and_lazy_imports():
    found = arrows()
    assert ("module.py", "module.py", "drift", False) in found
    assert ("checkpoints/loading.py", "checkpoints", "registry.py", True) in found


def test_no_import_reaches_a_later_layer():
    index = layer_index()
    upward = sorted(
        f"{name} -> {dst}{' (lazy)' if lazy else ''}"
        for name, src, dst, lazy in arrows()
        if index[dst] > index[src] and not (lazy and (name, dst) in LAZY_UPWARD)
    )
    assert not upward, "imports from a later layer:\n" + "\n".join(upward)


def test_inputs_are_peers_and_the_named_arrows_are_absent():
    found = {(src, dst) for _, src, dst, _ in arrows()}
    inputs = dict(LAYERS)["inputs"]
    assert not {(src, dst) for src, dst in found if src in inputs and dst in inputs}, "data/ and encoders/ are peers"
    index = layer_index()
    assert not {dst for src, dst in found if src == "module.py" and index[dst] > index["module.py"]}
    assert ("checkpoints", "callbacks") not in found  # checkpoints/ sits below callbacks/
