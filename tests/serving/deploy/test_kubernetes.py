"""The Kubernetes rollout, through the real ``kubernetes`` client, against an API test double.

No cluster exists here: tests/serving/k8s_fake.py serves the Kubernetes REST API over real HTTP
on 127.0.0.1 and scripts what the Deployment controller and the pods do; a second small HTTP
server plays the model server behind the Service. The assertions are on what the double
received (which PATCHes, with which model URI, field manager and force flag) and on the
rollout's exit code and message.
"""

from __future__ import annotations

import json
import logging
import time

import pytest

from serving.deploy import manifests
from serving.deploy.kubernetes import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROLLED_BACK,
    KubeClient,
    Rollout,
    Smoke,
    served_version,
)
from serving.deploy.settings import DeploySettings
from tests.serving.deploy.k8s_fake import WRONG_VERSION, FakeCluster, FakeModelServer

NS = "ml-serving"
NAME = "model-server"
TRACKING = "http://mlflow.ml-platform.svc.cluster.local:5000"
V1 = "models:/regression-model/1"
V2 = "models:/regression-model/2"
EXAMPLE = json.dumps({"dataframe_split": {"columns": ["x1", "x2"], "data": [[1.0, 2.0], [3, 4]]}})


@pytest.fixture
def settings() -> DeploySettings:
    return DeploySettings(
        target="kubernetes",
        namespace=NS,
        deployment_name=NAME,
        serving_image="registry.example.com/train-and-deploy/serving:1.0",
    )


@pytest.fixture
def cluster():
    fake = FakeCluster(namespace=NS).start()
    yield fake
    fake.stop()


@pytest.fixture
def model_server(cluster):
    server = FakeModelServer(cluster)
    yield server
    server.stop()


@pytest.fixture
def seeded(cluster, settings) -> dict:
    """The Deployment serving version 1, rollout complete (revision 1)."""
    return cluster.seed(manifests.deployment(settings, V1, "1", tracking_uri=TRACKING))


def rollout(cluster, model_server, settings, model_uri=V2, **overrides) -> Rollout:
    options = {
        "model_uri": model_uri,
        "version": model_uri.rsplit("/", 1)[-1],
        "tracking_uri": TRACKING,
        "service_url": model_server.url,
        "input_example": lambda uri: EXAMPLE,
        "smoke": Smoke(passes=3, interval_s=0.02, request_timeout_s=5),
        "timeout_s": 1.5,
        "smoke_timeout_s": 1.0,
        "poll_s": 0.02,
        "backoff_s": 0.01,
    }
    options.update(overrides)
    kube = KubeClient(cluster.api_client(), NS, NAME, retry_delay_s=0.01)
    return Rollout(kube, settings, **options)


def env_value(template: dict, name: str) -> str:
    (env,) = [e for e in template["spec"]["containers"][0]["env"] if e["name"] == name]
    return env["value"]


# -- success and no-op ------------------------------------------------------------------------


def test_success(cluster, model_server, settings, seeded, caplog):
    caplog.set_level(logging.INFO, logger="serving.rollout")
    result = rollout(cluster, model_server, settings).run()

    assert result.exit_code == EXIT_OK, result.message
    assert result.status == "rolled_out"
    assert (result.previous_model_uri, result.previous_version) == (V1, "1")
    (patch,) = cluster.patches
    assert patch.status == 200
    assert patch.content_type == "application/apply-patch+yaml"
    assert patch.field_manager == "train-and-deploy"
    assert patch.forced
    # the optimistic lock: applied onto the very object the previous revision was read from
    assert patch.body["metadata"]["resourceVersion"] == seeded["metadata"]["resourceVersion"]
    assert patch.model_uri == V2
    assert "replicas" not in patch.body["spec"], "the HPA owns spec.replicas"
    assert cluster.live_model_uri(NAME) == V2
    assert set(cluster.ready_versions()) == {"2"}
    assert model_server.invocations, "the smoke test sent the input example"
    assert model_server.invocations[0] == json.loads(EXAMPLE)
    assert "serves version 2" in result.smoke
    log = caplog.text
    for step in ("step read: ok", "step apply: ok", "step wait: ok", "step smoke: ok"):
        assert step in log
    assert "rollout complete" in log


def test_rerun_of_the_live_version_is_a_noop(cluster, model_server, settings):
    cluster.seed(manifests.deployment(settings, V2, "2", tracking_uri=TRACKING))
    result = rollout(cluster, model_server, settings).run()

    assert result.exit_code == EXIT_OK, result.message
    assert result.status == "unchanged"
    assert cluster.patches == []
    assert not [r for r in cluster.requests if r[0] != "GET"], "read-only"
    assert model_server.invocations, "a no-op still checks that the live version answers"


def test_version_from_v1_model_when_no_header(cluster, settings, seeded):
    server = FakeModelServer(cluster, version_header=False)
    try:
        result = rollout(cluster, server, settings).run()
    finally:
        server.stop()
    assert result.exit_code == EXIT_OK, result.message


# -- failures that roll back ------------------------------------------------------------------


def assert_rolled_back(cluster, seeded, result) -> None:
    assert result.exit_code == EXIT_ROLLED_BACK, result.message
    assert result.status == "rolled_back"
    applied = cluster.applied()
    assert [p.model_uri for p in applied] == [V2, V1]
    rollback = applied[1]
    assert rollback.field_manager == "train-and-deploy" and rollback.forced
    # `rollout undo`: the exact pod template that ran before, not a re-render
    assert rollback.body["spec"]["template"] == seeded["spec"]["template"]
    assert rollback.body["metadata"]["annotations"][manifests.MODEL_URI_ANNOTATION] == V1
    assert rollback.body["metadata"]["labels"][manifests.VERSION_LABEL] == "1"
    assert cluster.live_model_uri(NAME) == V1
    assert set(cluster.ready_versions()) == {"1"}
    assert f"rolled back to {V1}" in result.message
    assert result.previous_version == "1"


def test_pods_never_ready_hits_the_deadline_and_rolls_back(cluster, model_server, settings, seeded):
    cluster.behaviour[V2] = "never_ready"
    started = time.monotonic()
    result = rollout(cluster, model_server, settings, timeout_s=1.0).run()

    assert_rolled_back(cluster, seeded, result)
    assert "not complete within 1s" in result.message
    assert "1/2 updated" in result.message and "not ready" in result.message
    assert time.monotonic() - started < 15


def test_progress_deadline_exceeded_fails_fast(cluster, model_server, settings, seeded):
    cluster.behaviour[V2] = "progress_deadline"
    started = time.monotonic()
    result = rollout(cluster, model_server, settings, timeout_s=60).run()

    assert_rolled_back(cluster, seeded, result)
    assert "ProgressDeadlineExceeded" in result.message
    assert "has timed out progressing" in result.message
    assert time.monotonic() - started < 15, "did not wait for its own 60 s deadline"


@pytest.mark.parametrize(
    ("behaviour", "reason"), [("image_pull", "ErrImagePull"), ("crash", "CrashLoopBackOff")]
)
def test_pods_that_cannot_start_fail_fast(
    cluster, model_server, settings, seeded, behaviour, reason
):
    cluster.behaviour[V2] = behaviour
    started = time.monotonic()
    result = rollout(cluster, model_server, settings, timeout_s=60).run()

    assert_rolled_back(cluster, seeded, result)
    assert "new pods cannot start" in result.message
    assert reason in result.message
    assert f"{NAME}-" in result.message, "names the pod"
    assert time.monotonic() - started < 15


def test_wrong_version_served_rolls_back(cluster, model_server, settings, seeded):
    cluster.behaviour[V2] = "wrong_version"
    result = rollout(cluster, model_server, settings, smoke_timeout_s=0.5).run()

    assert_rolled_back(cluster, seeded, result)
    assert f"serves model version {WRONG_VERSION}, expected 2" in result.message
    assert "serves version 1" in result.smoke, "the rollback was smoke-tested too"


def test_rollback_that_fails_too_exits_3(cluster, model_server, settings, seeded):
    cluster.behaviour[V2] = "image_pull"
    cluster.behaviour[V1] = "never_ready"  # e.g. the old image was garbage-collected
    result = rollout(cluster, model_server, settings, timeout_s=0.5).run()

    assert result.exit_code == EXIT_FAILED
    assert result.status == "failed"
    assert "ErrImagePull" in result.message and "AND the rollback" in result.message
    assert [p.model_uri for p in cluster.applied()] == [V2, V1]


# -- conflicts, resumption, preconditions -----------------------------------------------------


def test_reads_retry_an_unavailable_api_server_then_give_up(cluster, seeded, caplog):
    from kubernetes.client.exceptions import ApiException

    caplog.set_level(logging.WARNING, logger="serving.rollout")
    kube = KubeClient(cluster.api_client(), NS, NAME, retry_delay_s=0.01)
    cluster.unavailable_to_inject = 2
    assert kube.get_deployment()["metadata"]["name"] == NAME
    assert "503 Service Unavailable; retrying (1/3)" in caplog.text
    assert "retrying (2/3)" in caplog.text
    cluster.unavailable_to_inject = 3
    with pytest.raises(ApiException) as failed:
        kube.get_deployment()
    assert failed.value.status == 503


def test_conflict_once_is_retried(cluster, model_server, settings, seeded, caplog):
    caplog.set_level(logging.INFO, logger="serving.rollout")
    cluster.conflicts_to_inject = 1
    result = rollout(cluster, model_server, settings).run()

    assert result.exit_code == EXIT_OK, result.message
    assert [p.status for p in cluster.patches] == [409, 200]
    assert "apply conflict (409, attempt 1/5)" in caplog.text
    assert cluster.live_model_uri(NAME) == V2


def test_concurrent_change_is_detected_and_previous_is_re_read(
    cluster, model_server, settings, seeded
):
    """Someone applies between our read and our apply: 409, then we roll back to *theirs*."""
    v3 = "models:/regression-model/3"
    kube = KubeClient(cluster.api_client(), NS, NAME)
    original_apply = kube.apply_deployment
    calls = []

    def racing_apply(body):
        if not calls:
            cluster.apply_directly(
                NAME, manifests.deployment(settings, v3, "3", tracking_uri=TRACKING)
            )
        calls.append(body)
        return original_apply(body)

    kube.apply_deployment = racing_apply
    cluster.behaviour[V2] = "image_pull"
    r = rollout(cluster, model_server, settings)
    r.kube = kube
    result = r.run()

    assert [p.status for p in cluster.patches] == [409, 200, 200]
    assert result.exit_code == EXIT_ROLLED_BACK, result.message
    assert result.previous_model_uri == v3
    assert cluster.live_model_uri(NAME) == v3


def test_resumes_an_interrupted_rollout_without_patching(cluster, model_server, settings, seeded):
    """A retried rollout pod finds its version applied but not finished: it waits, no PATCH."""
    cluster.apply_directly(NAME, manifests.deployment(settings, V2, "2", tracking_uri=TRACKING))
    result = rollout(cluster, model_server, settings).run()

    assert result.exit_code == EXIT_OK, result.message
    assert cluster.patches == []
    assert cluster.live_model_uri(NAME) == V2


def test_interrupted_rollout_that_fails_rolls_back_to_the_previous_replicaset(
    cluster, model_server, settings, seeded
):
    cluster.apply_directly(NAME, manifests.deployment(settings, V2, "2", tracking_uri=TRACKING))
    cluster.behaviour[V2] = "image_pull"
    result = rollout(cluster, model_server, settings).run()

    assert result.exit_code == EXIT_ROLLED_BACK, result.message
    (patch,) = cluster.applied()
    assert patch.model_uri == V1
    assert "pod-template-hash" not in patch.body["spec"]["template"]["metadata"]["labels"]
    assert cluster.live_model_uri(NAME) == V1


def test_missing_deployment_is_not_created(cluster, model_server, settings):
    result = rollout(cluster, model_server, settings).run()

    assert result.exit_code == EXIT_FAILED
    assert "does not exist" in result.message and "nothing was changed" in result.message
    assert cluster.patches == []


def test_unpinned_uri_is_refused(cluster, model_server, settings):
    with pytest.raises(ValueError, match="pinned"):
        rollout(cluster, model_server, settings, model_uri="models:/regression-model@champion")
    assert cluster.requests == []


def test_served_version_helper(cluster, model_server, seeded):
    assert served_version(model_server.url) == "1"


# -- the CLI, with KUBECONFIG -----------------------------------------------------------------


@pytest.fixture
def cli_env(cluster, model_server, tmp_path, monkeypatch, seeded):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(str(tmp_path / "kubeconfig")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    monkeypatch.setenv(
        "PIPELINE_DEPLOY_SERVING_IMAGE", "registry.example.com/train-and-deploy/serving:1.0"
    )
    example = tmp_path / "example.json"
    example.write_text(EXAMPLE)
    return [
        "rollout",
        *("--namespace", NS, "--deployment", NAME),
        *("--service-url", model_server.url, "--input-example", str(example)),
        *("--timeout", "5", "--smoke-timeout", "1", "--poll-interval", "0.02"),
    ]


def test_cli_success(cli_env, cluster, capsys):
    from serving.deploy.__main__ import main

    code = main([*cli_env, "--model-uri", V2, "--version", "2"])
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK, out
    assert out["status"] == "rolled_out" and out["version"] == "2"
    assert cluster.live_model_uri(NAME) == V2
    (patch,) = cluster.patches
    assert env_value(patch.body["spec"]["template"], "MLFLOW_TRACKING_URI") == TRACKING


def test_cli_image_pull_error_exits_1_and_says_why(cli_env, cluster, capsys, caplog):
    from serving.deploy.__main__ import main

    caplog.set_level(logging.INFO, logger="serving.rollout")
    cluster.behaviour[V2] = "image_pull"
    code = main([*cli_env, "--model-uri", V2, "--version", "2"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == EXIT_ROLLED_BACK
    assert out["status"] == "rolled_back"
    assert "ErrImagePull" in out["message"]
    assert "ErrImagePull" in caplog.text, "the reason is in the log too"
    assert cluster.live_model_uri(NAME) == V1


@pytest.mark.parametrize(
    ("uri", "version"),
    [("models:/regression-model@champion", "2"), ("models:/regression-model/2", "3")],
)
def test_cli_refuses_aliases_before_any_request(cli_env, cluster, uri, version):
    from serving.deploy.__main__ import main

    requests_before = len(cluster.requests)
    assert main([*cli_env, "--model-uri", uri, "--version", version]) == 2
    assert len(cluster.requests) == requests_before
