"""The Grafana dashboard (docker/k8s/monitoring/model-server-dashboard.json): fast checks.

Every panel query (and the feature variable's selector) parses: promtool checks them as
recording rules, after Grafana's macros are substituted. Every series a panel uses is the
model server's (``model_server_*``; tests/integration/test_server_runtime.py scrapes a real
server for them), one the Airflow plugin's exporter really renders (with the labels the query
matches on), Prometheus' ``up`` or kube-state-metrics'. The panels cover what the dashboard is
for, the alert thresholds it draws are the rules', and the JSON is one Grafana loads: unique
panel ids, no overlapping panels, every query on the ``datasource`` variable.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.serving.deploy import monitoring
from tests.serving.deploy.conftest import run_promtool
from tests.serving.deploy.promql import selected_labels, series_names

# The series the issue names for the dashboard (histograms by their _bucket series).
REQUIRED = {
    "model_server_requests_total",
    "model_server_request_duration_seconds_bucket",
    "model_server_batch_rows_bucket",
    "model_server_batch_requests_bucket",
    "model_server_model_version",
    "mlflow_registry_alias_version",
    "model_server_feature_value_bucket",
    "model_server_prediction_value_bucket",
    "pipeline_feature_drift_score",
    "pipeline_drift_threshold",
}
# The visualisations it uses, all built into Grafana 11 (a typo would be an empty panel).
PANEL_TYPES = {"row", "stat", "timeseries", "heatmap", "bargauge"}


@pytest.fixture(scope="module")
def board() -> dict:
    return monitoring.dashboard()


def panels(board: dict) -> list[dict]:
    return monitoring.panels(board)


def queries(board: dict) -> list[tuple[str, str]]:
    return monitoring.dashboard_queries(board)


def test_every_query_parses(promtool, board, tmp_path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, (_, expr) in enumerate(queries(board))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(queries(board))} rules found" in result.stdout


def test_promtool_check_catches_a_broken_query(promtool, tmp_path):
    """The check above would fail on a query Prometheus rejects."""
    path = tmp_path / "broken.yml"
    expr = "sum by (le) (rate(model_server_batch_rows_bucket[5m])"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": expr}]}]})
    )
    assert run_promtool(promtool, "check", "rules", path).returncode != 0


def test_every_series_is_the_servers_or_exported_elsewhere(board):
    """The alerts' series too: with the dashboard's, every series the monitoring uses."""
    plugin = monitoring.exposition_series(monitoring.plugin_exposition())
    used = set().union(*(series_names(expr) for _, expr in queries(board)))
    assert used >= REQUIRED, f"no panel shows {REQUIRED - used}"
    wrong = []
    for where, expr in monitoring.queries():
        labels = selected_labels(expr)
        for name in series_names(expr):
            if name.startswith("model_server_"):
                continue  # the server's: tests/integration/test_server_runtime.py
            if not monitoring.exported_elsewhere(name, plugin):
                wrong.append(f"{where}: nobody exports {name}")
            elif name in plugin and labels.get(name, set()) - plugin[name]:
                wrong.append(f"{where}: {name} has no label {labels[name] - plugin[name]}")
    assert not wrong, wrong


def test_server_series_are_selected_by_the_job_of_the_alerts(board):
    """Every model_server_* selector names job="model-server", as the alert rules do."""
    for where, expr in queries(board):
        for name, matchers in re.findall(r"\b(model_server_\w+)\{([^}]*)\}", expr):
            assert 'job="model-server"' in matchers, (where, name)
        assert not re.search(r"\bmodel_server_\w+(?![\w{])", expr), (where, "bare selector")


def test_grafana_can_load_it(board):
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    assert board["uid"] == "train-and-deploy-model-server" and len(board["uid"]) <= 40
    assert isinstance(board["schemaVersion"], int) and board["title"]
    (datasource,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["name"] == "datasource" and datasource["query"] == "prometheus"
    assert {p["type"] for p in board["panels"]} <= PANEL_TYPES
    for panel in panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    cells = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{panel['title']!r} overlaps another panel"
        cells |= mine


def _minutes(duration: str) -> int:
    value, unit = re.fullmatch(r"(\d+)([mh])", duration).groups()
    return int(value) * (60 if unit == "h" else 1)


def test_alert_lines_and_texts_are_the_rules(board):
    """The dashed alert lines sit at the rules' thresholds and the descriptions name them and
    the rules' `for`: the dashboard and prometheus-rule.yaml are changed together."""
    by_title = {p["title"]: p for p in board["panels"]}
    alerts = monitoring.alerts()

    def red_from(title: str) -> float:
        steps = by_title[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return next(s["value"] for s in steps if s["color"] == "red")

    def said(title: str, text: str) -> None:
        assert text in by_title[title]["description"], (title, text)

    ratio = monitoring.threshold("ModelServerHighErrorRate")
    assert red_from("Error ratio of /invocations") == ratio
    minutes = _minutes(alerts["ModelServerHighErrorRate"]["for"])
    said("Error ratio of /invocations", f"fires above {ratio:.0%} for {minutes} minutes")
    p99 = monitoring.threshold("ModelServerHighLatency")
    assert red_from("Latency of /invocations") == p99
    minutes = _minutes(alerts["ModelServerHighLatency"]["for"])
    said("Latency of /invocations", f"fires when p99 > {p99:g}s for {minutes} minutes")
    minutes = _minutes(alerts["ModelServedVersionNotChampion"]["for"])
    said("Served version vs @champion", f"differ for {minutes} minutes")


def test_feature_panel_repeats_over_the_features_the_server_exports(board):
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "feature"]
    assert variable["query"].startswith("label_values(model_server_feature_value_bucket{")
    assert variable["multi"] and variable["includeAll"]
    (panel,) = [p for p in panels(board) if p.get("repeat") == "feature"]
    assert 'feature="$feature"' in panel["targets"][0]["expr"]
