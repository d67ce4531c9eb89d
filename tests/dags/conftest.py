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

# What a task's own process needs no more of: the kubernetes clients, unless it starts a pod.
POD_ONLY_MODULES = ("kubernetes", "kubernetes_asyncio")
# The task whose process parses each file first (one that starts no pod), as Airflow 3's task
# runner does: with the parsing context naming it.
TASK_PARSE_CONTEXT = "register"

# The project's own packages: a scheduler that loaded one before forking its LocalExecutor
# workers hands that (possibly outdated) copy to every task it runs.
PROJECT_MODULES = ("ml", "serving", "_support", "_params", "_rollout")

_PROBE_CODE = (
    "import importlib.util, json, os, sys\n"
    # What every Airflow component (the scheduler too) does when it starts: load the plugins.
    "from airflow import plugins_manager\n"
    "plugins_manager.ensure_plugins_loaded()\n"
    f"project = {PROJECT_MODULES!r}\n"
    "loaded = sorted(m for m in sys.modules if m.split('.')[0] in project)\n"
    "print(json.dumps(['plugins', 'plugins', loaded]))\n"
    f"sys.path.insert(0, {str(DAGS_DIR)!r})\n"
    "def parse(path):\n"
    "    spec = importlib.util.spec_from_file_location('dag_under_test', path)\n"
    "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    # First as a task's process parses it, then (kubernetes then loads) as the DAG processor.
    f"for path in {[str(f) for f in DAG_FILES]!r}:\n"
    "    os.environ['_AIRFLOW_PARSING_CONTEXT_DAG_ID'] = os.path.basename(path)[:-3]\n"
    f"    os.environ['_AIRFLOW_PARSING_CONTEXT_TASK_ID'] = {TASK_PARSE_CONTEXT!r}\n"
    "    parse(path)\n"
    f"    heavy = {(*HEAVY_MODULES, *POD_ONLY_MODULES)!r}\n"
    "    print(json.dumps(['task', path, sorted(m for m in heavy if m in sys.modules)]))\n"
    "del os.environ['_AIRFLOW_PARSING_CONTEXT_DAG_ID']\n"
    "del os.environ['_AIRFLOW_PARSING_CONTEXT_TASK_ID']\n"
    f"for path in {[str(f) for f in DAG_FILES]!r}:\n"
    "    parse(path)\n"
    f"    heavy = {HEAVY_MODULES!r}\n"
    "    print(json.dumps(['dag', path, sorted(m for m in heavy if m in sys.modules)]))\n"
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


@pytest.fixture(scope="session")
def dag_parse_report() -> dict[str, list[tuple[str, list[str]]]]:
    """``{"plugins": [...], "task": [...], "dag": [...]}`` from one fresh interpreter
    (started early; see the module docstring): the project modules loaded once the plugins
    are (what every Airflow component does at start), then ``(dag file, heavy modules loaded
    after importing it)`` for every DAG file in turn, first as a task's process parses it
    (parsing context: task ``register``), then as the DAG processor does."""
    global _probe
    probe, _probe = _probe or _start_probe(), None
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err
    report: dict[str, list[tuple[str, list[str]]]] = {"plugins": [], "task": [], "dag": []}
    for line in out.splitlines():
        if line.startswith('["'):
            kind, path, loaded = json.loads(line)
            report[kind].append((path, loaded))
    return report


def load_dag(dag_id: str):
    """The DAG ``dag_id`` parsed from its file (``dags/<dag_id>.py``), with no import errors."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def task_states(dag_run) -> dict[str, str]:
    """``{task_id: state}`` of a finished ``dag.test()`` run."""
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
