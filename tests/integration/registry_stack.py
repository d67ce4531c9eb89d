"""An MLflow server that delivers its registry webhooks to a real Airflow API server.

What `make run` wires up, on free loopback ports: an ``mlflow server`` (SQLite registry,
proxied artifacts) with webhooks enabled for loopback delivery, and ``airflow api-server``
loading ``plugins/registry_events`` through Airflow's plugin manager, on the test's Airflow
metadata DB. The test process points its env at both (the DAGs it runs with ``dag.test()``
read it) and the local deploy target at free ports. The API server knows one user for the
REST API: ``approver`` (password :data:`APPROVER_PASSWORD`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.plugins.conftest import clear_queue, sync_dags_to_db
from tests.processes import wait_http

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
CLIENT_MLFLOW_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
APPROVER_PASSWORD = "approver-password"


@contextmanager
def registry_stack(
    root: Path,
    model: str,
    secret: str,
    *,
    env: dict[str, str] | None = None,
    prepare: Callable[[str], None] = lambda mlflow_url: None,
) -> Iterator[dict]:
    """Start both servers, point the env at them (plus ``env``), run ``prepare(mlflow_url)``
    while the API server boots, register the webhook; yields ``root``, ``mlflow``,
    ``airflow``, ``client`` (MlflowClient), ``endpoint`` (the local target's front port)."""
    from mlflow import MlflowClient

    from ml.registry import use_mlflow
    from scripts.stack import WEBHOOK_PATH, mlflow_webhook_env, register_mlflow_webhook
    from scripts.stacklib.processes import spawn

    mlflow_port, api_port = free_port(), free_port()
    front, slot_a, slot_b = free_port(), free_port(), free_port()
    mlflow_url, api_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{api_port}"
    # A server never inherits a client-side MLflow URI left behind by earlier tests.
    server_env = {k: v for k, v in os.environ.items() if k not in CLIENT_MLFLOW_URIS}
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server_env.update(mlflow_webhook_env(root))
    server_env["MLFLOW_WEBHOOK_CACHE_TTL"] = "1"  # the webhook is created after the start
    server_env["PATH"] = f"{BIN}{os.pathsep}{server_env.get('PATH', '')}"
    server = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--workers", "1",
    ]  # fmt: skip
    mp = pytest.MonkeyPatch()
    for key, value in {
        "AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_url,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "MLFLOW_REGISTRY_URI": mlflow_url,  # deploy steps set it process-wide: undone at the end
        "PIPELINE_REGISTRY_MODEL_NAME": model,
        "PIPELINE_DEPLOY_TARGET": "local",
        "PIPELINE_DEPLOY_LOCAL_PORT": str(front),
        "PIPELINE_DEPLOY_LOCAL_SLOT_PORTS": f"{slot_a},{slot_b}",
        "PIPELINE_DEPLOY_LOCAL_STATE_DIR": str(root / "serving"),
        "PIPELINE_DEPLOY_HEALTH_TIMEOUT_S": "120",
        "PIPELINE_WEBHOOK_SECRET": secret,
        **(env or {}),
    }.items():
        mp.setenv(key, value)
    # Earlier tests may have pointed MLflow's process-wide registry URI at their own server.
    use_mlflow(mlflow_url)
    passwords = root / "airflow-passwords.json"
    passwords.write_text(json.dumps({"approver": APPROVER_PASSWORD}))
    procs = []
    try:
        # Both servers boot in parallel; the plugin reads the DB per request, not at start.
        procs.append(mlflow_proc := spawn(server, server_env, root / "mlflow.log"))
        api_cmd = [str(BIN / "airflow"), "api-server", "-H", "127.0.0.1", "-p", str(api_port)]
        api_env = {
            **os.environ,
            # This checkout's ml and serving (the venv may be installed from another one).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "approver:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        }
        procs.append(api_proc := spawn(api_cmd, api_env, root / "api-server.log"))
        # What the DAG processor does: the DAGs (and their assets) into the metadata DB.
        sync_dags_to_db()
        clear_queue()
        wait_http(f"{mlflow_url}/health", mlflow_proc, root / "mlflow.log")
        prepare(mlflow_url)
        wait_http(f"{api_url}/registry-events/", api_proc, root / "api-server.log")
        described = httpx.get(f"{api_url}/registry-events/").json()
        assert described["watching"] == {"model": model, "alias": "champion"}

        hook_url = f"{api_url}{WEBHOOK_PATH}"
        first = register_mlflow_webhook(mlflow_url, hook_url, secret)
        # MLflow's own signed test delivery reached the plugin, which ignored the example model.
        assert first["test_ok"] and '"ignored"' in first["test_body"], first
        yield {
            "root": root,
            "mlflow": mlflow_url,
            "airflow": api_url,
            "client": MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url),
            "endpoint": f"http://127.0.0.1:{front}",
        }
    finally:
        from serving.deploy.local import LocalTarget, stop_group
        from serving.deploy.settings import DeploySettings

        LocalTarget(DeploySettings(), mlflow_url).stop_all()
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        mp.undo()
        for proc in reversed(procs):
            stop_group(proc.pid, timeout_s=20)
            proc.wait(timeout=10)


def airflow_api(url: str, user: str = "approver", password: str = APPROVER_PASSWORD):
    """An httpx client of the API server's REST API (/api/v2), logged in as ``user``."""
    login = {"username": user, "password": password}
    token = httpx.post(f"{url}/auth/token", json=login, timeout=30).raise_for_status()
    auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
    return httpx.Client(base_url=f"{url}/api/v2", headers=auth, timeout=30)
