"""Score models on the holdout and record the result on the training run.

The challenger and the champion are scored by the same code on the same holdout, so the
gate compares like with like. ``regression_metrics`` is pure NumPy; MLflow and matplotlib are
imported only by the functions that do I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ml import drift
from ml.plotting import new_figure
from ml.stream import BottomK, RunningStats, Source, holdout_rank
from serving.server.contract import PREDICTION_COLUMN

PREDICTIONS_PLOT = "plots/predictions_vs_truth.png"
RESIDUALS_PLOT = "plots/residuals.png"
# The rows a rollout verifies the live endpoint on, with this model's own predictions for them:
# chosen once, here, and logged with the training run (serving.deploy.verify reads them back).
VERIFICATION_ROWS_ARTIFACT = "verification/rows.json"
# The training data's profile (ml.drift), which monitor_drift scores newer partitions against.
DRIFT_PROFILE_ARTIFACT = "drift/profile.json"
# A streamed evaluation keeps this many holdout rows (a uniform sample, by the holdout hash) for
# the drift profile, the plots and the verification rows; smaller holdouts are kept whole.
SAMPLE_ROWS = 100_000
# Scatter plots draw at most this many of them.
PLOT_ROWS = 10_000


def regression_metrics(y_true, y_pred) -> dict[str, float]:
    """RMSE, MAE and R² of ``y_pred`` against ``y_true`` (1-D, same length, finite)."""
    accumulator = MetricsAccumulator()
    accumulator.update(y_true, y_pred)
    return accumulator.result()


class MetricsAccumulator:
    """RMSE, MAE and R² over a stream of (truth, prediction) batches."""

    def __init__(self) -> None:
        self.squared = 0.0
        self.absolute = 0.0
        self.truth = RunningStats(1)

    def update(self, y_true, y_pred) -> None:
        truth = np.asarray(y_true, dtype="float64")
        pred = np.asarray(y_pred, dtype="float64")
        if truth.shape != pred.shape or truth.ndim != 1:
            raise ValueError(f"shape mismatch: y_true {truth.shape} vs y_pred {pred.shape}")
        if not (np.all(np.isfinite(truth)) and np.all(np.isfinite(pred))):
            raise ValueError("y_true and y_pred must be finite")
        residuals = truth - pred
        self.squared += float(np.sum(residuals**2))
        self.absolute += float(np.sum(np.abs(residuals)))
        self.truth.update(truth.reshape(-1, 1))

    def result(self) -> dict[str, float]:
        n = self.truth.n
        if n == 0:
            raise ValueError("cannot compute metrics on zero rows")
        ss_tot = float(self.truth.m2[0])
        ss_res = self.squared
        # A constant target has no variance to explain: follow scikit-learn (perfect -> 1, else
        # 0) rather than return NaN/-inf, which would poison gate comparisons.
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
        return {"rmse": float(np.sqrt(ss_res / n)), "mae": self.absolute / n, "r2": float(r2)}


def predict(model_uri: str, frame: pd.DataFrame, feature_columns: list[str]) -> np.ndarray:
    """Predictions of the MLflow model at ``model_uri`` as a 1-D float64 array."""
    import mlflow.pyfunc

    return _predict_with(mlflow.pyfunc.load_model(model_uri), frame, feature_columns)


def _predict_with(model, frame: pd.DataFrame, feature_columns: list[str]) -> np.ndarray:
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing feature columns: {missing}")
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
    doubles = [s.name for s in schema.inputs if s.type == DataType.double]
    doubles = {name: "float64" for name in doubles if name in features.columns}
    return features.astype(doubles) if doubles else features


@dataclass
class StreamedEvaluation:
    """Metrics per model over every holdout row, and the rows kept (``sample``: features and
    target, in stream order; the first model's ``predictions`` on them)."""

    metrics: dict[str, dict[str, float]]
    rows: int
    sample: pd.DataFrame
    predictions: np.ndarray


def evaluate_stream(
    model_uris: Mapping[str, str], source: Source, feature_columns: list[str],
    target_column: str, *, seed: int, sample_rows: int = SAMPLE_ROWS,
) -> StreamedEvaluation:  # fmt: skip
    """Score every model of ``model_uris`` on the rows of ``source`` in one pass, a record
    batch at a time (each model loaded once); keep at most ``sample_rows`` rows, those with
    the smallest holdout hash (``ml.stream.holdout_rank`` with ``seed``): all of them when
    the holdout is smaller."""
    import mlflow.pyfunc

    if not model_uris:
        raise ValueError("no model to evaluate")
    models = {key: mlflow.pyfunc.load_model(uri) for key, uri in model_uris.items()}
    first = next(iter(models))
    metrics = {key: MetricsAccumulator() for key in models}
    kept = BottomK(sample_rows)
    rows = 0
    for values, hashes in source.batches():
        frame = pd.DataFrame(values[:, :-1], columns=list(feature_columns))
        truth = values[:, -1]
        predictions = {}
        for key, model in models.items():
            predictions[key] = _predict_with(model, frame, feature_columns)
            metrics[key].update(truth, predictions[key])
        positions = np.arange(rows, rows + len(values))
        kept.add(
            holdout_rank(hashes, seed), np.column_stack([values, predictions[first]]), positions
        )
        rows += len(values)
    if rows == 0:
        raise ValueError("the holdout has no rows: more data, or a larger holdout_fraction")
    sample, _ = kept.result()
    sample = sample.reshape(-1, len(feature_columns) + 2)
    frame = pd.DataFrame(sample[:, :-1], columns=[*feature_columns, target_column])
    return StreamedEvaluation(
        metrics={key: accumulator.result() for key, accumulator in metrics.items()},
        rows=rows,
        sample=frame,
        predictions=sample[:, -1],
    )


def log_evaluation(
    run_id: str, holdout: pd.DataFrame, target_column: str, predictions: np.ndarray,
    metrics: Mapping[str, float], champion_metrics: Mapping[str, float] | None,
    champion_version: str | None, *, feature_columns: list[str] | None = None,
    holdout_rows: int | None = None,
) -> None:  # fmt: skip
    """Record the holdout evaluation on the challenger's run.

    Metrics as ``holdout_<name>`` (and ``champion_holdout_<name>`` when a champion was
    scored), the champion's version as a tag, two diagnostic plots and, given the feature
    columns, the fixed rows every rollout of this model verifies the endpoint on
    (:func:`verification_rows`) and the drift profile. ``holdout`` may be a sample of the
    holdout (a streamed evaluation's): ``holdout_rows`` then says how many rows it had.
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
    values["holdout_rows"] = float(holdout_rows if holdout_rows is not None else len(truth))
    if champion_metrics is not None:
        values |= {f"champion_holdout_{k}": float(v) for k, v in champion_metrics.items()}
    tags = [RunTag("champion_version", str(champion_version))] if champion_version else []

    client = MlflowClient()
    client.log_batch(
        run_id, [Metric(key, value, now, 0) for key, value in values.items()], [], tags
    )
    shown = truth[:PLOT_ROWS], predictions[:PLOT_ROWS]
    client.log_figure(run_id, _predictions_vs_truth_figure(*shown), PREDICTIONS_PLOT)
    client.log_figure(run_id, _residuals_figure(*shown), RESIDUALS_PLOT)
    if feature_columns:
        rows = verification_rows(holdout, feature_columns, predictions)
        client.log_dict(run_id, rows, VERIFICATION_ROWS_ARTIFACT)
        profile = drift_profile(holdout, feature_columns, target_column, predictions)
        if holdout_rows is not None:
            profile["rows"] = int(holdout_rows)
        client.log_dict(run_id, profile, DRIFT_PROFILE_ARTIFACT)


def drift_profile(
    holdout: pd.DataFrame, feature_columns: list[str], target_column: str, predictions: np.ndarray
) -> dict:
    """What the drift monitor compares new data with: the holdout's features, target and this
    model's predictions on it (the holdout is a seeded sample of the whole training window)."""
    frame = holdout[list(feature_columns)].copy()
    frame[drift.TARGET_KEY] = holdout[target_column].to_numpy()
    frame[drift.PREDICTION_KEY] = np.asarray(predictions, dtype="float64").reshape(-1)
    return drift.profile_frame(frame, [*feature_columns, drift.TARGET_KEY, drift.PREDICTION_KEY])


def verification_rows(
    holdout: pd.DataFrame, feature_columns: list[str], predictions: np.ndarray, rows: int = 64
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


def _predictions_vs_truth_figure(truth: np.ndarray, predictions: np.ndarray):
    figure = new_figure(5.5, 5.0)
    ax = figure.add_subplot()
    ax.scatter(truth, predictions, s=8, alpha=0.5)
    low = float(min(truth.min(), predictions.min()))
    high = float(max(truth.max(), predictions.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="perfect")
    ax.set(xlabel="truth", ylabel="prediction", title="Holdout: predictions vs truth")
    ax.legend(loc="upper left")
    return figure


def _residuals_figure(truth: np.ndarray, predictions: np.ndarray):
    residuals = truth - predictions
    figure = new_figure(10.0, 4.0)
    vs_prediction, histogram = figure.subplots(1, 2)
    vs_prediction.scatter(predictions, residuals, s=8, alpha=0.5)
    vs_prediction.axhline(0.0, color="black", linewidth=1)
    vs_prediction.set(
        xlabel="prediction", ylabel="residual (truth - prediction)", title="Residuals vs prediction"
    )
    histogram.hist(residuals, bins=30)
    histogram.set(xlabel="residual", ylabel="rows", title="Residual distribution")
    return figure
