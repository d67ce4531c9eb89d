"""Prometheus metrics of the registry and of the latest drift check, for alerts and dashboards.

``GET /registry-events/metrics`` (this plugin's app) answers, from MLflow:

- ``mlflow_registry_up``: 1 when the registry answered the last read, else 0;
- ``mlflow_registry_alias_version{model,alias}``: the version each alias of the watched model
  names (``@champion``: what must be live; the ``ModelServedVersionNotChampion`` alert compares
  it with the servers' ``model_server_model_version``);
- ``pipeline_champion_uncleared{model,version}``: 1 when ``@champion`` names a version with
  neither a passed gate nor a ``force`` reason (``ml.gate.uncleared``; the
  ``ModelChampionNotCleared`` alert of ``docker/k8s/monitoring/governance-rule.yaml``), else 0;
- ``pipeline_feature_drift_score{model,feature}``: PSI per column from the newest
  ``monitor_drift`` check (``__target__`` and ``__prediction__`` included), with
  ``pipeline_drift_threshold{model,feature}`` next to it, ``pipeline_drift_retrain{model}`` and
  ``pipeline_drift_check_timestamp_seconds{model}``;
- from the newest ``monitor_quality`` check (``ml.quality``): ``pipeline_live_rmse``,
  ``pipeline_live_mae`` and ``pipeline_live_rows`` ``{model,version}`` per served version,
  ``pipeline_champion_live_rmse{model,version}`` and ``pipeline_live_rmse_bar{model}`` (the
  gate's ``max_rmse`` it was judged against), ``pipeline_quality_rows{model,kind}`` (served,
  labelled), ``pipeline_quality_retrain{model}``, ``pipeline_retro_challenger{model,version}``
  (1: it beat @champion on the labelled rows) and
  ``pipeline_quality_check_timestamp_seconds{model}``.

Reads are cached for ``CACHE_S`` seconds, so any number of Prometheus replicas scraping costs
MLflow two requests per interval. The MLflow endpoint is ``MLFLOW_TRACKING_URI``, else the
``mlflow_default`` Connection's host.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:  # imported where used: see registry_events.app.registry_settings
    from ml.settings import DriftSettings, RegistrySettings

log = logging.getLogger(__name__)

CACHE_S = 15.0
PSI_PREFIX = "psi."
LIVE_PREFIXES = {"rmse": "live_rmse.v", "mae": "live_mae.v", "rows": "live_rows.v"}


@dataclass(frozen=True)
class RegistrySnapshot:
    """What the exporter read from MLflow (``up`` False: the read failed, nothing else known)."""

    up: bool
    aliases: Mapping[str, str] = field(default_factory=dict)
    # (@champion's version, True when it breaks the rule of production: ml.gate.uncleared)
    champion: tuple[str, bool] | None = None
    drift_scores: Mapping[str, float] = field(default_factory=dict)
    drift_retrain: bool | None = None
    drift_checked_at_s: float | None = None
    # The newest quality check: {"rmse"|"mae"|"rows": {version: value}}, its metrics and tags.
    live: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    quality: Mapping[str, float] = field(default_factory=dict)  # served, labelled, max_rmse
    quality_champion: str | None = None
    quality_retrain: bool | None = None
    suggested: tuple[str, ...] = ()
    quality_checked_at_s: float | None = None


def render(snapshot: RegistrySnapshot, model: str, drift: DriftSettings) -> bytes:
    """The Prometheus text exposition of ``snapshot`` (pure)."""
    from ml.drift import threshold_for  # numpy and pandas: not at plugin import time

    families = [GaugeMetricFamily("mlflow_registry_up", "1: the registry answered the read.")]
    families[0].add_metric([], 1.0 if snapshot.up else 0.0)
    aliases = GaugeMetricFamily(
        "mlflow_registry_alias_version",
        "Version the alias of the registered model names.",
        labels=["model", "alias"],
    )
    for alias, version in sorted(snapshot.aliases.items()):
        if str(version).isdigit():
            aliases.add_metric([model, alias], float(version))
    families.append(aliases)
    if snapshot.champion is not None:
        uncleared = GaugeMetricFamily(
            "pipeline_champion_uncleared",
            "1: @champion names a version with neither a passed gate nor a force reason.",
            labels=["model", "version"],
        )
        version, broken = snapshot.champion
        uncleared.add_metric([model, version], 1.0 if broken else 0.0)
        families.append(uncleared)
    scores = GaugeMetricFamily(
        "pipeline_feature_drift_score",
        "PSI of a column in the newest monitor_drift check against @champion's training data.",
        labels=["model", "feature"],
    )
    thresholds = GaugeMetricFamily(
        "pipeline_drift_threshold",
        "PSI above which the column counts as drifted.",
        labels=["model", "feature"],
    )
    for column, value in sorted(snapshot.drift_scores.items()):
        scores.add_metric([model, column], value)
        thresholds.add_metric([model, column], threshold_for(column, drift))
    families += [scores, thresholds]
    if snapshot.drift_retrain is not None:
        retrain = GaugeMetricFamily(
            "pipeline_drift_retrain",
            "1: the newest drift check asked train_and_deploy for a run.",
            labels=["model"],
        )
        retrain.add_metric([model], 1.0 if snapshot.drift_retrain else 0.0)
        families.append(retrain)
    if snapshot.drift_checked_at_s is not None:
        checked = GaugeMetricFamily(
            "pipeline_drift_check_timestamp_seconds",
            "Unix time of the newest drift check.",
            labels=["model"],
        )
        checked.add_metric([model], snapshot.drift_checked_at_s)
        families.append(checked)

    families += _quality_families(snapshot, model)

    class _Snapshot:
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry)


def _quality_families(snapshot: RegistrySnapshot, model: str) -> list[GaugeMetricFamily]:
    """The newest quality check's gauges (none before the first check)."""
    if snapshot.quality_checked_at_s is None:
        return []
    live, quality, champion = snapshot.live, snapshot.quality, snapshot.quality_champion
    by_version = ["version"]
    gauges: list[tuple[str, str, list[str], dict]] = [
        *(
            (f"pipeline_live_{kind}", f"Live {kind} of a served version over the labelled rows.",
             by_version, live.get(kind, {}))
            for kind in ("rmse", "mae", "rows")
        ),
        ("pipeline_champion_live_rmse", "Live RMSE of the version @champion named.", by_version,
         {champion: live["rmse"][champion]} if champion in live.get("rmse", {}) else {}),
        ("pipeline_live_rmse_bar", "The gate's max_rmse the live RMSE was judged against.", [],
         {(): quality["max_rmse"]} if "max_rmse" in quality else {}),
        ("pipeline_quality_rows", "Served rows in the check's window, and those labelled.",
         ["kind"], {k: quality[k] for k in ("served", "labelled") if k in quality}),
        ("pipeline_quality_retrain", "1: the check asked train_and_deploy for a run.", [],
         {(): float(bool(snapshot.quality_retrain))}),
        ("pipeline_retro_challenger", "1: the version beat @champion on the labelled rows (a "
         "promotion to consider).", by_version, dict.fromkeys(snapshot.suggested, 1.0)),
        ("pipeline_quality_check_timestamp_seconds", "Unix time of the newest quality check.",
         [], {(): snapshot.quality_checked_at_s}),
    ]  # fmt: skip
    families = []
    for name, doc, labels, values in gauges:
        family = GaugeMetricFamily(name, doc, labels=["model", *labels])
        for key, value in sorted(values.items()):
            family.add_metric([model, *([key] if labels else [])], value)
        families.append(family)
    return families


def _newest_run(client, experiment_name: str):
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def read_snapshot(tracking_uri: str, settings: RegistrySettings) -> RegistrySnapshot:
    """Aliases of the watched model and the newest drift and quality runs, from MLflow."""
    from mlflow import MlflowClient

    from ml.gate import uncleared

    # The registry is the tracking server: never a registry URI some other code set globally.
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_registered_model(settings.model_name)
        aliases = {str(k): str(v) for k, v in (model.aliases or {}).items()}
        champion = aliases.get(settings.champion_alias)
        tags = client.get_model_version(settings.model_name, champion).tags if champion else None
    except Exception as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            log.warning("Registry read failed: %s", exc)
            return RegistrySnapshot(up=False)
        aliases, tags = {}, None  # nothing registered yet: up, no aliases
    checked = None if tags is None else (str(champion), uncleared(tags) is not None)
    snapshot = RegistrySnapshot(up=True, aliases=aliases, champion=checked)
    try:
        drift = _newest_run(client, f"{settings.experiment_name}-drift")
        quality = _newest_run(client, f"{settings.experiment_name}-quality")
    except Exception as exc:
        log.warning("Drift and quality runs could not be read: %s", exc)
        return snapshot
    found: dict = {}
    if drift is not None:
        found |= {
            "drift_scores": {
                k.removeprefix(PSI_PREFIX): v
                for k, v in drift.data.metrics.items()
                if k.startswith(PSI_PREFIX)
            },
            "drift_retrain": drift.data.tags.get("drift.retrain") == "true",
            "drift_checked_at_s": drift.info.start_time / 1000.0,
        }
    if quality is not None:
        metrics, tags = quality.data.metrics, quality.data.tags
        found |= {
            "live": {
                kind: {k.removeprefix(p): v for k, v in metrics.items() if k.startswith(p)}
                for kind, p in LIVE_PREFIXES.items()
            },
            "quality": {k: metrics[k] for k in ("served", "labelled", "max_rmse") if k in metrics},
            "quality_champion": tags.get("champion_version") or None,
            "quality_retrain": tags.get("quality.retrain") == "true",
            "suggested": tuple(v for v in tags.get("quality.suggested", "").split(",") if v),
            "quality_checked_at_s": quality.info.start_time / 1000.0,
        }
    return RegistrySnapshot(up=True, aliases=aliases, champion=checked, **found)


def tracking_uri() -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    try:
        from airflow.models.connection import Connection

        conn = Connection.get_connection_from_secrets(
            os.environ.get("PIPELINE_MLFLOW_CONN_ID", "mlflow_default")
        )
    except Exception:
        return None
    from ml.settings import connection_tracking_uri

    return connection_tracking_uri(conn.host, conn.port, conn.conn_type) if conn.host else None


class CachedExposition:
    """The rendered metrics, read from MLflow at most once per ``ttl_s`` (thread-safe)."""

    def __init__(self, ttl_s: float = CACHE_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._body = b""

    def get(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._body = self._read()
                self._at = time.monotonic()
            return self._body

    @staticmethod
    def _read() -> bytes:
        from ml.settings import DriftSettings, RegistrySettings

        settings = RegistrySettings()
        uri = tracking_uri()
        snapshot = read_snapshot(uri, settings) if uri else RegistrySnapshot(up=False)
        return render(snapshot, settings.model_name, DriftSettings())
