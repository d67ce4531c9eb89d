"""``python -m serving.deploy rollout``: the one way a version goes live, by hand or in the
rollout pod. What it asks the rollout path for, and its exit codes (0 ok, 1 a verdict,
2 refused, 3 a fault), with the rollout path itself stubbed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from serving.deploy import target
from serving.deploy.__main__ import main
from serving.deploy.rollout import Request

OUTCOME = {"status": "rolled_out", "version": "3", "steps": []}


@pytest.fixture
def rollout(monkeypatch):
    """``run_request`` stubbed: records (request, target); ``rollout.raises`` makes it raise."""
    import serving.deploy.rollout as module

    stub = SimpleNamespace(calls=[], raises=None)

    def run_request(request, deploy, registry, *, tracking_uri):
        stub.calls.append((request, deploy.target))
        if stub.raises is not None:
            raise stub.raises
        return OUTCOME

    monkeypatch.setattr(module, "run_request", run_request)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    return stub


def test_version_is_the_manual_deploy_and_rollback(rollout, capsys):
    assert main(["rollout", "--version", "3", "--target", "local"]) == 0
    ((request, where),) = rollout.calls
    assert (request.kind, request.version, where) == ("version", "3", "local")
    assert request.reason == "by hand: version 3"
    assert json.loads(capsys.readouterr().out) == OUTCOME


def test_version_with_a_reason(rollout):
    main(["rollout", "--version", "4", "--reason", "v5 answers wrongly", "--target", "local"])
    assert rollout.calls[0][0] == Request("version", "4", reason="v5 answers wrongly")


@pytest.mark.parametrize("strategy", ["direct", "canary"])
def test_strategy_overrides_the_request_s_and_the_setting(rollout, strategy):
    sent = Request("champion", reason="promotion", strategy="shadow")
    main(["rollout", "--request", sent.to_json(), "--strategy", strategy, "--target", "local"])
    assert rollout.calls[0][0] == Request("champion", reason="promotion", strategy=strategy)


def test_sigterm_ends_a_rollout_as_a_fault_on_its_way_out(rollout, monkeypatch):
    """A deleted rollout pod: the rollout path unwinds (a canary's traffic goes back) and the
    exit code says fault (retried), never a verdict."""
    import os
    import signal

    import serving.deploy.rollout as module

    unwound = []

    def killed(request, deploy, registry, *, tracking_uri):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            unwound.append(True)

    monkeypatch.setattr(module, "run_request", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["rollout", "--version", "3", "--target", "local"]) == 3
    assert unwound == [True] and signal.getsignal(signal.SIGTERM) == before


def test_request_is_the_rollout_pod_s_way_in(rollout, tmp_path):
    sent = Request("candidate", "7", champion_at_eval="6", run_id="r", reason="nightly")
    out = tmp_path / "result" / "outcome.json"
    code = main(
        ["rollout", "--request", sent.to_json(), "--target", "kubernetes", "--output", str(out)]
    )
    assert code == 0
    assert rollout.calls == [(sent, "kubernetes")]
    assert json.loads(out.read_text()) == OUTCOME


def test_no_request_deploys_what_champion_names(rollout):
    assert main(["rollout", "--target", "local"]) == 0
    assert rollout.calls[0][0] == Request("champion")


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (target.VerificationFailed("row 0: 1.0 != 2.0"), 1),
        (target.NotReady("never ready", restored="2"), 1),
        (target.RequestRejected("no version 9"), 2),
        (target.TargetRejected("Kubernetes 1.29"), 2),
        (target.DeployFailed("pods unschedulable"), 3),
        (target.EndpointUnreachable("refused"), 3),
        (target.RolloutError("registry down"), 3),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_exit_codes_tell_a_verdict_a_refusal_and_a_fault_apart(rollout, capsys, raised, code):
    rollout.raises = raised
    assert main(["rollout", "--version", "3", "--target", "local"]) == code
    assert capsys.readouterr().out == ""  # no result on stdout


@pytest.mark.parametrize(
    "request_json",
    ['{"kind": "nightly"}', '{"kind": "version"}', "{not json", '{"kind": "champion", "x": 1}'],
)
def test_a_bad_request_is_refused_before_anything_runs(rollout, request_json):
    assert main(["rollout", "--request", request_json, "--target", "local"]) == 2
    assert rollout.calls == []


@pytest.mark.parametrize(
    "argv",
    [
        ["rollout", "--version", "3", "--request", '{"kind": "champion"}'],  # one or the other
        ["rollout", "--version", "three"],
        # The bypasses are gone: no pinned URI applied outside the rollout path.
        ["rollout", "--model-uri", "models:/regression-model/3", "--version", "3"],
        ["deploy-local", "--model-uri", "models:/regression-model/3", "--version", "3"],
    ],
)
def test_usage_errors_exit_2(rollout, argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert rollout.calls == []


@pytest.mark.parametrize(
    "crash",
    [RuntimeError("MLflow answered 503 while tagging"), KeyError("status"), OSError("disk full")],
    ids=["runtime", "key", "os"],
)
def test_an_error_nobody_foresaw_is_a_fault_not_a_verdict(rollout, crash, caplog):
    """An exception the rollout path does not name says nothing about the version: exit 3
    (retried), never Python's own 1, which the rollout pod's operator reads as a verdict."""
    rollout.raises = crash
    assert main(["rollout", "--version", "3", "--target", "local"]) == 3
    assert "FAULT" in caplog.text and "Traceback" in caplog.text


def test_a_permission_the_service_account_lacks_is_a_refusal(monkeypatch):
    """The API server's 401/403 will not change on a retry: TargetRejected, naming the call."""
    from kubernetes.client.exceptions import ApiException

    from serving.deploy.kube_api import KubeApi

    api = KubeApi.__new__(KubeApi)
    api.retry_s = 0.1

    def forbidden():
        raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(target.TargetRejected, match=r"GET deployment.*403"):
        api.call("GET deployment", forbidden)
