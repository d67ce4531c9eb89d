"""The stack of the promotion load tests (``test_promotion_load.py``), and how they drive it.

What is real here (the tests themselves only move the alias, relay the webhooks and read):

* PostgreSQL: the tier's throwaway server holds both MLflow's backend store and Airflow's
  metadata DB (database ``airflow_load``, migrated for this module);
* MLflow: the tier's ``mlflow server`` (two worker processes). ``@champion`` is moved 50
  times through its REST API, cycling over three registered versions, and MLflow itself signs
  and sends every webhook (from each worker's delivery thread pool, so deliveries overlap and
  may arrive out of order);
* Airflow: an ``airflow api-server`` process with two workers loads ``plugins/registry_events``
  through the plugin manager and records the asset events; an ``airflow scheduler`` process
  (LocalExecutor, parallelism 2) creates the ``deploy_model`` runs from the asset-triggered run
  queue and runs their tasks; the tasks roll out on the local target: real model-server
  processes behind the front proxy, which the test asks what it serves (``/v1/model``, and
  the ``X-Model-Version`` header of a prediction).

Between MLflow and the API server sits the relay of ``promotion_relay.py`` (MLflow's webhook
URL points at it), which times every delivery and sends the duplicates (twins, replays).

``promotion_stack`` is the body of the tests' module-scoped ``stack`` fixture: the tests of a
module share one stack, in order.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port
from tests.postgres.promotion_relay import Hit, Relay
from tests.processes import log_tail, wait_http

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = f"pg-load-{uuid.uuid4().hex[:8]}"
ASSET_URI = f"mlflow://models/{MODEL}/aliases/champion"
DAG_ID = "deploy_model"
SECRET = uuid.uuid4().hex
WEIGHTS = {"1": [1.0, 2.0, 3.0], "2": [-1.0, 0.5, 2.0], "3": [0.25, 0.25, 4.0]}
TWIN_EVERY = 5

# Run in a fresh interpreter with the Airflow environment of the module: migrate the metadata
# DB, write deploy_model (and its asset) to it as the DAG processor would, create the rollout
# pool. Only deploy_model: no other DAG (reconcile_deployment would trigger runs of its own).
_PREPARE_AIRFLOW = """
import sys
from pathlib import Path

from airflow.utils import db

db.upgradedb()

from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
from airflow.models.pool import Pool

manager = DagBundlesManager()
manager.sync_bundles_to_db()
bundle = manager.get_bundle("dags-folder")
if not bundle.is_initialized:
    bundle.initialize()
bag = BundleDagBag(
    dag_folder=str(Path(bundle.path) / "deploy_model.py"),
    bundle_path=bundle.path,
    bundle_name=bundle.name,
)
assert bag.import_errors == {}, bag.import_errors
assert sorted(bag.dags) == ["deploy_model"], sorted(bag.dags)
sync_bag_to_db(bag, bundle.name, bundle.version)
Pool.create_or_update_pool(
    name=sys.argv[1], slots=1, description="one model rollout at a time", include_deferred=False
)
"""


# -- processes -------------------------------------------------------------------------------


class Db:
    """Reads of Airflow's metadata DB on PostgreSQL (the airflow_load role's own login)."""

    def __init__(self, url: str) -> None:
        self.dsn = url.replace("postgresql+psycopg://", "postgresql://")

    def rows(self, query: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    @staticmethod
    def _json(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str | bytes) else value

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        rows = self.rows(
            "SELECT e.id, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE a.uri = %s ORDER BY e.id",
            (ASSET_URI,),
        )
        return [(event_id, self._json(extra) or {}) for event_id, extra in rows]

    def queued(self) -> list[str]:
        return [
            dag_id
            for (dag_id,) in self.rows(
                "SELECT q.target_dag_id FROM asset_dag_run_queue q JOIN asset a "
                "ON a.id = q.asset_id WHERE a.uri = %s",
                (ASSET_URI,),
            )
        ]

    def runs(self) -> list[dict[str, Any]]:
        rows = self.rows(
            "SELECT r.id, r.run_id, r.state, r.run_type, r.queued_at, r.start_date, r.end_date, "
            "(SELECT count(*) FROM dagrun_asset_event d WHERE d.dag_run_id = r.id) "
            "FROM dag_run r WHERE r.dag_id = %s ORDER BY r.id",
            (DAG_ID,),
        )
        keys = ("id", "run_id", "state", "run_type", "queued_at", "start", "end", "consumed")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def tasks(self, run_id: str) -> dict[str, str]:
        return dict(
            self.rows(
                "SELECT task_id, state FROM task_instance WHERE dag_id = %s AND run_id = %s",
                (DAG_ID, run_id),
            )
        )

    def consumed(self, run_pk: int) -> list[int]:
        """Ids of the asset events a run was created for (``dagrun_asset_event``)."""
        rows = self.rows("SELECT event_id FROM dagrun_asset_event WHERE dag_run_id = %s", (run_pk,))
        return [event_id for (event_id,) in rows]

    def xcom(self, run_id: str, task_id: str) -> Any:
        rows = self.rows(
            "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = %s "
            "AND key = 'return_value'",
            (DAG_ID, run_id, task_id),
        )
        return self._json(rows[0][0]) if rows else None


def promotion_stack(postgres, request, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The body of a module-scoped ``stack`` fixture (``yield from`` it): the stack started,
    as a dict (its folder, MLflow's URL and a client, the relay, the Airflow DB reader, the
    model endpoint, a function that starts the scheduler, setup timings); stopped after."""
    import mlflow
    from mlflow import MlflowClient

    from scripts.stack import register_mlflow_webhook
    from scripts.stacklib.postgres import airflow_db_env
    from scripts.stacklib.processes import spawn
    from serving.deploy.local import LocalTarget, stop_group
    from serving.deploy.settings import DeploySettings

    root = tmp_path_factory.mktemp("pg-load")
    saved_uris = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    timings: dict[str, float] = {}
    started = _CLOCK["start"] = time.monotonic()
    db_url = postgres.ensure_database("airflow_load")
    api_port, front, slot_a, slot_b = free_port(), free_port(), free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    deploy = DeploySettings(
        target="local",
        local_port=front,
        local_slot_ports=[slot_a, slot_b],
        local_state_dir=str(root / "serving"),
        health_timeout_s=120,
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))
    }
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "NO_PROXY": "127.0.0.1,localhost",
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__WORKERS": "2",  # two processes record deliveries concurrently
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PIPELINE_REGISTRY_MODEL_NAME": MODEL,
            "PIPELINE_DEPLOY_TARGET": "local",
            "PIPELINE_DEPLOY_LOCAL_PORT": str(front),
            "PIPELINE_DEPLOY_LOCAL_SLOT_PORTS": f"{slot_a},{slot_b}",
            "PIPELINE_DEPLOY_LOCAL_STATE_DIR": deploy.local_state_dir,
            "PIPELINE_DEPLOY_HEALTH_TIMEOUT_S": "120",
            "PIPELINE_WEBHOOK_SECRET": SECRET,
            **airflow_db_env(db_url),
        }
    )
    (root / "airflow").mkdir()
    procs: list[subprocess.Popen] = []
    relay = None
    client = None
    hook_id = None
    prepare_log = root / "prepare-airflow.log"
    # Migrating Airflow's DB and MLflow's first start on PostgreSQL take longest: run both at
    # once (the migration needs no MLflow).
    prepare = spawn(
        [sys.executable, "-c", _PREPARE_AIRFLOW, deploy.rollout_pool], env, prepare_log, cwd=REPO
    )
    procs.append(prepare)
    try:
        mlflow_url = request.getfixturevalue("pg_mlflow")
        timings["mlflow_ready_s"] = time.monotonic() - started
        progress("MLflow on PostgreSQL answers")
        client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        _register_versions(mlflow_url)
        progress(f"{len(WEIGHTS)} versions registered")
        assert prepare.wait(timeout=600) == 0, log_tail(prepare_log)
        timings["airflow_db_ready_s"] = time.monotonic() - started
        progress("Airflow DB migrated, deploy_model synced")
        env.update(
            {
                "AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_url,
                "MLFLOW_TRACKING_URI": mlflow_url,
            }
        )
        api_log = root / "api-server.log"
        api_argv = [str(BIN / "airflow"), "api-server", "-H", "127.0.0.1", "-p", str(api_port)]
        procs.append(api := spawn(api_argv, env, api_log, cwd=REPO))
        wait_http(f"{api_url}/registry-events/", api, api_log, timeout_s=180)
        described = httpx.get(f"{api_url}/registry-events/", timeout=10).json()
        assert described["watching"] == {"model": MODEL, "alias": "champion"}, described
        timings["api_server_ready_s"] = time.monotonic() - started
        progress("API server answers")

        relay = Relay(f"{api_url}/registry-events/mlflow-webhook", TWIN_EVERY, MODEL)
        # Alias moves only: the deliveries counted here are the promotions (the rollouts'
        # own tag writes would be deliveries of model_version_tag.set too).
        hook = register_mlflow_webhook(
            mlflow_url, relay.url, SECRET, events=["model_version_alias.created"]
        )
        hook_id = hook["webhook_id"]
        assert hook["test_ok"] and '"ignored"' in hook["test_body"], hook
        time.sleep(1.5)  # MLFLOW_WEBHOOK_CACHE_TTL=1: both MLflow workers see the webhook
        timings["stack_ready_s"] = time.monotonic() - started

        scheduler: list[subprocess.Popen] = []

        def start_scheduler() -> None:
            """Start the scheduler (once: later calls find it running)."""
            if not scheduler:
                argv = [str(BIN / "airflow"), "scheduler"]
                scheduler.append(spawn(argv, env, root / "scheduler.log", cwd=REPO))
                procs.append(scheduler[0])
            assert scheduler[0].poll() is None, log_tail(root / "scheduler.log")

        yield {
            "root": root,
            "mlflow": mlflow_url,
            "client": client,
            "relay": relay,
            "db": Db(db_url),
            "endpoint": f"http://127.0.0.1:{front}",
            "start_scheduler": start_scheduler,
            "timings": timings,
        }
    finally:
        if hook_id is not None:
            client.delete_webhook(hook_id)
        for proc in reversed(procs):
            stop_group(proc.pid, timeout_s=5)
            proc.wait(timeout=10)
        LocalTarget(deploy, env.get("MLFLOW_TRACKING_URI", "")).stop_all()
        if relay is not None:
            relay.close()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for key, value in saved_uris.items():  # MLflow exported the URIs set above
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_CLOCK = {"start": time.monotonic()}  # reset when the stack starts


def progress(message: str) -> None:
    print(f"[load {time.monotonic() - _CLOCK['start']:6.1f}s] {message}", flush=True)


def _register_versions(mlflow_url: str) -> None:
    import mlflow

    from tests.integration.promotion_models import Linear, log_version

    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_registry_uri(mlflow_url)
    mlflow.set_experiment(f"pg-load-{uuid.uuid4().hex[:8]}")
    for number, weights in WEIGHTS.items():
        assert log_version(Linear(weights), MODEL) == number


# -- driving it ------------------------------------------------------------------------------


def promote(client, versions: list[str], window_s: float | None) -> list[tuple[float, float]]:
    """Move @champion to each of ``versions`` in order, one REST call after the other (spread
    evenly over ``window_s`` if given, else as fast as MLflow answers); (sent, answered)."""
    calls = []
    start = time.monotonic()
    for i, version in enumerate(versions):
        if window_s is not None:
            time.sleep(max(0.0, start + i * window_s / len(versions) - time.monotonic()))
        sent = time.monotonic()
        client.set_registered_model_alias(MODEL, "champion", version)
        calls.append((sent, time.monotonic()))
    return calls


def cycle(first: str, n: int) -> list[str]:
    order = sorted(WEIGHTS)
    i = order.index(first)
    return [order[(i + k) % len(order)] for k in range(n)]


def wait_for_deliveries(relay: Relay, since: float, n: int, timeout_s: float = 60) -> list[Hit]:
    """MLflow's deliveries for this model since ``since``, once ``n`` distinct ids arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        hits = relay.ours(since)
        ids = {h.delivery_id for h in hits if h.via == "mlflow"}
        if len(ids) >= n:
            time.sleep(0.5)  # twins still in flight
            return relay.ours(since)
        if time.monotonic() > deadline:
            raise AssertionError(f"MLflow delivered {len(ids)} of {n} webhooks in {timeout_s}s")
        time.sleep(0.1)


def served(endpoint: str) -> str | None:
    try:
        version = httpx.get(f"{endpoint}/v1/model", timeout=5).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None
    return None if version is None else str(version)


def predict_header(endpoint: str) -> str | None:
    from tests.integration.promotion_models import example

    frame = example()
    response = httpx.post(
        f"{endpoint}/invocations",
        json={"dataframe_split": frame.to_dict(orient="split", index=False)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.headers.get("X-Model-Version")


def settle(stack, final: str, after_run: int, timeout_s: float = 150) -> tuple[float, list]:
    """Wait until ``final`` is served and no deploy_model run is queued or running (and none
    is waiting in the queue); (when ``final`` was first served, the runs after ``after_run``)."""
    db: Db = stack["db"]
    live_at = None
    deadline = time.monotonic() + timeout_s
    while True:
        if live_at is None and served(stack["endpoint"]) == final:
            live_at = time.monotonic()
        runs = [r for r in db.runs() if r["id"] > after_run]
        busy = [r for r in runs if r["state"] in ("queued", "running")]
        if live_at is not None and runs and not busy and not db.queued():
            return live_at, runs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled in {timeout_s}s: served {served(stack['endpoint'])}, want "
                f"{final}; runs {runs}; queue {db.queued()}\n"
                f"{log_tail(stack['root'] / 'scheduler.log')}"
            )
        time.sleep(0.25)


def champion(client) -> str | None:
    try:
        return client.get_model_version_by_alias(MODEL, "champion").version
    except Exception:  # no @champion yet
        return None


def replay_some(relay: Relay, delivery_ids: list[str]) -> list[Hit]:
    """Send ``delivery_ids`` again, byte for byte, all at once."""
    with ThreadPoolExecutor(len(delivery_ids)) as pool:
        return list(pool.map(relay.replay, delivery_ids))
