"""The judge's decision (``decide``, pure apart from the query it is handed) and what a
Prometheus that does not answer means: a fault, never a verdict. The PromQL itself goes through
promtool in test_rollout_judge.py."""

from __future__ import annotations

import pytest

from serving.deploy.judge import REQUESTS, Judge, check_query, decide, measure_query
from serving.deploy.settings import DeploySettings
from serving.deploy.target import RolloutError, Verdict

SETTINGS = DeploySettings(judge_min_requests=50)


def prometheus(values: dict[str, float], failing: set[str] = frozenset()):
    """A query function: each check's measure from ``values`` (absent: no data), its
    comparison answering a sample for the checks in ``failing``."""
    answers = {REQUESTS + '{track="canary"}': values.get("requests")}
    for check in ("errors", "latency", "prediction", "shadow"):
        answers[measure_query(check)] = values.get(check)
        answers[check_query(check, SETTINGS)] = values.get(check) if check in failing else None
    asked = []

    def query(expr: str) -> list[dict]:
        asked.append(expr)
        value = answers[expr]
        return [] if value is None else [{"metric": {}, "value": [0, str(value)]}]

    query.asked = asked
    return query


def test_a_step_that_passes_every_check_says_so_with_its_evidence():
    query = prometheus({"requests": 10.0, "errors": 0.0, "latency": 0.004, "prediction": 0.01})
    judgement = decide("canary 25%", False, SETTINGS, query)
    assert judgement.passed and judgement.requests == 600
    assert judgement.measures == {"errors": 0.0, "latency": 0.004, "prediction": 0.01}
    line = judgement.summary()
    assert line.startswith("canary 25%: passed; 600 requests/min")
    assert "p99 latency 4.0ms" in line and "prediction PSI vs stable 0.01 (limit 0.1)" in line
    assert not any("shadow" in expr for expr in query.asked), "no shadow check outside shadow"


def test_a_failing_check_fails_the_step_and_names_itself():
    query = prometheus(
        {"requests": 10.0, "errors": 0.0, "latency": 0.004, "prediction": 0.35, "shadow": 6.2},
        failing={"prediction", "shadow"},
    )
    judgement = decide("shadow", True, SETTINGS, query)
    assert not judgement.passed and judgement.failed == ["prediction", "shadow"]
    line = judgement.summary()
    assert line.startswith("shadow: FAILED on prediction, shadow;")
    assert "prediction PSI vs stable 0.35 (limit 0.1) FAILED" in line
    assert "paired |diff| p99 6.2 (limit 5) FAILED" in line


def test_a_measure_without_data_is_not_judged():
    judgement = decide("canary 5%", False, SETTINGS, prometheus({"requests": 2.0, "errors": 0.0}))
    assert judgement.passed
    assert judgement.measures["prediction"] is None
    assert "prediction PSI vs stable not judged (no data)" in judgement.summary()


@pytest.mark.parametrize("requests", [None, 0.5])
def test_too_few_requests_to_judge_is_a_fault_not_a_verdict(requests):
    with pytest.raises(RolloutError, match="fewer than judge_min_requests") as raised:
        decide("shadow", True, SETTINGS, prometheus({"requests": requests}))
    assert not isinstance(raised.value, Verdict)


def test_a_prometheus_that_does_not_answer_is_a_fault(free_ports):
    (port,) = free_ports(1)
    settings = DeploySettings(prometheus_url=f"http://127.0.0.1:{port}")
    with pytest.raises(RolloutError, match="did not answer"):
        Judge(settings, retry_s=0.3).judge("canary 5%", shadow=False, catch_up_s=0)
    with pytest.raises(RolloutError, match="needs prometheus_url"):
        Judge(DeploySettings())


def test_a_namespace_narrows_every_query():
    assert measure_query("prediction", "ml-serving") == (
        'rollout:prediction_psi:1m{namespace="ml-serving"}'
    )
    latency = check_query("latency", SETTINGS, "ml-serving")
    assert latency.count('namespace="ml-serving"') == 2 and 'track="stable"' in latency


def test_the_judge_asks_again_while_prometheus_catches_up_with_the_step(monkeypatch):
    """At the end of a step Prometheus is a scrape and a rule evaluation behind: no requests
    yet, then no PSI yet, then everything: judged on everything."""
    rounds = [
        prometheus({}),
        prometheus({"requests": 10.0, "errors": 0.0, "latency": 0.004}),
        prometheus(
            {"requests": 10.0, "errors": 0.0, "latency": 0.004, "prediction": 0.3},
            failing={"prediction"},
        ),
    ]
    asked: list[float] = []

    def query(self, client, expr, *, at):
        if not asked or asked[-1] != at:
            asked.append(at)
        return rounds[min(len(asked), len(rounds)) - 1](expr)

    monkeypatch.setattr(Judge, "_query", query)
    monkeypatch.setattr("serving.deploy.judge.time.sleep", lambda s: None)
    judge = Judge(DeploySettings(prometheus_url="http://prometheus", judge_min_requests=50))
    judgement = judge.judge("canary 5%", shadow=False)
    assert len(asked) == 3 and judgement.failed == ["prediction"]
    asked.clear()
    with pytest.raises(RolloutError, match="fewer than judge_min_requests"):
        judge.judge("canary 5%", shadow=False, catch_up_s=0)
