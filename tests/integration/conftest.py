"""Real servers for integration tests: an `mlflow server` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and proxied local artifacts, like `make run`."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def xcom(dag_run, task_id: str, key: str = "return_value"):
    """What ``task_id`` of ``dag_run`` pushed under ``key`` (as the metadata DB holds it)."""
    import json

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=key, run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id
            ).with_only_columns(XComModel.value)
        ).first()
    if row is None:
        return None
    try:
        return json.loads(row.value) if isinstance(row.value, str | bytes) else row.value
    except ValueError:
        return row.value  # a plain string (operator links are stored unserialised)
