"""The rollout pod's operator reads its exit code: 1 (a verdict) and 2 (refused) fail the task
for good; 3 (a fault) and everything else stay ordinary failures, which Airflow retries.

No cluster: the pod is a stand-in with a container status, and KubernetesPodOperator's own
cleanup (which raises when the pod failed) is stubbed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from _pod_operators import RolloutPodOperator, exit_code
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from serving.deploy.pods import ROLLOUT_FINAL_EXIT_CODES


def pod(*containers: tuple[str, int | None]) -> SimpleNamespace:
    """A V1Pod stand-in: ``(container name, exit code)``; None: still running."""

    def status(name: str, code: int | None) -> SimpleNamespace:
        terminated = None if code is None else SimpleNamespace(exit_code=code)
        running = SimpleNamespace() if code is None else None
        return SimpleNamespace(
            name=name, state=SimpleNamespace(terminated=terminated, running=running)
        )

    return SimpleNamespace(
        metadata=SimpleNamespace(name="model-rollout-abc"),
        status=SimpleNamespace(container_statuses=[status(n, c) for n, c in containers]),
    )


@pytest.mark.parametrize(
    ("remote", "code"),
    [
        (pod(("base", 1)), 1),
        (pod(("base", 0)), 0),
        (pod(("istio-proxy", 0), ("base", 3)), 3),
        (pod(("base", None)), None),  # running
        (pod(("sidecar", 1)), None),  # not the rollout container
        (pod(), None),  # no status yet (never scheduled)
        (SimpleNamespace(status=None), None),
        (SimpleNamespace(status=SimpleNamespace(container_statuses=None)), None),
        (None, None),  # the pod was never created
    ],
)
def test_exit_code_of_the_rollout_container(remote, code):
    assert exit_code(remote, "base") == code


def test_the_final_codes_are_the_cli_s_verdict_and_refusal():
    from serving.deploy.__main__ import EXIT_FAULT, EXIT_REFUSED, EXIT_VERDICT

    assert ROLLOUT_FINAL_EXIT_CODES == {EXIT_VERDICT: "verdict", EXIT_REFUSED: "refused"}
    assert EXIT_FAULT not in ROLLOUT_FINAL_EXIT_CODES


@pytest.fixture
def operator():
    return RolloutPodOperator(
        task_id="rollout_kubernetes", name="model-rollout", image="pipeline:1", retries=2
    )


@pytest.fixture
def pod_failed(monkeypatch):
    """KubernetesPodOperator.cleanup as it ends a failed pod: it raises. Returns what it
    raised, to compare with what comes out of the rollout operator."""
    raised = AirflowException("Pod model-rollout-abc returned a failure.")

    def cleanup(self, pod, remote_pod, *args, **kwargs):
        raise raised

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", cleanup)
    return raised


@pytest.mark.parametrize(("code", "kind"), [(1, "verdict"), (2, "refused")])
def test_a_verdict_or_a_refusal_fails_the_task_without_retries(operator, pod_failed, code, kind):
    with pytest.raises(AirflowFailException) as failed:
        operator.cleanup(pod(("base", code)), pod(("base", code)))
    assert f"exited {code} ({kind})" in str(failed.value)
    assert "not retried" in str(failed.value)
    assert failed.value.__cause__ is pod_failed  # the operator's own message stays attached


@pytest.mark.parametrize(
    "remote",
    [
        pod(("base", 3)),  # a fault: nothing marked
        pod(("base", 137)),  # OOM-killed
        pod(("base", None)),  # evicted while running (no exit code)
        pod(),  # never started
        None,
    ],
    ids=["fault", "oom-killed", "evicted", "never-started", "no-pod"],
)
def test_a_fault_or_a_pod_that_died_stays_an_ordinary_failure(operator, pod_failed, remote):
    with pytest.raises(AirflowException) as failed:
        operator.cleanup(pod(("base", 3)), remote)
    assert failed.value is pod_failed  # re-raised as it was: Airflow retries it
    assert not isinstance(failed.value, AirflowFailException)


def test_a_success_passes_through(operator, monkeypatch):
    calls = []
    monkeypatch.setattr(
        KubernetesPodOperator, "cleanup", lambda self, *a, **k: calls.append((a, k))
    )
    remote = pod(("base", 0))
    assert operator.cleanup(remote, remote, context={"ti": None}) is None
    assert calls == [((remote, remote), {"context": {"ti": None}})]


def test_a_fail_exception_from_the_operator_itself_is_kept(operator, monkeypatch):
    own = AirflowFailException("already final")

    def cleanup(self, *args, **kwargs):
        raise own

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", cleanup)
    with pytest.raises(AirflowFailException) as failed:
        operator.cleanup(pod(("base", 3)), pod(("base", 3)))
    assert failed.value is own


def test_the_container_is_the_operator_s_base_container(monkeypatch, pod_failed):
    """The code is read from the container the operator runs the rollout in."""
    renamed = RolloutPodOperator(
        task_id="rollout_kubernetes", name="model-rollout", image="pipeline:1",
        base_container_name="rollout",
    )  # fmt: skip
    with pytest.raises(AirflowFailException):
        renamed.cleanup(None, pod(("base", 0), ("rollout", 1)))
