"""The model server's Grafana dashboard, built with grafana-foundation-sdk.

``python -m serving.deploy render ... --grafana-dashboard
docker/grafana/model-server-dashboard.json`` writes it as JSON (import it in Grafana, or
provision the file); ``render`` also puts it in a ConfigMap (docker/k8s/base/dashboards.yaml)
that Grafana's dashboard sidecar loads in a cluster. Both are committed, and checked against
this module by tests/serving/deploy/test_manifests.py; tests/serving/deploy/test_dashboard.py
parses every query with promtool, and tests/integration/test_server_runtime.py checks the
series against a real model server's /metrics.

Rows, top to bottom:

- health: scrape targets up, server ready, requests in flight, registry reachable;
- traffic and errors: requests per second by route and status, the 5xx/4xx share of
  ``/invocations`` (the error-ratio alert's threshold drawn in);
- latency: p50/p90/p99 of ``/invocations`` (the p99 alert's threshold drawn in);
- micro-batching: rows and requests per model call (quantiles);
- model version: the version every server serves against the version ``@champion`` names;
- distributions: a heatmap per input feature (the ``feature`` variable, repeated) and one of
  the predictions;
- drift: the drift DAG's latest PSI per column (features, target, predictions) against each
  column's threshold, and how long ago that check ran.

The model server's series are selected by ``job="model-server"``, the job it has in a cluster
(the ServiceMonitor) and in the local stack's Prometheus alike; the others are documented in
:data:`EXTERNAL_METRICS`. This is the only module that imports grafana-foundation-sdk (a dev
dependency): serving.deploy.manifests imports it only when rendering.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import bargauge, heatmap, stat, timeseries
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    HeatmapCalculationOptions,
    ReduceDataOptions,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.heatmap import YAxisConfig
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    GraphThresholdsStyleMode,
    HeatmapCellLayout,
    LegendDisplayMode,
    LegendPlacement,
    LineInterpolation,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from serving.deploy.manifests import CHAMPION_ALIAS, METRICS_JOB, PREDICTION_FEATURE
from serving.deploy.settings import DeploySettings

DASHBOARD_FILE = "model-server-dashboard.json"
DASHBOARD_PATH = f"docker/grafana/{DASHBOARD_FILE}"
DASHBOARD_UID = "train-and-deploy-model-server"
# Series the dashboard (and the alerts) use that the model server does not export, and who
# does. Every other series a panel queries must be one the server's /metrics has
# (tests/integration/test_dashboard_metrics.py scrapes a real server for it).
EXTERNAL_METRICS = {
    "up": "Prometheus itself: 1 when the last scrape of a target succeeded",
    "mlflow_registry_alias_version": "the Airflow plugin's /metrics "
    "(plugins/registry_events/exporter.py, GET /registry-events/metrics on the API server): "
    "the version a registry alias names, labels model and alias",
    "mlflow_registry_up": "the Airflow plugin's /metrics: 1 when the registry answered",
    "pipeline_feature_drift_score": "the Airflow plugin's /metrics: the drift DAG's latest PSI "
    f'per column, labels model and feature ("__target__", "{PREDICTION_FEATURE}" included)',
    "pipeline_drift_threshold": "the Airflow plugin's /metrics: each column's PSI threshold, "
    "labels model and feature",
    "pipeline_drift_check_timestamp_seconds": "the Airflow plugin's /metrics: when the newest "
    "drift check ran, label model",
}
# kube-state-metrics' series (kube_*) are external too (the no-ready-pods alert).
EXTERNAL_PREFIXES = ("kube_",)

_DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
_SERVER = f'job="{METRICS_JOB}"'
_INV = f'{_SERVER},route="/invocations"'
_RATE = "$__rate_interval"


def _query(expr: str, legend: str = "", ref: str = "A") -> Dataquery:
    query = Dataquery().expr(expr).ref_id(ref).datasource(_DS)
    return query.legend_format(legend) if legend else query


def _thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def _legend() -> VizLegendOptions:
    return (
        VizLegendOptions()
        .display_mode(LegendDisplayMode.TABLE)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["lastNotNull", "max"])
    )


def _series(title: str, description: str, unit: str, *queries: Dataquery) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(_DS)
        .unit(unit)
        .height(8)
        .span(12)
        .fill_opacity(10)
        .legend(_legend())
    )
    for query in queries:
        panel = panel.with_target(query)
    return panel


def _quantiles(metric: str, selector: str) -> list[Dataquery]:
    return [
        _query(
            f"histogram_quantile({q}, sum by (le) (rate({metric}{{{selector}}}[{_RATE}])))",
            f"p{round(q * 100)}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
    ]


def _alert_line(value: float) -> tuple[GraphThresholdsStyleConfig, ThresholdsConfig]:
    return (
        GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED),
        _thresholds((None, "green"), (value, "red")),
    )


def _stat(title: str, description: str, expr: str, *steps: tuple[float | None, str]):
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(_DS)
        .with_target(_query(expr))
        .height(4)
        .span(6)
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.BACKGROUND)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(_thresholds(*steps))
    )


def _distribution(title: str, description: str, metric: str, selector: str) -> heatmap.Panel:
    """Per-bucket counts of a histogram over time, as Prometheus buckets (no re-binning)."""
    query = (
        _query(f"sum by (le) (increase({metric}{{{selector}}}[{_RATE}]))", "{{le}}")
        .format(PromQueryFormat.HEATMAP)
        .interval("1m")
    )
    return (
        heatmap.Panel()
        .title(title)
        .description(description)
        .datasource(_DS)
        .with_target(query)
        .height(8)
        .span(12)
        .calculate(False)
        .calculation(HeatmapCalculationOptions())
        .rows_frame(heatmap.RowsHeatmapOptions().layout(HeatmapCellLayout.LE))
        .y_axis(YAxisConfig().unit("short"))
        .show_y_histogram()
        .show_color_scale(True)
    )


def build(settings: DeploySettings) -> Dashboard:
    """The dashboard; the alert thresholds drawn in come from ``settings``."""
    error_style, error_thresholds = _alert_line(settings.alert_error_ratio)
    p99_style, p99_thresholds = _alert_line(settings.alert_p99_latency_s)
    served = (
        "max by (model) (label_replace("
        f"model_server_model_version{{{_SERVER}}} * on (instance, job) group_left (name) "
        f"max by (instance, job, name) (model_server_model_info{{{_SERVER}}}), "
        '"model", "$1", "name", "(.+)"))'
    )
    served_min = served.replace("max by (model)", "min by (model)", 1)
    champion = f'max by (model) (mlflow_registry_alias_version{{alias="{CHAMPION_ALIAS}"}})'
    psi = "max by (model, feature) (pipeline_feature_drift_score)"
    threshold = "max by (model, feature) (pipeline_drift_threshold)"
    return (
        Dashboard("Model server")
        .uid(DASHBOARD_UID)
        .description(
            "train-and-deploy: the model server's traffic, errors, latency and micro-batching, "
            f"the served version against @{CHAMPION_ALIAS}, input and prediction "
            "distributions, and drift. Generated by serving/deploy/dashboard.py."
        )
        .tags(["train-and-deploy", "model-server", "mlflow"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            QueryVariable("feature")
            .label("Feature")
            .datasource(_DS)
            .query(f"label_values(model_server_feature_value_bucket{{{_SERVER}}}, feature)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
        )
        # -- health
        .with_row(Row("Health"))
        .with_panel(
            _stat(
                "Model-server targets up",
                "Scrape targets of job model-server that answered the last scrape (alert "
                "ModelServerDown when one does not).",
                f"sum(up{{{_SERVER}}})",
                (None, "red"),
                (1, "green"),
            )
        )
        .with_panel(
            _stat(
                "Ready",
                "1 once every live worker has loaded the model and answered a warm-up "
                "prediction (model_server_ready); the lowest over the targets.",
                f"min(model_server_ready{{{_SERVER}}})",
                (None, "red"),
                (1, "green"),
            )
        )
        .with_panel(
            _stat(
                "Requests in flight",
                "Requests being processed now, over every target.",
                f"sum(model_server_requests_in_flight{{{_SERVER}}})",
                (None, "green"),
            )
        )
        .with_panel(
            _stat(
                "Registry reachable",
                "1 when the Airflow plugin's exporter could read the MLflow registry "
                "(mlflow_registry_up): the @champion and drift panels depend on it.",
                "min(mlflow_registry_up)",
                (None, "red"),
                (1, "green"),
            )
        )
        # -- traffic and errors
        .with_row(Row("Traffic and errors"))
        .with_panel(
            _series(
                "Requests by route and status",
                "model_server_requests_total: requests per second by route and status code.",
                "reqps",
                _query(
                    "sum by (route, status) "
                    f"(rate(model_server_requests_total{{{_SERVER}}}[{_RATE}]))",
                    "{{route}} {{status}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Error ratio of /invocations",
                "Share of /invocations answered 5xx (the ModelServerHighErrorRate alert fires "
                f"above {settings.alert_error_ratio:.0%} for 5 minutes; dashed line) and 4xx "
                "(bad client input, not alerted).",
                "percentunit",
                *(
                    _query(
                        f"sum(rate(model_server_requests_total{{{_INV},status=~{pattern}}}"
                        f"[{_RATE}]))\n/\n"
                        f"sum(rate(model_server_requests_total{{{_INV}}}[{_RATE}]))",
                        legend,
                        ref,
                    )
                    for pattern, legend, ref in (('"5.."', "5xx", "A"), ('"4.."', "4xx", "B"))
                ),
            )
            .min(0)
            .thresholds_style(error_style)
            .thresholds(error_thresholds)
        )
        # -- latency
        .with_row(Row("Latency"))
        .with_panel(
            _series(
                "Latency of /invocations",
                "Quantiles of model_server_request_duration_seconds (the ModelServerHighLatency "
                f"alert fires when p99 > {settings.alert_p99_latency_s:g}s for 10 minutes; "
                "dashed line).",
                "s",
                *_quantiles("model_server_request_duration_seconds_bucket", _INV),
            )
            .min(0)
            .thresholds_style(p99_style)
            .thresholds(p99_thresholds)
        )
        .with_panel(
            _series(
                "Latency by route (p99)",
                "p99 of every route (health checks, /metrics included).",
                "s",
                _query(
                    "histogram_quantile(0.99, sum by (le, route) "
                    f"(rate(model_server_request_duration_seconds_bucket{{{_SERVER}}}[{_RATE}])))",
                    "{{route}}",
                ),
            ).min(0)
        )
        # -- micro-batching
        .with_row(Row("Micro-batching"))
        .with_panel(
            _series(
                "Rows per model call",
                "Quantiles of model_server_batch_rows: rows per fast-path model call "
                "(concurrent requests coalesced, big requests as they come).",
                "short",
                *_quantiles("model_server_batch_rows_bucket", _SERVER),
            ).min(0)
        )
        .with_panel(
            _series(
                "Requests per model call",
                "Quantiles of model_server_batch_requests: requests coalesced into one model "
                "call (1 = no batching happened).",
                "short",
                *_quantiles("model_server_batch_requests_bucket", _SERVER),
            ).min(0)
        )
        # -- model version
        .with_row(Row(f"Model version (served vs @{CHAMPION_ALIAS})"))
        .with_panel(
            _series(
                f"Served version vs @{CHAMPION_ALIAS}",
                "The registry version the model servers serve (model_server_model_version; "
                "highest and lowest over the servers, they differ during a rollout) against "
                f"the version @{CHAMPION_ALIAS} names (mlflow_registry_alias_version, from the "
                "Airflow plugin). ModelServedVersionNotChampion fires when they differ for "
                f"{settings.alert_version_mismatch_for_s // 60} minutes.",
                "none",
                _query(served, "served (highest) {{model}}", "A"),
                _query(served_min, "served (lowest) {{model}}", "B"),
                _query(champion, f"@{CHAMPION_ALIAS} {{{{model}}}}", "C"),
            )
            .decimals(0)
            .line_interpolation(LineInterpolation.STEP_AFTER)
            .fill_opacity(0)
            .line_width(2)
        )
        .with_panel(
            stat.Panel()
            .title("Now")
            .description(f"The latest served and @{CHAMPION_ALIAS} versions.")
            .datasource(_DS)
            .with_target(_query(served, "served {{model}}", "A"))
            .with_target(_query(champion, f"@{CHAMPION_ALIAS} {{{{model}}}}", "B"))
            .height(8)
            .span(12)
            .decimals(0)
            .graph_mode(BigValueGraphMode.NONE)
            .color_mode(BigValueColorMode.NONE)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        )
        # -- distributions
        .with_row(Row("Input and prediction distributions"))
        .with_panel(
            _distribution(
                "Predictions",
                "How the predictions spread over the buckets of model_server_prediction_value "
                "(predictions per bucket and interval).",
                "model_server_prediction_value_bucket",
                _SERVER,
            ).span(24)
        )
        .with_panel(
            # One copy per selected feature, side by side (Grafana sizes the copies).
            _distribution(
                "Feature $feature",
                "How the values of one input feature spread over the buckets of "
                "model_server_feature_value (rows received per bucket and interval).",
                "model_server_feature_value_bucket",
                f'{_SERVER},feature="$feature"',
            )
            .span(24)
            .repeat("feature")
            .repeat_direction("h")
            .max_per_row(2)
        )
        # -- drift
        .with_row(Row("Drift (the drift DAG's latest result)"))
        .with_panel(
            bargauge.Panel()
            .title("Drift per column, against its threshold")
            .description(
                "The latest monitor_drift run's PSI of each column (the features, __target__, "
                "__prediction__; pipeline_feature_drift_score) as a share of that column's "
                "threshold (pipeline_drift_threshold): red from 100% on, where ModelInputDrift "
                "or ModelPredictionDrift fires."
            )
            .datasource(_DS)
            .with_target(
                _query(
                    f"{psi}\n/ on (model, feature)\n{threshold}", "{{model}} {{feature}}"
                ).instant()
            )
            .height(8)
            .span(12)
            .unit("percentunit")
            .min(0)
            .orientation(VizOrientation.HORIZONTAL)
            .display_mode(BarGaugeDisplayMode.GRADIENT)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .thresholds(_thresholds((None, "green"), (0.8, "yellow"), (1.0, "red")))
        )
        .with_panel(
            _series(
                "PSI over time",
                "Each column's PSI per drift run (solid) and its threshold (dashed).",
                "none",
                _query(psi, "{{model}} {{feature}}", "A"),
                _query(threshold, "threshold {{model}} {{feature}}", "B"),
            )
            .min(0)
            .line_interpolation(LineInterpolation.STEP_AFTER)
            .fill_opacity(0)
            .override_by_query(
                "B",
                [
                    DynamicConfigValue(
                        id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                    )
                ],
            )
        )
        .with_panel(
            _stat(
                "Since the last drift check",
                "Time since the newest monitor_drift run (pipeline_drift_check_timestamp_seconds;"
                " the DAG runs daily): the drift panels show that run.",
                "time() - max by (model) (pipeline_drift_check_timestamp_seconds)",
                (None, "green"),
                (1.5 * 86400, "yellow"),
                (3 * 86400, "red"),
            )
            .unit("s")
            .graph_mode(BigValueGraphMode.NONE)
        )
    )


def dashboard_dict(settings: DeploySettings) -> dict[str, Any]:
    """The dashboard model as Grafana's JSON (a dict), panels (rows too) numbered in order."""
    model = json.loads(JSONEncoder().encode(build(settings).build()))
    for number, panel in enumerate(model["panels"], 1):
        panel["id"] = number
    return model


def dashboard_json(settings: DeploySettings) -> str:
    """The dashboard JSON as committed: keys sorted, 2-space indent, newline at the end."""
    return json.dumps(dashboard_dict(settings), indent=2, sort_keys=True) + "\n"
