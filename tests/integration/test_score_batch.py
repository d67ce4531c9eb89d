"""score_batch end to end through Airflow's ``dag.test()``: @champion trained and promoted by the
pipeline's steps on a real MLflow store (SQLite), served by a real model server (the live
endpoint the check asks), a window of synthetic partitions scored with the server's compiled
path; the predictions are the endpoint's numbers for the same rows, the run is in MLflow, the
predictions asset has its event, and a second run scores nothing again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from ml.schema import SYNTHETIC_FEATURES
from tests.conftest import free_port
from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import xcom as _xcom
from tests.plugins.conftest import asset_events, sync_dags_to_db
from tests.processes import wait_http

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]

REPO = Path(__file__).resolve().parents[2]
MODEL = "batch-it-model"
END = date(2026, 3, 10)
FEATURES = list(SYNTHETIC_FEATURES)


@pytest.fixture
def served(airflow_db, mlflow_store, tmp_path, monkeypatch):
    """@champion v1 served by a model server; the env the DAG reads its settings from."""
    from ml import pipeline
    from ml.registry import Registry
    from ml.settings import DataSettings, GateSettings, RegistrySettings, TrainingSettings

    port = free_port()
    for key, value in {
        "PIPELINE_DATA_PATH": str(tmp_path / "data"),
        "PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY": "300",
        "PIPELINE_REGISTRY_MODEL_NAME": MODEL,
        "PIPELINE_REGISTRY_EXPERIMENT_NAME": MODEL,
        "PIPELINE_BATCH_PREDICTIONS_PATH": str(tmp_path / "predictions"),
        "PIPELINE_DEPLOY_SERVICE_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    data, registry = DataSettings(), RegistrySettings()
    window = pipeline.load_window(data, END)
    training = TrainingSettings(epochs=2, hidden_units=[8], threads=1)
    trained = pipeline.train(window, data, training, registry, tracking_uri=mlflow_store)
    evaluation = pipeline.evaluate(window, trained, data, registry, tracking_uri=mlflow_store)
    version = pipeline.register(window, trained, evaluation, registry, tracking_uri=mlflow_store)
    lenient = GateSettings(max_rmse=1e6, min_r2=-1e6)
    pipeline.gate(version, evaluation, lenient, registry, tracking_uri=mlflow_store)
    Registry(mlflow_store, registry).set_alias(registry.champion_alias, version["version"])
    sync_dags_to_db()

    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "serving.server", "--model-uri", version["model_uri"],
           "--port", str(port), "--no-access-log"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout_s=180)
        yield {"version": version, "url": f"http://127.0.0.1:{port}", "root": tmp_path}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_window_is_scored_with_the_endpoints_numbers_once(served):
    dag = load_dag("score_batch")
    conf = {"data_end_date": END.isoformat(), "batch_window_days": 2}
    run = dag.test(run_conf=conf)
    assert task_states(run) == {"resolve": "success", "check": "success", "score": "success"}
    checked, summary = _xcom(run, "check"), _xcom(run, "score")
    assert checked["rows"] == 64 and checked["max_abs_diff_endpoint"] <= 1e-5
    assert summary["version"] == served["version"]["version"] and summary["rows"] == 600

    # The batch's numbers are the endpoint's for the same rows.
    resolved = _xcom(run, "resolve")
    first = resolved["window"]["partitions"][0]
    rows = pd.read_parquet(first["uri"])[FEATURES].head(50)
    answer = httpx.post(
        f"{served['url']}/invocations",
        json={"dataframe_split": {"columns": FEATURES, "data": rows.values.tolist()}},
        timeout=30,
    ).json()["predictions"]
    endpoint = np.array([a["prediction"] for a in answer])
    batch = pd.read_parquet(summary["files"][0])["prediction"].to_numpy()[:50]
    np.testing.assert_allclose(batch, endpoint, rtol=1e-6, atol=1e-5)

    from mlflow import MlflowClient

    mlflow_run = MlflowClient().get_run(summary["run_id"])
    assert mlflow_run.data.params["input_digest"] == resolved["window"]["digest"]
    assert mlflow_run.data.metrics["rows"] == 600
    [event] = asset_events(f"pipeline://predictions/{MODEL}")
    assert event == {k: summary[k] for k in ("version", "input_digest", "output", "rows")}

    again = dag.test(run_conf=conf)
    assert _xcom(again, "score")["skipped"] is True
