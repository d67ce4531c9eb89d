"""Shadow and canary steps (``serving.deploy.progressive``) with a stand-in target, judge and
registry: which traffic each step gets, what is tagged, and that whatever stops the steps
(a failed step, a failed verification, a fault, the task killed) puts every request back on
the live version before anything else."""

from __future__ import annotations

import numpy as np
import pytest

import serving.deploy.progressive as progressive
from serving.deploy.judge import Judgement
from serving.deploy.progressive import Step, StepFailed, roll_out, steps
from serving.deploy.settings import DeploySettings
from serving.deploy.target import RequestRejected, RolloutError, VerificationFailed
from serving.deploy.verify import Rows

SETTINGS = DeploySettings(prometheus_url="http://prometheus", canary_bake_s=7)


def test_the_steps_of_each_strategy():
    assert steps("direct", SETTINGS) == []
    assert steps("shadow", SETTINGS) == [Step("shadow", mirror=0.1)]
    assert steps("canary", SETTINGS) == [
        Step("shadow", mirror=0.1),
        Step("canary 5%", weight=0.05),
        Step("canary 25%", weight=0.25),
        Step("canary 50%", weight=0.5),
    ]
    no_shadow = DeploySettings(shadow_share=0, canary_steps=[10, 90])
    assert steps("canary", no_shadow) == [Step("canary 10%", 0.1), Step("canary 90%", 0.9)]
    with pytest.raises(RequestRejected, match="shadow_share"):
        steps("shadow", no_shadow)
    # Kubernetes without a Gateway cannot mirror: a canary starts at its first step.
    assert steps("canary", SETTINGS, mirrors=False)[0] == Step("canary 5%", weight=0.05)
    with pytest.raises(RequestRejected, match="gateway_name"):
        steps("shadow", SETTINGS, mirrors=False)


class Target:
    name = "local"
    mirrors = True
    candidate_endpoint = "http://candidate"

    def __init__(self, healthy: bool = True) -> None:
        self.calls: list[tuple] = []
        self.healthy = healthy

    def start_candidate(self, model_uri, version, *, live_uri):
        self.calls.append(("start", version, live_uri))
        return {"endpoint": self.candidate_endpoint, "ready_s": 1.0}

    def route(self, weight, mirror):
        self.calls.append(("route", weight, mirror))

    def candidate_healthy(self):
        return self.healthy

    def promote_candidate(self):
        self.calls.append(("promote",))

    def drop_candidate(self):
        self.calls.append(("drop",))


class Registry:
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.reports: list[dict] = []

    def tag_version(self, version, tags):
        self.tags.update(tags)

    def log_report(self, version, report, name):
        self.reports.append(report)
        return f"runs:/r1/{name}"


class Judge:
    """Fails the steps named in ``failing`` on the prediction check; ``raises``: a fault."""

    failing: set[str] = set()
    raises: Exception | None = None

    def __init__(self, settings, namespace=None):
        pass

    def judge(self, step, *, shadow):
        if Judge.raises:
            raise Judge.raises
        measures = {"errors": 0.0, "latency": 0.01, "prediction": 0.02}
        if shadow:
            measures["shadow"] = 0.5
        failed = ["prediction"] if step in Judge.failing else []
        return Judgement(step, 600, measures, failed, {"prediction": "0.1"})

    def shadow_histogram(self, seconds):
        return {"1.0": 10.0, "+Inf": 12.0}


ROWS = Rows(["a"], [[1.0]], np.asarray([1.0]), "test")


@pytest.fixture
def run(monkeypatch):
    Judge.failing, Judge.raises = set(), None
    monkeypatch.setattr(progressive, "Judge", Judge)
    monkeypatch.setattr(progressive.judging, "WINDOW_S", 0)
    verified = {"rows": 1, "max_abs_diff": 0.0}
    monkeypatch.setattr(progressive, "verify", lambda endpoint, version, rows: verified)
    slept: list[float] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    def go(target=None, strategy="canary", sleep=sleep):
        target, reg, lines = target or Target(), Registry(), []
        try:
            result = roll_out(target, SETTINGS, strategy, version="4", model_uri="models:/m/4",
                              live_uri="models:/m/3", rows=ROWS, reg=reg, step=lines.append,
                              sleep=sleep, clock=lambda: clock[0])  # fmt: skip
            return result, target, reg, lines, None
        except BaseException as exc:
            return None, target, reg, lines, exc

    go.slept = slept
    return go


def test_a_canary_that_passes_every_step_is_promoted_with_its_evidence(run):
    result, target, reg, lines, error = run()
    assert error is None
    assert target.calls == [
        ("start", "4", "models:/m/3"),
        ("route", 0.0, 0.1),
        ("route", 0.05, 0.0),
        ("route", 0.25, 0.0),
        ("route", 0.5, 0.0),
        ("promote",),
    ]
    assert run.slept == [7, 7, 7, 7]
    assert [s["step"] for s in result["steps"]] == ["shadow", "canary 5%", "canary 25%",
                                                    "canary 50%"]  # fmt: skip
    assert reg.tags["rollout.step.1"].startswith("shadow: passed; 600 requests/min")
    assert reg.tags["rollout.step.4"].startswith("canary 50%: passed")
    assert reg.tags["rollout.report"].startswith("runs:/r1/rollout/report-")
    (report,) = reg.reports
    assert report["outcome"] == "promoted" and len(report["steps"]) == 4
    assert report["shadow_abs_diff_histogram"] == {"1.0": 10.0, "+Inf": 12.0}
    assert any(line.startswith("canary 25%: passed") for line in lines)


def test_the_first_judgement_waits_for_a_whole_window_of_the_candidates_traffic(run, monkeypatch):
    """Its window must not reach back into the rollout before (a previous candidate's series
    on the same track)."""
    monkeypatch.setattr(progressive.judging, "WINDOW_S", 100)
    _, _, _, lines, error = run()
    assert error is None
    assert run.slept == [7, 93, 7, 7, 7]
    assert any("once a whole 100s window" in line for line in lines)


def test_a_failed_step_puts_traffic_back_and_is_a_verdict_naming_the_step(run):
    Judge.failing = {"canary 5%"}
    _, target, reg, _, error = run()
    assert isinstance(error, StepFailed)
    assert str(error).startswith("canary step 2 (canary 5%) failed on prediction:")
    assert target.calls[-2:] == [("route", 0.05, 0.0), ("drop",)]
    assert ("promote",) not in target.calls
    assert set(reg.tags) == {"rollout.step.1", "rollout.step.2", "rollout.report"}
    assert "FAILED on prediction" in reg.tags["rollout.step.2"]
    assert reg.reports[0]["outcome"] == "failed at step 2"


@pytest.mark.parametrize(
    "stop",
    [
        RolloutError("Prometheus did not answer"),  # a fault: nothing learned, nothing tagged
        KeyboardInterrupt(),  # the task killed (Airflow: SIGTERM) in the middle of a step
    ],
    ids=["fault", "killed"],
)
def test_whatever_stops_the_steps_puts_traffic_back(run, stop):
    Judge.raises = stop if isinstance(stop, RolloutError) else None

    def sleep(seconds):
        if isinstance(stop, KeyboardInterrupt):
            raise stop

    _, target, reg, _, error = run(sleep=sleep)
    assert error is stop
    assert target.calls[-1] == ("drop",) and ("promote",) not in target.calls
    assert not any(key.startswith("rollout.step") for key in reg.tags)


def test_a_candidate_that_fails_verification_never_gets_traffic(run, monkeypatch):
    def wrong(endpoint, version, rows):
        raise VerificationFailed("row 0: 2.0, expected 1.0")

    monkeypatch.setattr(progressive, "verify", wrong)
    _, target, _, _, error = run()
    assert isinstance(error, VerificationFailed)
    assert target.calls == [("start", "4", "models:/m/3"), ("drop",)]


def test_a_candidate_that_stops_answering_fails_its_step(run):
    _, target, _, _, error = run(target=Target(healthy=False), strategy="shadow")
    assert isinstance(error, StepFailed) and "stopped answering" in str(error)
    assert target.calls[-1] == ("drop",)
