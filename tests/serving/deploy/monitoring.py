"""The monitoring sources as the tests read them: docker/k8s/monitoring's PrometheusRule (the
alert rules, everywhere), ServiceMonitor and Grafana dashboard, the PromQL they hold, and who
exports each series they use.

The rules reach promtool (and the local stack's Prometheus) as the plain rule file the stack
derives from the PrometheusRule (scripts/stacklib/prometheus.py: rules_yaml).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from scripts.stacklib.prometheus import PROMETHEUS_RULE, rules_yaml
from tests.serving.deploy.promql import grafana_to_promql

REPO = Path(__file__).resolve().parents[3]
MONITORING = REPO / "docker" / "k8s" / "monitoring"
SERVICE_MONITOR = MONITORING / "service-monitor.yaml"
DASHBOARD = MONITORING / "model-server-dashboard.json"
ALERT_TESTS = sorted((Path(__file__).parent / "alert_rules").glob("*.test.yml"))
# Series the dashboard and the alerts use that neither the model server nor the Airflow plugin
# exports: Prometheus' own `up` (1 when a target's last scrape succeeded) and kube-state-metrics'
# kube_* (the no-ready-pods alert).
PROMETHEUS_SERIES = {"up"}
KUBE_STATE_METRICS_PREFIX = "kube_"


def prometheus_rule() -> dict:
    return yaml.safe_load(PROMETHEUS_RULE.read_text())


def alert_rules() -> list[dict]:
    return [r for g in prometheus_rule()["spec"]["groups"] for r in g["rules"] if "alert" in r]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in alert_rules()}


def write_rule_tests(folder: Path) -> tuple[Path, list[Path]]:
    """``rules.yml`` as the stack derives it, and copies of the promtool test files next to it
    (their ``rule_files`` names ``rules.yml``, relative to the test file)."""
    folder.mkdir(parents=True, exist_ok=True)
    rules = folder / "rules.yml"
    rules.write_text(rules_yaml(PROMETHEUS_RULE))  # the model server's: what these cases cover
    copies = []
    for path in ALERT_TESTS:
        copy = folder / path.name
        copy.write_text(path.read_text())
        copies.append(copy)
    return rules, copies


def threshold(alert: str) -> float:
    """The number an alert's expression compares with at its end (``... > 0.05``)."""
    (value,) = re.findall(r">\s*([0-9.]+)\s*$", alerts()[alert]["expr"])
    return float(value)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
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


def queries() -> list[tuple[str, str]]:
    """Every PromQL expression of the dashboard and the alert rules."""
    rules = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    return dashboard_queries(dashboard()) + rules


def plugin_exposition() -> str:
    """The Airflow plugin exporter's /metrics text with every series it has present (the
    drift scores of a feature, the target and the predictions)."""
    plugins = str(REPO / "plugins")
    if plugins not in sys.path:  # as Airflow does for its plugins
        sys.path.append(plugins)
    from registry_events.exporter import RegistrySnapshot, render

    from ml.drift import PREDICTION_KEY
    from ml.settings import DriftSettings

    snapshot = RegistrySnapshot(
        up=True,
        aliases={"champion": "4"},
        drift_scores={"x0": 0.1, "__target__": 0.1, PREDICTION_KEY: 0.1},
        drift_retrain=False,
        drift_checked_at_s=1_800_000_000.0,
    )
    return render(snapshot, "regression-model", DriftSettings()).decode()


def exposition_series(text: str) -> dict[str, set[str]]:
    """``{sample name: label names}`` of a Prometheus text exposition."""
    samples: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? ", line)
        if match:
            labels = set(re.findall(r'(\w+)="', match.group(2) or ""))
            samples.setdefault(match.group(1), set()).update(labels)
    return samples


def exported_elsewhere(name: str, plugin: dict[str, set[str]]) -> bool:
    """``name`` is a series of Prometheus itself, kube-state-metrics or the Airflow plugin
    (``plugin``: :func:`exposition_series` of :func:`plugin_exposition`)."""
    return name in PROMETHEUS_SERIES or name.startswith(KUBE_STATE_METRICS_PREFIX) or name in plugin
