"""The DAG-parse probe starts when collection ends, so its fresh interpreter (which pays the
whole Airflow import again) runs on the other core while the rest of the session runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
HEAVY_MODULES = ("tensorflow", "keras", "mlflow", "pandas", "matplotlib", "sklearn")
PROBE_TEST = "test_dag_parse_imports_nothing_heavy"

_PROBE_CODE = (
    "import importlib.util, json, sys\n"
    f"sys.path.insert(0, {str(DAGS_DIR)!r})\n"
    f"for path in {[str(f) for f in DAG_FILES]!r}:\n"
    "    spec = importlib.util.spec_from_file_location('dag_under_test', path)\n"
    "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    f"    print(json.dumps([path, sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)]))\n"
)
_probe: subprocess.Popen | None = None


def _start_probe() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _PROBE_CODE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    global _probe
    if any(item.name == PROBE_TEST for item in session.items):
        _probe = _start_probe()


@pytest.fixture
def dag_parse_report() -> list[tuple[str, list[str]]]:
    """``[(dag file, heavy modules loaded after importing it)]`` from one fresh interpreter
    that imported every DAG file in turn (started early; see the module docstring)."""
    global _probe
    probe, _probe = _probe or _start_probe(), None
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err
    return [tuple(json.loads(line)) for line in out.splitlines() if line.startswith('["')]


def load_dag(dag_id: str):
    """The DAG ``dag_id`` parsed from its file (``dags/<dag_id>.py``), with no import errors."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def task_states(dag_run) -> dict[str, str]:
    """``{task_id: state}`` of a finished ``dag.test()`` run."""
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
