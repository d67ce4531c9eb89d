"""The server package's shape: modules a reader can hold in their head, and no import cycles.

Imports inside functions count too (a lazy import is for start-up time or an optional
dependency, never a way round a cycle); imports under ``if TYPE_CHECKING:`` do not (they never
run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[3] / "serving" / "server"
PACKAGE = "serving.server"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    return {f"{PACKAGE}.{path.stem}": path for path in sorted(SERVER.glob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _server_imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at any depth, outside TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found & known


def test_no_module_is_longer_than_the_limit():
    lengths = {p.name: len(p.read_text().splitlines()) for p in SERVER.glob("*.py")}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines (split by concern): {too_long}"
