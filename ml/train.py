"""Fit the regressor and record everything needed to reproduce and serve it in MLflow.

One call = one MLflow run holding: all training settings as params, per-epoch curves,
the training dataset as a run input (with its content digest), the code version, and
the model as a pyfunc (models-from-code ``keras_pyfunc.py`` + the ``.keras`` file) with a
signature, an input example and pinned pip requirements.

The tracking URI is the caller's business (``MLFLOW_TRACKING_URI`` or
``mlflow.set_tracking_uri``); nothing here reads Airflow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd

from ml.export import SlimExportError, write_litert_artifact
from ml.lineage import code_version
from ml.model import build_model, set_global_determinism
from ml.settings import TrainingSettings
from serving.server.contract import (
    KERAS_ARTIFACT_KEY,
    KERAS_CODE_FILE,
    LITERT_ARTIFACT_KEY,
    PREDICTION_COLUMN,
)

if TYPE_CHECKING:
    from ml.stream import Source, TrainingData

log = logging.getLogger(__name__)

# The code file and artifact key are what the model server recognises (serving.server.contract).
PYFUNC_CODE_PATH = Path(__file__).with_name(KERAS_CODE_FILE)
MODEL_NAME_IN_RUN = "model"
# Below this there is no meaningful train/validation split.
MIN_TRAINING_ROWS = 10
INPUT_EXAMPLE_ROWS = 5
# The serving environment: what the pyfunc needs, pinned to what it was trained with.
SERVING_PACKAGES = ("tensorflow-cpu", "keras", "mlflow", "pandas", "numpy")
# MLflow stores a dataset input's digest in a 36-char column; the full digest goes in a tag.
MAX_DATASET_DIGEST_CHARS = 36
MAX_PARAM_VALUE_CHARS = 6000
# Names the pipeline step a training run is an attempt of (Airflow: "<dag>/<run>/<task>").
RUN_KEY_TAG = "pipeline_run_key"
SUPERSEDED_BY_TAG = "superseded_by_run_id"
FAILURE_REASON_TAG = "failure_reason"
# Whether the model has its TensorFlow-free runtime artifact (ml.export), or why not.
SLIM_ARTIFACT_TAG = "slim_artifact"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    epochs_run: int
    best_val_rmse: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_model(
    train_frame: pd.DataFrame | Source, feature_columns: list[str], target_column: str,
    settings: TrainingSettings, *, experiment_name: str, run_name: str | None = None,
    tags: Mapping[str, str] | None = None, dataset_name: str = "training_window",
    dataset_source: str | None = None, dataset_digest: str | None = None,
    params_extra: Mapping[str, Any] | None = None,
) -> TrainResult:  # fmt: skip
    """Train on ``train_frame`` and log the run and the model to MLflow.

    ``train_frame`` is a frame in memory, or an ``ml.stream.Source`` of the rows (the
    pipeline streams the window's training rows: never the whole window in memory). A
    seeded ``settings.validation_fraction`` of the rows (by a hash of each row,
    ``ml.stream``) is held out for early stopping (best weights restored). Returns references
    only: the run id and the logged model's URI (``models:/<model_id>``, accepted by
    ``mlflow.register_model``).

    ``tags`` are on the run from its creation. With ``tags[RUN_KEY_TAG]`` (the pipeline step
    this run is an attempt of), the experiment's RUNNING runs with the same key are earlier
    attempts that died without ending their run (MLflow down, process killed): they are
    marked FAILED, see :func:`fail_dead_attempts`.
    """
    from ml import stream

    feature_columns = list(feature_columns)
    columns = [*feature_columns, target_column]
    if not feature_columns:
        raise ValueError("feature_columns is empty")
    if isinstance(train_frame, pd.DataFrame):
        _check_training_frame(train_frame, feature_columns, target_column)
        source: Source = stream.FrameSource(train_frame, columns)
    else:
        source = train_frame
        if list(source.columns) != columns:
            raise ValueError(f"the source's columns {source.columns} are not {columns}")

    # One streaming pass: counts, scaling statistics, the validation rows.
    data = stream.prepare_training(
        source, settings.validation_fraction, settings.seed, stream.MAX_VALIDATION_ROWS
    )
    total_rows = data.train_rows + data.validation_rows
    if total_rows < MIN_TRAINING_ROWS:
        raise ValueError(
            f"training frame has {total_rows} rows; at least {MIN_TRAINING_ROWS} are needed"
        )
    batch_size, learning_rate = sized_to_data(data.train_rows, settings)
    params = _training_params(settings, total_rows, feature_columns, target_column)
    params.update(
        effective_batch_size=batch_size,
        effective_learning_rate=learning_rate,
        validation_rows=data.validation_rows,
    )
    clashes = sorted(set(params_extra or {}) & set(params))
    if clashes:
        raise ValueError(f"params_extra must not override training params: {clashes}")
    params.update(params_extra or {})

    # float64 for the signature and example, so the signature says "double" for every
    # feature (JSON requests are cast to it by the scoring server; ml.evaluate.predict casts
    # in-process frames). The network itself runs in float32.
    head = _head(source, INPUT_EXAMPLE_ROWS)
    example = pd.DataFrame(head[:, :-1], columns=feature_columns)

    mlflow.set_experiment(experiment_name)
    run_tags = dict(tags or {})
    with mlflow.start_run(run_name=run_name, tags=run_tags) as run:
        if run_key := run_tags.get(RUN_KEY_TAG):
            try:
                fail_dead_attempts(run.info.experiment_id, run_key, superseded_by=run.info.run_id)
            except Exception as exc:  # bookkeeping of the dead attempt: never stops training
                log.warning("Could not mark earlier attempts of %s FAILED: %s", run_key, exc)
        digest = dataset_digest[:MAX_DATASET_DIGEST_CHARS] if dataset_digest else None
        dataset = _dataset(
            train_frame, head, columns, target_column, dataset_name, dataset_source, digest
        )
        mlflow.log_input(dataset, context="training")
        identity = {"code_version": code_version(), "data_digest": dataset_digest or dataset.digest}
        mlflow.set_tags({**run_tags, **identity})
        mlflow.log_params(params)

        model, history, fit_seconds = _fit(source, data, settings, batch_size, learning_rate)
        epochs_run = len(history["loss"])
        best_val_rmse = float(np.min(history["val_rmse"]))
        # fit_*: what make bench-train reads the training throughput from.
        mlflow.log_metrics({"best_val_rmse": best_val_rmse, "epochs_run": epochs_run,
                            "fit_seconds": fit_seconds, "fit_rows": data.train_rows})  # fmt: skip

        model_info = _log_pyfunc_model(model, example, feature_columns)

    return TrainResult(run.info.run_id, model_info.model_uri, epochs_run, best_val_rmse)


def sized_to_data(train_rows: int, settings: TrainingSettings) -> tuple[int, float]:
    """(batch size, learning rate) for ``train_rows`` training rows.

    The batch doubles from ``batch_size`` while an epoch keeps at least
    ``min_steps_per_epoch`` steps, up to ``max_batch_size``: a small window trains exactly as
    configured, a large one in far fewer, larger steps (a step of this network costs about
    the same for 64 rows as for thousands). With ``scale_learning_rate`` the learning rate
    grows with the square root of the batch's growth, capped at ``max_learning_rate`` (never
    below ``learning_rate``).
    """
    batch = settings.batch_size
    while batch * 2 <= settings.max_batch_size and train_rows // (batch * 2) >= max(
        settings.min_steps_per_epoch, 1
    ):
        batch *= 2
    rate = settings.learning_rate
    if settings.scale_learning_rate and batch > settings.batch_size:
        grown = rate * math.sqrt(batch / settings.batch_size)
        rate = max(rate, min(grown, settings.max_learning_rate))
    return batch, rate


def _head(source: Source, rows: int) -> np.ndarray:
    """The first ``rows`` rows of ``source`` in stream order (the input example)."""
    for values, _ in source.batches():
        return values[:rows]
    raise ValueError("the training data has no rows")


def _dataset(frame, head, columns, target_column, name, source, digest=None):
    with warnings.catch_warnings():
        # MLflow registers the local-file source twice and warns about the "ambiguity".
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        if isinstance(frame, pd.DataFrame):
            return mlflow.data.from_pandas(
                frame, source=source, targets=target_column, name=name, digest=digest
            )
        # A stream has no frame to profile: its name, source, digest and the schema MLflow
        # infers for its first rows (the schema from_pandas logs for a frame of the window).
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.models import infer_signature

        return MetaDataset(
            source=resolve_dataset_source(source or "unknown"),
            name=name,
            digest=digest,
            schema=infer_signature(pd.DataFrame(head, columns=columns)).inputs,
        )


def fail_dead_attempts(experiment_id: str, run_key: str, *, superseded_by: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``experiment_id`` tagged ``RUN_KEY_TAG=run_key``
    (except ``superseded_by``, the new attempt's run); returns their run ids.

    Only one attempt of a pipeline step runs at a time (Airflow starts a retry once the
    previous attempt is over), so such a run belongs to an attempt that ended without ending
    its run. Each is tagged with the run that superseded it and why.
    """
    client = mlflow.MlflowClient()
    quote = '"' if "'" in run_key else "'"
    if quote in run_key:
        raise ValueError(f"{RUN_KEY_TAG} must not contain both quote characters: {run_key!r}")
    where = f"tags.{RUN_KEY_TAG} = {quote}{run_key}{quote} and attributes.status = 'RUNNING'"
    runs = mlflow.search_runs([experiment_id], filter_string=where, output_format="list")
    found = [r.info.run_id for r in runs if r.info.run_id != superseded_by]
    for run_id in found:
        client.set_tag(run_id, SUPERSEDED_BY_TAG, superseded_by)
        client.set_tag(
            run_id,
            FAILURE_REASON_TAG,
            f"the attempt died without ending this run; run {superseded_by} is the retry of "
            f"the same pipeline step ({RUN_KEY_TAG}={run_key})",
        )
        client.set_terminated(run_id, status="FAILED")
        log.warning(
            "Marked run %s FAILED: an earlier attempt of %s that died without ending it "
            "(superseded by run %s)", run_id, run_key, superseded_by
        )  # fmt: skip
    return found


def pinned_requirements() -> list[str]:
    """``name==version`` for the serving packages installed here (missing ones skipped)."""
    pins = []
    for package in SERVING_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{package}=={metadata.version(package)}")
    return pins


def _check_training_frame(frame: pd.DataFrame, feature_columns: list[str], target_column: str):
    if target_column in feature_columns:
        raise ValueError(f"target column {target_column!r} is also listed as a feature")
    missing = [c for c in [*feature_columns, target_column] if c not in frame.columns]
    if missing:
        raise ValueError(f"training frame is missing columns: {missing}")
    if len(frame) < MIN_TRAINING_ROWS:
        raise ValueError(
            f"training frame has {len(frame)} rows; at least {MIN_TRAINING_ROWS} are needed"
        )
    used = frame[[*feature_columns, target_column]]
    non_numeric = [c for c in used.columns if not pd.api.types.is_numeric_dtype(used[c])]
    if non_numeric:
        raise ValueError(f"columns must be numeric: {non_numeric}")
    # NaNs would silently turn the loss into NaN and train nothing.
    with_nans = used.columns[used.isna().any()].tolist()
    if with_nans:
        raise ValueError(f"columns contain missing values: {with_nans}")


def _training_params(
    settings: TrainingSettings, n_rows: int, feature_columns: list[str], target_column: str
) -> dict[str, Any]:
    # Where it ran (runner, pod sizing) is not a hyperparameter; threads stay (they can change
    # floating-point summation order).
    params: dict[str, Any] = settings.model_dump(exclude={"runner"})
    params = {k: v for k, v in params.items() if not k.startswith("pod_")}
    params["hidden_units"] = ",".join(str(u) for u in settings.hidden_units)
    params.update(
        n_rows=n_rows,
        n_features=len(feature_columns),
        # Same text MLflow logs for the pyfunc's model_config["feature_columns"]: it logs
        # model_config as run params, and a differing value for the key would clash.
        feature_columns=str(list(feature_columns))[:MAX_PARAM_VALUE_CHARS],
        target_column=target_column,
    )
    return params


def _fit(
    source: Source, data: TrainingData, settings: TrainingSettings, batch_size: int, rate: float
):
    import keras
    import tensorflow as tf

    from ml import stream

    set_global_determinism(settings.seed)
    if settings.threads:
        _limit_threads(settings.threads)
    # Scaling statistics from the training rows only (ml.stream), so validation stays unseen.
    features = len(source.columns) - 1
    model = build_model(features, settings.hidden_units, rate, feature_mean=data.feature_mean,
                        feature_variance=data.feature_variance, target_mean=data.target_mean,
                        target_std=data.target_std)  # fmt: skip
    # Batches come shuffled and sized from the stream; a Python generator feeds tf.data (one
    # call per epoch) and prefetching overlaps reading the next batches with the step.
    batches = (
        tf.data.Dataset.from_generator(
            stream.training_batches(source, data, settings.seed, batch_size),
            output_signature=(
                tf.TensorSpec(shape=(None, features), dtype=tf.float32),
                tf.TensorSpec(shape=(None,), dtype=tf.float32),
            ),
        )
        # Known steps per epoch (and a check that every epoch yields them all).
        .apply(tf.data.experimental.assert_cardinality(-(-data.train_rows // batch_size)))
        .prefetch(4)
    )
    stop = keras.callbacks.EarlyStopping(monitor="val_rmse", mode="min", restore_best_weights=True,
                                         patience=settings.early_stopping_patience)  # fmt: skip
    started = time.perf_counter()
    history = model.fit(
        batches,
        shuffle=False,
        validation_data=(data.validation_x, data.validation_y),
        validation_batch_size=max(batch_size, 4096),
        epochs=settings.epochs,
        verbose=0,
        callbacks=[stop, _mlflow_epoch_logger()],
    )
    # model.fit alone (no imports, no model building): what the bare-loop ceiling compares to.
    return model, history.history, time.perf_counter() - started


def _limit_threads(threads: int) -> None:
    """Size TensorFlow's pools to the CPUs this process may use (a pod's limit)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:  # the runtime is already up (an earlier model in this process)
        log.warning("TensorFlow already initialized: threads=%d not applied", threads)


def _mlflow_epoch_logger():
    """A Keras callback logging every epoch's logs (loss, rmse, val_*) with step=epoch."""
    import keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)

    return MlflowEpochLogger()


def _log_pyfunc_model(model, features: pd.DataFrame, feature_columns: list[str]):
    from mlflow.models import infer_signature

    example = features.head(INPUT_EXAMPLE_ROWS).reset_index(drop=True)
    # A direct call, not model.predict: same numbers the served tf.function produces.
    predictions = pd.DataFrame(
        {"prediction": np.asarray(model(example.to_numpy("float32"))).reshape(-1).astype("float64")}
    )
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        model.save(keras_path)
        artifacts = {KERAS_ARTIFACT_KEY: str(keras_path)}
        # The TensorFlow-free copy for slim serving: optional, so a conversion problem only
        # costs the slim path (the server serves the .keras model instead), never the run.
        litert_dir = Path(tmp) / LITERT_ARTIFACT_KEY
        try:
            diff = write_litert_artifact(
                model, litert_dir, feature_columns=feature_columns, output_name=PREDICTION_COLUMN,
                check_rows=features.to_numpy("float32"), example_rows=example.to_numpy("float32"),
            )  # fmt: skip
        except SlimExportError as exc:
            log.warning("model logged without the LiteRT artifact (no slim serving): %s", exc)
            mlflow.set_tag(SLIM_ARTIFACT_TAG, f"skipped: {exc}"[:MAX_PARAM_VALUE_CHARS])
        else:
            artifacts[LITERT_ARTIFACT_KEY] = str(litert_dir)
            mlflow.set_tag(SLIM_ARTIFACT_TAG, f"litert, max abs diff vs keras {diff:.2g}")
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_CODE_PATH),
            artifacts=artifacts,
            model_config={"feature_columns": feature_columns},
            signature=infer_signature(example, predictions),
            input_example=example,
            pip_requirements=pinned_requirements(),
        )
