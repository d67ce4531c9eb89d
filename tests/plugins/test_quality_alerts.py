"""The feedback loop's alert rules (docker/k8s/monitoring/quality-rule.yaml) through promtool:
file checks, its unit tests (tests/plugins/alert_rules/quality.test.yml) pass and depend on
the rules (rules that never fire fail every firing case, rules that always fire every quiet
one), every alert has both kinds of case, and the alerts fire on what the Airflow plugin's
exporter and the model server really export."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.serving.deploy.conftest import (
    REPO,
    _promtool_or_skip,
    derive_rule_tests,
    run_promtool,
)
from tests.serving.deploy.test_alert_rules import _series_lines

SOURCE = REPO / "docker" / "k8s" / "monitoring" / "quality-rule.yaml"
TEST_SOURCE = Path(__file__).parent / "alert_rules" / "quality.test.yml"
# The plain rule file the local stack derives from SOURCE, and the cases pointed at it.
RULES = TESTS = Path()


@pytest.fixture(scope="module", autouse=True)
def _derived(tmp_path_factory):
    global RULES, TESTS
    RULES, TESTS = derive_rule_tests(SOURCE, TEST_SOURCE, tmp_path_factory.mktemp("quality-rules"))


@pytest.fixture(scope="module")
def promtool() -> str:
    return _promtool_or_skip()


def _alerts() -> set[str]:
    return {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def test_the_rules_check_and_their_unit_tests_pass(promtool):
    check = run_promtool(promtool, "check", "rules", RULES)
    assert check.returncode == 0 and f"SUCCESS: {len(_alerts())} rules found" in check.stdout
    result = run_promtool(promtool, "test", "rules", TESTS)
    assert result.returncode == 0, result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = [c for g in yaml.safe_load(TESTS.read_text())["tests"] for c in g["alert_rule_test"]]
    assert {c["alertname"] for c in cases if c.get("exp_alerts")} == _alerts()
    assert {c["alertname"] for c in cases if not c.get("exp_alerts")} == _alerts()


@pytest.mark.parametrize(
    ("expr", "which"),
    [("vector(1) > 2", "firing"), ('label_replace(vector(1), "model", "any", "", "")', "quiet")],
    ids=["never-firing-rules", "always-firing-rules"],
)
def test_cases_depend_on_the_rules(promtool, tmp_path, expr, which):
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    test = yaml.safe_load(TESTS.read_text()) | {"rule_files": [str(tmp_path / "rules.yml")]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", tmp_path / "test.yml")
    failed = {"firing": set(), "quiet": set()}
    for name, empty in re.findall(r"alertname: (\w+), time: \S+,\s*exp:(\[\])?", result.stdout):
        failed["quiet" if empty else "firing"].add(name)
    assert failed[which] == _alerts()


def test_alerts_fire_on_what_the_exporters_really_export(promtool, tmp_path, monkeypatch):
    from ml.settings import DriftSettings
    from serving.server.metrics import ServerMetrics

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from registry_events.exporter import RegistrySnapshot, render

    snapshot = RegistrySnapshot(
        up=True,
        aliases={"champion": "4"},
        live={"rmse": {"3": 5.0, "4": 4.2}, "mae": {"4": 3.1}, "rows": {"4": 300.0}},
        quality={"served": 900.0, "labelled": 300.0, "max_rmse": 3.0},
        quality_champion="4",
        quality_retrain=True,
        suggested=("6",),
        quality_checked_at_s=600.0,
    )
    airflow = render(snapshot, "regression-model", DriftSettings()).decode()
    server = ServerMetrics()
    server.count_payload_rows("dropped", 10)
    served = server.render().decode()
    assert 'model_server_payload_log_rows_total{outcome="dropped"} 10.0' in served
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

    def annotations(alert: str, description: str) -> dict[str, str]:
        return rules[alert]["annotations"] | {"description": description}

    series = _series_lines(airflow, job="airflow", instance="a:8080")
    series += _series_lines(served, job="model-server", instance="127.0.0.1:5001")
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "ModelLiveErrorAboveGate",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "model": "regression-model",
                                    "version": "4",
                                },
                                "exp_annotations": annotations(
                                    "ModelLiveErrorAboveGate",
                                    "regression-model: @champion v4 has a live RMSE of 4.2 on "
                                    "the labelled rows of the newest quality check, above the "
                                    "gate's max_rmse 3.",
                                ),
                            }
                        ],
                    },
                    {
                        "eval_time": "2m",
                        "alertname": "ModelBetterVersionAvailable",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "info",
                                    "model": "regression-model",
                                    "version": "6",
                                },
                                "exp_annotations": annotations(
                                    "ModelBetterVersionAvailable",
                                    "regression-model: v6 has a lower RMSE than @champion on the "
                                    "labelled rows of the newest quality check: a promotion to "
                                    "consider (nothing was promoted).",
                                ),
                            }
                        ],
                    },
                    {"eval_time": "2m", "alertname": "ModelLabelsMissing", "exp_alerts": []},
                    # a counter that does not move drops nothing now
                    {"eval_time": "15m", "alertname": "ModelPayloadLogDropping", "exp_alerts": []},
                ],
            }
        ],
    }
    path = tmp_path / "exporters.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", path)
    assert result.returncode == 0, result.stdout
