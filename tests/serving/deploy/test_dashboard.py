"""The Grafana dashboard (serving.deploy.dashboard): fast checks.

Every panel query (and the feature variable's selector) parses: promtool checks them as
recording rules, after Grafana's macros are substituted. Every series a panel uses is the
model server's (``model_server_*``; tests/integration/test_server_runtime.py scrapes a real
server for them) or one the module documents as exported elsewhere. The panels cover what the
dashboard is for, and the JSON is one Grafana loads: unique panel ids, no overlapping panels,
every query on the ``datasource`` variable, and the SDK reads it back. The committed JSON and
ConfigMap equal the render (test_manifests.py).
"""

from __future__ import annotations

import re

import pytest
import yaml

from serving.deploy import dashboard
from serving.deploy.settings import DeploySettings
from tests.serving.deploy.conftest import run_promtool
from tests.serving.deploy.promql import grafana_to_promql, series_names

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


@pytest.fixture(scope="module")
def board() -> dict:
    return dashboard.dashboard_dict(DeploySettings())


def panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def queries(board: dict) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target and query variable, as Prometheus gets it."""
    found = [
        (f"panel {p['title']!r} {t['refId']}", grafana_to_promql(t["expr"], {"$feature": "x0"}))
        for p in panels(board)
        for t in p["targets"]
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            (selector,) = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]).groups()
            found.append((f"variable {variable['name']!r}", selector))
    return found


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


def test_every_series_is_the_servers_or_documented(board):
    used = set().union(*(series_names(expr) for _, expr in queries(board)))
    assert used >= REQUIRED, f"no panel shows {REQUIRED - used}"
    others = {
        name
        for name in used
        if not name.startswith("model_server_") and not name.startswith(dashboard.EXTERNAL_PREFIXES)
    }
    assert others <= set(dashboard.EXTERNAL_METRICS), others - set(dashboard.EXTERNAL_METRICS)


def test_server_series_are_selected_by_the_job_of_the_alerts(board):
    """Every model_server_* selector names job="model-server", as the alert rules do."""
    for where, expr in queries(board):
        for name, matchers in re.findall(r"\b(model_server_\w+)\{([^}]*)\}", expr):
            assert 'job="model-server"' in matchers, (where, name)
        assert not re.search(r"\bmodel_server_\w+(?![\w{])", expr), (where, "bare selector")


def test_grafana_can_load_it(board):
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    assert board["uid"] == dashboard.DASHBOARD_UID and len(board["uid"]) <= 40
    (datasource,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["name"] == "datasource" and datasource["query"] == "prometheus"
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
    register_default_plugins()
    loaded = Dashboard.from_json(board)
    assert [p.title for p in loaded.panels] == [p["title"] for p in board["panels"]]


def test_alert_thresholds_are_drawn_from_the_settings():
    board = dashboard.dashboard_dict(
        DeploySettings(alert_error_ratio=0.02, alert_p99_latency_s=0.5)
    )
    by_title = {p["title"]: p for p in board["panels"]}

    def red_from(title: str) -> float:
        steps = by_title[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return next(s["value"] for s in steps if s["color"] == "red")

    assert red_from("Error ratio of /invocations") == 0.02
    assert red_from("Latency of /invocations") == 0.5


def test_feature_panel_repeats_over_the_features_the_server_exports(board):
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "feature"]
    assert variable["query"].startswith("label_values(model_server_feature_value_bucket{")
    assert variable["multi"] and variable["includeAll"]
    (panel,) = [p for p in panels(board) if p.get("repeat") == "feature"]
    assert 'feature="$feature"' in panel["targets"][0]["expr"]
