"""A training attempt that died (MLflow down mid-train, worker killed) leaves its MLflow run
RUNNING; the retry of the same pipeline step marks that run FAILED.

The step is named by the ``pipeline_run_key`` tag (Airflow passes ``<dag>/<run>/<task>``);
the dead attempt is a run created with that tag and never ended, as a killed process leaves
it. The retry is ``python -m ml train`` (what the pod runs; the worker's task calls the same
``ml.pipeline.train``) against a real SQLite MLflow store.
"""

from __future__ import annotations

import json
import logging

import pytest

END = "2026-03-10"
EXPERIMENT = "test-dead-attempts"
KEY_TAG = "pipeline_run_key"
# What the DAG passes: an Airflow run id holds ':' and '+'.
KEY = "train_and_deploy/manual__2026-03-10T02:00:00+00:00/train"


@pytest.fixture
def ml_main(mlflow_store, tmp_path, monkeypatch, capsys):
    """``python -m ml <args>`` in this process against the test's MLflow store."""
    from ml.__main__ import main

    monkeypatch.setenv("PIPELINE_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_DATA_WINDOW_DAYS", "2")
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY", "100")
    monkeypatch.setenv("PIPELINE_REGISTRY_EXPERIMENT_NAME", EXPERIMENT)

    def run(*args: str) -> dict:
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out)

    return run


def _run(client, experiment_id: str, tags: dict[str, str], *, end: str | None = None) -> str:
    run = client.create_run(experiment_id, tags=tags, run_name="attempt 1")
    if end:
        client.set_terminated(run.info.run_id, status=end)
    return run.info.run_id


@pytest.mark.integration
def test_the_retry_marks_the_dead_attempts_run_failed(ml_main, tmp_path, caplog):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.create_experiment(EXPERIMENT)
    dead = _run(client, experiment_id, {KEY_TAG: KEY, "airflow_run_id": "manual__1"})
    # Not attempts of this step: another step's live run, and an attempt that ended.
    other_step = _run(client, experiment_id, {KEY_TAG: "train_and_deploy/manual__2/train"})
    untagged = _run(client, experiment_id, {})
    ended = _run(client, experiment_id, {KEY_TAG: KEY}, end="KILLED")

    ml_main("window", "--end", END, "--output", str(tmp_path / "window.json"))
    caplog.set_level(logging.INFO, logger="ml.train")
    trained = ml_main(
        "train",
        *("--window", str(tmp_path / "window.json")),
        *("--epochs", "2"),
        *("--tag", f"{KEY_TAG}={KEY}"),
    )

    new = client.get_run(trained["run_id"])
    assert new.info.status == "FINISHED"
    assert new.data.tags[KEY_TAG] == KEY
    old = client.get_run(dead)
    assert old.info.status == "FAILED"
    assert old.info.end_time is not None
    assert old.data.tags["superseded_by_run_id"] == new.info.run_id
    assert old.data.tags["failure_reason"] == (
        f"the attempt died without ending this run; run {new.info.run_id} is the retry of "
        f"the same pipeline step ({KEY_TAG}={KEY})"
    )
    assert client.get_run(other_step).info.status == "RUNNING"
    assert client.get_run(untagged).info.status == "RUNNING"
    assert client.get_run(ended).info.status == "KILLED"
    assert f"Marked run {dead} FAILED" in caplog.text


@pytest.mark.integration
def test_a_first_attempt_supersedes_nothing_and_no_key_touches_nothing(ml_main, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.create_experiment(EXPERIMENT)
    unkeyed = _run(client, experiment_id, {})
    ml_main("window", "--end", END, "--output", str(tmp_path / "window.json"))
    window = str(tmp_path / "window.json")

    plain = ml_main("train", "--window", window, "--epochs", "1")
    assert KEY_TAG not in client.get_run(plain["run_id"]).data.tags
    assert client.get_run(unkeyed).info.status == "RUNNING"

    keyed = ml_main("train", "--window", window, "--epochs", "1", "--tag", f"{KEY_TAG}={KEY}")
    run = client.get_run(keyed["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[KEY_TAG] == KEY
    assert "superseded_by_run_id" not in run.data.tags
    assert client.get_run(unkeyed).info.status == "RUNNING"


@pytest.mark.parametrize("key", ["dag/run'with'quotes/train", 'dag/run"double/train', KEY])
def test_fail_dead_attempts_matches_the_key_exactly_whatever_it_holds(mlflow_store, key):
    from mlflow import MlflowClient

    from ml.train import fail_dead_attempts

    client = MlflowClient()
    experiment_id = client.create_experiment(EXPERIMENT)
    dead = _run(client, experiment_id, {KEY_TAG: key})
    lookalike = _run(client, experiment_id, {KEY_TAG: key + "x"})
    current = _run(client, experiment_id, {KEY_TAG: key})

    assert fail_dead_attempts(experiment_id, key, superseded_by=current) == [dead]
    assert client.get_run(dead).info.status == "FAILED"
    assert client.get_run(lookalike).info.status == "RUNNING"
    assert client.get_run(current).info.status == "RUNNING"  # the caller's own run
