"""The feedback loop end to end: what the model answered becomes data, its error against the
labels that came back drives retraining, and a better version nobody promoted is pointed out.

Real parts: versions trained, evaluated, registered and gated by the pipeline's own steps on a
real MLflow store (SQLite); each @champion served by a real model server process
(``python -m serving.server``) writing its payload log, answering the synthetic source's
readings of today; the synthetic source's ground truth for those rows; ``monitor_quality``
through Airflow's ``dag.test()`` on the test metadata DB, where its ``retrain`` task records
the asset event that queues ``train_and_deploy`` (the DAGs are synced to the DB as the DAG
processor does; no scheduler runs here, so the retraining that run would do is done by the
same pipeline steps, with the event's reason).

The concept shift is planted in the labels: from 20 days ago on, the synthetic load depends
more on the temperature and has a higher base (``synthetic_drift_*``); the first champion was
trained before it. A version trained after it is registered but rejected by its gate: the
retro-challenger must find that it would have beaten the champion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from ml.schema import SYNTHETIC_FEATURES
from tests.conftest import free_port
from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import xcom as _xcom
from tests.plugins.conftest import asset_events, clear_queue, queued_for, sync_dags_to_db
from tests.processes import wait_http

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]

REPO = Path(__file__).resolve().parents[2]
MODEL = "quality-it-model"
LIVE_ERROR_URI = f"pipeline://live-error/{MODEL}"
TODAY = datetime.now(UTC).date()
DRIFT_START = TODAY - timedelta(days=20)
FEATURES = list(SYNTHETIC_FEATURES)


@pytest.fixture
def env(airflow_db, mlflow_store, tmp_path, monkeypatch):
    for key, value in {
        "PIPELINE_DATA_PATH": str(tmp_path / "data"),
        "PIPELINE_DATA_WINDOW_DAYS": "7",
        "PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY": "300",
        "PIPELINE_DATA_SYNTHETIC_DRIFT_START": DRIFT_START.isoformat(),
        "PIPELINE_DATA_SYNTHETIC_DRIFT_STRENGTH": "2.0",
        "PIPELINE_REGISTRY_MODEL_NAME": MODEL,
        "PIPELINE_REGISTRY_EXPERIMENT_NAME": MODEL,
        "PIPELINE_QUALITY_PAYLOAD_PATH": str(tmp_path / "payload-log"),
        "PIPELINE_QUALITY_LABELS_PATH": str(tmp_path / "labels"),
        "PIPELINE_QUALITY_WINDOW_DAYS": "2",
        "PIPELINE_QUALITY_BREACH_DAYS": "1",
        "PIPELINE_QUALITY_LABEL_DELAY_DAYS": "0",
        "PIPELINE_QUALITY_MIN_ROWS": "50",
        # The bar the live RMSE is judged against (the gate's); the versions pass their own
        # gate with it, the shifted world is far beyond it.
        "PIPELINE_GATE_MAX_RMSE": "6",
    }.items():
        monkeypatch.setenv(key, value)
    sync_dags_to_db()  # after the env: the asset's name comes from the model name at parse time
    _unpause("train_and_deploy")
    clear_queue()
    return {"tracking_uri": mlflow_store, "root": tmp_path}


def _unpause(dag_id: str) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == dag_id).values(is_paused=False))


def _train(env, end, *, reason=None, passes=True) -> str:
    """A version trained on the 7 days before ``end`` by the pipeline's steps; gated (an
    impossible bar when not ``passes``); returns its number."""
    from ml import pipeline
    from ml.settings import DataSettings, GateSettings, RegistrySettings, TrainingSettings

    uri, data, registry = env["tracking_uri"], DataSettings(), RegistrySettings()
    window = pipeline.load_window(data, end)
    if reason:
        window["trigger_reason"] = reason
    training = TrainingSettings(epochs=12, hidden_units=[16], threads=1)
    trained = pipeline.train(window, data, training, registry, tracking_uri=uri)
    evaluation = pipeline.evaluate(window, trained, data, registry, tracking_uri=uri)
    version = pipeline.register(window, trained, evaluation, registry, tracking_uri=uri)
    gate = GateSettings(min_r2=-1e6) if passes else GateSettings(max_rmse=1e-6)
    decision = pipeline.gate(version, evaluation, gate, registry, tracking_uri=uri)
    assert decision["passed"] is passes, decision
    return version["version"]


def _promote(env, version: str) -> None:
    """What a passing rollout does last (the rollout itself is tested elsewhere)."""
    from ml.registry import Registry
    from ml.settings import RegistrySettings

    registry = RegistrySettings()
    Registry(env["tracking_uri"], registry).set_alias(registry.champion_alias, version)


def _serve(env, version: str, seed: int) -> list[str]:
    """Serve ``version`` with the payload log on (every request), send it 100 requests of
    readings (1 to 3 rows each: 199 rows), stop it; returns the request ids it answered
    with."""
    from ml.settings import DataSettings
    from ml.synthetic import synthetic_partition

    readings = synthetic_partition(TODAY - timedelta(days=seed), DataSettings())[FEATURES]
    port, log = free_port(), env["root"] / f"server-v{version}.log"
    cmd = [
        sys.executable, "-m", "serving.server", "--model-uri", f"models:/{MODEL}/{version}",
        "--port", str(port), "--no-access-log",
        "--payload-log-path", str(env["root"] / "payload-log"),
        "--payload-log-sample-percent", "100",
    ]  # fmt: skip
    child = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's server, from any cwd
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=env["root"], env=child
        )
    ids = []
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout_s=180)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for i in range(100):
                rows = readings.iloc[3 * i : 3 * i + 1 + i % 3]
                body = {"dataframe_split": {"columns": FEATURES, "data": rows.values.tolist()}}
                resp = client.post("/invocations", json=body)
                assert resp.status_code == 200, resp.text
                ids.append(resp.headers["x-request-id"])
    finally:
        proc.send_signal(signal.SIGTERM)  # the payload log's open file is closed on the way out
        proc.wait(timeout=60)
    return ids


def test_live_error_drives_retraining_and_a_better_version_is_pointed_out(env):
    from ml.registry import Registry
    from ml.settings import RegistrySettings

    registry = Registry(env["tracking_uri"], RegistrySettings())
    before = _train(env, DRIFT_START - timedelta(days=10))  # the world as it was
    _promote(env, before)
    better = _train(env, TODAY, passes=False)  # after the shift, but its gate said no
    served = _serve(env, before, seed=0)
    assert len(set(served)) == 100

    dag = load_dag("monitor_quality")
    tomorrow = (TODAY + timedelta(days=1)).isoformat()
    first = dag.test(run_conf={"data_end_date": tomorrow})
    assert task_states(first) == {
        "check": "success",
        "retrain_or_not": "success",
        "retrain": "success",
        "no_retrain": "skipped",
    }
    report = _xcom(first, "check")
    live_before = report["live"][before]
    assert report["labelled"] == report["served"] == live_before["rows"] == 199
    holdout_rmse = float(registry.get(before).tags["holdout_rmse"])
    assert live_before["rmse"] > max(6.0, 2 * holdout_rmse)  # the shift shows in the labels
    [event] = asset_events(LIVE_ERROR_URI)
    assert event["champion_version"] == before
    assert queued_for(LIVE_ERROR_URI) == ["train_and_deploy"]
    # The retro-challenger: the gate-rejected version would have done better on these rows.
    assert report["suggested"] == [better]
    tags = registry.get(better).tags
    assert tags["retro.beats_champion"] == "true"
    assert float(tags["retro.live_rmse"]) < live_before["rmse"]
    assert "retro.beats_champion" not in registry.get(before).tags
    assert registry.get(better).aliases == () and "champion" in registry.get(before).aliases

    # The run the event queued retrains on the newest window (the shifted world), with the
    # event's reason; its version passes and goes live.
    after = _train(env, TODAY + timedelta(days=1), reason=event["reason"])
    assert registry.get(after).tags["trigger_reason"].startswith("live error in ")
    _promote(env, after)
    clear_queue()
    _serve(env, after, seed=1)

    second = dag.test(run_conf={"data_end_date": tomorrow})
    report = _xcom(second, "check")
    assert report["champion_version"] == after
    live_after = report["live"][after]
    assert live_after["rows"] == 199
    assert live_after["rmse"] < live_before["rmse"] / 2
    assert task_states(second)["no_retrain"] == "success"
    assert queued_for(LIVE_ERROR_URI) == []
    # the plugin's exporter reads the newest check
    from registry_events.exporter import read_snapshot

    snapshot = read_snapshot(env["tracking_uri"], RegistrySettings())
    assert snapshot.quality_champion == after
    assert snapshot.live["rmse"][after] == pytest.approx(live_after["rmse"])
    assert json.loads(json.dumps(report))  # a TaskFlow value: JSON all the way
