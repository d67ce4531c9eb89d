"""The MLflow Connection's credentials reach MLflow while a task runs, and only then."""

from __future__ import annotations

import json
import os

import pytest

from tests.dags.conftest import load_dag


@pytest.fixture
def connection(monkeypatch):
    conn = {"conn_type": "http", "host": "mlflow.example", "port": 5000,
            "login": "robot", "password": "s3cret"}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps(conn))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-shell")


def test_reading_the_endpoint_writes_nothing_into_the_environment(connection):
    import _support

    assert _support.tracking_uri() == "http://mlflow.example:5000"
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-the-shell"


def test_a_task_has_the_credentials_while_it_runs_and_leaves_the_environment_as_it_was(
    connection,
):
    import _support

    _support._credentials_on({})
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "robot"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    _support._credentials_off({})
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-the-shell"


@pytest.mark.parametrize(
    "dag_id", ["train_and_deploy", "deploy_model", "reconcile_deployment", "monitor_drift"]
)
def test_every_task_that_may_talk_to_mlflow_gets_them(dag_id):
    import _support

    for task in load_dag(dag_id).tasks:
        assert task._pre_execute_hook is _support._credentials_on, task.task_id
        assert task._post_execute_hook is _support._credentials_off, task.task_id
