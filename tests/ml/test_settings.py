"""Settings: env vars with a prefix per concern, per-run overrides that are validated again."""

from __future__ import annotations

from datetime import date

import pytest
from pydantic import ValidationError

from ml.settings import (
    DataSettings,
    GateSettings,
    RegistrySettings,
    TrainingSettings,
    split_csv,
    split_csv_ints,
    tracking_uri,
    with_overrides,
)


def test_each_concern_reads_its_own_prefix(monkeypatch):
    monkeypatch.setenv("PIPELINE_TRAIN_EPOCHS", "7")
    monkeypatch.setenv("PIPELINE_DATA_WINDOW_DAYS", "3")
    monkeypatch.setenv("PIPELINE_GATE_MAX_RMSE", "1.5")
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", "house-prices")
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_DRIFT_START", "2026-03-01")
    assert TrainingSettings().epochs == 7
    data = DataSettings()
    assert data.window_days == 3 and data.synthetic_drift_start == date(2026, 3, 1)
    assert GateSettings().max_rmse == 1.5
    assert RegistrySettings().model_name == "house-prices"


def test_lists_come_comma_separated_from_env_vars(monkeypatch):
    monkeypatch.setenv("PIPELINE_TRAIN_HIDDEN_UNITS", "128, 16")
    monkeypatch.setenv("PIPELINE_DATA_FEATURE_COLUMNS", "a,b , c,")
    assert TrainingSettings().hidden_units == [128, 16]
    assert DataSettings().feature_columns == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("PIPELINE_TRAIN_EPOCHS", "0", "epochs"),
        ("PIPELINE_TRAIN_HIDDEN_UNITS", "64,0", "hidden_units"),
        ("PIPELINE_TRAIN_RUNNER", "laptop", "runner"),
        ("PIPELINE_DATA_HOLDOUT_FRACTION", "0.95", "holdout_fraction"),
        ("PIPELINE_DATA_SOURCE", "s3", "source"),
        ("PIPELINE_GATE_MIN_R2", "1.5", "min_r2"),
    ],
)
def test_a_bad_env_value_is_an_error_that_names_the_field(monkeypatch, env, value, field):
    monkeypatch.setenv(env, value)
    cls = {"TRAIN": TrainingSettings, "DATA": DataSettings, "GATE": GateSettings}[env.split("_")[1]]
    with pytest.raises(ValidationError) as err:
        cls()
    assert field in str(err.value)


def test_an_unknown_keyword_is_refused_rather_than_ignored():
    with pytest.raises(ValidationError, match="epoch"):
        TrainingSettings(epoch=3)


def test_overrides_are_validated_and_none_means_keep():
    base = TrainingSettings(epochs=10, learning_rate=0.01)
    assert with_overrides(base) is base
    assert with_overrides(base, epochs=None) is base
    changed = with_overrides(base, epochs=3, hidden_units="8,4")
    assert (changed.epochs, changed.hidden_units, changed.learning_rate) == (3, [8, 4], 0.01)
    assert base.epochs == 10  # a copy, the deployment-wide settings are untouched
    with pytest.raises(ValidationError, match="learning_rate"):
        with_overrides(base, learning_rate=-1)
    with pytest.raises(ValidationError, match="unknown_knob"):
        with_overrides(base, unknown_knob=1)


def test_split_helpers_leave_non_strings_alone():
    assert split_csv(["x"]) == ["x"] and split_csv(None) is None
    assert split_csv_ints("1, 2,3") == [1, 2, 3] and split_csv_ints([4]) == [4]
    with pytest.raises(ValueError):
        split_csv_ints("1,two")


def test_tracking_uri_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == "http://127.0.0.1:5000"
