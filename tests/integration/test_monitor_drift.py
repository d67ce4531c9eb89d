"""monitor_drift end to end: a drifted window emits the asset event that queues train_and_deploy,
an ordinary one does not.

Real parts: the champion is trained, evaluated (which logs its drift profile), registered and
promoted by the pipeline's own steps on a real MLflow store (SQLite); ``monitor_drift`` runs
through Airflow's ``dag.test()`` on the test metadata DB, where its ``retrain`` task records the
asset event; the DAGs are synced to that DB the way the DAG processor does, so the asset-run
queue shows what the scheduler would start (no scheduler runs here).
"""

from __future__ import annotations

from datetime import date

import pytest

from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import xcom as _xcom
from tests.plugins.conftest import asset_events, clear_queue, queued_for, sync_dags_to_db

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]

MODEL = "drift-it-model"
ASSET_URI = f"pipeline://drift/{MODEL}"
TRAINED_UNTIL = date(2026, 11, 29)  # the champion's window: the 7 days before
MONITOR_END = "2026-12-02"  # the monitor's 3-day window right after it


@pytest.fixture
def champion(airflow_db, mlflow_store, tmp_path, monkeypatch):
    """A promoted champion with a drift profile, and the env the DAGs read their settings from."""
    from ml import pipeline
    from ml.registry import Registry
    from ml.settings import DataSettings, GateSettings, RegistrySettings, TrainingSettings

    monkeypatch.setenv("PIPELINE_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_DATA_WINDOW_DAYS", "7")
    # The default 400 rows a day: the champion's drift profile is its holdout's (~560 rows);
    # at 150 a day (~210 rows) the season's own change read as target drift (PSI 0.275).
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY", "400")
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", MODEL)
    monkeypatch.setenv("PIPELINE_REGISTRY_EXPERIMENT_NAME", MODEL)
    data, registry = DataSettings(), RegistrySettings()
    training = TrainingSettings(epochs=2, hidden_units=[8], threads=1)

    window = pipeline.load_window(data, TRAINED_UNTIL)
    trained = pipeline.train(window, data, training, registry, tracking_uri=mlflow_store)
    evaluation = pipeline.evaluate(window, trained, data, registry, tracking_uri=mlflow_store)
    version = pipeline.register(window, trained, evaluation, registry, tracking_uri=mlflow_store)
    lenient = GateSettings(max_rmse=1e6, min_r2=-1e6)
    pipeline.gate(version, evaluation, lenient, registry, tracking_uri=mlflow_store)
    Registry(mlflow_store, registry).set_alias(registry.champion_alias, version["version"])

    sync_dags_to_db()  # after the env: the asset's name comes from the model name at parse time
    _unpause("train_and_deploy")  # what `make run` does; a paused DAG is never queued
    clear_queue()
    return version["version"]


def _unpause(dag_id: str) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == dag_id).values(is_paused=False))


def test_a_drifted_window_queues_train_and_deploy_and_an_ordinary_one_does_not(
    champion, tmp_path, monkeypatch
):
    dag = load_dag("monitor_drift")

    calm = dag.test(run_conf={"data_end_date": MONITOR_END})
    assert task_states(calm) == {
        "load_window": "success",
        "score": "success",
        "retrain_or_not": "success",
        "no_drift": "success",
        "retrain": "skipped",
    }
    report = _xcom(calm, "score")  # the report, a TaskFlow value: both ends get it
    assert report["retrain"] is False
    assert _xcom(calm, "no_drift") == (report.get("skipped") or report["summary"])
    assert asset_events(ASSET_URI) == []
    assert queued_for(ASSET_URI) == []

    # The same days, but the world changed from the day after the champion's window on.
    monkeypatch.setenv("PIPELINE_DATA_PATH", str(tmp_path / "drifted"))
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_DRIFT_START", TRAINED_UNTIL.isoformat())
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_DRIFT_STRENGTH", "2.0")
    drifted = dag.test(run_conf={"data_end_date": MONITOR_END})
    assert task_states(drifted) == {
        "load_window": "success",
        "score": "success",
        "retrain_or_not": "success",
        "retrain": "success",
        "no_drift": "skipped",
    }
    assert _xcom(drifted, "score")["retrain"] is True
    [event] = asset_events(ASSET_URI)
    assert event["champion_version"] == champion
    assert "__target__" in event["drifted"]
    assert event["reason"].startswith(f"drift against @champion v{champion} in 2026-11-29..")
    assert queued_for(ASSET_URI) == ["train_and_deploy"]
