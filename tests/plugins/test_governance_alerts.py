"""docker/k8s/monitoring/governance-rule.yaml through promtool: the rule file checks, its unit tests
(tests/plugins/alert_rules/governance.test.yml) pass, they fail against a rule that never fires
and one that always fires, and the alert fires on what the plugin's exporter really renders.
Without promtool (`make prometheus-tools`) these tests skip with that reason."""

from __future__ import annotations

import pytest
import yaml

from tests.serving.deploy.conftest import (
    REPO,
    _promtool_or_skip,
    derive_rule_tests,
    run_promtool,
)

SOURCE = REPO / "docker" / "k8s" / "monitoring" / "governance-rule.yaml"
TEST_SOURCE = REPO / "tests" / "plugins" / "alert_rules" / "governance.test.yml"
# The plain rule file the local stack derives from SOURCE, and the cases pointed at it.
RULES = TESTS = REPO


@pytest.fixture(scope="module", autouse=True)
def _derived(tmp_path_factory):
    global RULES, TESTS
    RULES, TESTS = derive_rule_tests(
        SOURCE, TEST_SOURCE, tmp_path_factory.mktemp("governance-rules")
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    return _promtool_or_skip()


def test_the_rule_file_checks_and_its_unit_tests_pass(promtool):
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0 and "SUCCESS: 1 rules found" in result.stdout, result.stdout
    result = run_promtool(promtool, "test", "rules", TESTS)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("expr", "failing"),
    [
        ("vector(1) > 2", "got:[]"),  # never fires: the firing case fails
        ('label_replace(vector(1), "model", "m", "", "")', "exp:[]"),  # always: the quiet ones
    ],
    ids=["never-firing", "always-firing"],
)
def test_the_cases_depend_on_the_rule(promtool, tmp_path, expr, failing):
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"][0]["expr"] = expr
    (tmp_path / "governance.yml").write_text(yaml.safe_dump(rules))
    test = yaml.safe_load(TESTS.read_text()) | {"rule_files": [str(tmp_path / "governance.yml")]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", tmp_path / "test.yml")
    assert result.returncode != 0 and failing in "".join(result.stdout.split()), result.stdout


def test_the_alert_fires_on_what_the_exporter_renders(promtool, tmp_path, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    from ml.settings import DriftSettings

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from registry_events.exporter import RegistrySnapshot, render

    def series(snapshot: RegistrySnapshot) -> list[dict]:
        text = render(snapshot, "regression-model", DriftSettings()).decode()
        return [
            {
                "series": sample.name
                + "{"
                + ",".join(f'{k}="{v}"' for k, v in {**sample.labels, "job": "registry"}.items())
                + "}",
                "values": f"{sample.value}x20",
            }
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    # The firing case of the unit tests names v7 of regression-model too.
    annotations = yaml.safe_load(TESTS.read_text())["tests"][0]["alert_rule_test"][1]["exp_alerts"][
        0
    ]["exp_annotations"]
    alias = {"champion": "7"}
    cases = [
        (RegistrySnapshot(up=True, aliases=alias, champion=("7", True)), ["7"]),
        (RegistrySnapshot(up=True, aliases=alias, champion=("7", False)), []),
    ]
    for n, (snapshot, firing) in enumerate(cases):
        test = {
            "rule_files": [str(RULES)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": series(snapshot),
                    "alert_rule_test": [
                        {
                            "eval_time": "12m",
                            "alertname": "ModelChampionNotCleared",
                            "exp_alerts": [
                                {
                                    "exp_labels": {
                                        "severity": "critical",
                                        "model": "regression-model",
                                        "version": v,
                                    },
                                    "exp_annotations": annotations,
                                }
                                for v in firing
                            ],
                        }
                    ],
                }
            ],
        }
        path = tmp_path / f"exporter-{n}.test.yml"
        path.write_text(yaml.safe_dump(test, sort_keys=False))
        result = run_promtool(promtool, "test", "rules", path)
        assert result.returncode == 0, result.stdout


def test_the_runbook_section_exists():
    rule = yaml.safe_load(RULES.read_text())["groups"][0]["rules"][0]
    anchor = rule["annotations"]["runbook_url"].split("#")[1]
    headings = (REPO / "docs" / "operations.md").read_text().splitlines()
    assert f"### {rule['alert']}" in headings and anchor == rule["alert"].lower()
