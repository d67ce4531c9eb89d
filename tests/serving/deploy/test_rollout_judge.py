"""The rollout judge's PromQL through promtool: the recording rules of
docker/k8s/monitoring/rollout-judge-rule.yaml (the measures; a PrometheusRule, run as the plain
rule file the local stack derives from it) and the comparisons serving.deploy.judge sends
(check_query, with the settings' default thresholds), as alerting rules in a rule file written
here.

Every check has a scenario where it fails ("firing") and one where it passes ("quiet"), and
promtool's own evaluation says which. Then the same tests run against comparisons that never
fire and that always fire: every firing case must then fail, and so must every quiet case, so no
case passes whatever the PromQL says. The PSI rule is checked against ml.drift.psi (the drift
monitor's) on the same bins, and the measures' values against numbers computed here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scripts.stacklib.prometheus import JUDGE_RULE, rules_yaml
from serving.deploy.judge import CHECKS, REQUESTS, check_query, measure_query
from serving.deploy.settings import DeploySettings
from tests.serving.deploy.conftest import run_promtool

SOURCE = JUDGE_RULE
# The plain rule file the local stack derives from SOURCE (written by _derived).
RULES = Path()
SETTINGS = DeploySettings()
# Each scenario: input series every 15 s for 5 minutes, judged at 3 minutes (rate over 1m).
INTERVAL_S, EVAL = 15, "3m"
PREDICTION_BOUNDS = (30.0, 35.0, 40.0, 43.0, 46.0, 50.0, 55.0, 60.0, 70.0)  # a decile profile
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DIFF_BOUNDS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0)
STABLE_SHARES = (10, 10, 10, 10, 10, 10, 10, 10, 10, 10)  # per 15 s, per bin
SHIFTED_SHARES = (2, 3, 5, 6, 8, 10, 13, 16, 18, 19)  # the same count, moved up


@pytest.fixture(scope="module", autouse=True)
def _derived(tmp_path_factory):
    global RULES
    RULES = tmp_path_factory.mktemp("judge-rules") / "rollout-judge.yml"
    RULES.write_text(rules_yaml(SOURCE))


def _labels(track: str, **extra: str) -> str:
    port = {"stable": 5011, "canary": 5012}[track]
    labels = {"job": "model-server-tracks", "instance": f"127.0.0.1:{port}", "track": track}
    return ",".join(f'{k}="{v}"' for k, v in {**labels, **extra}.items())


def _counter(name: str, labels: str, per_step: float) -> dict:
    return {"series": f"{name}{{{labels}}}", "values": f"0+{per_step}x20"}


def _histogram(name: str, labels: str, bounds, per_bin, extra: str = "") -> list[dict]:
    """A histogram's _bucket/_count/_sum series, ``per_bin[i]`` observations per 15 s in bin i
    (the last bin is above the last bound), each observed at its bin's upper bound."""
    series, cumulative = [], 0.0
    labels = labels + (f",{extra}" if extra else "")
    for bound, count in zip((*bounds, "+Inf"), per_bin, strict=True):
        cumulative += count
        series.append(_counter(f"{name}_bucket", f'{labels},le="{bound}"', cumulative))
    series.append(_counter(f"{name}_count", labels, cumulative))
    top = (*bounds, bounds[-1])
    series.append(
        _counter(f"{name}_sum", labels, sum(c * b for c, b in zip(per_bin, top, strict=True)))
    )
    return series


def _requests(track: str, ok: float, errors: float = 0.0) -> list[dict]:
    name = "model_server_requests_total"
    route = 'route="/invocations",method="POST"'
    return [
        _counter(name, f'{_labels(track)},{route},status="200"', ok),
        _counter(name, f'{_labels(track)},{route},status="500"', errors),
        # other routes and 4xx never count against a version
        _counter(name, f'{_labels(track)},{route},status="400"', 50),
        _counter(name, f'{_labels(track)},route="/ping",method="GET",status="503"', 50),
    ]


def _latency(track: str, per_bin) -> list[dict]:
    return _histogram("model_server_request_duration_seconds", _labels(track), LATENCY_BOUNDS,
                      per_bin, 'route="/invocations"')  # fmt: skip


def _predictions(track: str, per_bin) -> list[dict]:
    return _histogram("model_server_prediction_value", _labels(track), PREDICTION_BOUNDS, per_bin)


def _diffs(per_bin) -> list[dict]:
    return _histogram("model_server_shadow_abs_diff", _labels("canary"), DIFF_BOUNDS, per_bin)


FAST = (0, 50, 40, 10, 0, 0, 0, 0, 0, 0, 0)  # p99 within 5 ms
SLOW = (0, 0, 0, 0, 0, 0, 0, 60, 40, 0, 0)  # p99 near 0.5 s


def _scenario(*, errors=0.0, stable_errors=0.0, latency=FAST, shares=STABLE_SHARES, diffs=None):
    """A stable version and a candidate (100 answers per 15 s each) with what is given."""
    series = [*_requests("stable", 100, stable_errors), *_requests("canary", 100 - errors, errors)]
    series += _latency("stable", FAST) + _latency("canary", latency)
    series += _predictions("stable", STABLE_SHARES) + _predictions("canary", shares)
    if diffs is not None:
        series += _diffs(diffs)
    return series


# (check, fires?, scenario): every check fails in one and passes in the other.
CASES = [
    ("errors", True, _scenario(errors=5)),  # 5% > 1%
    ("errors", False, _scenario(errors=0.5, stable_errors=30)),  # 0.5%; the stable's are not its
    ("latency", True, _scenario(latency=SLOW)),
    ("latency", False, _scenario()),
    ("prediction", True, _scenario(shares=SHIFTED_SHARES)),
    ("prediction", False, _scenario(shares=(11, 9, 10, 10, 11, 9, 10, 10, 10, 10))),
    ("shadow", True, _scenario(diffs=(10, 20, 20, 20, 10, 15, 5, 0))),  # p99 in (10, 25]
    ("shadow", False, _scenario(diffs=(30, 40, 20, 10, 0, 0, 0, 0))),  # p99 in (1, 2.5]
]


def _check_rules(path: Path, expr=None) -> Path:
    """Each check's comparison as an alerting rule ``Check_<check>`` (``expr(check)``:
    instead of the judge's comparison)."""
    rules = [{"alert": f"Check_{check}", "expr": (expr or _judges)(check)} for check in CHECKS]
    path.write_text(yaml.safe_dump({"groups": [{"name": "checks", "rules": rules}]}))
    return path


def _judges(check: str) -> str:
    return check_query(check, SETTINGS)


def _never(check: str) -> str:
    return "vector(1) > 2"


def _always(check: str) -> str:  # with the labels the check's own answer has
    return (
        "vector(1)"
        if check == "prediction"
        else 'label_replace(vector(1), "track", "canary", "", "")'
    )


def _test_file(tmp_path: Path, checks: Path, cases=CASES) -> Path:
    tests = []
    for check, fires, series in cases:
        expected = [{"exp_labels": {"track": "canary"}}] if fires else []
        if fires and check == "prediction":
            expected = [{"exp_labels": {}}]
        tests.append(
            {
                "interval": f"{INTERVAL_S}s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": EVAL, "alertname": f"Check_{check}", "exp_alerts": expected}
                ],
            }
        )
    path = tmp_path / "judge.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES), str(checks)], "tests": tests}))
    return path


def test_the_rule_file_passes_promtool_check(promtool):
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout
    source = yaml.safe_load(SOURCE.read_text())
    assert (source["apiVersion"], source["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    records = [r for g in source["spec"]["groups"] for r in g["rules"]]
    assert records and all("record" in r and "alert" not in r for r in records)


def test_every_measure_is_over_the_window_the_judge_waits_for():
    from serving.deploy.judge import WINDOW_S

    ranges = set(re.findall(r"\[(\w+)\]", RULES.read_text()))
    assert ranges == {f"{WINDOW_S // 60}m"}


def test_every_check_has_a_firing_and_a_quiet_case():
    assert {c for c, fires, _ in CASES if fires} == set(CHECKS)
    assert {c for c, fires, _ in CASES if not fires} == set(CHECKS)


def test_each_check_fails_and_passes_as_promtool_evaluates_it(promtool, tmp_path):
    test = _test_file(tmp_path, _check_rules(tmp_path / "checks.yml"))
    result = run_promtool(promtool, "test", "rules", test)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("expr", "which"),
    [(_never, True), (_always, False)],
    ids=["never-failing-checks", "always-failing-checks"],
)
def test_cases_depend_on_the_promql(promtool, tmp_path, expr, which):
    test = _test_file(tmp_path, _check_rules(tmp_path / "checks.yml", expr))
    result = run_promtool(promtool, "test", "rules", test)
    assert result.returncode != 0, result.stdout
    failed = set(re.findall(r"alertname: Check_(\w+), time: \S+,\s*exp:(\[\])?", result.stdout))
    expected = {(check, "" if fires else "[]") for check, fires, _ in CASES if fires == which}
    assert failed == expected, result.stdout


def test_the_measures_are_what_they_say(promtool, tmp_path):
    """Requests, 5xx share and PSI (against ml.drift.psi over the same bins) for the shifted
    scenario; a namespace in the series (a cluster) is kept and can be selected."""
    from ml.drift import psi

    stable = [s / sum(STABLE_SHARES) for s in STABLE_SHARES]
    canary = [s / sum(SHIFTED_SHARES) for s in SHIFTED_SHARES]
    expected_psi = psi(stable, canary)
    assert expected_psi > SETTINGS.judge_psi

    def close(expr: str, value: float) -> dict:
        return {"expr": f"abs({expr} - {value!r}) < bool 1e-9", "eval_time": EVAL,
                "exp_samples": [{"labels": "{}", "value": 1}]}  # fmt: skip

    series = _scenario(errors=5, shares=SHIFTED_SHARES)
    clustered = [
        {**s, "series": s["series"].replace("}", ',namespace="ml-serving"}', 1)} for s in series
    ]
    test = {
        "rule_files": [str(RULES)],
        "tests": [
            {
                "interval": f"{INTERVAL_S}s",
                "input_series": series,
                "promql_expr_test": [
                    # 95 + 5 + 50 (4xx: answered, not errors) per 15 s
                    close(f"sum({REQUESTS}{{track='canary'}}) * 60", 600.0),
                    close(f"sum({measure_query('errors')})", 5 / 150),
                    close(f"sum({measure_query('prediction')})", expected_psi),
                ],
            },
            {
                "interval": f"{INTERVAL_S}s",
                "input_series": clustered,
                "promql_expr_test": [
                    close(f"sum({measure_query('prediction', 'ml-serving')})", expected_psi),
                    close(f"count({measure_query('prediction', 'team-b')}) or vector(0)", 0),
                ],
            },
        ],
    }
    path = tmp_path / "measures.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = run_promtool(promtool, "test", "rules", path)
    assert result.returncode == 0, result.stdout
