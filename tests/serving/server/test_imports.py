"""The server package ships alone in the serving image: its imports stop at its own dependencies.

Two checks: every ``import`` statement in ``serving/server/`` names an allowed package (static,
so a lazy import inside a function counts too), and importing the server's modules in a fresh
interpreter loads none of the forbidden packages (transitively, so an allowed package that
drags in a forbidden one is caught as well).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

SERVER = Path(__file__).resolve().parents[3] / "serving" / "server"
# What the serving images install (scripts/build_images.sh: SERVING_REQUIREMENTS and
# SLIM_REQUIREMENTS) and the package itself.
ALLOWED = {
    "serving",  # only serving.server, checked below
    "numpy",
    "pandas",
    "pyarrow",
    "mlflow",
    "tensorflow",
    "keras",
    "ai_edge_litert",  # the slim path's runtime (serving/server/slim.py)
    "uvicorn",
    "orjson",
    "prometheus_client",
    # only for a payload log written to an object store URL; not in the images (the server
    # refuses such a path at start when it is missing: serving/server/__main__.py)
    "fsspec",
}
FORBIDDEN = ("ml", "serving.deploy", "airflow", "kubernetes", "pydantic_settings", "httpx")


def _stdlib() -> set[str]:
    return set(sys.stdlib_module_names)


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_every_import_statement_names_an_allowed_package():
    stdlib = _stdlib()
    bad = []
    for path in sorted(SERVER.rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            foreign_serving = module.startswith("serving.") and not module.startswith(
                "serving.server"
            )
            if foreign_serving or (top not in stdlib and top not in ALLOWED):
                bad.append(f"{path.name}:{line} imports {module}")
    assert not bad, "the serving image does not have these:\n" + "\n".join(bad)


def test_importing_the_server_loads_nothing_forbidden():
    modules = sorted(f"serving.server.{path.stem}" for path in SERVER.glob("*.py"))
    probe = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=SERVER.parents[1],
        env={"PATH": sysconfig.get_path("scripts"), "PYTHONPATH": str(SERVER.parents[1])},
    )
    loaded = json.loads(out.stdout)
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not leaked, f"importing the server loads {leaked}"
