"""The whole `train_and_deploy` DAG through Airflow's `dag.test()`, against a real MLflow server,
with the local deploy target: a real model server process behind the local front port.

The scenarios run in order on one MLflow server: a first run deploys v1; a run with an
impossible gate registers v2 but deploys nothing; a corrupt partition fails validation and
registers nothing.
"""

from __future__ import annotations

import shutil
from datetime import date

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port
from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import xcom as _xcom

pytestmark = pytest.mark.integration

MODEL = "it-regression-model"
END = date(2026, 3, 10)
FAST = {"epochs": 25, "data_window_days": 3, "data_end_date": END.isoformat()}


@pytest.fixture(scope="module")
def stack(mlflow_server, airflow_db, tmp_path_factory):
    """Env for the DAG's settings: data, serving state and ports in temp folders."""
    root = tmp_path_factory.mktemp("pipeline")
    front, slot_a, slot_b = free_port(), free_port(), free_port()
    env = {
        "AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_server,
        "MLFLOW_TRACKING_URI": mlflow_server,
        # The deploy steps set the registry URI process-wide; undone with the rest at the end.
        "MLFLOW_REGISTRY_URI": mlflow_server,
        "PIPELINE_DATA_PATH": str(root / "data"),
        "PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY": "300",
        "PIPELINE_REGISTRY_MODEL_NAME": MODEL,
        "PIPELINE_REGISTRY_EXPERIMENT_NAME": "it-train-and-deploy",
        "PIPELINE_DEPLOY_LOCAL_PORT": str(front),
        "PIPELINE_DEPLOY_LOCAL_SLOT_PORTS": f"{slot_a},{slot_b}",
        "PIPELINE_DEPLOY_LOCAL_STATE_DIR": str(root / "serving"),
        "PIPELINE_DEPLOY_HEALTH_TIMEOUT_S": "240",
    }
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    yield {"root": root, "endpoint": f"http://127.0.0.1:{front}", "tracking_uri": mlflow_server}
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    LocalTarget(DeploySettings(), mlflow_server).stop_all()
    mp.undo()


def _dag():
    return load_dag("train_and_deploy")


def test_one_nightly_run_causes_exactly_one_rollout(stack, first_run):
    """The run's own promotion fires the registry webhook, and the scheduler starts
    deploy_model for it: that run finds @champion live and healthy and deploys nothing."""
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    target = LocalTarget(DeploySettings(), stack["tracking_uri"])
    serving = target.read_active()
    assert serving["version"] == "1" and serving["restarts"] == 0
    echo = _deploy_model().test()
    assert str(echo.state) == "success"
    assert task_states(echo)["in_sync"] == "success"
    assert target.read_active() == serving  # the same server: no second rollout


def _deploy_model():
    return load_dag("deploy_model")


def _client(tracking_uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@pytest.fixture(scope="module")
def first_run(stack):
    dag_run = _dag().test(run_conf=FAST)
    return dag_run


def test_first_run_trains_registers_deploys_and_promotes(stack, first_run):
    from serving.deploy.rollout import Request

    states = task_states(first_run)
    assert str(first_run.state) == "success", states
    assert states["train_or_not"] == "success" and states["unchanged"] == "skipped"
    assert states["deploy_or_not"] == "success"
    assert states["rollout_local"] == "success"
    assert states["rollout_kubernetes"] == "skipped"
    assert states["not_deployed"] == "skipped"
    # The gate's values: its decision, the route the branch took, the request the rollout ran.
    assert _xcom(first_run, "gate", key="passed") is True
    assert _xcom(first_run, "gate", key="route") == "approval"
    # Approval not required (the default): the approval task routes straight to the rollout.
    assert _xcom(first_run, "gate", key="ask")["required"] is False
    assert states["approval"] == "success"
    request = Request.from_dict(_xcom(first_run, "gate", key="request"))
    assert (request.kind, request.version, request.run_id) == ("candidate", "1", first_run.run_id)
    assert request.champion_at_eval is None  # no @champion to compare with then

    client = _client(stack["tracking_uri"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.version == "1"
    assert version.tags["gate.passed"] == "true"
    assert version.tags["airflow_run_id"] == first_run.run_id
    assert version.tags["data_window_end"] == END.isoformat()
    assert len(version.tags["data_digest"]) == 64
    run = client.get_run(version.run_id)
    assert run.data.params["epochs"] == "25"
    assert "holdout_rmse" in run.data.metrics
    assert run.inputs.dataset_inputs, "training dataset logged as a run input"
    # Verified on the fixed rows logged at evaluation, then promoted, in one rollout.
    import mlflow

    rows = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/verification/rows.json")
    assert len(rows["data"]) == len(rows["predictions"]) == 64
    outcome = _xcom(first_run, "rollout_local")
    assert outcome["status"] == "rolled_out" and outcome["champion"] == "1"
    assert outcome["verification"]["rows_from"] == f"logged with run {version.run_id}"
    assert version.tags["rollout.verified"]
    # Its model card: data window, digest, code version, the gate, the rollout history.
    card = version.description
    assert f"`train_and_deploy` run `{first_run.run_id}`" in card
    assert version.tags["data_digest"][:16] in card and version.tags["code_version"] in card
    assert "**Gate**: passed" in card and "| live | on local: train_and_deploy run" in card

    from mlflow.models import Model

    model = Model.load(f"models:/{MODEL}/1")
    assert model.signature is not None
    example = model.load_input_example()
    assert list(example.columns) == [s.name for s in model.signature.inputs.inputs]

    # A real HTTP prediction from the deployed endpoint equals the registered model's.
    import mlflow.pyfunc

    expected = np.asarray(mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(example))
    response = httpx.post(
        f"{stack['endpoint']}/invocations",
        json={"dataframe_split": example.to_dict(orient="split", index=False)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    got = pd.json_normalize(response.json()["predictions"]).to_numpy().ravel()
    np.testing.assert_allclose(got, expected.ravel(), atol=1e-5)


def test_gate_rejection_registers_but_deploys_nothing(stack, first_run):
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    # Same data, code and parameters as @champion v1: only forced does it train again.
    dag_run = _dag().test(run_conf={**FAST, "max_rmse": 1e-6, "force_retrain": True})
    states = task_states(dag_run)
    assert str(dag_run.state) == "success", states  # "not deployed" is an outcome, not a crash
    assert states["not_deployed"] == "success"
    assert states["rollout_local"] == "skipped"
    assert _xcom(dag_run, "gate", key="route") == "not_deployed"
    assert _xcom(dag_run, "gate", key="request") is None
    summary = _xcom(dag_run, "gate", key="summary")
    assert _xcom(dag_run, "not_deployed") == f"Version 2 not deployed: {summary}"

    client = _client(stack["tracking_uri"])
    rejected = client.get_model_version(MODEL, "2")
    assert rejected.tags["gate.passed"] == "false"
    assert rejected.tags["gate.check.max_rmse"].startswith("failed")
    assert "RMSE" in rejected.tags["gate.reasons"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert not rejected.aliases
    assert LocalTarget(DeploySettings(), stack["tracking_uri"]).active_version() == "1"


def test_corrupt_partition_fails_validation_and_registers_nothing(stack, first_run, monkeypatch):
    # A user source: the synthetic partitions so far, plus one corrupt file on the last day.
    files = stack["root"] / "user-data"
    shutil.copytree(stack["root"] / "data", files, dirs_exist_ok=True)
    bad_day = files / f"date={date(2026, 3, 9).isoformat()}"
    (bad_day / "part-corrupt.parquet").write_bytes(b"this is not parquet")
    monkeypatch.setenv("PIPELINE_DATA_SOURCE", "files")
    monkeypatch.setenv("PIPELINE_DATA_PATH", str(files))

    client = _client(stack["tracking_uri"])
    versions_before = len(client.search_model_versions(f"name='{MODEL}'"))

    dag_run = _dag().test(run_conf=FAST)
    states = task_states(dag_run)
    assert str(dag_run.state) == "failed"
    assert states["validate_data"] == "failed"
    assert states["train"] == "upstream_failed"
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions_before
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"


def test_validation_error_names_partition_column_and_rule(stack, tmp_path):
    """The message a user sees in the validate_data log, produced by the same step function."""
    from ml.data import DataValidationError
    from ml.pipeline import load_window, validate_window
    from ml.settings import DataSettings

    settings = DataSettings(path=str(tmp_path), window_days=2)
    window = load_window(settings, END)
    bad = pd.read_parquet(window["partitions"][0]["uri"])
    bad.loc[3, bad.columns[0]] = np.nan
    bad.to_parquet(window["partitions"][0]["uri"])
    with pytest.raises(DataValidationError) as excinfo:
        validate_window({**window}, settings.model_copy(update={"source": "files"}))
    message = str(excinfo.value)
    assert window["partitions"][0]["uri"] in message
    assert bad.columns[0] in message and "nulls" in message


def test_train_step_fails_fast_and_clearly_when_the_registry_is_down(tmp_path):
    from ml.pipeline import load_window, train
    from ml.registry import RegistryUnavailableError
    from ml.settings import DataSettings, RegistrySettings, TrainingSettings

    dead = f"http://127.0.0.1:{free_port()}"
    settings = DataSettings(path=str(tmp_path), window_days=1)
    window = load_window(settings, END)
    with pytest.raises(RegistryUnavailableError) as excinfo:
        train(window, settings, TrainingSettings(epochs=1), RegistrySettings(), tracking_uri=dead)
    assert dead in str(excinfo.value)
