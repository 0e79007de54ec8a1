"""The package's import rules, read from the source with ``ast`` (nothing is imported or run).

Layers, high to low: app > analysis > testbeds > tasks > core > models; a module imports only its own
layer and those below it, ``errors`` is importable from everywhere, and only the package's front doors
(``__init__``, ``__main__``) and the app layer may import the package itself. Imports inside functions
and ``TYPE_CHECKING`` blocks count: a deferred import is still a dependency, it only moves the failure
of a cycle from import time to the first call.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "chg_tlens"
LAYERS = ("app", "analysis", "testbeds", "tasks", "core", "models")
"""High to low."""
EVERYWHERE = ("errors",)
"""Top-level modules any layer may import."""
FRONT_DOORS = ("__init__", "__main__")
"""The package's own files: they gather the layers, so they sit outside the order."""


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str, package_dir: Path) -> bool:
    location = package_dir.parent.joinpath(*dotted.split("."))
    return location.is_dir() or location.with_suffix(".py").is_file()


def imported_modules(path: Path, package_dir: Path) -> set[str]:
    """The package's modules one file imports, wherever in the file the import statement sits.

    ``from pkg.sub import name`` counts as ``pkg.sub.name`` when that is a module, else as ``pkg.sub``;
    ``from pkg import name`` of a non-module name is an import of the package's ``__init__``.
    """
    package, this = package_dir.name, module_name(path, package_dir)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchor at this module's package
                anchor = this.split(".") if path.name == "__init__.py" else this.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != package:
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if _is_module(target, package_dir) else base)
    found.discard(this)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, for every ``.py`` file under ``package_dir``."""
    return {module_name(path, package_dir): imported_modules(path, package_dir)
            for path in sorted(package_dir.rglob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected group of modules (Tarjan), e.g. ``[a, b, a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_cycle(graph, group) for group in groups]


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    start = min(group)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def layer_of(module: str) -> str:
    """``app`` ... ``models``, ``errors``, or a front door; anything else is a file without a place."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def order_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run up the layers, reach the package itself from below app, or come from or go to
    a top-level file that has no place in the order."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = []
    for source, targets in sorted(graph.items()):
        source_layer = layer_of(source)
        if source_layer in FRONT_DOORS:
            continue
        if source_layer not in rank and source_layer not in EVERYWHERE:
            found.append(f"{source}: top-level module outside the layers {LAYERS}")
            continue
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer == "__init__":
                if source_layer != "app":
                    found.append(f"{source} imports the package's __init__ from below app")
            elif target_layer in EVERYWHERE:
                continue
            elif source_layer in EVERYWHERE:
                found.append(f"{source} (importable from everywhere) imports {target}")
            elif target_layer not in rank:
                found.append(f"{source} imports {target}, a module outside the layers")
            elif rank[target_layer] < rank[source_layer]:
                found.append(f"{source} ({source_layer}) imports {target} ({target_layer}): upward")
    return found


# ----------------------------------------------------------------- the package


def test_no_module_takes_part_in_an_import_cycle():
    found = cycles(import_graph(PACKAGE_DIR))
    assert not found, "import cycles (deferred imports included):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found)


def test_imports_run_only_down_the_layers_and_never_reach_the_package_from_below_app():
    found = order_violations(import_graph(PACKAGE_DIR))
    assert not found, "\n".join(found)


def test_every_module_is_read():
    graph = import_graph(PACKAGE_DIR)
    assert {"chg_tlens", "chg_tlens.core.result", "chg_tlens.app.cli", "chg_tlens.errors"} <= set(graph)
    assert "chg_tlens.core.data" in graph["chg_tlens.core.fit"]


# ----------------------------------------------------------------- the rules themselves


def _package(root: Path, files: dict[str, str]) -> Path:
    package_dir = root / "pkg"
    for name, text in files.items():
        path = package_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {path.parent for path in package_dir.rglob("*.py")} | {package_dir}:
        (folder / "__init__.py").touch()
    return package_dir


def test_an_import_inside_a_function_closes_a_cycle(tmp_path):
    package_dir = _package(tmp_path, {
        "core/low.py": "def f():\n    from pkg.core.high import g\n    return g\n",
        "core/high.py": "from pkg.core import low\n",
    })
    assert cycles(import_graph(package_dir)) == [["pkg.core.high", "pkg.core.low", "pkg.core.high"]]


def test_a_type_checking_import_and_a_longer_ring_are_cycles_too(tmp_path):
    package_dir = _package(tmp_path, {
        "core/a.py": "import pkg.core.b\n",
        "core/b.py": "from pkg.core.c import X\n",
        "core/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import Y\nX = 1\n",
    })
    assert cycles(import_graph(package_dir)) == [["pkg.core.a", "pkg.core.b", "pkg.core.c", "pkg.core.a"]]


def test_deferred_upward_and_package_imports_are_named(tmp_path):
    package_dir = _package(tmp_path, {
        "core/fit.py": "def f():\n    from pkg.analysis.plots import p\n    from pkg import __version__\n",
        "analysis/plots.py": "from pkg.errors import E\nfrom pkg.core import fit\n",
        "app/cli.py": "from pkg import run\nfrom pkg.analysis import plots\n",
        "errors.py": "E = ValueError\n",
        "helpers.py": "",
        "__main__.py": "from pkg.app.cli import main\n",
    })
    assert order_violations(import_graph(package_dir)) == [
        "pkg.core.fit imports the package's __init__ from below app",
        "pkg.core.fit (core) imports pkg.analysis.plots (analysis): upward",
        "pkg.helpers: top-level module outside the layers ('app', 'analysis', 'testbeds', 'tasks', "
        "'core', 'models')",
    ]


def test_a_package_without_cycles_or_upward_imports_passes(tmp_path):
    package_dir = _package(tmp_path, {
        "models/load.py": "",
        "core/fit.py": "from pkg.models import load\nfrom pkg.errors import E\n",
        "app/cli.py": "import pkg\nfrom pkg.core.fit import f\n",
        "errors.py": "E = ValueError\n",
    })
    graph = import_graph(package_dir)
    assert cycles(graph) == [] and order_violations(graph) == []
