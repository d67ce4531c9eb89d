"""train_model and ml.evaluate against a real (SQLite) MLflow store, on a small easy problem.

The tests that train real Keras models and log them to MLflow (five trainings, each with a
model logged, loaded and predicted through MLflow's pyfunc) are integration tests by nature and
are marked ``integration``: `make test` runs them, `make test-unit` skips them. The argument
checks, the metrics and ``log_evaluation`` stay unit tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.evaluate import (
    PREDICTIONS_PLOT,
    RESIDUALS_PLOT,
    log_evaluation,
    predict,
    regression_metrics,
)
from ml.settings import TrainingSettings
from ml.train import TrainResult, train_model

FEATURES = ["x0", "x1", "x2", "x3"]
TARGET = "target"
DIGEST = "f" * 64  # as long as a sha256: longer than MLflow's 36-char dataset digest column
FAST = TrainingSettings(epochs=8, batch_size=32, hidden_units=[16, 8], learning_rate=0.01)


def synthetic_frame(n_rows: int, seed: int) -> pd.DataFrame:
    """y = 3·x0 - 2·x1 + 0.5·x2 + 10 + small noise; x3 is irrelevant."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, len(FEATURES)))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + 10 + rng.normal(scale=0.3, size=n_rows)
    frame = pd.DataFrame(x, columns=FEATURES)
    frame[TARGET] = y
    return frame


def _train(frame: pd.DataFrame, settings: TrainingSettings = FAST, **kwargs) -> TrainResult:
    return train_model(
        frame,
        FEATURES,
        TARGET,
        settings,
        experiment_name="test-train",
        **kwargs,
    )


@pytest.fixture
def git_sha(monkeypatch):
    monkeypatch.setenv("GIT_SHA", "0123abcd")
    return "0123abcd"


@pytest.mark.integration
def test_run_records_params_epoch_curves_tags_and_dataset(mlflow_store, git_sha):
    from mlflow import MlflowClient

    result = _train(
        synthetic_frame(400, seed=0),
        run_name="nightly",
        tags={"airflow_run_id": "scheduled__2026-01-01"},
        dataset_source="/data/window",
        dataset_digest=DIGEST,
        params_extra={"window_start": "2026-01-01"},
    )

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.run_name == "nightly"
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    assert result.model_uri.startswith("models:/")

    params = run.data.params
    placement = {"runner"} | {f for f in TrainingSettings.model_fields if f.startswith("pod_")}
    assert not placement & set(params), "where it ran is not a hyperparameter"
    for field, value in FAST.model_dump(exclude=placement).items():
        if field != "hidden_units":
            assert params[field] == str(value)
    assert params["hidden_units"] == "16,8"
    assert params["n_rows"] == "400"
    assert params["feature_columns"] == str(FEATURES)
    assert params["window_start"] == "2026-01-01"

    assert run.data.tags["code_version"] == git_sha
    assert run.data.tags["data_digest"] == DIGEST
    assert run.data.tags["airflow_run_id"] == "scheduled__2026-01-01"

    for key in ["loss", "val_loss", "rmse", "val_rmse"]:
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(
            range(result.epochs_run)
        )
    val_rmse = [m.value for m in client.get_metric_history(result.run_id, "val_rmse")]
    assert result.best_val_rmse == pytest.approx(min(val_rmse))
    assert run.data.metrics["best_val_rmse"] == pytest.approx(result.best_val_rmse)

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "training_window"
    assert DIGEST.startswith(dataset_input.dataset.digest)
    assert dataset_input.dataset.source_type == "local"
    assert "x0" in dataset_input.dataset.schema
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_a_streamed_window_logs_the_dataset_schema_a_frame_of_it_logs(mlflow_store):
    """A window streamed from its partitions (no frame to profile) is logged as the training
    input with the schema MLflow infers for the same rows as a pandas frame."""
    import mlflow
    from mlflow import MlflowClient

    from ml.stream import FrameSource
    from ml.train import _dataset

    frame = synthetic_frame(50, seed=1)
    columns = [*FEATURES, TARGET]
    head = frame[columns].to_numpy("float64")[:5]
    mlflow.set_experiment("test-dataset")
    logged = {}
    for name, rows in (("frame", frame), ("stream", FrameSource(frame, columns))):
        with mlflow.start_run() as run:
            dataset = _dataset(rows, head, columns, TARGET, name, "/data/window", DIGEST[:36])
            mlflow.log_input(dataset, context="training")
        (dataset_input,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
        logged[name] = json.loads(dataset_input.dataset.schema)
    assert logged["stream"] == logged["frame"]
    assert [spec["name"] for spec in logged["stream"]["mlflow_colspec"]] == columns


@pytest.mark.integration
def test_logged_model_is_self_describing_and_serves_the_keras_numbers(mlflow_store, tmp_path):
    import keras
    import mlflow

    frame = synthetic_frame(400, seed=1)
    result = _train(frame)

    pyfunc_model = mlflow.pyfunc.load_model(result.model_uri)
    signature = pyfunc_model.metadata.signature
    assert signature.inputs.input_names() == FEATURES
    assert [s.type.name for s in signature.inputs.inputs] == ["double"] * len(FEATURES)
    assert signature.outputs.input_names() == ["prediction"]
    pd.testing.assert_frame_equal(
        pyfunc_model.input_example.reset_index(drop=True),
        frame[FEATURES].head(5).reset_index(drop=True),
    )
    assert mlflow.get_logged_model(result.model_uri.split("/")[-1]).source_run_id == result.run_id
    model_dir = Path(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=tmp_path))
    requirements = (model_dir / "requirements.txt").read_text()
    assert "tensorflow-cpu==" in requirements and "mlflow==" in requirements

    # Shuffled column order: the pyfunc must still feed the network in the trained order.
    served = pyfunc_model.predict(frame[FEATURES[::-1]])
    reference = keras.saving.load_model(model_dir / "artifacts" / "model.keras").predict(
        frame[FEATURES].to_numpy("float32"), verbose=0
    )
    assert list(served.columns) == ["prediction"]
    assert served["prediction"].dtype == np.float64
    np.testing.assert_allclose(served["prediction"], reference.ravel(), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_same_seed_trains_the_same_model(mlflow_store):
    frame = synthetic_frame(300, seed=2)
    settings = FAST.model_copy(update={"epochs": 3})

    first = _train(frame, settings)
    second = _train(frame, settings)

    assert first.run_id != second.run_id
    np.testing.assert_array_equal(
        predict(first.model_uri, frame, FEATURES), predict(second.model_uri, frame, FEATURES)
    )


@pytest.mark.integration
def test_trained_model_beats_predicting_the_mean(mlflow_store):
    result = _train(synthetic_frame(600, seed=3))
    holdout = synthetic_frame(200, seed=4)

    metrics = regression_metrics(holdout[TARGET], predict(result.model_uri, holdout, FEATURES))

    assert metrics["r2"] > 0.8
    assert metrics["rmse"] < holdout[TARGET].std()
    # An integer column is fed to the "double" signature too (MLflow alone would refuse it).
    as_ints = holdout.assign(x3=holdout["x3"].round().astype("int64"))
    assert predict(result.model_uri, as_ints, FEATURES).shape == (len(holdout),)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["x1"]), "missing columns"),
        (lambda f: f.drop(columns=[TARGET]), "missing columns"),
        (lambda f: f.head(5), "rows"),
        (lambda f: f.assign(x0=np.where(f.index == 3, np.nan, f["x0"])), "missing values"),
        (lambda f: f.assign(x2="text"), "numeric"),
    ],
)
def test_rejects_unusable_frames_before_touching_mlflow(mutate, message):
    with pytest.raises(ValueError, match=message):
        _train(mutate(synthetic_frame(50, seed=5)))


def test_rejects_the_target_as_a_feature():
    with pytest.raises(ValueError, match="also listed as a feature"):
        train_model(
            synthetic_frame(50, seed=5),
            [*FEATURES, TARGET],
            TARGET,
            FAST,
            experiment_name="unused",
        )


def test_regression_metrics_on_a_hand_computed_table():
    y_true = [1.0, 2.0, 3.0, 4.0]
    y_pred = [1.0, 3.0, 2.0, 4.0]
    # residuals 0, -1, 1, 0 -> MSE 0.5; mean 2.5 -> SS_tot 5, SS_res 2.
    metrics = regression_metrics(y_true, y_pred)

    assert metrics == pytest.approx({"rmse": np.sqrt(0.5), "mae": 0.5, "r2": 1 - 2 / 5})
    assert all(isinstance(v, float) for v in metrics.values())
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["r2"] == 1.0


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [([1.0, 2.0], [1.0]), ([], []), ([1.0, np.nan], [1.0, 2.0]), ([[1.0, 2.0]], [[1.0, 2.0]])],
)
def test_regression_metrics_rejects_bad_input(y_true, y_pred):
    with pytest.raises(ValueError):
        regression_metrics(y_true, y_pred)


def test_log_evaluation_records_metrics_champion_and_plots(mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    holdout = synthetic_frame(60, seed=6)
    predictions = holdout[TARGET].to_numpy() + np.random.default_rng(0).normal(size=60)
    metrics = regression_metrics(holdout[TARGET], predictions)
    champion = {"rmse": 1.5, "mae": 1.2, "r2": 0.7}
    mlflow.set_experiment("test-evaluate")  # not the cached id of an earlier test's store
    with mlflow.start_run() as run:
        pass

    log_evaluation(run.info.run_id, holdout, TARGET, predictions, metrics, champion, "3")

    client = MlflowClient()
    logged = client.get_run(run.info.run_id).data
    for name, value in metrics.items():
        assert logged.metrics[f"holdout_{name}"] == pytest.approx(value)
    for name, value in champion.items():
        assert logged.metrics[f"champion_holdout_{name}"] == pytest.approx(value)
    assert logged.tags["champion_version"] == "3"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {PREDICTIONS_PLOT, RESIDUALS_PLOT}
    png = Path(client.download_artifacts(run.info.run_id, PREDICTIONS_PLOT)).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_log_evaluation_without_champion(mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    holdout = synthetic_frame(20, seed=7)
    mlflow.set_experiment("test-evaluate")  # not the cached id of an earlier test's store
    with mlflow.start_run() as run:
        pass

    log_evaluation(
        run.info.run_id, holdout, TARGET, holdout[TARGET].to_numpy(), {"rmse": 0.0}, None, None
    )

    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.metrics["holdout_rmse"] == 0.0
    assert not any(k.startswith("champion_") for k in logged.metrics)
    assert "champion_version" not in logged.tags


def test_batch_and_learning_rate_grow_with_the_rows_only_for_large_windows():
    from ml.train import sized_to_data

    settings = TrainingSettings()  # batch 64, up to 8192; >= 500 steps an epoch
    # The default window (2,800 rows, ~2,000 of them training) trains as configured.
    assert sized_to_data(2_000, settings) == (64, settings.learning_rate)
    assert sized_to_data(63_000, settings) == (64, settings.learning_rate)
    batch, rate = sized_to_data(680_000, settings)
    assert batch == 1024 and rate == pytest.approx(min(0.005 * 4, settings.max_learning_rate))
    assert sized_to_data(50_000_000, settings) == (8192, settings.max_learning_rate)
    fixed = settings.model_copy(update={"max_batch_size": 64})
    assert sized_to_data(50_000_000, fixed) == (64, settings.learning_rate)
    unscaled = settings.model_copy(update={"scale_learning_rate": False})
    assert sized_to_data(680_000, unscaled) == (1024, settings.learning_rate)
