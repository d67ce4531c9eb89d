"""Load held (issue 13): 50 promotions within 10 s, on PostgreSQL, end with the last one live.

What is real here (the test itself only moves the alias, relays the webhooks and reads):

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

Between MLflow and the API server sits a relay in the test process (MLflow's webhook URL points
at it). It forwards each delivery unchanged (same body, same signed headers) and passes the
answer back, and it is how the test sees what no part reports: the endpoint's latency per
delivery, and the deliveries themselves, which it uses for two kinds of duplicates:

* twins: every 5th delivery is forwarded twice at the same moment (what an MLflow retry looks
  like when the first attempt's answer was slow), so the two copies race through the two API
  server workers before either is recorded;
* replays: after the burst, 10 recorded deliveries are sent again, byte for byte, all at once.

Each delivery id must end up as exactly one asset event, and every duplicate must be answered
200 ``ignored`` naming that event.

Two scenarios, in order, on one stack (each also runs alone, ``-k``):

1. the scheduler is down during a burst sent as fast as MLflow takes the alias moves (~3 s):
   the 50 events wait in one queue entry (``asset_dag_run_queue`` holds one row per asset and
   DAG), and the scheduler, started after it, creates exactly one ``deploy_model`` run from
   it, which deploys the last promotion;
2. the scheduler runs during a second burst, paced evenly over 10 s: it creates a run at the
   first event, defers the next while that one runs (``max_active_runs=1``), and the last
   promotion ends live after at most 3 runs.

Each run deploys what ``@champion`` names when its rollout runs, not what its events carried.
Which events Airflow links to a run (``dagrun_asset_event``, what the ``request`` task logs as
its triggers) is not all of them: the queue entry keeps the time of the event that created it,
and a run is linked to the events up to that time, so of a burst it gets the first one and
the rest are linked to the next run, whenever that comes. What is deployed does not depend on
it (every alias move is made before MLflow sends its webhook, and every run reads the alias
after it was created); the test checks only that no event is linked to two runs.

Each scenario prints its numbers (``LOAD ...`` lines, see ``docs/benchmarks.md``):
``pytest tests/postgres/test_promotion_load.py -s``.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.postgres.promotion_relay import Hit, Relay
from tests.processes import log_tail, wait_http

pytestmark = [pytest.mark.postgres, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = f"pg-load-{uuid.uuid4().hex[:8]}"
ASSET_URI = f"mlflow://models/{MODEL}/aliases/champion"
DAG_ID = "deploy_model"
SECRET = uuid.uuid4().hex
WEIGHTS = {"1": [1.0, 2.0, 3.0], "2": [-1.0, 0.5, 2.0], "3": [0.25, 0.25, 4.0]}
PROMOTIONS = 50
WINDOW_S = 10.0
TWIN_EVERY = 5
REPLAYS = 10
MAX_RUNS = 3  # "no more than a few deploy_model runs"

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


@pytest.fixture(scope="module")
def stack(postgres, request, tmp_path_factory) -> Iterator[dict[str, Any]]:
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
        _progress("MLflow on PostgreSQL answers")
        client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        _register_versions(mlflow_url)
        _progress(f"{len(WEIGHTS)} versions registered")
        assert prepare.wait(timeout=600) == 0, log_tail(prepare_log)
        timings["airflow_db_ready_s"] = time.monotonic() - started
        _progress("Airflow DB migrated, deploy_model synced")
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
        _progress("API server answers")

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


def _progress(message: str) -> None:
    print(f"[load {time.monotonic() - _CLOCK['start']:6.1f}s] {message}", flush=True)


def _register_versions(mlflow_url: str) -> None:
    import mlflow

    from tests.integration.promotion_models import Linear, log_version

    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_registry_uri(mlflow_url)
    mlflow.set_experiment(f"pg-load-{uuid.uuid4().hex[:8]}")
    for number, weights in WEIGHTS.items():
        assert log_version(Linear(weights), MODEL) == number


# -- helpers ---------------------------------------------------------------------------------


def _promote(client, versions: list[str], window_s: float | None) -> list[tuple[float, float]]:
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


def _cycle(first: str, n: int) -> list[str]:
    order = sorted(WEIGHTS)
    i = order.index(first)
    return [order[(i + k) % len(order)] for k in range(n)]


def _wait_for_deliveries(relay: Relay, since: float, n: int, timeout_s: float = 60) -> list[Hit]:
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


def _check_each_delivery_recorded_once(db: Db, hits: list[Hit], events_before: int) -> dict:
    """Every delivery id: one ``recorded`` answer, one asset event; every other copy of it
    answered ``ignored`` with that event's id. Returns {delivery_id: event_id}."""
    assert all(h.status == 200 for h in hits), [
        (h.via, h.status, h.answer) for h in hits if h.status != 200
    ]
    by_id: dict[str, list[Hit]] = {}
    for hit in hits:
        by_id.setdefault(hit.delivery_id, []).append(hit)
    recorded: dict[str, int] = {}
    for delivery_id, copies in by_id.items():
        statuses = Counter(h.answer.get("status") for h in copies)
        assert statuses["recorded"] == 1, (delivery_id, [(h.via, h.answer) for h in copies])
        assert statuses["ignored"] == len(copies) - 1, [h.answer for h in copies]
        (first,) = [h for h in copies if h.answer.get("status") == "recorded"]
        recorded[delivery_id] = first.answer["asset_event_id"]
        for dup in copies:
            if dup is not first:
                assert "already recorded" in dup.answer["reason"], dup.answer
                assert dup.answer["asset_event_id"] == recorded[delivery_id], dup.answer
    events = db.events()[events_before:]
    event_ids = Counter(extra.get("delivery_id") for _, extra in events)
    assert sorted(event_ids) == sorted(recorded), "an event for a delivery nobody answered"
    assert set(event_ids.values()) == {1}, [k for k, v in event_ids.items() if v > 1]
    assert {extra["delivery_id"]: eid for eid, extra in events} == recorded
    return recorded


def _served(endpoint: str) -> str | None:
    try:
        version = httpx.get(f"{endpoint}/v1/model", timeout=5).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None
    return None if version is None else str(version)


def _predict_header(endpoint: str) -> str | None:
    from tests.integration.promotion_models import example

    frame = example()
    response = httpx.post(
        f"{endpoint}/invocations",
        json={"dataframe_split": frame.to_dict(orient="split", index=False)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.headers.get("X-Model-Version")


def _settle(stack, final: str, after_run: int, timeout_s: float = 150) -> tuple[float, list]:
    """Wait until ``final`` is served and no deploy_model run is queued or running (and none
    is waiting in the queue); (when ``final`` was first served, the runs after ``after_run``)."""
    db: Db = stack["db"]
    live_at = None
    deadline = time.monotonic() + timeout_s
    while True:
        if live_at is None and _served(stack["endpoint"]) == final:
            live_at = time.monotonic()
        runs = [r for r in db.runs() if r["id"] > after_run]
        busy = [r for r in runs if r["state"] in ("queued", "running")]
        if live_at is not None and runs and not busy and not db.queued():
            return live_at, runs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled in {timeout_s}s: served {_served(stack['endpoint'])}, want "
                f"{final}; runs {runs}; queue {db.queued()}\n"
                f"{log_tail(stack['root'] / 'scheduler.log')}"
            )
        time.sleep(0.25)


def _champion(client) -> str | None:
    try:
        return client.get_model_version_by_alias(MODEL, "champion").version
    except Exception:  # no @champion yet
        return None


def _pct(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile in ms, rounded (None without values)."""
    if len(values) < 2:
        return round(values[0], 1) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


def _report(stack, name: str, numbers: dict[str, Any], hits: list[Hit]) -> None:
    """Print the numbers; every forwarded request goes to ``hits-<name>.json`` beside the logs."""
    print(f"\nLOAD {name}: " + json.dumps(numbers, default=str))
    start = min(h.sent for h in hits)
    rows = [
        {
            "via": h.via,
            "delivery_id": h.delivery_id,
            "version": h.version,
            "sent_s": round(h.sent - start, 4),
            "latency_ms": round(h.latency_s * 1000, 1),
            "status": h.status,
            "answer": h.answer.get("status"),
        }
        for h in sorted(hits, key=lambda h: h.sent)
    ]
    (stack["root"] / f"hits-{name}.json").write_text(json.dumps(rows, indent=1))


def _latencies(hits: list[Hit]) -> dict[str, float]:
    """The webhook endpoint's latency as the relay saw it: all requests, the recorded ones, and
    those sent a second or more after the burst's first (a freshly started API server's first
    deliveries wait for each worker's first recording: imports, DB connections)."""
    first = min(h.sent for h in hits)
    ms = [h.latency_s * 1000 for h in hits]
    recorded = [h.latency_s * 1000 for h in hits if h.answer.get("status") == "recorded"]
    later = [h.latency_s * 1000 for h in hits if h.sent - first >= 1.0]
    return {
        "requests": len(ms),
        "p50_ms": _pct(ms, 50),
        "p99_ms": _pct(ms, 99),
        "max_ms": round(max(ms), 1),
        "recorded_p50_ms": _pct(recorded, 50),
        "recorded_p99_ms": _pct(recorded, 99),
        "after_1s_requests": len(later),
        "after_1s_p50_ms": _pct(later, 50),
        "after_1s_p99_ms": _pct(later, 99),
    }


def _replay_some(relay: Relay, delivery_ids: list[str]) -> list[Hit]:
    """Send ``delivery_ids`` again, byte for byte, all at once."""
    with ThreadPoolExecutor(len(delivery_ids)) as pool:
        return list(pool.map(relay.replay, delivery_ids))


# -- scenarios -------------------------------------------------------------------------------


def test_fifty_promotions_while_the_scheduler_is_down_make_one_run_of_the_last(stack):
    relay: Relay = stack["relay"]
    db: Db = stack["db"]
    client = stack["client"]
    events_before = len(db.events())
    assert db.runs() == [] and db.queued() == []
    versions = _cycle("1", PROMOTIONS)
    final = versions[-1]

    since = time.monotonic()
    calls = _promote(client, versions, window_s=None)
    hits = _wait_for_deliveries(relay, since, PROMOTIONS)
    burst_s = calls[-1][1] - calls[0][0]
    _progress(f"{PROMOTIONS} alias moves in {burst_s:.1f}s, all delivered")
    assert burst_s <= WINDOW_S, f"50 alias moves took {burst_s:.1f}s"
    mlflow_hits = [h for h in hits if h.via == "mlflow"]
    # MLflow sent one delivery per alias move, for the version moved to: none lost.
    assert len({h.delivery_id for h in mlflow_hits}) == PROMOTIONS
    first_copy = {h.delivery_id: h.version for h in mlflow_hits}
    assert Counter(first_copy.values()) == Counter(versions)
    assert sum(h.via == "twin" for h in hits) == PROMOTIONS // TWIN_EVERY

    replayed = sorted(first_copy)[:REPLAYS]
    replays = _replay_some(relay, replayed)
    hits = relay.ours(since)
    recorded = _check_each_delivery_recorded_once(db, hits, events_before)
    assert len(recorded) == PROMOTIONS
    assert all(h.answer["status"] == "ignored" for h in replays)
    # 50 events, one queue entry: the scheduler will start one run for all of them.
    assert db.queued() == [DAG_ID]
    assert db.runs() == []
    assert client.get_model_version_by_alias(MODEL, "champion").version == final
    last_answer = max(h.sent + h.latency_s for h in hits if h.via == "mlflow")
    first_sent = min(h.sent for h in mlflow_hits)

    scheduler_at, scheduler_wall = time.monotonic(), datetime.now(UTC)
    stack["start_scheduler"]()
    _progress("scheduler started")
    live_at, runs = _settle(stack, final, after_run=0)
    _progress(f"v{final} live, runs settled")
    time.sleep(3)  # a few scheduler loops: the run's own work must not queue another one
    runs = db.runs()
    assert len(runs) == 1, runs
    (run,) = runs
    assert run["state"] == "success" and run["run_type"] == "asset_triggered", run
    # The run is linked to the events recorded until its queue entry was made (the entry keeps
    # the time of the first event; later ones find it there): the first of the burst.
    assert run["consumed"] >= 1, run
    assert set(db.consumed(run["id"])) <= set(recorded.values())
    assert db.tasks(run["run_id"]) == {
        "request": "success",
        "rollout_or_not": "success",
        "rollout_local": "success",
        "rollout_kubernetes": "skipped",
        "in_sync": "skipped",
    }
    outcome = db.xcom(run["run_id"], "rollout_local")
    assert outcome["status"] == "rolled_out" and outcome["version"] == final, outcome
    assert db.queued() == []
    assert client.get_model_version_by_alias(MODEL, "champion").version == final
    assert _served(stack["endpoint"]) == final
    assert _predict_header(stack["endpoint"]) == final

    _report(
        stack,
        "scheduler-down",
        {
            "promotions": PROMOTIONS,
            "alias_moves_s": round(burst_s, 2),
            "deliveries_per_s": round(PROMOTIONS / (last_answer - first_sent), 1),
            "first_to_last_delivery_s": round(last_answer - first_sent, 2),
            "twins": PROMOTIONS // TWIN_EVERY,
            "replays": REPLAYS,
            **_latencies(hits),
            "events_recorded": len(recorded),
            "queue_entries": 1,
            "runs_created": len(runs),
            "events_consumed_by_the_run": run["consumed"],
            "scheduler_start_to_run_s": round(
                (run["queued_at"] - scheduler_wall).total_seconds(), 1
            ),
            "run_s": round((run["end"] - run["queued_at"]).total_seconds(), 1),
            "scheduler_start_to_live_s": round(live_at - scheduler_at, 1),
            "last_promotion_to_live_s": round(live_at - calls[-1][1], 1),
            "stack_setup": {k: round(v, 1) for k, v in stack["timings"].items()},
        },
        hits,
    )


# A second rollout and ~80 s more: `make test-load` (and `make test-postgres`) run it, the
# default `make test` deselects it to stay well under 20 minutes (README, Tests).
@pytest.mark.load
def test_fifty_promotions_in_ten_seconds_while_the_scheduler_runs_end_with_the_last_live(stack):
    relay: Relay = stack["relay"]
    db: Db = stack["db"]
    client = stack["client"]
    stack["start_scheduler"]()  # running since the scenario before, unless run alone
    last_run = max((r["id"] for r in db.runs()), default=0)
    live_before = _served(stack["endpoint"])
    champion_before = _champion(client)
    events_before = len(db.events())
    first = str(int(champion_before or "0") % len(WEIGHTS) + 1)
    versions = _cycle(first, PROMOTIONS)
    final = versions[-1]
    assert versions[0] != champion_before and final not in (live_before, champion_before)

    since = time.monotonic()
    calls = _promote(client, versions, window_s=WINDOW_S)
    burst_s = calls[-1][1] - calls[0][0]
    _progress(f"{PROMOTIONS} paced alias moves in {burst_s:.1f}s")
    assert burst_s <= WINDOW_S + 1, f"the paced alias moves took {burst_s:.1f}s"
    hits = _wait_for_deliveries(relay, since, PROMOTIONS)
    first_copy = {h.delivery_id: h.version for h in hits if h.via == "mlflow"}
    assert len(first_copy) == PROMOTIONS
    assert Counter(first_copy.values()) == Counter(versions)
    assert sum(h.via == "twin" for h in hits) == PROMOTIONS // TWIN_EVERY
    replays = _replay_some(relay, sorted({h.delivery_id for h in hits})[:REPLAYS])
    live_at, runs = _settle(stack, final, after_run=last_run)
    _progress(f"v{final} live, runs settled")
    time.sleep(3)
    runs = [r for r in db.runs() if r["id"] > last_run]

    hits = relay.ours(since)
    recorded = _check_each_delivery_recorded_once(db, hits, events_before)
    assert len(recorded) == PROMOTIONS
    assert all(h.answer["status"] == "ignored" for h in replays)
    assert 1 <= len(runs) <= MAX_RUNS, runs
    assert all(r["state"] == "success" for r in runs), runs
    assert all(r["run_type"] == "asset_triggered" for r in runs), runs
    # No event is consumed by two runs (a run takes the events since the previous one).
    consumed = [event for r in db.runs() for event in db.consumed(r["id"])]
    assert len(consumed) == len(set(consumed)), Counter(consumed).most_common(3)
    assert set(consumed) <= {event_id for event_id, _ in db.events()}
    assert db.queued() == []
    assert client.get_model_version_by_alias(MODEL, "champion").version == final
    assert _served(stack["endpoint"]) == final
    assert _predict_header(stack["endpoint"]) == final
    outcomes = [db.xcom(r["run_id"], "rollout_local") for r in runs]
    last_answer = max(h.sent + h.latency_s for h in hits if h.via == "mlflow")
    first_sent = min(h.sent for h in hits if h.via == "mlflow")

    _report(
        stack,
        "scheduler-running",
        {
            "promotions": PROMOTIONS,
            "alias_moves_s": round(burst_s, 2),
            "deliveries_per_s": round(PROMOTIONS / (last_answer - first_sent), 1),
            "first_to_last_delivery_s": round(last_answer - first_sent, 2),
            **_latencies(hits),
            "events_recorded": len(recorded),
            "runs_created": len(runs),
            "runs": [
                {
                    "consumed": r["consumed"],
                    "tasks": db.tasks(r["run_id"]),
                    "deployed": (o or {}).get("version"),
                    "status": (o or {}).get("status"),
                    "s": round((r["end"] - r["queued_at"]).total_seconds(), 1),
                }
                for r, o in zip(runs, outcomes, strict=True)
            ],
            "last_promotion_to_live_s": round(live_at - calls[-1][1], 1),
        },
        hits,
    )
