"""The distributed tier: the object store (MinIO, scripts/stacklib/objectstore.py) and the
CeleryExecutor shape (scripts/stacklib/distributed.py) as ``PIPELINE_EXECUTOR=celery make run``
starts them.

Where they cannot start (no object-store binary: ``make objectstore-tools``; not root, no
network namespaces, no Redis or worker users: ``scripts/install_distributed.sh``) every test
that needs them is skipped with that reason, which ``pytest -ra`` folds into one SKIPPED line.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

CANNOT_START = "the distributed tier cannot start here"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Every skip of the tier reported at one place, so that `pytest -ra` folds them."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and CANNOT_START in report.longrepr[2]:
        gate = skip_unless.__code__
        report.longrepr = (gate.co_filename, gate.co_firstlineno, report.longrepr[2])
    return report


def skip_unless(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(f"{CANNOT_START}: {reason}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="session")
def object_store() -> Iterator:
    """A running MinIO with the bucket ``pipeline``; removed at the end."""
    from scripts.stacklib import gobuild, objectstore

    try:
        objectstore.binary()
    except gobuild.Unavailable as exc:
        skip_unless(f"object store: {exc}")
    root = Path(tempfile.mkdtemp(prefix="pipeline-objectstore-test-"))
    store = objectstore.ObjectStore(root, free_port())
    proc = store.start(root / "minio.log")
    try:
        deadline = time.monotonic() + 60
        while not store.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MinIO did not start:\n{_tail(root / 'minio.log')}")
            time.sleep(0.2)
        store.ensure_bucket("pipeline")
        yield store
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_env(object_store, monkeypatch):
    """The object store's credentials and endpoint in this process's environment, as a task
    gets them from the ``aws_default`` Connection."""
    from s3fs import S3FileSystem

    for key, value in object_store.client_env().items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()  # an instance made with other credentials
    yield object_store
    S3FileSystem.clear_instance_cache()


class Stack:
    """A running ``PIPELINE_EXECUTOR=celery`` stack of ``scripts/stack.py`` in ``state``."""

    def __init__(self, state: Path, env: dict[str, str]) -> None:
        from scripts.stacklib.distributed import Shape

        self.state, self.env = state, env
        self.shape = Shape(state, env)
        self.hosts = {host.name: host for host in self.shape.network.hosts()}
        self.airflow_url = f"http://{self.shape.host}:{env['AIRFLOW_PORT']}"
        self.mlflow_url = f"http://{self.shape.host}:{env['MLFLOW_PORT']}"
        self._http = None

    def stack(self, command: str, timeout_s: float = 600) -> str:
        import subprocess

        script = str(Path(__file__).resolve().parents[2] / "scripts" / "stack.py")
        done = subprocess.run(
            [sys.executable, script, command], env=self.env, capture_output=True, text=True,
            timeout=timeout_s, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"stack.py {command}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
        return done.stdout

    @property
    def api(self):
        """Airflow's REST API (/api/v2), logged in as the stack's admin."""
        import json

        import httpx

        if self._http is None:
            passwords = self.state / "airflow" / "simple_auth_manager_passwords.json.generated"
            login = {"username": "admin", "password": json.loads(passwords.read_text())["admin"]}
            token = httpx.post(f"{self.airflow_url}/auth/token", json=login, timeout=30)
            auth = {"Authorization": f"Bearer {token.raise_for_status().json()['access_token']}"}
            self._http = httpx.Client(
                base_url=f"{self.airflow_url}/api/v2", headers=auth, timeout=30
            )
        return self._http

    def get(self, path: str, **params):
        return self.api.get(path, params=params).raise_for_status().json()

    def tasks(self, dag_id: str, run_id: str) -> dict[str, dict]:
        found = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in found}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict]:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/tries"
        return self.get(path)["task_instances"]

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float = 600) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(2)
        raise AssertionError(f"{dag_id} run {run_id} did not end in {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def celery_stack() -> Iterator[Stack]:
    """``PIPELINE_EXECUTOR=celery`` `make up`'s stack in a temp state folder, on free ports,
    without Prometheus; stopped (``stack.py down``, which removes the hosts) at the end."""
    import os

    from scripts.stacklib import distributed
    from tests.conftest import _free_ports

    skip_unless(distributed.unavailable())
    state = Path(tempfile.mkdtemp(prefix="pipeline-celery-test-", dir="/tmp"))
    ports = dict(zip(
        ("MLFLOW_PORT", "AIRFLOW_PORT", "PIPELINE_PG_PORT", "PIPELINE_REDIS_PORT",
         "PIPELINE_OBJECT_STORE_PORT", "PIPELINE_DEPLOY_LOCAL_PORT"), map(str, _free_ports(6)),
        strict=True,
    ))  # fmt: skip
    # Not this test process's Airflow and MLflow settings: the stack sets its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "AWS_"))}
    env |= ports | {
        "PIPELINE_EXECUTOR": "celery",
        "PIPELINE_STATE_DIR": str(state),
        "PROMETHEUS_BIN": "/nonexistent",
        # A killed worker's task is failed (and retried) in seconds.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # Small and quick: a few epochs unless a run asks for more, and no early stop then.
        "PIPELINE_TRAIN_EPOCHS": "3",
        "PIPELINE_TRAIN_EARLY_STOPPING_PATIENCE": "1000",
    }
    stack = Stack(state, env)
    try:
        stack.stack("up")
        yield stack
    finally:
        try:
            stack.stack("down", timeout_s=300)
        finally:
            shutil.rmtree(state, ignore_errors=True)
