"""The judge of a shadow or canary step: Prometheus decides, from live metrics.

The measures are recording rules of the PrometheusRule
``docker/k8s/monitoring/rollout-judge-rule.yaml`` (per track, ``stable`` and ``canary``, over
the last minute; the local stack loads them with the alerts, through the rule file it derives
from the monitoring base); the thresholds are the run's settings
(``judge_*``). At the end of a step :meth:`Judge.judge` asks Prometheus, all at one instant,
for the requests the candidate answered, for each check's measure and for each check's
comparison (:func:`check_query`: the PromQL that returns a sample exactly when the check
fails, run through promtool by tests/serving/deploy/test_rollout_judge.py):

==========  ==================================================================  =========
check       fails when                                                          steps
==========  ==================================================================  =========
errors      the candidate's share of 5xx answers > ``judge_error_ratio``        all
latency     its p99 > ``judge_p99_ratio`` x the stable p99 + ``judge_p99_slack_s``  all
prediction  PSI of its predictions against the stable's > ``judge_psi``         all
shadow      p99 of |candidate - live| on mirrored requests > ``judge_shadow_diff_p99``  shadow
==========  ==================================================================  =========

A measure Prometheus has no value for (the stable version answered nothing in that minute, no
mirrored answer could be paired) is reported as not judged. Too few requests to the candidate
(``judge_min_requests``) and a Prometheus that does not answer are faults
(:class:`~serving.deploy.target.RolloutError`): the step learned nothing about the version.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from serving.deploy.settings import DeploySettings
from serving.deploy.target import RolloutError

# check -> (the recorded measure, in words, shadow steps only?)
CHECKS: dict[str, tuple[str, str, bool]] = {
    "errors": ("rollout:invocations_5xx:ratio_rate1m", "5xx share", False),
    "latency": ("rollout:invocations_latency:p99_1m", "p99 latency", False),
    "prediction": ("rollout:prediction_psi:1m", "prediction PSI vs stable", False),
    "shadow": ("rollout:shadow_abs_diff:p99_1m", "paired |diff| p99", True),
}
REQUESTS = "rollout:invocations:rate1m"
# Judgement over the last minute (the rules' window): requests = rate x 60.
WINDOW_S = 60
# Prometheus lags the end of a step by a scrape and a rule evaluation: the judge asks again
# (every second, for at most this long) while the candidate's requests or a measure are
# missing, then judges what there is.
CATCH_UP_S = 30.0


class TooFewRequests(RolloutError):
    """The candidate answered too few requests to be judged: a fault, not a verdict."""


def _selector(namespace: str | None, track: str | None = None) -> str:
    matchers = [f'track="{track}"'] if track else []
    if namespace:
        matchers.append(f'namespace="{namespace}"')
    return "{" + ", ".join(matchers) + "}" if matchers else ""


def measure_query(check: str, namespace: str | None = None) -> str:
    """The PromQL of a check's measure for the candidate."""
    rule = CHECKS[check][0]
    return rule + _selector(namespace, None if check == "prediction" else "canary")


def check_query(check: str, settings: DeploySettings, namespace: str | None = None) -> str:
    """The PromQL that returns a sample (the measure) exactly when ``check`` fails."""
    measure = measure_query(check, namespace)
    if check == "errors":
        return f"{measure} > {settings.judge_error_ratio!r}"
    if check == "latency":
        stable = CHECKS["latency"][0] + _selector(namespace, "stable")
        return (
            f"{measure} > on (namespace) group_left () ({settings.judge_p99_ratio!r} * {stable} "
            f"+ {settings.judge_p99_slack_s!r})"
        )
    if check == "prediction":
        return f"{measure} > {settings.judge_psi!r}"
    return f"{measure} > {settings.judge_shadow_diff_p99!r}"


def thresholds(settings: DeploySettings) -> dict[str, str]:
    """Each check's threshold, in words (what a tag says it was compared with)."""
    return {
        "errors": f"{settings.judge_error_ratio:.2%}",
        "latency": f"{settings.judge_p99_ratio:g} x stable + {settings.judge_p99_slack_s:g}s",
        "prediction": f"{settings.judge_psi:g}",
        "shadow": f"{settings.judge_shadow_diff_p99:g}",
    }


@dataclass
class Judgement:
    """What the judge saw in one step, and what it decided."""

    step: str
    requests: int
    measures: dict[str, float | None] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    thresholds: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """One line: the verdict and the evidence (a version tag and a task-log line)."""
        parts = []
        for check, value in self.measures.items():
            name = CHECKS[check][1]
            shown = "not judged (no data)" if value is None else _show(check, value)
            flag = " FAILED" if check in self.failed else ""
            parts.append(f"{name} {shown} (limit {self.thresholds.get(check, '?')}){flag}")
        verdict = "passed" if self.passed else f"FAILED on {', '.join(self.failed)}"
        return f"{self.step}: {verdict}; {self.requests} requests/min; " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "requests": self.requests, "measures": self.measures,
                "failed": self.failed, "thresholds": self.thresholds}  # fmt: skip


def _show(check: str, value: float) -> str:
    if check == "errors":
        return f"{value:.2%}"
    if check == "latency":
        return f"{value * 1000:.1f}ms"
    return f"{value:.3g}"


def decide(
    step: str,
    shadow: bool,
    settings: DeploySettings,
    query: Callable[[str], list[dict[str, Any]]],
    namespace: str | None = None,
) -> Judgement:
    """The judgement of a step from ``query`` (PromQL -> the instant vector's samples).

    Pure apart from ``query``: tests hand it a table of answers."""
    rate = _value(query(REQUESTS + _selector(namespace, "canary")))
    requests = round((rate or 0.0) * WINDOW_S)
    if requests < settings.judge_min_requests:
        raise TooFewRequests(
            f"{step}: the candidate answered {requests} requests over the last minute, fewer "
            f"than judge_min_requests ({settings.judge_min_requests}): nothing to judge on. "
            "Shadow and canary rollouts need live traffic (rollout_strategy=direct has none)."
        )
    judgement = Judgement(step, requests, thresholds=thresholds(settings))
    for check, (_, _, shadow_only) in CHECKS.items():
        if shadow_only and not shadow:
            continue
        judgement.measures[check] = _value(query(measure_query(check, namespace)))
        if query(check_query(check, settings, namespace)):
            judgement.failed.append(check)
    return judgement


def _value(samples: list[dict[str, Any]]) -> float | None:
    if not samples:
        return None
    value = float(samples[0]["value"][1])
    return None if value != value else value  # NaN: no data (e.g. 0/0)


class Judge:
    """Asks the Prometheus at ``settings.prometheus_url`` for a step's judgement."""

    def __init__(self, settings: DeploySettings, *, namespace: str | None = None,
                 retry_s: float = 30.0) -> None:  # fmt: skip
        if not settings.prometheus_url:
            raise RolloutError("a shadow or canary rollout needs prometheus_url (the judge)")
        self.settings, self.namespace, self.retry_s = settings, namespace, retry_s
        self.url = settings.prometheus_url.rstrip("/") + "/api/v1/query"

    def judge(self, step: str, *, shadow: bool, catch_up_s: float = CATCH_UP_S) -> Judgement:
        deadline = time.monotonic() + catch_up_s
        with httpx.Client(timeout=10.0) as client:
            while True:
                query = functools.partial(self._query, client, at=time.time())
                try:
                    judgement = decide(step, shadow, self.settings, query, self.namespace)
                except TooFewRequests:
                    if time.monotonic() >= deadline:
                        raise
                else:
                    complete = None not in judgement.measures.values()
                    if complete or time.monotonic() >= deadline:
                        return judgement
                time.sleep(1.0)

    def shadow_histogram(self, seconds: float) -> dict[str, float]:
        """The shadow's paired |diff| per bucket bound over the last ``seconds`` (cumulative
        counts, for the report)."""
        selector = _selector(self.namespace, "canary")
        expr = (f"sum by (le) (increase(model_server_shadow_abs_diff_bucket{selector}"
                f"[{max(int(seconds), 1)}s]))")  # fmt: skip
        with httpx.Client(timeout=10.0) as client:
            samples = self._query(client, expr, at=time.time())
        return {s["metric"].get("le", ""): round(float(s["value"][1]), 1) for s in samples}

    def _query(self, client: httpx.Client, expr: str, *, at: float) -> list[dict[str, Any]]:
        def ask() -> list[dict[str, Any]]:
            response = client.get(self.url, params={"query": expr, "time": at})
            body: Mapping[str, Any] = response.json() if response.content else {}
            if response.status_code != 200 or body.get("status") != "success":
                raise _NoAnswer(f"{response.status_code} {body.get('error') or response.text}")
            return list(body["data"]["result"])

        try:
            return Retrying(
                stop=stop_after_delay(self.retry_s),
                wait=wait_exponential(multiplier=0.25, max=4),
                retry=retry_if_exception_type((httpx.HTTPError, _NoAnswer, ValueError)),
                reraise=True,
            )(ask)
        except (httpx.HTTPError, _NoAnswer, ValueError) as exc:
            raise RolloutError(f"Prometheus at {self.url} did not answer {expr!r}: {exc}") from exc


class _NoAnswer(Exception):
    pass
