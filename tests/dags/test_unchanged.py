"""Nothing to do, nothing done: a train_and_deploy run whose data digest, code version and
training parameters are those @champion was trained on ends at `unchanged` without training;
with the `force_retrain` Param it trains.

The runs go through Airflow's ``dag.test()`` with a real SQLite MLflow store. The first run
trains and registers v1 (its rollout is marked success without running); v1 is then made
@champion as a rollout does once the endpoint is verified.
"""

from __future__ import annotations

import pytest

from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import xcom as _xcom

# dag.test() imports Starlette's TestClient, which warns that it will move to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

EXPERIMENT = "test-unchanged"
CONF = {"epochs": 2, "data_window_days": 2, "data_end_date": "2026-03-10"}
SKIPPED_WHEN_UNCHANGED = (
    "validate_data",
    "train",
    "evaluate",
    "register",
    "gate",
    "deploy_or_not",
    "not_deployed",
    "rollout_local",
    "rollout_kubernetes",
)


@pytest.mark.integration
def test_a_run_like_the_champion_s_ends_unchanged_unless_forced(
    airflow_db, mlflow_store, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from ml.registry import Registry
    from ml.settings import RegistrySettings

    monkeypatch.setenv("PIPELINE_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY", "100")
    monkeypatch.setenv("PIPELINE_REGISTRY_EXPERIMENT_NAME", EXPERIMENT)
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", "test-unchanged-model")
    monkeypatch.setenv("PIPELINE_TRAIN_HIDDEN_UNITS", "8")
    monkeypatch.setenv("GIT_SHA", "0123abcd")  # the same code version in every run
    dag = load_dag("train_and_deploy")
    client = MlflowClient()

    def training_runs():
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return client.search_runs(
            [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'"
        )

    first = dag.test(run_conf=CONF, mark_success_pattern="rollout_.*")
    states = task_states(first)
    assert states["unchanged_check"] == "success" and states["unchanged"] == "skipped", states
    assert states["train_or_not"] == "success" and states["validate_data"] == "success"
    assert _xcom(first, "unchanged_check")["unchanged"] is False
    assert states["register"] == "success", states
    registry = Registry(mlflow_store, RegistrySettings())
    v1 = registry.get("1")
    (run1,) = training_runs()
    for tag in ("data_digest", "code_version", "training_fingerprint", "trigger_reason"):
        assert v1.tags[tag] == run1.data.tags[tag], tag
    assert v1.tags["code_version"] == "0123abcd"
    assert v1.tags["training_fingerprint"].startswith("sha256:")
    assert v1.tags["trigger_reason"] == "manual trigger"
    registry.set_alias("champion", "1")  # what the rollout does once v1 is verified live

    second = dag.test(run_conf=CONF)
    states = task_states(second)
    assert str(second.state) == "success", states
    assert states["unchanged_check"] == "success" and states["train_or_not"] == "success"
    assert states["unchanged"] == "success"
    assert {states[t] for t in SKIPPED_WHEN_UNCHANGED} == {"skipped"}, states
    assert len(training_runs()) == 1  # nothing trained
    assert registry.latest_version().version == "1"  # nothing registered
    # The decision is unchanged_check's value; `unchanged` ends the run with its reason.
    decision = _xcom(second, "unchanged_check")
    assert decision["unchanged"] is True
    assert decision["reason"].startswith(
        "unchanged: @champion v1 was trained on the same data digest, code version and parameters"
    )
    assert _xcom(second, "unchanged") == decision["reason"]

    forced = dag.test(
        run_conf={**CONF, "force_retrain": True},
        mark_success_pattern=(
            "(?!load_window$|unchanged_check$|train_or_not$|validate_data$|train$).*"
        ),
    )
    states = task_states(forced)
    assert str(forced.state) == "success", states
    assert states["unchanged"] == "skipped" and states["train"] == "success", states
    run2 = next(r for r in training_runs() if r.info.run_id != run1.info.run_id)
    assert run2.data.tags["airflow_run_id"] == forced.run_id
    assert run2.data.tags["trigger_reason"] == "manual trigger"  # still flows to training
    for tag in ("data_digest", "code_version", "training_fingerprint"):
        assert run2.data.tags[tag] == run1.data.tags[tag], tag
