"""The alert rules (serving.deploy.manifests.alert_rules) through promtool.

docker/prometheus/rules.yml is the PrometheusRule's groups as a plain rule file (the committed
file equals the render: test_manifests.py). Here promtool checks it, and runs the unit tests in
tests/serving/deploy/alert_rules/*.test.yml: series in, alerts out (labels and the rendered
annotations), each alert with a case that fires and one that does not. Then the same tests run
against rules whose expressions never fire, and against rules that always fire: every alert's
firing case must then fail, and so must every alert's quiet case, so no case passes whatever the
rule says.

promtool comes from Debian's prometheus package (`make prometheus-tools`); without it these
tests skip with that reason. Each promtool run takes well under a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from serving.deploy.manifests import RULES_FILE
from tests.serving.deploy.conftest import REPO, run_promtool

RULES = REPO / RULES_FILE
TESTS = sorted((Path(__file__).parent / "alert_rules").glob("*.test.yml"))


def _alerts() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def _cases() -> list[dict]:
    return [
        {**case, "file": path.name}
        for path in TESTS
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]


def test_rules_file_passes_promtool_check(promtool):
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_alert_rule_unit_tests_pass(promtool):
    assert TESTS, "no tests/serving/deploy/alert_rules/*.test.yml"
    result = run_promtool(promtool, "test", "rules", *TESTS)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("SUCCESS") == len(TESTS), result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = _cases()
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert firing == _alerts(), f"no firing case for {_alerts() - firing}"
    assert quiet == _alerts(), f"no quiet case for {_alerts() - quiet}"
    for path in TESTS:
        assert yaml.safe_load(path.read_text())["rule_files"] == [f"../../../../{RULES_FILE}"], (
            path.name
        )


def _failures(promtool: str, tmp_path: Path, expr: str) -> dict[str, set[str]]:
    """Run every test file against a copy of the rules whose every alert expression is
    ``expr``: the alert names of the failing cases, for cases that expect alerts ("firing")
    and cases that expect none ("quiet")."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    mutated = tmp_path / "rules.yml"
    mutated.write_text(yaml.safe_dump(rules))
    copies = []
    for path in TESTS:
        test = yaml.safe_load(path.read_text())
        test["rule_files"] = [str(mutated)]
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(test, sort_keys=False))
        copies.append(copy)
    result = run_promtool(promtool, "test", "rules", *copies)
    assert result.returncode != 0, result.stdout
    failed: dict[str, set[str]] = {"firing": set(), "quiet": set()}
    for name, empty in re.findall(r"alertname: (\w+), time: \S+,\s*exp:(\[\])?", result.stdout):
        failed["quiet" if empty else "firing"].add(name)
    return failed


@pytest.mark.parametrize(
    ("expr", "which"),
    [("vector(1) > 2", "firing"), ('label_replace(vector(1), "model", "any", "", "")', "quiet")],
    ids=["never-firing-rules", "always-firing-rules"],
)
def test_cases_depend_on_the_rules(promtool, tmp_path, expr, which):
    """Rules that never fire fail every alert's firing case; rules that always fire fail
    every alert's quiet case."""
    assert _failures(promtool, tmp_path, expr)[which] == _alerts()


# -- the exporters' real output -------------------------------------------------------------------


def _series_lines(exposition: str, **scrape_labels: str) -> list[dict]:
    """promtool input series for every sample of a text exposition, as Prometheus would store
    it after scraping (``scrape_labels`` added), constant for 20 minutes."""
    from prometheus_client.parser import text_string_to_metric_families

    series = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = {**sample.labels, **scrape_labels}
            matchers = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
            series.append(
                {"series": f"{sample.name}{{{matchers}}}", "values": f"{sample.value}x20"}
            )
    return series


def test_alerts_fire_on_what_the_exporters_really_export(promtool, tmp_path, monkeypatch):
    """The Airflow plugin's exporter (plugins/registry_events/exporter.py) and the server's
    ServerMetrics render their expositions; fed to promtool as scraped series, the drift and
    version alerts fire as the contract says."""
    from ml.drift import PREDICTION_KEY
    from ml.settings import DriftSettings
    from serving.deploy.manifests import PREDICTION_FEATURE
    from serving.server.metrics import ServerMetrics

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from registry_events.exporter import RegistrySnapshot, render

    assert PREDICTION_FEATURE == PREDICTION_KEY
    model, drift = "regression-model", DriftSettings(target_psi=0.5, prediction_psi=0.3)
    snapshot = RegistrySnapshot(
        up=True,
        aliases={"champion": "4", "challenger": "5"},
        drift_scores={"x0": 0.9, "x1": 0.01, "__target__": 0.4, PREDICTION_KEY: 0.35},
        drift_retrain=False,
        drift_checked_at_s=1_800_000_000.0,
    )
    airflow = render(snapshot, model, drift).decode()
    server = ServerMetrics()
    labels = {"name": model, "version": "3", "uri": f"models:/{model}/3"}
    server.set_model({**labels, "flavor": "python_function", "fast_path": "true"}, 1.0)
    served = server.render().decode()
    assert "model_server_model_version 3.0" in served.splitlines()
    common = {"severity": "warning", "namespace": "ml-serving", "deployment": "model-server"}

    def drifted(feature: str, score: float, threshold: float) -> dict:
        return {
            "exp_labels": {**common, "model": model, "feature": feature},
            "exp_annotations": {
                "summary": "A model input column drifted from the training data",
                "description": f"{model}: PSI of column {feature} is {score:.3g}, above its "
                f"threshold {threshold:.3g}.",
                "runbook_url": "docs/operations.md#modelinputdrift",
            },
        }

    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _series_lines(airflow, job="airflow", instance="a:8080")
                + _series_lines(served, job="model-server", instance="127.0.0.1:5001"),
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "ModelInputDrift",  # x1 (0.01) and __target__ (0.4 < 0.5) not
                        "exp_alerts": [drifted("x0", 0.9, drift.feature_psi)],
                    },
                    {
                        "eval_time": "2m",
                        "alertname": "ModelPredictionDrift",
                        "exp_alerts": [
                            {
                                "exp_labels": {**common, "model": model},
                                "exp_annotations": {
                                    "summary": "The model's predictions drifted from its "
                                    "holdout predictions",
                                    "description": f"{model}: PSI of the predictions is 0.35, "
                                    "above their threshold 0.3.",
                                    "runbook_url": "docs/operations.md#modelpredictiondrift",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "12m",
                        "alertname": "ModelServedVersionNotChampion",
                        "exp_alerts": [
                            {
                                "exp_labels": {**common, "model": model},
                                "exp_annotations": {
                                    "summary": "The served model version is not @champion",
                                    "description": f"{model}: a model server serves version 3 "
                                    "while @champion is version 4, for 10m: a rollout failed "
                                    "or did not run.",
                                    "runbook_url": "docs/operations.md#"
                                    "modelservedversionnotchampion",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "exporters.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", path)
    assert result.returncode == 0, result.stdout
