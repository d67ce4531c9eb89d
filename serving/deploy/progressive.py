"""Shadow and canary: a version earns its traffic step by step, judged on live metrics.

:func:`serving.deploy.rollout.run` calls :func:`roll_out` instead of a plain deploy when the
run's strategy (``rollout_strategy``, or the request's ``strategy``) is not ``direct`` and a
healthy version is live to compare with:

1. the candidate starts beside the live version, with no traffic, its prediction histogram in
   the live version's buckets, and is verified on its fixed rows at its own endpoint;
2. :func:`steps` (pure): ``shadow`` is one step in which the candidate answers a mirrored
   ``shadow_share`` of the live requests (callers only ever see the live answers);
   ``canary`` is that step (unless ``shadow_share`` is 0), then ``canary_steps`` (5%, 25%,
   50%: the share of the predictions it answers);
3. each step lasts ``canary_bake_s``, then :class:`~serving.deploy.judge.Judge` decides on
   the last minute (not before the candidate has run for a whole minute: the window must not
   reach back into the rollout before); its verdict and evidence become the version's tag
   ``rollout.step.<n>`` and a task-log line;
4. every step passed: the candidate takes every request (the caller moves ``@champion``).

A failed step is a verdict (:class:`StepFailed`): every request goes back to the live version
(the target does it in seconds), and the caller tags the version ``rollout.failed`` with the
step and the reason and leaves ``@champion`` alone. Anything else that stops the steps (the
judge's Prometheus does not answer, too little traffic to judge, the task is killed) puts the
traffic back just the same and tags nothing. Either way the steps' evidence is logged as a JSON
report in the version's run (``rollout/report-<time>.json``, tag ``rollout.report``), with the
shadow's paired-difference histogram.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.deploy import judge as judging
from serving.deploy.judge import Judge, Judgement
from serving.deploy.settings import DeploySettings
from serving.deploy.target import EndpointUnreachable, RequestRejected, RolloutError, Verdict
from serving.deploy.verify import Rows, verify

log = logging.getLogger(__name__)

STEP_TAG = "rollout.step.{n}"
REPORT_TAG = "rollout.report"


@dataclass(frozen=True)
class Step:
    name: str
    weight: float = 0.0  # share of the predictions the candidate answers
    mirror: float = 0.0  # share of the others mirrored to it


class StepFailed(Verdict):
    """A shadow or canary step ran and the judge failed the candidate."""


def steps(strategy: str, settings: DeploySettings, *, mirrors: bool = True) -> list[Step]:
    """The steps of a ``shadow`` or ``canary`` rollout (``direct`` has none) on a target that
    can mirror requests or not (Kubernetes without a Gateway: a canary has no shadow step)."""
    if strategy == "direct":
        return []
    share = settings.shadow_share if mirrors else 0.0
    shadow = [Step("shadow", mirror=share)] if share else []
    if strategy == "shadow" and not shadow:
        why = "shadow_share above 0" if mirrors else "a target that mirrors (gateway_name)"
        raise RequestRejected(f"a shadow rollout needs {why}")
    if strategy == "shadow":
        return shadow
    return shadow + [Step(f"canary {p:g}%", weight=p / 100) for p in settings.canary_steps]


def roll_out(
    target: Any,
    settings: DeploySettings,
    strategy: str,
    *,
    version: str,
    model_uri: str,
    live_uri: str,
    rows: Rows,
    reg: Any,
    step: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Start, verify and step the candidate ``version`` beside ``live_uri``; see the module
    docstring. Returns its verification and the steps' judgements; raises
    :class:`~serving.deploy.target.VerificationFailed` or :class:`StepFailed` (verdicts:
    traffic already back on the live version), or a fault."""
    planned = steps(strategy, settings, mirrors=target.mirrors)
    judge = Judge(settings, namespace=settings.namespace if target.name == "kubernetes" else None)
    detail = target.start_candidate(model_uri, version, live_uri=live_uri)
    # The judge looks at the last WINDOW_S: not before a whole window of this candidate's own
    # series exists (a shorter one would also hold the series of the rollout before).
    judge_after = clock() + judging.WINDOW_S
    step(f"v{version} started beside {live_uri}, no traffic yet ({_brief(detail)})")
    judged: list[Judgement] = []
    shadow_histogram: dict[str, float] = {}
    outcome = "stopped"
    try:
        try:
            verification = verify(target.candidate_endpoint, version, rows)
        except EndpointUnreachable as exc:
            raise RolloutError(f"cannot verify v{version}: {exc}") from exc
        step(f"v{version} verified on its own endpoint: {verification['rows']} rows")
        for n, current in enumerate(planned, 1):
            target.route(current.weight, current.mirror)
            step(f"{strategy} step {n}/{len(planned)}: {current.name} for "
                 f"{settings.canary_bake_s:g}s")  # fmt: skip
            sleep(settings.canary_bake_s)
            if (early := judge_after - clock()) > 0:
                step(f"judging in {early:.0f}s, once a whole {judging.WINDOW_S}s window of "
                     f"v{version}'s traffic exists")  # fmt: skip
                sleep(early)
            if not target.candidate_healthy():
                raise StepFailed(f"{strategy} step {n} ({current.name}): the candidate stopped "
                                 "answering")  # fmt: skip
            judgement = judge.judge(current.name, shadow=current.mirror > 0)
            judged.append(judgement)
            if current.mirror:
                shadow_histogram = judge.shadow_histogram(settings.canary_bake_s)
            reg.tag_version(version, {STEP_TAG.format(n=n): judgement.summary()[:5000]})
            step(judgement.summary())
            if not judgement.passed:
                outcome = f"failed at step {n}"
                checks = ", ".join(judgement.failed)
                raise StepFailed(f"{strategy} step {n} ({current.name}) failed on {checks}: "
                                 f"{judgement.summary()}")  # fmt: skip
        target.promote_candidate()
        outcome = "promoted"
        step(f"v{version} passed every step: it takes every request")
    except BaseException:
        target.drop_candidate()  # first: callers are back on the live version
        step(f"every request back on {live_uri}; v{version} stopped")
        raise
    finally:
        _report(reg, version, strategy, live_uri, outcome, judged, shadow_histogram, step)
    return {"verification": verification, "steps": [j.to_dict() for j in judged]}


def _report(
    reg: Any,
    version: str,
    strategy: str,
    live_uri: str,
    outcome: str,
    judged: list[Judgement],
    shadow_histogram: dict[str, float],
    step: Callable[[str], None],
) -> None:
    if not judged:
        return
    report = {
        "version": version,
        "strategy": strategy,
        "compared_with": live_uri,
        "outcome": outcome,
        "steps": [j.to_dict() for j in judged],
        "shadow_abs_diff_histogram": shadow_histogram,
    }
    name = f"rollout/report-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    try:
        uri = reg.log_report(version, report, name)
        if uri:
            reg.tag_version(version, {REPORT_TAG: uri})
            step(f"report: {uri}")
    except Exception as exc:  # evidence only: the tags above carry the verdicts
        log.warning("could not log the rollout report of v%s: %s", version, exc)


def _brief(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items() if k in ("endpoint", "ready_s"))
