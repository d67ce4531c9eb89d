"""Typed settings, one object per concern.

Every knob is declared here once: its type, default, bounds, title and description.
Deployment-wide values come from environment variables (prefix per concern, e.g.
``PIPELINE_TRAIN_EPOCHS``); per-run knobs (Airflow Params, CLI options, both derived from these
fields by ``ml.knobs``) override them via :func:`with_overrides`, which re-validates.
Endpoints and secrets do not live here: they come from Airflow Connections (or
``MLFLOW_TRACKING_URI`` outside Airflow).
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Where local state lives when nothing else is configured: the repo's .local/ folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_STATE_DIR = Path(os.environ.get("PIPELINE_STATE_DIR", PROJECT_ROOT / ".local"))


def split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def split_csv_ints(value: Any) -> Any:
    """:func:`split_csv`, then each item as an int (ports, layer sizes)."""
    value = split_csv(value)
    if isinstance(value, list):
        return [int(v) for v in value]
    return value


class DataSettings(BaseSettings):
    """Where training data comes from and what it must look like."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_DATA_", extra="forbid")

    source: Literal["synthetic", "files"] = Field(
        "synthetic",
        description="'synthetic' writes the built-in daily partitions under `path` before "
        "reading them; 'files' reads partitions someone else wrote.",
    )
    path: str = Field(
        str(LOCAL_STATE_DIR / "data"),
        description="Folder or fsspec URL holding partitions laid out as "
        "`<path>/date=YYYY-MM-DD/*.parquet|csv`.",
    )
    format: Literal["parquet", "csv", "jsonl"] = Field(
        "parquet", description="File format of the partitions; jsonl: JSON lines."
    )
    feature_columns: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Feature columns (comma-separated in the env var). "
        "None means the built-in synthetic schema.",
    )
    target_column: str = "target"
    schema_file: str | None = Field(
        None,
        description="Optional JSON file declaring per-column ranges and nullability; "
        "see docs/data.md.",
    )
    window_days: int = Field(
        7,
        ge=1,
        le=366,
        title="Data window (days)",
        description="How many days of partitions to train on, ending (exclusive) at the window "
        "end: the run's data interval end unless another end is given.",
    )
    min_rows_per_partition: int = Field(50, ge=1)
    min_rows_total: int = Field(200, ge=1)
    holdout_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    split_seed: int = 42
    # The built-in synthetic source.
    synthetic_rows_per_day: int = Field(400, ge=1)
    synthetic_noise: float = Field(1.0, ge=0.0, description="Std of the target noise.")
    synthetic_drift_start: date | None = Field(
        None, description="From this date on, the synthetic relationship drifts."
    )
    synthetic_drift_strength: float = Field(0.0, ge=0.0)

    _split_features = field_validator("feature_columns", mode="before")(split_csv)


class TrainingSettings(BaseSettings):
    """Model shape and fitting knobs."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_TRAIN_", extra="forbid")

    epochs: int = Field(
        40,
        ge=1,
        le=10_000,
        title="Epochs",
        description="Upper bound; early stopping usually ends sooner.",
    )
    learning_rate: float = Field(
        0.005,
        gt=0.0,
        le=1.0,
        title="Learning rate",
        description="Adam learning rate at batch_size (see scale_learning_rate).",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=65_536,
        title="Batch size",
        description="Rows per step for small windows; larger windows double it (see "
        "max_batch_size).",
    )
    max_batch_size: int = Field(
        8192,
        ge=1,
        le=65_536,
        description="The batch doubles from batch_size while an epoch keeps at least "
        "min_steps_per_epoch steps, up to this (at most batch_size: a fixed batch). Large "
        "batches make large windows fast: a step costs about the same for 64 or 8192 rows.",
    )
    min_steps_per_epoch: int = Field(500, ge=1)
    scale_learning_rate: bool = Field(
        True,
        description="A grown batch trains with learning_rate * sqrt(batch / batch_size), "
        "capped at max_learning_rate (fewer, less noisy steps take larger ones).",
    )
    max_learning_rate: float = Field(0.02, gt=0.0, le=1.0)
    hidden_units: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [64, 32])
    early_stopping_patience: int = Field(5, ge=1)
    validation_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    seed: int = 42
    threads: int | None = Field(
        None,
        ge=1,
        description="TensorFlow intra-op threads; None: TensorFlow's default (every CPU it "
        "sees). Training pods set it from pod_cpu: in a container TensorFlow sees the node's "
        "CPUs, not the pod's limit, and oversubscribed threads get throttled.",
    )
    # Where training runs. Read when the DAG file is parsed: it picks the `train` task's
    # operator, the graph stays the same.
    runner: Literal["worker", "kubernetes"] = Field(
        "worker",
        description="worker: train inside the Airflow task. kubernetes: train in a "
        "KubernetesPodOperator pod (`python -m ml train` in the pipeline image) with the "
        "pod_* resources, on the cluster of the deploy settings' Connection.",
    )
    pod_cpu: str = Field(
        "2", description="CPU request = limit of the training pod (Kubernetes quantity)."
    )
    pod_memory: str = Field("4Gi", description="Memory request = limit of the training pod.")
    pod_namespace: str | None = Field(
        None, description="Namespace of the training pod; None: the deploy namespace."
    )
    pod_data_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim mounted read-only at PIPELINE_DATA_PATH in the "
        "training pod, for data on a shared volume. Leave empty when the data path is an "
        "object-store URL the pod can read (credentials via PIPELINE_DEPLOY_POD_ENV_SECRET).",
    )

    @field_validator("hidden_units", mode="before")
    @classmethod
    def _split_units(cls, value: Any) -> Any:
        return split_csv_ints(value)

    @field_validator("hidden_units")
    @classmethod
    def _positive_units(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("hidden_units needs at least one layer, each with >= 1 unit")
        return value


class GateSettings(BaseSettings):
    """What a model must reach before it may be deployed."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_GATE_", extra="forbid")

    max_rmse: float = Field(
        3.0,
        gt=0.0,
        title="Gate: max holdout RMSE",
        description="Absolute bar: holdout RMSE at most this.",
    )
    min_r2: float = Field(
        0.8,
        le=1.0,
        title="Gate: min holdout R²",
        description="Absolute bar: holdout R² at least this.",
    )
    max_regression: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        title="Gate: allowed regression vs champion",
        description="Allowed relative RMSE increase over @champion on the same holdout "
        "(0.02 = 2% worse at most).",
    )
    force_deploy: bool = Field(
        False,
        title="Force deploy",
        description="Deploy even if the gate rejects (the decision is still recorded).",
    )
    require_approval: bool = Field(
        False,
        title="Require approval",
        description="After the gate passes, wait for a person to approve the version (Airflow "
        "Required Actions, the REST API, or the `approval` tag in MLflow) before any traffic "
        "moves; no answer within approval_timeout_s is a rejection.",
    )
    approval_timeout_s: int = Field(
        86_400,
        ge=1,
        le=30 * 86_400,
        description="How long an approval may wait for an answer before it counts as a "
        "rejection (the scheduler resolves it within 15 s of the deadline).",
    )


class RegistrySettings(BaseSettings):
    """The MLflow experiment, registered model and aliases this pipeline owns."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_REGISTRY_", extra="forbid")

    model_name: str = "regression-model"
    experiment_name: str = "train_and_deploy"
    champion_alias: str = Field("champion", description="Names what is live.")
    challenger_alias: str = Field("challenger", description="Passed the gate, rolling out.")


class DriftSettings(BaseSettings):
    """What the drift monitor compares, and when a shift is big enough to retrain."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_DRIFT_", extra="forbid")

    window_days: int = Field(
        3,
        ge=1,
        le=366,
        description="Newest days of partitions compared with @champion's training profile.",
    )
    bins: int = Field(10, ge=2, le=100, description="Quantile bins per column in a profile.")
    feature_psi: float = Field(0.25, gt=0.0, description="PSI above which a feature drifted.")
    target_psi: float = Field(0.25, gt=0.0, description="PSI above which the target drifted.")
    prediction_psi: float = Field(
        0.25, gt=0.0, description="PSI above which @champion's predictions drifted."
    )
    max_null_share_increase: float = Field(0.1, ge=0.0, le=1.0)
    prometheus_url: str | None = Field(
        None,
        description="Prometheus that scrapes the model server: when set, what the server "
        "answered over the window (its feature and prediction histograms) is scored too, as "
        "served:<column>. The local stack sets it to its own Prometheus.",
    )
    served_min_rows: int = Field(
        200, ge=1, description="Fewer served rows in the window than this: not scored."
    )
    trigger_on: Annotated[list[Literal["target", "features", "prediction"]], NoDecode] = Field(
        default_factory=lambda: ["target"],
        description="Which drifts start a retraining (comma-separated in the env var); the "
        "others are reported, logged and alerted on. Default: the target only. Inputs follow "
        "the weather and the season day to day, and the nightly run retrains on them anyway; "
        "a shift in what the model predicts for (the target) is what a retrain fixes.",
    )

    _split_trigger = field_validator("trigger_on", mode="before")(split_csv)


class QualitySettings(BaseSettings):
    """The feedback loop: what the model servers answered (the payload log), the labels that
    come back for it, and when the live error asks for a retraining (``ml.quality``)."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_QUALITY_", extra="forbid")

    payload_path: str = Field(
        str(LOCAL_STATE_DIR / "payload-log"),
        description="Folder or fsspec URL of the model servers' payload log "
        "(`<path>/date=YYYY-MM-DD/payload-*.parquet|jsonl`); the local target's servers write "
        "here.",
    )
    labels_path: str = Field(
        str(LOCAL_STATE_DIR / "labels"),
        description="Folder or fsspec URL of the labels: `<path>/date=YYYY-MM-DD/*.parquet|"
        "csv|jsonl` with `request_id`, optionally `row`, and the target column.",
    )
    window_days: int = Field(
        7, ge=1, le=366, description="Days of served and labelled rows each check scores."
    )
    breach_days: int = Field(
        2,
        ge=1,
        le=366,
        description="Retrain when @champion's live RMSE was above the gate's max_rmse on each "
        "of this many newest labelled days.",
    )
    min_rows: int = Field(
        50, ge=1, description="Labelled rows a version (or a day) needs before it is judged."
    )
    label_delay_days: int = Field(
        1,
        ge=0,
        le=366,
        description="The synthetic source's ground truth for a served day arrives this many "
        "days later (only with PIPELINE_DATA_SOURCE=synthetic).",
    )
    retro_versions: int = Field(
        5,
        ge=0,
        le=100,
        description="The newest registered versions (gate-rejected ones included) scored on the "
        "labelled rows; those that beat @champion there are tagged as a suggestion.",
    )
    retro_margin: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="A version is suggested when its RMSE on the labelled rows is at least this "
        "much (relative) below @champion's on the same rows.",
    )


class BatchSettings(BaseSettings):
    """Batch scoring (``score_batch``): which days a run scores, and where the predictions go."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_BATCH_", extra="forbid")

    predictions_path: str = Field(
        str(LOCAL_STATE_DIR / "predictions"),
        description="Folder or fsspec URL of the predictions: "
        "`<path>/v<version>-<input digest>/date=YYYY-MM-DD/<input file>.parquet`, one "
        "`prediction` per input row in the input's order, and `_SUCCESS.json`.",
    )
    window_days: int = Field(
        1,
        ge=1,
        le=366,
        title="Days to score",
        description="Days of partitions a run scores, ending (exclusive) at the window end.",
    )


S = TypeVar("S", bound=BaseSettings)


def with_overrides(settings: S, **overrides: Any) -> S:
    """Return a validated copy with per-run overrides applied; ``None`` values are ignored."""
    update = {k: v for k, v in overrides.items() if v is not None}
    if not update:
        return settings
    merged = settings.model_dump() | update
    return type(settings).model_validate(merged)


def tracking_uri() -> str:
    """The MLflow tracking URI outside Airflow (inside, the DAG passes the Connection's)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")


def connection_tracking_uri(
    host: str, port: int | None = None, conn_type: str | None = None
) -> str:
    """The MLflow URI an Airflow Connection names: its host (with or without a scheme) and
    port; a bare host gets ``http`` unless the Connection's type is ``https``."""
    if "://" in host:
        base = host.rstrip("/")
    else:
        scheme = conn_type if conn_type in ("http", "https") else "http"
        base = f"{scheme}://{host}"
    return f"{base}:{port}" if port else base
