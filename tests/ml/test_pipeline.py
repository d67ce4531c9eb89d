"""The pipeline's steps chained as the DAG chains them, on a real MLflow store and tiny data.

Each step takes and returns JSON-able references only: the test passes every result through
``json`` (what XCom does) before the next step sees it. The chain trains and logs a real Keras
model, so like the other training tests it is marked ``integration``.
"""

from __future__ import annotations

import json
from datetime import date

import pytest

from ml import lineage, pipeline
from ml.settings import (
    DataSettings,
    DriftSettings,
    GateSettings,
    RegistrySettings,
    TrainingSettings,
)

END = date(2026, 11, 29)
NEXT = date(2026, 12, 2)  # the monitor's 3-day window right after the training window
REGISTRY = RegistrySettings(model_name="pipeline-test", experiment_name="pipeline-test")
TRAINING = TrainingSettings(epochs=2, hidden_units=[8], early_stopping_patience=1, threads=1)


def xcom(value):
    return json.loads(json.dumps(value))


@pytest.fixture
def data(tmp_path) -> DataSettings:
    # The default 400 rows a day: the drift profile is the holdout's (~560 rows); much smaller
    # holdouts make its deciles noisy enough to read the season's change as drift.
    return DataSettings(path=str(tmp_path / "data"), window_days=7, synthetic_rows_per_day=400)


def test_load_window_writes_once_and_its_digest_follows_the_data(data):
    first = xcom(pipeline.load_window(data, END))
    assert [p["day"] for p in first["partitions"]] == [f"2026-11-{d}" for d in range(22, 29)]
    assert (first["start"], first["end"], first["source"]) == (
        "2026-11-22",
        "2026-11-29",
        "synthetic",
    )
    assert xcom(pipeline.load_window(data, END)) == first  # same files, same digest

    later = xcom(pipeline.load_window(data, date(2026, 11, 30)))
    assert later["digest"] != first["digest"]


def test_validate_window_counts_rows_and_names_a_bad_partition(data):
    import pandas as pd

    from ml.data import DataValidationError

    window = xcom(pipeline.load_window(data, END))
    assert pipeline.validate_window(window, data)["total_rows"] == 2800

    uri = window["partitions"][0]["uri"]
    frame = pd.read_parquet(uri)
    frame.loc[3, "target"] = None
    frame.to_parquet(uri)
    with pytest.raises(DataValidationError) as err:
        pipeline.validate_window(window, data)
    assert "2026-11-22" in str(err.value) and "target" in str(err.value)


def test_holdout_is_the_same_rows_every_time(data):
    from ml.data import Partition, read_frame, split_holdout
    from ml.schema import load_schema

    window = xcom(pipeline.load_window(data, END))
    _, first = pipeline.holdout_frame(window, data)
    _, again = pipeline.holdout_frame(window, data)
    assert 480 <= len(first) <= 640  # holdout_fraction 0.2 of 2800 rows, by a hash per row
    assert first.equals(again)
    # The streamed holdout is the in-memory split's.
    partitions = [Partition(date.fromisoformat(p["day"]), p["uri"]) for p in window["partitions"]]
    whole = read_frame(partitions, load_schema(data), data)
    _, in_memory = split_holdout(whole, data.holdout_fraction, data.split_seed)
    assert first.equals(in_memory)


@pytest.mark.integration
def test_steps_chain_from_window_to_champion_and_the_next_run_meets_it(
    data, mlflow_store, monkeypatch
):
    from ml.registry import Registry

    window = xcom(pipeline.load_window(data, END))
    key = "train_and_deploy/run-1/train"
    trained = xcom(
        pipeline.train(window, data, TRAINING, REGISTRY, tracking_uri=mlflow_store,
                       tags={"pipeline_run_key": key})
    )  # fmt: skip
    evaluation = xcom(pipeline.evaluate(window, trained, data, REGISTRY, tracking_uri=mlflow_store))
    _, holdout = pipeline.holdout_frame(window, data)
    assert evaluation["champion"] is None and evaluation["holdout_rows"] == len(holdout)
    version = xcom(
        pipeline.register(window, trained, evaluation, REGISTRY, tracking_uri=mlflow_store)
    )
    lenient = GateSettings(max_rmse=1e6, min_r2=-1e6)
    decision = xcom(
        pipeline.gate(version, evaluation, lenient, REGISTRY, tracking_uri=mlflow_store)
    )
    assert decision["passed"] and not decision["has_champion"]

    registry = Registry(mlflow_store, REGISTRY)
    registered = registry.get(version["version"])
    assert registered.tags["data_digest"] == window["digest"]
    assert registered.tags["gate.passed"] == "true"
    # The training's identity, on the run and on the version, as a later run compares it.
    identity = lineage.training_identity(window["digest"], TRAINING, data)
    run_tags = registry.client.get_run(trained["run_id"]).data.tags
    for tag, value in identity.items():
        assert registered.tags[tag] == run_tags[tag] == value, tag
    assert registry.get(REGISTRY.challenger_alias).version == version["version"]
    # What the rollout does once the version is verified live (serving.deploy.rollout:
    # _promote moves @champion, _drop_challenger retires @challenger naming it).
    registry.set_alias(REGISTRY.champion_alias, version["version"])
    registry.delete_alias(REGISTRY.challenger_alias)
    # A training pod's result, read back by its run key, is what train() returned.
    assert pipeline.trained_by(key, REGISTRY, tracking_uri=mlflow_store) == trained
    # Same window, code and parameters as the champion: nothing to do, unless forced.
    check = pipeline.unchanged_check(window, data, TRAINING, REGISTRY, tracking_uri=mlflow_store)
    assert check["unchanged"] and check["champion_version"] == version["version"]
    forced = pipeline.unchanged_check(
        window, data, TRAINING, REGISTRY, tracking_uri=mlflow_store, force=True
    )
    assert not forced["unchanged"]

    # The next run compares against that champion on its own holdout, and a strict gate holds.
    evaluation2 = xcom(
        pipeline.evaluate(window, trained, data, REGISTRY, tracking_uri=mlflow_store)
    )
    assert evaluation2["champion_version"] == version["version"]
    assert evaluation2["champion"] == pytest.approx(evaluation2["candidate"])  # the same model
    version2 = xcom(
        pipeline.register(window, trained, evaluation2, REGISTRY, tracking_uri=mlflow_store)
    )
    strict = GateSettings(max_rmse=1e-9)
    decision2 = xcom(
        pipeline.gate(version2, evaluation2, strict, REGISTRY, tracking_uri=mlflow_store)
    )
    assert not decision2["passed"]
    assert registry.get(version2["version"]).tags["gate.passed"] == "false"
    with pytest.raises(LookupError):  # promotion retired @challenger; a rejection sets none
        registry.get(REGISTRY.challenger_alias)
    assert registry.champion().version == version["version"]

    # monitor_drift: the champion's profile was logged at evaluation; the next days score
    # against it. An ordinary few days do not retrain; a drifted target does, and says why.
    import mlflow

    from ml.evaluate import DRIFT_PROFILE_ARTIFACT

    profile = mlflow.artifacts.load_dict(f"runs:/{trained['run_id']}/{DRIFT_PROFILE_ARTIFACT}")
    assert set(profile["columns"]) >= {"temperature_c", "__target__", "__prediction__"}
    drift_settings = DriftSettings()
    newest = xcom(pipeline.load_window(data.model_copy(update={"window_days": 3}), NEXT))
    calm = xcom(
        pipeline.monitor_drift(newest, data, drift_settings, REGISTRY, tracking_uri=mlflow_store)
    )
    assert calm["champion_version"] == version["version"] and calm["predictions_scored"]
    assert calm["retrain"] is False, calm["summary"]
    assert set(calm["scores"]) == set(profile["columns"])
    assert calm["rows_scored"] == calm["rows"] > 0  # a window this small is scored whole

    moved = data.model_copy(
        update={
            "path": data.path + "-drifted",
            "synthetic_drift_start": END,
            "synthetic_drift_strength": 2.0,
        }
    )
    drifted_window = xcom(pipeline.load_window(moved.model_copy(update={"window_days": 3}), NEXT))
    # A window larger than the sample: its partitions are read one by one and a sample scored.
    from ml import drift

    monkeypatch.setattr(drift, "SAMPLE_ROWS", calm["rows"] // 3)
    drifted = xcom(
        pipeline.monitor_drift(
            drifted_window, moved, drift_settings, REGISTRY, tracking_uri=mlflow_store
        )
    )
    assert drifted["retrain"] is True and "__target__" in drifted["drifted"]
    assert (drifted["rows"], drifted["rows_scored"]) == (calm["rows"], calm["rows"] // 3)
    report_run = mlflow.get_run(drifted["run_id"])
    assert report_run.data.tags["drift.retrain"] == "true"
    assert report_run.data.metrics["psi.__target__"] == drifted["scores"]["__target__"]
    assert mlflow.artifacts.load_dict(f"runs:/{drifted['run_id']}/drift/report.json")["retrain"]
