"""Live quality: what the model servers answered (their payload log) joined to the labels that
came back for it, scored per served version; when that error asks for a retraining; and which
registered versions would have done better on the same rows (the retro-challengers).

The payload log (``serving.server.payload``) and the labels are daily partitions in the
pipeline's layout, ``<path>/date=YYYY-MM-DD/*.parquet|jsonl|csv``. A label is a row of
``request_id`` (the ``X-Request-Id`` the server answered with), optionally ``row`` (the row's
position in a request of several rows; 0 when absent) and the target column. The join is on
(``request_id``, ``row``) over the same days for both, so a label that lands a day after the
row was served is joined by the next daily check, whose window still holds that row.

Everything but :func:`monitor_quality` (MLflow, files) is pure: frames in, numbers out.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd

from ml.settings import DataSettings, GateSettings, QualitySettings, RegistrySettings
from serving.server.contract import (
    PAYLOAD_REQUEST_ID,
    PAYLOAD_ROW,
    PAYLOAD_VERSION,
    PREDICTION_COLUMN,
)

log = logging.getLogger(__name__)

KEYS = [PAYLOAD_REQUEST_ID, PAYLOAD_ROW]
DAY = "day"  # the partition a row was read from
FORMATS = ("parquet", "jsonl", "csv")
# Version tags the retro-challenger writes (a suggestion: nothing moves an alias on them).
RETRO_BEATS_TAG = "retro.beats_champion"
RETRO_RMSE_TAG = "retro.live_rmse"
RETRO_CHAMPION_TAG = "retro.champion"


def read_days(path: str, days: Sequence[date]) -> pd.DataFrame:
    """Every data file of ``days`` under ``path`` (Parquet, JSON lines, CSV; hidden files are
    writers' files in progress) as one frame with a ``day`` column; empty when none."""
    import fsspec

    from ml.data import _day_files

    fs, root = fsspec.core.url_to_fs(path)
    fs.invalidate_cache()
    frames = [
        _read_file(fs, found, fmt).assign(**{DAY: day})
        for day in days
        for fmt in FORMATS
        for found in _day_files(fs, root.rstrip("/"), day, fmt)
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def deliver_synthetic_labels(
    data_settings: DataSettings, quality: QualitySettings, days: Sequence[date]
) -> list[str]:
    """The synthetic source's delayed ground truth: for each payload file of a day served
    ``quality.label_delay_days`` before a day of ``days``, a labels file in that later day's
    partition (``labels-<payload file>.parquet``, written once: closed payload files never
    change). Returns the paths written."""
    import fsspec

    from ml.data import _day_files
    from ml.schema import load_schema
    from ml.synthetic import synthetic_labels

    features = load_schema(data_settings).feature_names
    fs, root = fsspec.core.url_to_fs(quality.payload_path)
    labels_fs, labels_root = fsspec.core.url_to_fs(quality.labels_path)
    fs.invalidate_cache()
    written = []
    for arrival in days:
        served = arrival - timedelta(days=quality.label_delay_days)
        folder = f"{labels_root.rstrip('/')}/date={arrival.isoformat()}"
        for fmt in FORMATS:
            for found in _day_files(fs, root.rstrip("/"), served, fmt):
                stem = found.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                path = f"{folder}/labels-{stem}.parquet"
                if labels_fs.exists(path):
                    continue
                rows = _read_file(fs, found, fmt).sort_values(KEYS, kind="stable")
                labels = rows[KEYS].assign(
                    **{
                        data_settings.target_column: synthetic_labels(
                            rows[features], served, data_settings, zlib.crc32(stem.encode())
                        )
                    }
                )
                labels_fs.makedirs(folder, exist_ok=True)
                with labels_fs.open(path, "wb") as handle:
                    labels.to_parquet(handle, index=False)
                written.append(path)
    if written:
        log.info("Synthetic labels: %d file(s) under %s", len(written), quality.labels_path)
    return written


def _read_file(fs, path: str, fmt: str) -> pd.DataFrame:
    from ml import stream

    with fs.open(path, "rb") as handle:
        if fmt == "parquet":
            frame = pd.read_parquet(handle)
        else:
            frame = pd.concat(stream.text_chunks(handle, fmt), ignore_index=True)
    if PAYLOAD_REQUEST_ID in frame:  # "42" in JSON lines or CSV reads as a number
        frame[PAYLOAD_REQUEST_ID] = frame[PAYLOAD_REQUEST_ID].astype(str)
    return frame


def join_labels(
    payload: pd.DataFrame, labels: pd.DataFrame, target: str
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The served rows that have a label, with the label as ``target``; and the counts
    (``served``, ``labels``, ``labelled``, ``ambiguous``: served rows left out because their
    key was served twice, a caller reusing its request id). A label sent twice: the last."""
    counts = {"served": len(payload), "labels": len(labels), "labelled": 0, "ambiguous": 0}
    if payload.empty or labels.empty or target not in labels:
        return pd.DataFrame(), counts
    if PAYLOAD_ROW not in labels:
        labels = labels.assign(**{PAYLOAD_ROW: 0})
    labels = labels.astype({PAYLOAD_ROW: "int64"}).drop_duplicates(KEYS, keep="last")
    served = payload.drop(columns=[target], errors="ignore")
    unique = served.drop_duplicates(KEYS, keep=False)
    counts["ambiguous"] = len(served) - len(unique)
    joined = unique.merge(labels[[*KEYS, target]], on=KEYS, how="inner")
    joined = joined[np.isfinite(joined[target].to_numpy(dtype="float64"))]
    counts["labelled"] = len(joined)
    return joined.reset_index(drop=True), counts


def _errors(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    residuals = np.asarray(truth, "float64") - np.asarray(predicted, "float64")
    return {
        "rows": len(residuals),
        "rmse": float(np.sqrt(np.mean(residuals**2))),
        "mae": float(np.mean(np.abs(residuals))),
    }


def live_errors(joined: pd.DataFrame, target: str) -> dict[str, dict[str, float]]:
    """RMSE, MAE and rows of what each served version answered, over the labelled rows."""
    if joined.empty:
        return {}
    return {
        str(version): _errors(group[target].to_numpy(), group[PREDICTION_COLUMN].to_numpy())
        for version, group in joined.groupby(joined[PAYLOAD_VERSION].astype(str))
    }


def daily_rmse(joined: pd.DataFrame, target: str, version: str) -> list[tuple[str, int, float]]:
    """(day, rows, RMSE) of ``version``'s answers per day it served, oldest first."""
    if joined.empty:
        return []
    mine = joined[joined[PAYLOAD_VERSION].astype(str) == str(version)]
    return [
        (str(day), len(group), _errors(group[target], group[PREDICTION_COLUMN])["rmse"])
        for day, group in sorted(mine.groupby(DAY), key=lambda item: item[0])
    ]


def breached(
    daily: Sequence[tuple[str, int, float]], bar: float, days: int, min_rows: int
) -> tuple[bool, str]:
    """Whether the live RMSE was above ``bar`` on each of the ``days`` newest days with at
    least ``min_rows`` labelled rows (days with fewer are not judged); and why, in words."""
    judged = [(day, rmse) for day, rows, rmse in daily if rows >= min_rows]
    if len(judged) < days:
        return False, f"{len(judged)} judged day(s), {days} needed"
    newest = judged[-days:]
    shown = ", ".join(f"{day}: {rmse:.3f}" for day, rmse in newest)
    if all(rmse > bar for _, rmse in newest):
        return True, f"live RMSE above the gate's max_rmse {bar:g} on {days} day(s) ({shown})"
    return False, f"live RMSE within {bar:g} on at least one of the last {days} day(s) ({shown})"


def suggestions(scores: Mapping[str, float], champion: str, margin: float) -> dict[str, bool]:
    """Per scored version other than ``champion``: whether its RMSE on the labelled rows is
    at least ``margin`` (relative) below the champion's on the same rows."""
    bar = scores[champion] * (1.0 - margin)
    return {v: rmse < bar for v, rmse in scores.items() if v != champion and math.isfinite(rmse)}


# -- the step --------------------------------------------------------------------------------------


def monitor_quality(
    data_settings: DataSettings,
    quality: QualitySettings,
    gate: GateSettings,
    registry: RegistrySettings,
    *,
    end: date,
    tracking_uri: str,
) -> dict[str, Any]:
    """The daily check over the ``quality.window_days`` days ending (exclusive) at ``end``:
    live RMSE/MAE per served version, logged as a run of ``<experiment>-quality``; ``retrain``
    when ``@champion``'s live RMSE was above ``gate.max_rmse`` on each of the
    ``quality.breach_days`` newest judged days; the retro-challengers tagged."""
    from ml import data
    from ml.registry import Registry

    days = data.window_days(end, quality.window_days)
    if data_settings.source == "synthetic":
        deliver_synthetic_labels(data_settings, quality, days)
    target = data_settings.target_column
    joined, counts = join_labels(
        read_days(quality.payload_path, days), read_days(quality.labels_path, days), target
    )
    reg = Registry(tracking_uri, registry)
    champion = reg.champion()
    result: dict[str, Any] = {
        "window_start": days[0].isoformat(),
        "window_end": end.isoformat(),
        **counts,
        "live": live_errors(joined, target),
        "champion_version": champion.version if champion else None,
        "max_rmse": gate.max_rmse,
        "retrain": False,
        "suggested": [],
    }
    if champion is None:
        result["summary"] = f"no @{registry.champion_alias}: nothing judged"
    else:
        daily = daily_rmse(joined, target, champion.version)
        result["daily"] = daily
        retrain, why = breached(daily, gate.max_rmse, quality.breach_days, quality.min_rows)
        result |= {"retrain": retrain, "summary": f"@champion v{champion.version}: {why}"}
        if quality.retro_versions and len(joined) >= quality.min_rows:
            result["retro"] = _retro(reg, champion.version, joined, data_settings, quality)
            result["suggested"] = [v for v, r in result["retro"].items() if r["beats"]]
    result["run_id"] = _log_run(result, registry, tracking_uri)
    (log.warning if result["retrain"] else log.info)(
        "Live quality %s..%s: %d served, %d labelled; %s; per version %s",
        result["window_start"],
        result["window_end"],
        counts["served"],
        counts["labelled"],
        result["summary"],
        {v: round(e["rmse"], 4) for v, e in result["live"].items()},
    )
    return result


def _retro(reg, champion: str, joined, data_settings, quality) -> dict[str, dict[str, Any]]:
    """Score the newest versions and the champion on the labelled rows; tag each scored
    version with whether it beats the champion there (a suggestion, nothing is promoted)."""
    from ml import evaluate as ev
    from ml.schema import load_schema

    features = load_schema(data_settings).feature_names
    target = data_settings.target_column
    versions = {v.version: v for v in reg.newest_versions(quality.retro_versions)}
    versions.setdefault(champion, reg.get(champion))
    scores: dict[str, float] = {}
    for version, info in versions.items():
        try:
            predicted = ev.predict(info.model_uri, joined, features)
        except Exception as exc:  # a version that cannot score these rows is not a suggestion
            log.warning("Retro-challenger: v%s not scored: %s", version, exc)
            continue
        scores[version] = _errors(joined[target].to_numpy(), predicted)["rmse"]
    if champion not in scores:
        return {}
    beats = suggestions(scores, champion, quality.retro_margin)
    for version, better in beats.items():
        reg.tag_version(
            version,
            {
                RETRO_BEATS_TAG: str(better).lower(),
                RETRO_RMSE_TAG: f"{scores[version]:.6g}",
                RETRO_CHAMPION_TAG: f"v{champion} {scores[champion]:.6g}",
            },
        )
        if better:
            log.warning(
                "Retro-challenger: v%s has RMSE %.4f on the labelled rows, @champion v%s %.4f: "
                "a promotion to consider (nothing was promoted)",
                version,
                scores[version],
                champion,
                scores[champion],
            )
    return {
        v: {"rmse": scores[v], "beats": beats.get(v, False), "champion": v == champion}
        for v in scores
    }


def _log_run(result: Mapping[str, Any], registry: RegistrySettings, tracking_uri: str) -> str:
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    client = MlflowClient(tracking_uri)
    name = f"{registry.experiment_name}-quality"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(
        experiment_id, run_name=f"quality {result['window_start']}..{result['window_end']}"
    )
    now = get_current_time_millis()
    metrics = [
        Metric(f"live_{key}.v{version}", float(value), now, 0)
        for version, errors in result["live"].items()
        for key, value in errors.items()
    ]
    metrics += [
        Metric(f"retro_rmse.v{version}", r["rmse"], now, 0)
        for version, r in result.get("retro", {}).items()
    ]
    metrics += [Metric(k, float(result[k]), now, 0) for k in ("served", "labelled", "max_rmse")]
    tags = {
        "quality.retrain": str(result["retrain"]).lower(),
        "quality.summary": str(result["summary"])[:5000],
        "quality.suggested": ",".join(result["suggested"]),
        "champion_version": str(result["champion_version"] or ""),
    }
    client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_dict(run.info.run_id, dict(result), "quality/report.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
