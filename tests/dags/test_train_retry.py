"""train_and_deploy's `train` task tags its MLflow run with the step's key, so the attempt after
one that died marks the dead attempt's run FAILED (``ml.train.fail_dead_attempts``).

The run goes through Airflow's ``dag.test()`` with a real SQLite MLflow store; the dead
attempt is a RUNNING run carrying the key of this DAG run's `train` step, as a killed worker
leaves it. The tasks after `train` are marked success without running.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.dags.test_dag_integrity import DAGS_DIR

# dag.test() imports Starlette's TestClient, which warns that it will move to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

EXPERIMENT = "test-train-retry"


def test_the_dag_and_ml_name_the_run_key_tag_alike():
    from _support import TRAINING_RUN_KEY_TAG

    from ml.train import RUN_KEY_TAG

    assert TRAINING_RUN_KEY_TAG == RUN_KEY_TAG


@pytest.mark.integration
def test_train_task_marks_the_run_of_a_dead_attempt_failed(
    airflow_db, mlflow_store, tmp_path, monkeypatch
):
    from airflow.dag_processing.dagbag import DagBag
    from mlflow import MlflowClient

    monkeypatch.setenv("PIPELINE_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY", "100")
    monkeypatch.setenv("PIPELINE_REGISTRY_EXPERIMENT_NAME", EXPERIMENT)
    dag = DagBag(dag_folder=str(DAGS_DIR / "train_and_deploy.py")).dags["train_and_deploy"]
    # dag.test() names the run manual__<run_after> when given a logical date.
    when = datetime.now(UTC).replace(microsecond=0)
    key = f"train_and_deploy/manual__{when.isoformat()}/train"
    client = MlflowClient()
    dead = client.create_run(
        client.create_experiment(EXPERIMENT), tags={"pipeline_run_key": key}
    ).info.run_id

    dag_run = dag.test(
        run_after=when,
        logical_date=when,
        run_conf={"epochs": 1, "data_window_days": 2, "data_end_date": "2026-03-10"},
        mark_success_pattern="(?!load_window$|validate_data$|train$).*",
    )

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert states["train"] == "success", states
    (trained,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string="attributes.status = 'FINISHED'",
    )
    assert trained.data.tags["pipeline_run_key"] == key
    assert trained.data.tags["airflow_run_id"] == dag_run.run_id
    old = client.get_run(dead)
    assert old.info.status == "FAILED"
    assert old.data.tags["superseded_by_run_id"] == trained.info.run_id
