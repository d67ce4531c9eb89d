"""The pipeline's steps: one function per step, plain references in, plain references out.

Each function here is what one Airflow task calls (and what ``python -m ml <step>`` calls in
a pod or a terminal). Inputs and outputs are JSON-able dicts of references (partition URIs,
run ids, version numbers), never data frames or models, so they travel through XCom.
Nothing here imports Airflow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from ml.settings import (
    DataSettings,
    DriftSettings,
    GateSettings,
    RegistrySettings,
    TrainingSettings,
)

log = logging.getLogger(__name__)
# The tag a training run records its result in (train / trained_by).
TRAINED_TAG = "train_result"


def _partitions(window: Mapping[str, Any]):
    from ml.data import Partition

    return [Partition(day=date.fromisoformat(p["day"]), uri=p["uri"]) for p in window["partitions"]]


def load_window(settings: DataSettings, end: date) -> dict[str, Any]:
    """Find (and for the synthetic source, write) the partitions of the window ending at ``end``."""
    from ml import data, synthetic

    days = data.window_days(end, settings.window_days)
    if settings.source == "synthetic":
        written = synthetic.materialize_synthetic(settings, days)
        log.info(
            "Synthetic source: wrote %d new partition(s) under %s", len(written), settings.path
        )
    partitions = data.discover_partitions(settings, days)
    digest = data.partitions_digest(partitions)
    log.info(
        "Window %s..%s (end exclusive %s): %d partition file(s), digest %s",
        days[0],
        days[-1],
        end,
        len(partitions),
        digest[:12],
    )
    return {
        "start": days[0].isoformat(),
        "end": end.isoformat(),
        "source": settings.source,
        "path": settings.path,
        "digest": digest,
        "partitions": [{"day": p.day.isoformat(), "uri": p.uri} for p in partitions],
    }


def validate_window(window: Mapping[str, Any], settings: DataSettings) -> dict[str, Any]:
    """Check every partition of the window; raises ``DataValidationError`` naming each problem."""
    from ml import data
    from ml.schema import load_schema

    schema = load_schema(settings)
    report = data.validate_partitions(_partitions(window), schema, settings)
    result = report.to_dict()
    log.info(
        "Data valid: %s rows in %d partition(s)",
        result.get("total_rows"),
        len(window["partitions"]),
    )
    return result


def holdout_frame(window: Mapping[str, Any], settings: DataSettings):
    """The holdout rows of the window in memory (the same rows every step sees: a hash of each
    row decides, ``ml.stream``). For small windows and tests; the steps stream them."""
    import numpy as np
    import pandas as pd

    from ml import data
    from ml.schema import load_schema

    schema = load_schema(settings)
    source = data.window_source(_partitions(window), schema, settings, "holdout")
    batches = [values for values, _ in source.batches()]
    columns = [spec.name for spec in schema.columns]
    rows = np.concatenate(batches) if batches else np.empty((0, len(columns)))
    return schema, pd.DataFrame(rows, columns=columns)


def train(
    window: Mapping[str, Any],
    data_settings: DataSettings,
    training: TrainingSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Fit on the training part of the window and log everything to MLflow.

    The run is tagged with the training's identity (data digest, code version, parameter
    fingerprint: ``ml.lineage``); the result carries it on to :func:`register`.
    """
    import mlflow

    from ml import data, lineage
    from ml.registry import Registry
    from ml.schema import load_schema
    from ml.train import train_model

    # Fail in seconds with a clear message, not after minutes of training and retries.
    Registry(tracking_uri, registry).check_available()
    mlflow.set_tracking_uri(tracking_uri)
    schema = load_schema(data_settings)
    # The training side of the holdout split, streamed from the partitions.
    train_rows = data.window_source(_partitions(window), schema, data_settings, "train")
    identity = lineage.training_identity(window["digest"], training, data_settings)
    run_tags = {
        "data_window_start": window["start"],
        "data_window_end": window["end"],
        **identity,
        **_trigger_tag(window),
        **(tags or {}),
    }
    result = train_model(
        train_rows,
        schema.feature_names,
        schema.target.name,
        training,
        experiment_name=registry.experiment_name,
        run_name=f"train {window['start']}..{window['end']}",
        tags=run_tags,
        dataset_name=f"window_{window['start']}_{window['end']}",
        dataset_source=window["path"],
        dataset_digest=window["digest"],
        params_extra={"data_source": window["source"], "window_days": len(window["partitions"])},
    )
    log.info(
        "Trained run %s in %d epochs (best val RMSE %.4f)",
        result.run_id,
        result.epochs_run,
        result.best_val_rmse,
    )
    trained = {
        **result.to_dict(),
        lineage.CODE_VERSION_TAG: identity[lineage.CODE_VERSION_TAG],
        lineage.FINGERPRINT_TAG: identity[lineage.FINGERPRINT_TAG],
    }
    # The result, on the run: where a training pod's result is read (trained_by).
    mlflow.MlflowClient().set_tag(result.run_id, TRAINED_TAG, json.dumps(trained))
    return trained


def trained_by(run_key: str, registry: RegistrySettings, *, tracking_uri: str) -> dict[str, Any]:
    """What :func:`train` returned in the run tagged ``pipeline_run_key=run_key``: how the step
    after a training pod gets its result (no XCom sidecar; tasks pass references). Of several
    finished attempts of the step (a retry after the result was lost), the last one."""
    import mlflow

    from ml.train import RUN_KEY_TAG

    mlflow.set_tracking_uri(tracking_uri)
    if '"' in run_key:
        raise ValueError(f"a run key cannot contain a double quote: {run_key!r}")
    runs = mlflow.search_runs(
        experiment_names=[registry.experiment_name],
        filter_string=f'tags.{RUN_KEY_TAG} = "{run_key}" and attributes.status = "FINISHED"',
        order_by=["attributes.end_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs or TRAINED_TAG not in runs[0].data.tags:
        raise LookupError(
            f"no finished training run tagged {RUN_KEY_TAG}={run_key!r} with a result in "
            f"experiment {registry.experiment_name!r}: did the training pod end its run?"
        )
    return json.loads(runs[0].data.tags[TRAINED_TAG])


def unchanged_check(
    window: Mapping[str, Any],
    data_settings: DataSettings,
    training: TrainingSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
    force: bool = False,
) -> dict[str, Any]:
    """Whether ``@champion`` was trained on this window's data digest, this code version and
    these parameters (then training again would redo it): ``ml.lineage.decide_unchanged``
    on the champion version's tags. Reads the registry only; imports no TensorFlow."""
    from ml import lineage
    from ml.registry import Registry

    candidate = lineage.training_identity(window["digest"], training, data_settings)
    champion = None if force else Registry(tracking_uri, registry).champion()
    decision = lineage.decide_unchanged(
        candidate,
        champion.version if champion else None,
        champion.tags if champion else None,
        force=force,
        alias=registry.champion_alias,
    )
    log.info("%s", decision.reason)
    return {**decision.to_dict(), "candidate": candidate}


def evaluate(
    window: Mapping[str, Any],
    trained: Mapping[str, Any],
    data_settings: DataSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """Score the new model and the current champion on the same holdout rows."""
    import mlflow

    from ml import data
    from ml import evaluate as ev
    from ml.registry import Registry
    from ml.schema import load_schema

    mlflow.set_tracking_uri(tracking_uri)
    schema = load_schema(data_settings)
    features, target = schema.feature_names, schema.target.name
    champion = Registry(tracking_uri, registry).champion()
    models = {"candidate": trained["model_uri"]}
    if champion is None:
        log.info("No @%s yet: nothing to compare against", registry.champion_alias)
    else:
        models["champion"] = champion.model_uri
    # One streamed pass over the holdout rows scores both models on the same rows.
    holdout = data.window_source(_partitions(window), schema, data_settings, "holdout")
    scored = ev.evaluate_stream(models, holdout, features, target, seed=data_settings.split_seed)
    metrics, champion_metrics = scored.metrics["candidate"], scored.metrics.get("champion")
    if champion is not None:
        log.info("Champion v%s on this holdout: %s", champion.version, _fmt(champion_metrics))
    log.info("Challenger on this holdout (%d rows): %s", scored.rows, _fmt(metrics))
    ev.log_evaluation(
        trained["run_id"],
        scored.sample,
        target,
        scored.predictions,
        metrics,
        champion_metrics,
        champion.version if champion else None,
        feature_columns=features,
        holdout_rows=scored.rows,
    )
    return {
        "candidate": metrics,
        "champion": champion_metrics,
        "champion_version": champion.version if champion else None,
        "holdout_rows": scored.rows,
    }


def register(
    window: Mapping[str, Any],
    trained: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    registry: RegistrySettings,
    *,
    tracking_uri: str,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Create the model version, tagged with what it was trained on and how it scored.

    The training's identity (data digest, and from ``trained`` the code version and parameter
    fingerprint) is what :func:`unchanged_check` compares a later run with.
    """
    from ml import lineage
    from ml.registry import Registry

    identity = {
        tag: str(trained[tag])
        for tag in (lineage.CODE_VERSION_TAG, lineage.FINGERPRINT_TAG)
        if trained.get(tag)
    }
    version_tags = {
        **evaluation_tags(window, evaluation),
        **identity,
        **_trigger_tag(window),
        **(tags or {}),
    }
    info = Registry(tracking_uri, registry).register(
        trained["model_uri"], trained["run_id"], version_tags
    )
    log.info("Registered %s version %s", info.name, info.version)
    return info.to_dict()


def evaluation_tags(window: Mapping[str, Any], evaluation: Mapping[str, Any]) -> dict[str, str]:
    """What a version is tagged with about its data and its evaluation (the model card's
    source): the window, its digest, and the holdout metrics of it and of ``@champion``."""
    from ml import lineage

    champion = evaluation.get("champion") or {}
    return {
        "data_window_start": window["start"],
        "data_window_end": window["end"],
        lineage.DATA_DIGEST_TAG: window["digest"],
        **{f"holdout_{k}": f"{v:.6g}" for k, v in evaluation["candidate"].items()},
        **{f"champion_holdout_{k}": f"{v:.6g}" for k, v in champion.items()},
        "champion_version_at_eval": str(evaluation.get("champion_version") or "none"),
    }


def gate(
    version: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    gate_settings: GateSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """Decide; record the decision on the version; on approval mark it ``@challenger``."""
    from ml.gate import decide
    from ml.registry import Registry

    decision = decide(evaluation["candidate"], evaluation.get("champion"), gate_settings)
    if not decision.has_champion:
        log.info("First model for this registry name: only the absolute bars apply")
    reg = Registry(tracking_uri, registry)
    reg.tag_version(version["version"], decision.to_tags())
    reg.update_card(version["version"])
    if decision.passed:
        reg.set_alias(registry.challenger_alias, version["version"])
        log.info(
            "Version %s %s; now @%s",
            version["version"],
            decision.summary(),
            registry.challenger_alias,
        )
    else:
        log.warning("Version %s %s; no alias moved", version["version"], decision.summary())
    return decision.to_dict()


def monitor_drift(
    window: Mapping[str, Any],
    data_settings: DataSettings,
    drift_settings: DriftSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """Score the window's partitions against ``@champion``'s training profile; log a report.

    Partitions are read one at a time and the scores read a uniform sample of at most
    ``drift.SAMPLE_ROWS`` rows of the window (``rows`` and ``rows_scored`` in the result).
    Partitions are read as they are, without the training-time validation: a column that
    went missing, all null or non-numeric is a finding of the report, not a crash. The
    champion's predictions on the rows are scored too when the features allow a prediction.
    The result is logged as a run of the ``<experiment>-drift`` experiment (one ``psi.<column>``
    metric per column, the report as JSON, a bar plot) and returned: ``retrain`` says whether
    the drift is of a kind that ``drift_settings.trigger_on`` retrains on.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from ml import data, drift
    from ml.evaluate import DRIFT_PROFILE_ARTIFACT
    from ml.registry import Registry

    result: dict[str, Any] = {
        "window_start": window["start"],
        "window_end": window["end"],
        "data_digest": window["digest"],
        "retrain": False,
        "drifted": {},
        "scores": {},
    }
    champion = Registry(tracking_uri, registry).champion()
    if champion is None:
        log.info("No @%s yet: nothing to compare the data with", registry.champion_alias)
        return result | {"skipped": f"no @{registry.champion_alias}"}
    result["champion_version"] = champion.version
    # Asked first, so that a registry that is down fails the task (and it is retried) instead
    # of reading as "this version has no profile".
    logged = {
        a.path
        for a in MlflowClient(tracking_uri).list_artifacts(
            champion.run_id, DRIFT_PROFILE_ARTIFACT.rsplit("/", 1)[0]
        )
    }
    if DRIFT_PROFILE_ARTIFACT not in logged:
        log.warning("Champion v%s has no drift profile: not scored", champion.version)
        return result | {
            "skipped": f"@{registry.champion_alias} v{champion.version} has no drift profile"
        }
    mlflow.set_tracking_uri(tracking_uri)
    profile = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/{DRIFT_PROFILE_ARTIFACT}")

    # One partition in memory at a time; the scores read a uniform sample of the window.
    frame, rows = drift.sample_frames(
        (data.read_partition(p, data_settings) for p in _partitions(window)), k=drift.SAMPLE_ROWS
    )
    target = data_settings.target_column
    scored = frame.drop(columns=[target], errors="ignore")
    if target in frame:
        scored[drift.TARGET_KEY] = frame[target]
    features = [c for c in profile["columns"] if c not in (drift.TARGET_KEY, drift.PREDICTION_KEY)]
    extra = {}
    predictions, why_not = _champion_predictions(champion.model_uri, frame, features)
    if predictions is not None:
        extra[drift.PREDICTION_KEY] = predictions
    else:
        log.info("Predictions not scored: %s", why_not)
        profile = {
            **profile,
            "columns": {k: v for k, v in profile["columns"].items() if k != drift.PREDICTION_KEY},
        }
    scores = drift.score_frame(profile, scored, extra)
    if drift_settings.prometheus_url:
        scores |= _served_scores(profile, window, drift_settings)
    verdict = drift.decide(scores, drift_settings)
    result |= {
        "rows": rows,
        "rows_scored": len(frame),
        "retrain": verdict.retrain,
        "drifted": verdict.drifted,
        "summary": verdict.summary(),
        "scores": {name: s.psi for name, s in scores.items()},
        "issues": {name: s.issue for name, s in scores.items() if s.issue},
        "predictions_scored": predictions is not None,
    }
    result["run_id"] = _log_drift_run(result, scores, drift_settings, registry, tracking_uri)
    (log.warning if verdict.drifted else log.info)(
        "Drift of %s..%s (%d rows, %d scored) against @%s v%s: %s",
        window["start"],
        window["end"],
        rows,
        len(frame),
        registry.champion_alias,
        champion.version,
        verdict.summary(),
    )
    return result


SERVED_QUERIES = {
    "features": "sum by (feature, le) "
    '(increase(model_server_feature_value_bucket{{job="model-server"}}[{range}]))',
    "prediction": "sum by (le) "
    '(increase(model_server_prediction_value_bucket{{job="model-server"}}[{range}]))',
}


def _served_scores(profile, window: Mapping[str, Any], settings: DriftSettings) -> dict:
    """``served:<column>`` scores of what the model server answered during the window, from
    the Prometheus histograms it exports (bucket bounds = the profile's edges). Prometheus
    down, too few rows served, or buckets that do not match the profile (another version
    served): nothing scored, and the log says which."""
    import httpx

    from ml import drift

    start, end = date.fromisoformat(window["start"]), date.fromisoformat(window["end"])
    days = max((end - start).days, 1)
    # The window's days, not "the last N days": ends at the window end (or now, if sooner).
    at = min(datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp(), time.time())
    series: dict[str, list[tuple[float, float]]] = {}
    try:
        for kind, query in SERVED_QUERIES.items():
            resp = httpx.get(
                f"{settings.prometheus_url.rstrip('/')}/api/v1/query",
                params={"query": query.format(range=f"{days}d"), "time": at},
                timeout=10,
            )
            resp.raise_for_status()
            for item in resp.json()["data"]["result"]:
                column = (
                    item["metric"].get("feature", "")
                    if kind == "features"
                    else drift.PREDICTION_KEY
                )
                le = float(item["metric"]["le"])
                series.setdefault(column, []).append((le, float(item["value"][1])))
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.warning("Served inputs not scored: Prometheus at %s: %s", settings.prometheus_url, exc)
        return {}
    scores = {}
    for column, buckets in sorted(series.items()):
        reference = profile["columns"].get(column)
        served_rows = max((count for le, count in buckets if le == float("inf")), default=0.0)
        if reference is None or served_rows < settings.served_min_rows:
            log.info("Served %s not scored: %.0f rows served", column, served_rows)
            continue
        name = f"{drift.SERVED_PREFIX}{column}"
        score = drift.score_served(drift.ColumnProfile.from_dict(reference), buckets, name)
        if score is None:
            log.info("Served %s not scored: its buckets are not @champion's bins", column)
            continue
        scores[name] = score
    return scores


def _champion_predictions(model_uri: str, frame, features: list[str]):
    """The champion's predictions on ``frame`` as a Series, or (None, why) when the rows
    cannot be predicted on (a feature missing, null or not a number: the report says which)."""
    import pandas as pd

    from ml import evaluate as ev

    missing = [c for c in features if c not in frame]
    if missing:
        return None, f"missing feature(s) {missing}"
    numeric = frame[features].apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any():
        return None, "a feature holds nulls or values that are not numbers"
    try:
        return pd.Series(ev.predict(model_uri, numeric, features)), None
    except Exception as exc:  # a report, not a verdict on the model
        return None, f"prediction failed: {exc}"


def _log_drift_run(
    result, scores, settings: DriftSettings, registry: RegistrySettings, tracking_uri
):
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    from ml import drift

    client = MlflowClient(tracking_uri)
    name = f"{registry.experiment_name}-drift"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(
        experiment_id,
        run_name=f"drift {result['window_start']}..{result['window_end']}",
        tags={
            "champion_version": str(result["champion_version"]),
            "drift.retrain": str(result["retrain"]).lower(),
            "drift.summary": result["summary"][:5000],
        },
    )
    now = get_current_time_millis()
    metrics = [Metric(f"psi.{k}", v, now, 0) for k, v in result["scores"].items() if v is not None]
    metrics.append(Metric("drifted_columns", float(len(result["drifted"])), now, 0))
    params = [
        Param("window_start", result["window_start"]),
        Param("window_end", result["window_end"]),
        Param("trigger_on", ",".join(settings.trigger_on)),
        Param("feature_psi", str(settings.feature_psi)),
        Param("target_psi", str(settings.target_psi)),
        Param("prediction_psi", str(settings.prediction_psi)),
    ]
    client.log_batch(
        run.info.run_id, metrics=metrics, params=params, tags=[RunTag("rows", str(result["rows"]))]
    )
    client.log_dict(
        run.info.run_id,
        {**result, "columns": {k: s.to_dict() for k, s in scores.items()}},
        "drift/report.json",
    )
    client.log_figure(run.info.run_id, drift.psi_figure(scores, settings), "drift/psi.png")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _trigger_tag(window: Mapping[str, Any]) -> dict[str, str]:
    """Why the run that trains on ``window`` started (set by the DAG: drift, schedule, ...)."""
    reason = window.get("trigger_reason")
    return {"trigger_reason": str(reason)[:5000]} if reason else {}


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
