"""The alert rules (docker/k8s/monitoring/prometheus-rule.yaml) through promtool.

promtool reads the PrometheusRule's groups as the plain rule file the local stack derives from
it (scripts/stacklib/prometheus.py: rules_yaml). promtool checks it, and runs the unit tests in
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

from tests.serving.deploy.conftest import REPO, run_promtool
from tests.serving.deploy.monitoring import ALERT_TESTS, alert_rules, alerts, write_rule_tests


@pytest.fixture
def rule_tests(tmp_path) -> tuple[Path, list[Path]]:
    return write_rule_tests(tmp_path / "alert_rules")


def _alerts() -> set[str]:
    return set(alerts())


def _cases() -> list[dict]:
    return [
        {**case, "file": path.name}
        for path in ALERT_TESTS
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]


def test_rules_file_passes_promtool_check(promtool, rule_tests):
    rules, _ = rule_tests
    result = run_promtool(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout
    assert len(alert_rules()) == len(_alerts()), "two alerts of the same name"


def test_alert_rule_unit_tests_pass(promtool, rule_tests):
    assert ALERT_TESTS, "no tests/serving/deploy/alert_rules/*.test.yml"
    _, tests = rule_tests
    result = run_promtool(promtool, "test", "rules", *tests)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("SUCCESS") == len(tests), result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases = _cases()
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert firing == _alerts(), f"no firing case for {_alerts() - firing}"
    assert quiet == _alerts(), f"no quiet case for {_alerts() - quiet}"
    for path in ALERT_TESTS:
        assert yaml.safe_load(path.read_text())["rule_files"] == ["rules.yml"], path.name


def _failures(promtool: str, tmp_path: Path, expr: str) -> dict[str, set[str]]:
    """Run every test file against a copy of the rules whose every alert expression is
    ``expr``: the alert names of the failing cases, for cases that expect alerts ("firing")
    and cases that expect none ("quiet")."""
    rules_file, copies = write_rule_tests(tmp_path)
    rules = yaml.safe_load(rules_file.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = expr
    rules_file.write_text(yaml.safe_dump(rules))
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
    from ml.settings import DriftSettings, RegistrySettings
    from serving.server.metrics import ServerMetrics

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from registry_events.exporter import RegistrySnapshot, render

    rules = alerts()
    # The names the rules select by are the pipeline's: the predictions' pseudo-feature, and
    # the alias that names what should be live.
    assert f'feature="{PREDICTION_KEY}"' in rules["ModelPredictionDrift"]["expr"]
    assert f'feature!="{PREDICTION_KEY}"' in rules["ModelInputDrift"]["expr"]
    champion = RegistrySettings.model_fields["champion_alias"].default
    assert f'alias="{champion}"' in rules["ModelServedVersionNotChampion"]["expr"]
    rules_file, _ = write_rule_tests(tmp_path / "rules")
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
        "rule_files": [str(rules_file)],
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
                                    "while @champion is version 4: a rollout failed or did "
                                    "not run.",
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
