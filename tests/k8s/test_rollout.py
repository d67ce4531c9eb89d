"""The rollout path on the Kubernetes target, against a real control plane.

Each test starts from a namespace bootstrapped the documented way at v1 (conftest.py) and
runs :func:`serving.deploy.rollout.run` as the rollout pod would: with the rollout
ServiceAccount's own token, so RBAC decides every call. Verification goes through the
Service (tests/k8s/runtime.py: its ready endpoints, real model servers).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serving.deploy.rollout import FAILED_TAG, Request, run
from serving.deploy.target import NotReady, RolloutError, Verdict, VerificationFailed
from serving.server.contract import MODEL_URI_ENV
from tests.k8s.conftest import MODEL, wait


def _champion(registry) -> str:
    return str(registry.get_model_version_by_alias(MODEL, "champion").version)


class AvailabilityWatch:
    """Every status the Deployment goes through, from a real watch, while a test runs."""

    def __init__(self, serving) -> None:
        from kubernetes import client, watch

        self.apps = client.AppsV1Api(serving.plane.api_client())
        self.serving = serving
        self.seen: list[tuple[int, int]] = []  # (available, desired)
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from urllib3.exceptions import ProtocolError

        settings = self.serving.settings
        try:
            for event in self._watch.stream(
                self.apps.list_namespaced_deployment,
                settings.namespace,
                field_selector=f"metadata.name={settings.deployment_name}",
                timeout_seconds=120,
            ):
                dep = event["object"]
                self.seen.append((dep.status.available_replicas or 0, dep.spec.replicas))
        except ProtocolError:  # stop() closed the stream
            pass

    def stop(self) -> list[tuple[int, int]]:
        self._watch.stop()
        self._thread.join(5)
        return self.seen


def test_a_version_rolls_out_with_never_fewer_available_pods_than_wanted(
    serving, registry, registry_settings
):
    first = serving.target().live()
    assert (first.version, first.healthy) == ("1", True), first.detail
    watch = AvailabilityWatch(serving)
    started = time.monotonic()
    outcome = run(
        Request("version", "2", reason="test"),
        serving.target(),
        registry_settings,
        tracking_uri=serving.tracking_uri,
    )
    took = time.monotonic() - started
    seen = watch.stop()
    assert outcome.status == "rolled_out" and outcome.version == "2", outcome
    assert _champion(registry) == "2"
    dep = serving.deployment()
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[MODEL_URI_ENV] == f"models:/{MODEL}/2"
    # maxUnavailable 0: from the first status the watch saw to the last, never fewer
    # available pods than the Deployment wants.
    assert seen and all(available >= desired for available, desired in seen), seen
    assert serving.proxy.ready_model_uris() == [f"models:/{MODEL}/2"] * 2
    print(f"\nBENCH k8s time to available (v1 -> v2, 2 replicas): {took:.1f} s")

    # Again: already live and answering right; nothing applied (the generation is unchanged).
    generation = dep["metadata"]["generation"]
    again = run(Request("champion"), serving.target(), registry_settings,
                tracking_uri=serving.tracking_uri)  # fmt: skip
    assert again.status == "unchanged"
    assert serving.deployment()["metadata"]["generation"] == generation


def test_pods_that_never_become_ready_are_undone_and_the_version_tagged(
    serving, registry, registry_settings
):
    registry.set_registered_model_alias(MODEL, "champion", "2")  # a person promotes v2
    target = serving.target(serving_image="train-and-deploy/serving:never-ready")
    started = time.monotonic()
    with pytest.raises(NotReady) as raised:
        run(
            Request("champion", reason="promotion", retry_failed=True, run_id="run-2"),
            target,
            registry_settings,
            tracking_uri=serving.tracking_uri,
        )
    took = time.monotonic() - started
    assert took <= serving.settings.progress_deadline_s + 15 + 10, took  # + the first rollout
    assert raised.value.restored == "1"
    assert "ProgressDeadlineExceeded" in str(raised.value) or "deadline" in str(raised.value)
    dep = serving.deployment()
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[MODEL_URI_ENV] == f"models:/{MODEL}/1"
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == serving.settings.serving_image
    assert serving.proxy.ready_model_uris() == [f"models:/{MODEL}/1"] * 2
    assert _champion(registry) == "1"  # the promotion is undone with the version
    tags = registry.get_model_version(MODEL, "2").tags
    assert "never became available" in tags[FAILED_TAG] and tags["rollout.failed_by"] == "run-2"
    print(f"\nBENCH k8s time to undo a never-ready version: {took:.1f} s")

    # The retry of the same run does not apply it again.
    generation = serving.deployment()["metadata"]["generation"]
    with pytest.raises(VerificationFailed, match="this run already failed"):
        run(
            Request("champion", retry_failed=True, run_id="run-2", champion_at_request="2"),
            target,
            registry_settings,
            tracking_uri=serving.tracking_uri,
        )
    assert serving.deployment()["metadata"]["generation"] == generation


def test_a_verification_mismatch_is_rolled_back_in_the_same_run(
    serving, registry, registry_settings
):
    with pytest.raises(VerificationFailed, match="differ from version 3"):
        run(
            Request("version", "3", reason="test", run_id="run-3"),
            serving.target(),
            registry_settings,
            tracking_uri=serving.tracking_uri,
        )
    dep = serving.deployment()
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[MODEL_URI_ENV] == f"models:/{MODEL}/1"
    assert serving.proxy.ready_model_uris() == [f"models:/{MODEL}/1"] * 2
    assert _champion(registry) == "1"
    assert "first mismatch at row" in registry.get_model_version(MODEL, "3").tags[FAILED_TAG]
    print(json.dumps(dep["status"]))


def test_a_failing_first_version_is_taken_out_of_service(bootstrap, registry, registry_settings):
    from mlflow.exceptions import MlflowException

    serving = bootstrap("3")  # an administrator installed v3; nothing served before it
    registry.delete_registered_model_alias(MODEL, "champion")
    with pytest.raises(VerificationFailed):
        run(
            Request("candidate", "3", champion_at_eval=None, reason="first run", run_id="r"),
            serving.target(),
            registry_settings,
            tracking_uri=serving.tracking_uri,
        )
    assert serving.deployment()["spec"]["replicas"] == 0
    wait(lambda: serving.proxy.ready_model_uris() == [], 30, "out of service")
    with pytest.raises(httpx.HTTPError):  # the Service has no endpoint: refused
        httpx.get(f"{serving.proxy.url}/ping", timeout=5)
    with pytest.raises(MlflowException):
        registry.get_model_version_by_alias(MODEL, "champion")
    assert FAILED_TAG in registry.get_model_version(MODEL, "3").tags
    live = serving.target().live()
    assert (live.version, live.healthy) == ("3", False) and "withdrawn" in live.detail

    # A person then deploys a good version by hand: it scales back up and serves.
    outcome = run(Request("version", "1", reason="by hand"), serving.target(), registry_settings,
                  tracking_uri=serving.tracking_uri)  # fmt: skip
    assert outcome.status == "rolled_out"
    assert serving.deployment()["spec"]["replicas"] == serving.settings.min_replicas
    assert _champion(registry) == "1"


def test_an_api_server_outage_is_a_fault_retried_to_completion(
    serving, registry, registry_settings
):
    errors: list[BaseException] = []
    # The production deadline (150 s) outlasts a 20 s outage and the controllers catching up;
    # the tier's 10 s would not: the rollout would be past its deadline when the API returns.
    target = serving.target(progress_deadline_s=120)

    def rollout() -> None:
        try:
            run(Request("version", "2", reason="test", run_id="outage"), target,
                registry_settings, tracking_uri=serving.tracking_uri)  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    attempt = threading.Thread(target=rollout)
    attempt.start()
    wait(lambda: f"models:/{MODEL}/2" in json.dumps(serving.deployment()["spec"]), 30, "applied")
    serving.plane.stop_apiserver()
    attempt.join(60)
    assert len(errors) == 1 and isinstance(errors[0], RolloutError), errors
    assert not isinstance(errors[0], Verdict)
    time.sleep(20)
    serving.plane.start_apiserver()
    back = time.monotonic()
    outcome = run(Request("version", "2", reason="test", run_id="outage"), target,
                  registry_settings, tracking_uri=serving.tracking_uri)  # fmt: skip
    took = time.monotonic() - back
    assert outcome.version == "2" and outcome.status in ("rolled_out", "unchanged"), outcome
    assert _champion(registry) == "2"
    assert FAILED_TAG not in registry.get_model_version(MODEL, "2").tags
    print(f"\nBENCH k8s time to complete after the API server returns: {took:.1f} s")


def test_a_field_the_server_does_not_know_is_a_final_error_naming_it(serving):
    """What an older cluster answers for a newer field (lifecycle.preStop.sleep before 1.30):
    a refusal naming the field, not a fault retried until the task gives up."""
    from serving.deploy.target import TargetRejected

    target = serving.target()
    body = target._render(f"models:/{MODEL}/1", "1")
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["lifecycle"]["preStop"]["snooze"] = {"seconds": 5}  # no Kubernetes has it
    generation = serving.deployment()["metadata"]["generation"]
    with pytest.raises(TargetRejected, match="snooze"):
        target._apply(body)
    assert serving.deployment()["metadata"]["generation"] == generation
