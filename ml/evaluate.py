"""Score models on the holdout and record the result on the training run.

The challenger and the champion are scored by the same code on the same holdout, so the
gate compares like with like. ``regression_metrics`` is pure NumPy; MLflow, pandas and
matplotlib are imported only by the functions that do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from serving.server.contract import PREDICTION_COLUMN

PREDICTIONS_PLOT = "plots/predictions_vs_truth.png"
RESIDUALS_PLOT = "plots/residuals.png"
# The rows a rollout verifies the live endpoint on, with this model's own predictions for them:
# chosen once, here, and logged with the training run (serving.deploy.verify reads them back).
VERIFICATION_ROWS_ARTIFACT = "verification/rows.json"
# The training data's profile (ml.drift), which monitor_drift scores newer partitions against.
DRIFT_PROFILE_ARTIFACT = "drift/profile.json"
VERIFICATION_ROWS = 64


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """RMSE, MAE and R² of ``y_pred`` against ``y_true`` (1-D, same length, finite)."""
    truth = np.asarray(y_true, dtype="float64")
    pred = np.asarray(y_pred, dtype="float64")
    if truth.ndim != 1 or pred.ndim != 1:
        raise ValueError(f"expected 1-D arrays, got shapes {truth.shape} and {pred.shape}")
    if truth.shape != pred.shape:
        raise ValueError(f"shape mismatch: y_true {truth.shape} vs y_pred {pred.shape}")
    if truth.size == 0:
        raise ValueError("cannot compute metrics on zero rows")
    if not (np.all(np.isfinite(truth)) and np.all(np.isfinite(pred))):
        raise ValueError("y_true and y_pred must be finite")

    residuals = truth - pred
    ss_res = float(np.sum(residuals**2))
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    # A constant target has no variance to explain: follow scikit-learn (perfect -> 1, else 0)
    # rather than return NaN/-inf, which would poison gate comparisons.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return {
        "rmse": float(np.sqrt(np.mean(residuals**2))),
        "mae": float(np.mean(np.abs(residuals))),
        "r2": float(r2),
    }


def predict(model_uri: str, frame: pd.DataFrame, feature_columns: list[str]) -> np.ndarray:
    """Predictions of the MLflow model at ``model_uri`` as a 1-D float64 array."""
    import mlflow.pyfunc
    import pandas as pd

    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing feature columns: {missing}")
    model = mlflow.pyfunc.load_model(model_uri)
    output = model.predict(_cast_to_signature_doubles(model, frame[list(feature_columns)]))
    # Our pyfunc returns a "prediction" column; tolerate other pyfuncs' shapes too.
    if isinstance(output, pd.DataFrame):
        output = output[PREDICTION_COLUMN] if PREDICTION_COLUMN in output else output.iloc[:, 0]
    predictions = np.asarray(output, dtype="float64").reshape(-1)
    if predictions.shape[0] != len(frame):
        raise ValueError(f"model returned {predictions.shape[0]} predictions for {len(frame)} rows")
    return predictions


def _cast_to_signature_doubles(model, features: pd.DataFrame) -> pd.DataFrame:
    """Cast the columns the signature declares "double" to float64.

    MLflow's schema enforcement refuses int64 -> double ("not safe": > 2**53), so an integer
    feature column in a frame would fail in-process even though JSON requests (which the
    scoring server casts to the schema's types) succeed.
    """
    from mlflow.types import DataType

    schema = model.metadata.get_input_schema()
    if schema is None or schema.is_tensor_spec():
        return features
    doubles = {
        spec.name: "float64"
        for spec in schema.inputs
        if spec.type == DataType.double and spec.name in features.columns
    }
    return features.astype(doubles) if doubles else features


def evaluate_on_holdout(
    model_uri: str, holdout: pd.DataFrame, feature_columns: list[str], target_column: str
) -> dict[str, float]:
    """``regression_metrics`` of the model at ``model_uri`` on ``holdout``."""
    if target_column not in holdout.columns:
        raise ValueError(f"holdout is missing target column {target_column!r}")
    predictions = predict(model_uri, holdout, feature_columns)
    return regression_metrics(holdout[target_column].to_numpy(), predictions)


def log_evaluation(
    run_id: str,
    holdout: pd.DataFrame,
    target_column: str,
    predictions: np.ndarray,
    metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    champion_version: str | None,
    *,
    feature_columns: list[str] | None = None,
) -> None:
    """Record the holdout evaluation on the challenger's run.

    Metrics as ``holdout_<name>`` (and ``champion_holdout_<name>`` when a champion was
    scored), the champion's version as a tag, two diagnostic plots and, given the feature
    columns, the fixed rows every rollout of this model verifies the endpoint on
    (:func:`verification_rows`).
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    truth = holdout[target_column].to_numpy(dtype="float64")
    predictions = np.asarray(predictions, dtype="float64").reshape(-1)
    if truth.shape != predictions.shape:
        raise ValueError(f"{len(truth)} holdout rows but {predictions.shape[0]} predictions")

    now = get_current_time_millis()
    values = {f"holdout_{k}": float(v) for k, v in metrics.items()}
    values["holdout_rows"] = float(len(truth))
    if champion_metrics is not None:
        values |= {f"champion_holdout_{k}": float(v) for k, v in champion_metrics.items()}
    tags = [RunTag("champion_version", str(champion_version))] if champion_version else []

    client = MlflowClient()
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, now, 0) for key, value in values.items()],
        tags=tags,
    )
    client.log_figure(run_id, _predictions_vs_truth_figure(truth, predictions), PREDICTIONS_PLOT)
    client.log_figure(run_id, _residuals_figure(truth, predictions), RESIDUALS_PLOT)
    if feature_columns:
        client.log_dict(
            run_id,
            verification_rows(holdout, feature_columns, predictions),
            VERIFICATION_ROWS_ARTIFACT,
        )
        client.log_dict(
            run_id,
            drift_profile(holdout, feature_columns, target_column, predictions),
            DRIFT_PROFILE_ARTIFACT,
        )


def drift_profile(
    holdout: pd.DataFrame,
    feature_columns: list[str],
    target_column: str,
    predictions: np.ndarray,
) -> dict:
    """What the drift monitor compares new data with: the holdout's features, target and this
    model's predictions on it (the holdout is a seeded sample of the whole training window)."""
    from ml import drift

    frame = holdout[list(feature_columns)].copy()
    frame[drift.TARGET_KEY] = holdout[target_column].to_numpy()
    frame[drift.PREDICTION_KEY] = np.asarray(predictions, dtype="float64").reshape(-1)
    return drift.profile_frame(frame, [*feature_columns, drift.TARGET_KEY, drift.PREDICTION_KEY])


def verification_rows(
    holdout: pd.DataFrame,
    feature_columns: list[str],
    predictions: np.ndarray,
    rows: int = VERIFICATION_ROWS,
) -> dict:
    """The first ``rows`` holdout rows and the model's predictions for them, as JSON.

    Fixed when the version is evaluated, so a rollout verifies on the same rows whenever it
    runs (a later data window or changed settings cannot change them), and the verifier needs
    no model load: it compares the endpoint's answers with these numbers.
    """
    head = holdout[list(feature_columns)].head(rows)
    return {
        "columns": [str(c) for c in feature_columns],
        "data": head.astype("float64").to_numpy().tolist(),
        "predictions": np.asarray(predictions, dtype="float64").reshape(-1)[: len(head)].tolist(),
    }


# Figures are built with the object-oriented API on an Agg canvas: no pyplot global state,
# no GUI backend, safe inside Airflow workers and threads.
def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _predictions_vs_truth_figure(truth: np.ndarray, predictions: np.ndarray):
    figure = new_figure(5.5, 5.0)
    ax = figure.add_subplot()
    ax.scatter(truth, predictions, s=8, alpha=0.5)
    low = float(min(truth.min(), predictions.min()))
    high = float(max(truth.max(), predictions.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="perfect")
    ax.set_xlabel("truth")
    ax.set_ylabel("prediction")
    ax.set_title("Holdout: predictions vs truth")
    ax.legend(loc="upper left")
    return figure


def _residuals_figure(truth: np.ndarray, predictions: np.ndarray):
    residuals = truth - predictions
    figure = new_figure(10.0, 4.0)
    vs_prediction, histogram = figure.subplots(1, 2)
    vs_prediction.scatter(predictions, residuals, s=8, alpha=0.5)
    vs_prediction.axhline(0.0, color="black", linewidth=1)
    vs_prediction.set_xlabel("prediction")
    vs_prediction.set_ylabel("residual (truth - prediction)")
    vs_prediction.set_title("Residuals vs prediction")
    histogram.hist(residuals, bins=30)
    histogram.set_xlabel("residual")
    histogram.set_ylabel("rows")
    histogram.set_title("Residual distribution")
    return figure
