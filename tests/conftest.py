"""Shared fixtures. Heavy imports stay inside fixtures so collecting tests stays fast."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

from tests import ports

# Quiet TensorFlow's C++ logging and keep runs reproducible across machines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# MLflow's HTTP client retries ~7 times with backoff by default: fail fast in tests.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


# The unit tier (`make test-unit`, `-m "not integration"`) stays under a minute by never
# importing what costs seconds per process: a test that needs TensorFlow is an integration test.
UNIT_TIER_FORBIDDEN = ("tensorflow",)
_first_forbidden: dict[str, str] = {}


def _unit_tier(config: pytest.Config) -> bool:
    return config.getoption("markexpr", "").replace(" ", "") == "notintegration"


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _unit_tier(item.config):
        for module in UNIT_TIER_FORBIDDEN:
            if module in sys.modules and module not in _first_forbidden:
                _first_forbidden[module] = item.nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _first_forbidden and exitstatus == 0:
        for module, nodeid in _first_forbidden.items():
            print(f"\nthe unit tier imported {module} (first after {nodeid}): mark it integration")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# `make test` runs the suite on two pytest-xdist workers: most of its time is spent waiting on
# servers, pods and DAG runs, not on the CPU. A file's tests stay on one worker (its module
# fixtures start once); a tier that holds something machine-wide (the Kubernetes tier the
# nodes' port 10250, the distributed tier its network namespaces, system users and stores, the
# container tier podman's storage, the postgres tier its server) runs whole on one worker.
# (A scheduler, not xdist_group marks: pytest-xdist 3.8's loadgroup does not see them under
# pytest 9, which keeps node ids where xdist no longer writes them.)
MACHINE_WIDE_TIERS = ("distributed", "k8s", "container", "postgres")


def xdist_scope(nodeid: str) -> str:
    """The unit one worker runs whole: a tier of MACHINE_WIDE_TIERS, else a file."""
    path = nodeid.split("::", 1)[0]
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[1] in MACHINE_WIDE_TIERS else path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The machine-wide tiers first in a one-process run (TEST_WORKERS=0), where a tier that
    cannot start shows at once. Under xdist the work units go out largest first (its default:
    a clean-clone `make test` took 12 min 33 s so, 13 min 40 s in this order)."""
    rank = {tier: i for i, tier in enumerate(MACHINE_WIDE_TIERS)}
    items.sort(key=lambda item: rank.get(xdist_scope(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class TierScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return TierScheduling(config, log)


def _reset_mlflow_globals() -> None:
    if "mlflow" in sys.modules:
        import mlflow
        from mlflow.tracking import fluent

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        fluent._active_experiment_id = None  # set_experiment's; MLflow has no public unset


# The MLFLOW_* variables as the session started with them (this file is imported first).
_MLFLOW_ENV = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def _reset_mlflow_env() -> None:
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[name]
    os.environ.update(_MLFLOW_ENV)


@pytest.fixture(autouse=True, scope="module")
def _mlflow_globals_per_module():
    """Each module starts and ends with MLflow's global tracking URI, registry URI and active
    experiment unset, and every MLFLOW_* variable as the session started with it:
    ``set_registry_uri``/``set_experiment`` export MLFLOW_REGISTRY_URI/MLFLOW_EXPERIMENT_ID for
    child processes and nothing unsets them, so a module (or a session fixture it was the
    first to use) that pointed MLflow at its store would point the next module on the same
    worker there too (seen under xdist: a container test registering into the Kubernetes
    tier's SQLite store, a run started in another store's experiment 1). Per module, not per
    test: module fixtures may set them for their module's tests."""
    _reset_mlflow_globals()
    _reset_mlflow_env()
    yield
    _reset_mlflow_globals()
    _reset_mlflow_env()


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> str:
    """An empty MLflow SQLite store, migrated once per session (migrating costs seconds)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-template")
    path = root / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the default experiment's artifact folder: never the repo's ./mlruns
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return str(path)


def _copy_store(template: str, path: str, artifact_root: str) -> None:
    """A copy of the template store whose default experiment keeps artifacts under
    ``artifact_root`` (where a store created at ``path`` with that cwd would keep them)."""
    import sqlite3

    src, dst = sqlite3.connect(template), sqlite3.connect(path)
    try:
        src.backup(dst)
        with dst:  # commits
            dst.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (os.path.join(artifact_root, "0"),),
            )
    finally:
        src.close()
        dst.close()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _mlflow_template_db):
    """A real MLflow tracking + registry store (SQLite) with artifacts in a temp folder.

    Every test gets its own store, copied from one migrated once per session.
    Returns the tracking URI; MLFLOW_TRACKING_URI is set to it for the test.
    """
    import mlflow

    monkeypatch.chdir(tmp_path)  # the SQLite store puts default artifacts under ./mlruns
    _copy_store(_mlflow_template_db, str(tmp_path / "mlflow.db"), str(tmp_path / "mlruns"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    # set_registry_uri also exports MLFLOW_REGISTRY_URI; don't leak it into later tests.
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


# Airflow reads its configuration when first imported: point it at a throwaway home and this
# repo's DAGs before any test module imports it. Tests never touch a developer's ~/airflow.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_AIRFLOW_HOME = os.environ.get("PIPELINE_TEST_AIRFLOW_HOME") or os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"airflow-test-{os.getpid()}"
)
os.makedirs(_AIRFLOW_HOME, exist_ok=True)
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_REPO, "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = os.path.join(_REPO, "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# Model servers started by the local target log payloads, the quality and batch steps write
# labels and predictions: into the throwaway folder, never the checkout's .local/.
for _name, _folder in (("QUALITY_PAYLOAD_PATH", "payload-log"), ("QUALITY_LABELS_PATH", "labels"),
                       ("BATCH_PREDICTIONS_PATH", "predictions")):  # fmt: skip
    os.environ.setdefault(f"PIPELINE_{_name}", os.path.join(_AIRFLOW_HOME, _folder))
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ.pop("AIRFLOW_CONN_MLFLOW_DEFAULT", None)
# Airflow's dag bundle puts the DAG folder on sys.path (DAGs import their `_support` module).
if os.path.join(_REPO, "dags") not in sys.path:
    sys.path.append(os.path.join(_REPO, "dags"))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return _REPO


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (SQLite) in the throwaway AIRFLOW_HOME.

    What `airflow db migrate` does, in this process: the tests that use the DB import Airflow
    anyway, and a separate `airflow` process would pay that import a second time.
    """
    from airflow.utils import db

    db.upgradedb()
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


# Every port a test gives a server comes from this worker's block (tests/ports.py).
free_port = ports.free_port
_free_ports = ports.free_ports


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    return _free_ports
