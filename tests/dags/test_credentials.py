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


def test_the_object_store_connection_reaches_s3_clients_while_a_task_runs(monkeypatch):
    """The data's object store (aws_default) as the variables s3fs and boto3 read, for the
    task's execution only: a worker holds no credential of its own."""
    import _support

    extra = {"endpoint_url": "http://10.0.0.1:9000", "region_name": "eu-west-1"}
    conn = {"conn_type": "aws", "login": "AKIDEXAMPLE", "password": "wJalr/K7MDENG", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    _support._credentials_on({})
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "wJalr/K7MDENG"
    assert os.environ["AWS_ENDPOINT_URL"] == "http://10.0.0.1:9000"
    assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"
    _support._credentials_off({})
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_ENDPOINT_URL" not in os.environ
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
