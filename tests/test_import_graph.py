"""No import cycles between the project's own modules, including cycles hidden in functions.

The graph is read from the source with ``ast``, not by importing anything: every ``import`` and
``from ... import`` statement counts, at module level, inside functions and under
``if TYPE_CHECKING:``. An import inside a function that only dodges a cycle at import time
still ties the two modules together (neither can be understood, tested or moved without the
other); importing a heavy third-party library lazily is fine and not counted here, since only
first-party modules are nodes of the graph.

Module names are what the interpreter sees: ``ml.*`` and ``serving.*`` from the repository root,
the DAG files as top-level modules (``_support``; the DAG folder is on ``sys.path``), the plugins
as their packages (``registry_events.*``; so is the plugins folder).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (folder on sys.path, the top-level names under it that are ours; None: every module there)
ROOTS: tuple[tuple[Path, tuple[str, ...] | None], ...] = (
    (REPO, ("ml", "serving")),
    (REPO / "dags", None),
    (REPO / "plugins", None),
)

# Cycles that exist today and are being removed in parallel (issue 21, the rollout wiring).
# Each entry must still be a cycle, exactly these modules (test_every_known_cycle_still_exists):
# the allowance goes with its cycle and cannot cover a new one. Add nothing here.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = " (inside a function)" if self.in_function else ""
        return f"{self.source}:{self.line} imports {self.target}{where}"


def discover_modules(roots: Iterable[tuple[Path, tuple[str, ...] | None]]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the roots."""
    modules: dict[str, Path] = {}
    for root, names in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if names is not None and parts[0] not in names:
                continue
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:
                modules[".".join(parts)] = path
    return modules


def _function_lines(tree: ast.AST) -> set[int]:
    """Line numbers of every statement inside a function or method body."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for inner in ast.walk(node):
                if inner is not node and hasattr(inner, "lineno"):
                    lines.add(inner.lineno)
    return lines


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load (the module, or module.attribute)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{alias.name}" if base else alias.name for alias in node.names]


def import_edges(modules: Mapping[str, Path]) -> list[Edge]:
    """Every first-party import of every module, resolved to the module it loads."""
    edges: list[Edge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        in_function = _function_lines(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = set()
            for name in _imported_names(node, module, is_package):
                # The longest first-party module the name starts with ("ml.data.Partition" and
                # "ml.data" both load ml.data).
                parts = name.split(".")
                for end in range(len(parts), 0, -1):
                    candidate = ".".join(parts[:end])
                    if candidate in modules:
                        targets.add(candidate)
                        break
            for target in sorted(targets - {module}):
                edges.append(Edge(module, target, node.lineno, node.lineno in in_function))
    return edges


def cycles(edges: Iterable[Edge]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module: each is a set of modules
    that all reach each other through imports."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {node: reachable(node) for node in graph}
    found = {
        frozenset({node} | {other for other in reach[node] if node in reach[other]})
        for node in graph
        if node in reach[node]
    }
    return sorted(found, key=lambda component: sorted(component))


def describe(component: frozenset[str], edges: Iterable[Edge]) -> str:
    inside = sorted(
        (e for e in edges if e.source in component and e.target in component),
        key=lambda e: (e.source, e.line),
    )
    return " <-> ".join(sorted(component)) + "\n" + "\n".join(f"    {e}" for e in inside)


@pytest.fixture(scope="module")
def project_edges() -> list[Edge]:
    return import_edges(discover_modules(ROOTS))


def test_no_import_cycles_beyond_the_known_ones(project_edges):
    new = [c for c in cycles(project_edges) if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(describe(c, project_edges) for c in new)


def test_every_known_cycle_still_exists(project_edges):
    """An allowance for a cycle that is gone would let it (or a smaller one) come back."""
    found = cycles(project_edges)
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"no longer cycles, delete them from KNOWN_CYCLES: {stale}"


def test_the_graph_sees_imports_in_functions_and_type_checking_blocks(tmp_path):
    """The scanner itself: a cycle hidden in a function, one under TYPE_CHECKING, relative
    imports, and a lazy third-party import (not a node) that makes no cycle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg import b\n    import numpy\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n"
    )
    (package / "d.py").write_text("from pkg.a import f\n")
    edges = import_edges(discover_modules([(tmp_path, ("pkg",))]))

    assert {(e.source, e.target, e.in_function) for e in edges} == {
        ("pkg.a", "pkg.b", True),
        ("pkg.b", "pkg.c", False),
        ("pkg.c", "pkg.a", False),
        ("pkg.d", "pkg.a", False),
    }
    assert cycles(edges) == [frozenset({"pkg.a", "pkg.b", "pkg.c"})]


def test_the_project_graph_covers_every_package(project_edges):
    """A scanner that silently found nothing would pass the cycle test: it must see imports
    from each of ml, serving, the DAG files and the plugins."""
    sources = {e.source.split(".")[0] for e in project_edges}
    assert {"ml", "serving", "_support", "registry_events"} <= sources
