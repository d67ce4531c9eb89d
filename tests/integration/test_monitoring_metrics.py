"""The dashboard and the alert rules against a real model server's /metrics.

A tiny Keras model is trained and registered (as in test_server_protocol), ``python -m
serving.server`` serves it as a real process, answers a few predictions (so that every labelled
series has a sample), and its /metrics is scraped once. Every series a dashboard panel or an
alert rule selects must then be one the server exports, with the labels the queries match on,
unless serving/deploy/dashboard.py documents it as exported elsewhere (Prometheus' ``up``, the
Airflow plugin's registry and drift gauges, kube-state-metrics).
"""

from __future__ import annotations

import re

import httpx
import pytest

from serving.deploy import dashboard, manifests
from serving.deploy.settings import DeploySettings
from tests.conftest import free_port
from tests.integration.test_server_protocol import (
    FEATURES,
    ServerProcess,
    child_env,
    our_server_cmd,
    sqlite_registry,
    synthetic_frame,
    train_and_register,
)
from tests.serving.deploy.promql import grafana_to_promql, selected_labels, series_names

pytestmark = pytest.mark.integration

MODEL_NAME = "serving-monitoring"
# Labels Prometheus adds at scrape time (job, instance) or the Prometheus Operator (namespace).
SCRAPE_LABELS = {"job", "instance", "namespace"}


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory) -> str:
    """A real server's /metrics after a few predictions."""
    root = tmp_path_factory.mktemp("serving-monitoring")
    with sqlite_registry(root):
        registry = train_and_register(root, MODEL_NAME)
    port = free_port()
    server = ServerProcess.start(
        "monitoring",
        our_server_cmd(registry.model_uri, port),
        port,
        child_env(registry.tracking_uri),
        root,
    )
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for n_rows in (1, 3):
                rows = synthetic_frame(n_rows, seed=n_rows)[FEATURES].to_numpy().tolist()
                body = {"dataframe_split": {"columns": FEATURES, "data": rows}}
                assert client.post("/invocations", json=body).status_code == 200
            return client.get("/metrics").text
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scraped(metrics_text) -> dict[str, set[str]]:
    """``{sample name: label names}`` of the scrape."""
    samples: dict[str, set[str]] = {}
    for line in metrics_text.splitlines():
        match = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? ", line)
        if match:
            labels = set(re.findall(r'(\w+)="', match.group(2) or ""))
            samples.setdefault(match.group(1), set()).update(labels)
    assert "model_server_requests_total" in samples, metrics_text[:2000]
    return samples


def _queries() -> list[tuple[str, str]]:
    settings = DeploySettings()
    board = dashboard.dashboard_dict(settings)
    found = [
        (f"panel {p['title']!r}", grafana_to_promql(t["expr"], {"$feature": "x0"}))
        for p in board["panels"]
        for t in p.get("targets", [])
    ]
    found += [  # label_values(<selector>, <label>)
        (f"variable {v['name']!r}", re.fullmatch(r"label_values\((.+), *\w+\)", v["query"])[1])
        for v in board["templating"]["list"]
        if v["type"] == "query"
    ]
    found += [(f"alert {r['alert']}", r["expr"]) for r in manifests.alert_rules(settings)]
    return found


def _external(name: str) -> bool:
    return name in dashboard.EXTERNAL_METRICS or name.startswith(dashboard.EXTERNAL_PREFIXES)


def test_every_series_of_the_dashboard_and_the_alerts_is_exported(scraped):
    missing: dict[str, list[str]] = {}
    wrong_labels = []
    for where, expr in _queries():
        labels = selected_labels(expr)
        for name in sorted(series_names(expr)):
            if _external(name):
                continue
            if name not in scraped:
                missing.setdefault(name, []).append(where)
                continue
            unknown = labels.get(name, set()) - SCRAPE_LABELS - scraped[name]
            if unknown:
                wrong_labels.append(f"{where}: {name} has no label {sorted(unknown)}")
    assert not wrong_labels, wrong_labels
    assert not missing, missing


def test_feature_histograms_are_labelled_with_the_models_input_columns(scraped, metrics_text):
    """The dashboard's feature variable lists the ``feature`` label's values: the model's
    input columns."""
    assert "model_server_feature_value_bucket" in scraped
    values = set(
        re.findall(
            r'^model_server_feature_value_bucket\{[^}]*feature="([^"]*)"', metrics_text, re.M
        )
    )
    assert values >= set(FEATURES), values
