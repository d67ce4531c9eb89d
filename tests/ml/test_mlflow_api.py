"""ml/ uses MLflow's public API only: no module or name starting with an underscore.

Private helpers change without notice between MLflow releases (``mlflow.types.utils._infer_schema``
was one); the public API they hide behind is what an upgrade keeps working.
"""

from __future__ import annotations

import ast
from pathlib import Path

ML = Path(__file__).resolve().parents[2] / "ml"


def private_mlflow_uses(source: str) -> list[str]:
    """``mlflow`` imports and attribute chains that reach a name starting with ``_``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            names = [*node.module.split("."), *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [part for alias in node.names for part in alias.name.split(".")]
            if names[0] != "mlflow":
                continue
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.insert(0, inner.attr)
                inner = inner.value
            if not (isinstance(inner, ast.Name) and inner.id == "mlflow"):
                continue
            names = ["mlflow", *chain]
        else:
            continue
        if any(name.startswith("_") for name in names):
            found.append((node.lineno, ".".join(names)))
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_the_scan_finds_private_imports_and_attributes():
    source = (
        "import mlflow\n"
        "from mlflow.types.utils import _infer_schema\n"
        "from mlflow.models import infer_signature\n"
        "mlflow.types.utils._infer_schema(x)\n"
        "mlflow.pyfunc.load_model(u)\n"
        "import mlflow._private\n"
    )
    assert private_mlflow_uses(source) == [
        "2: mlflow.types.utils._infer_schema",
        "4: mlflow.types.utils._infer_schema",
        "6: mlflow._private",
    ]


def test_ml_uses_no_private_mlflow_api():
    found = {
        str(path.relative_to(ML.parent)): uses
        for path in sorted(ML.rglob("*.py"))
        if (uses := private_mlflow_uses(path.read_text(encoding="utf-8")))
    }
    assert found == {}
