"""The Kubernetes target's pure rules, without a cluster: when a rollout is complete, what an
API error says, and what :meth:`KubernetesTarget.live` calls healthy.

The target against a real control plane (apply, watch, undo, outages) is tests/k8s.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace
from typing import Any

import pytest

from serving.deploy import manifests
from serving.deploy.kube_objects import rollout_state, transient, unknown_field
from serving.deploy.kubernetes import KubernetesTarget
from serving.deploy.settings import DeploySettings

SETTINGS = DeploySettings(target="kubernetes", namespace="ml-serving")
TRACKING = "http://mlflow.ml-platform.svc.cluster.local:5000"


def deployment(
    version: str = "7",
    *,
    replicas: int | None = 2,
    generation: int = 3,
    observed: int | None = 3,
    updated: int = 2,
    total: int = 2,
    available: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The serving Deployment pinned to ``version`` as the API serves it: spec (replicas set
    by the HPA), metadata.generation, and the controller's status."""
    dep = copy.deepcopy(
        manifests.deployment(
            SETTINGS, f"models:/regression-model/{version}", version, tracking_uri=TRACKING
        )
    )
    dep["metadata"].update(generation=generation, resourceVersion="100")
    if replicas is not None:
        dep["spec"]["replicas"] = replicas
    status: dict[str, Any] = {
        "replicas": total,
        "updatedReplicas": updated,
        "availableReplicas": available,
        "readyReplicas": available,
        "conditions": conditions or [],
    }
    if observed is not None:
        status["observedGeneration"] = observed
    dep["status"] = status
    return dep


DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": 'ReplicaSet "model-server-7d9" has timed out progressing.',
}
PROGRESSING = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}

STATES = [
    ("rolled out: every replica updated and available", deployment(), "complete"),
    (
        "the controller has not seen the new spec (observedGeneration lags)",
        deployment(generation=4, observed=3),
        "waiting",
    ),
    ("a fresh Deployment the controller never reported on", deployment(observed=None), "waiting"),
    (
        "new pods created, not available yet",
        deployment(updated=2, total=2, available=0, conditions=[PROGRESSING]),
        "waiting",
    ),
    ("fewer updated replicas than wanted", deployment(updated=1, total=2), "waiting"),
    (
        "old replicas left (surge: 2 new available, 1 old terminating its way out)",
        deployment(updated=2, total=3, available=3),
        "waiting",
    ),
    (
        "the progress deadline passed",
        deployment(updated=1, total=3, available=2, conditions=[DEADLINE]),
        "stuck",
    ),
    (
        "the deadline condition wins over counts that look done",
        deployment(conditions=[DEADLINE]),
        "stuck",
    ),
    (
        "an HPA scale-up in flight: more wanted than available",
        deployment(replicas=4, generation=5, observed=5, updated=4, total=4, available=2),
        "waiting",
    ),
    (
        "an HPA scale-up done: complete at the new replica count",
        deployment(replicas=4, generation=5, observed=5, updated=4, total=4, available=4),
        "complete",
    ),
    (
        "spec.replicas unset means 1",
        deployment(replicas=None, updated=1, total=1, available=1),
        "complete",
    ),
]


@pytest.mark.parametrize(
    ("dep", "state"), [case[1:] for case in STATES], ids=[case[0] for case in STATES]
)
def test_rollout_state(dep, state):
    found, why = rollout_state(dep)
    assert found == state, why
    assert why


def test_rollout_state_says_why_in_counts_and_names_the_deadline():
    assert rollout_state(deployment(updated=1, total=3, available=2))[1] == (
        "1 updated, 2 available, 3 in all, 2 wanted"
    )
    state, why = rollout_state(deployment(conditions=[DEADLINE]))
    assert state == "stuck" and "timed out progressing" in why


# -- API errors ---------------------------------------------------------------------------------


def api_error(status: int, message: str, reason: str = "BadRequest"):
    """An ApiException as the kubernetes client raises it: the body is the API server's Status
    object, as the bytes it sent (JSON: the quotes in a field path escaped)."""
    from kubernetes.client.exceptions import ApiException

    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": status,
    }
    response = SimpleNamespace(
        status=status, reason=reason, data=json.dumps(body).encode(), getheaders=lambda: {}
    )
    return ApiException(http_resp=response)


PRESTOP_SLEEP = '.spec.template.spec.containers[name="model-server"].lifecycle.preStop.sleep'


@pytest.mark.parametrize(
    ("message", "field"),
    [
        # Server-side apply on an API server whose schema lacks the field (structured merge).
        (
            "failed to create typed patch object (ml-serving/model-server; apps/v1, "
            f"Kind=Deployment): {PRESTOP_SLEEP}: field not declared in schema",
            PRESTOP_SLEEP,
        ),
        (".spec.template.spec.foo: field not declared in schema", ".spec.template.spec.foo"),
        # Strict field validation of a create/update.
        ('strict decoding error: unknown field "spec.template.spec.x"', "spec.template.spec.x"),
        ('unknown field "x"', "x"),
        # Not about a field.
        ('Operation cannot be fulfilled on deployments.apps "model-server": conflict', None),
        ("etcdserver: request timed out", None),
    ],
)
def test_unknown_field_is_read_from_the_api_s_message(message, field):
    assert unknown_field(api_error(400, message)) == field


def test_unknown_field_of_a_bodyless_or_foreign_error_is_none():
    from kubernetes.client.exceptions import ApiException

    assert unknown_field(ApiException(status=0, reason="SSLError")) is None
    assert unknown_field(ConnectionError("refused")) is None
    plain = ApiException(status=400, reason="x")
    plain.body = 'not json: unknown field "spec.y"'
    assert unknown_field(plain) == "spec.y"


def test_an_unknown_field_is_never_retried_as_an_outage():
    """A 5xx that names an unknown field (an aggregated API, a webhook) will not heal."""
    assert transient(api_error(503, "etcdserver: leader changed", "ServiceUnavailable"))
    assert not transient(
        api_error(500, f"{PRESTOP_SLEEP}: field not declared in schema", "InternalError")
    )
    assert not transient(api_error(409, "conflict", "Conflict"))


# -- what is live ---------------------------------------------------------------------------


class Api:
    """The one call ``live()`` makes: ``get()``, the Deployment (None: it does not exist)."""

    namespace, name = SETTINGS.namespace, SETTINGS.deployment_name

    def __init__(self, dep: dict[str, Any] | None) -> None:
        self.dep = dep

    def get(self) -> dict[str, Any] | None:
        return self.dep


def live(dep: dict[str, Any] | None):
    return KubernetesTarget(Api(dep), SETTINGS, tracking_uri=TRACKING).live()  # type: ignore[arg-type]


LIVE = [
    ("rolled out and available", deployment(), True),
    ("one pod of two available: serving, not an outage", deployment(available=1), True),
    (
        "an HPA scale-up: available below spec.replicas is still healthy",
        deployment(replicas=5, generation=4, observed=4, updated=5, total=5, available=2),
        True,
    ),
    ("nothing available", deployment(available=0), False),
    (
        "mid-rollout: old pods still run another template",
        deployment(updated=1, total=3, available=2),
        False,
    ),
    (
        "a rollout stuck at its deadline, all counts looking done",
        deployment(conditions=[DEADLINE]),
        False,
    ),
    (
        "a new spec the controller has not seen: its counts are the old template's pods'",
        deployment(generation=4, observed=3),
        False,
    ),
]


@pytest.mark.parametrize(("dep", "healthy"), [c[1:] for c in LIVE], ids=[c[0] for c in LIVE])
def test_live_is_healthy_when_every_pod_runs_the_pinned_template_and_one_is_available(dep, healthy):
    found = live(dep)
    assert found.version == "7"
    assert found.healthy is healthy, found.detail
    assert found.detail


def test_live_names_the_pinned_version():
    assert live(deployment("12")).version == "12"


def test_live_at_zero_replicas_is_withdrawn():
    found = live(deployment(replicas=0, updated=0, total=0, available=0))
    assert (found.version, found.healthy) == ("7", False)
    assert "withdrawn" in found.detail


def test_live_without_the_deployment_says_bootstrap_it():
    found = live(None)
    assert (found.version, found.healthy) == (None, False)
    assert "does not exist" in found.detail


# -- clusters users really have ------------------------------------------------------------------


class VersionedApi(Api):
    """A cluster that reports ``version`` on ``GET /version``; records applies."""

    def __init__(self, version: tuple[int, int]) -> None:
        super().__init__(deployment())
        self.version, self.applied = version, []

    def server_version(self) -> tuple[int, int]:
        return self.version

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(body)
        return body


@pytest.mark.parametrize("old", [(1, 24), (1, 29)])
def test_a_cluster_older_than_1_30_is_refused_before_anything_is_applied(old):
    from serving.deploy.target import TargetRejected

    api = VersionedApi(old)
    target = KubernetesTarget(api, SETTINGS, tracking_uri=TRACKING)  # type: ignore[arg-type]
    with pytest.raises(TargetRejected, match=rf"Kubernetes {old[0]}\.{old[1]}.*1\.30 or newer"):
        target.deploy("models:/regression-model/8", "8")
    assert api.applied == []


class WithdrawnApi(VersionedApi):
    """A Deployment withdrawn to 0 replicas, brought back by a deploy: the apply (generation 6,
    still 0 replicas), then the scale to 2 (generation 7). The controller's status for the
    apply (generation 6 observed, 0 wanted) comes before the scale's, as the watch sees it."""

    def __init__(self) -> None:
        super().__init__((1, 31))
        self.dep = deployment("3", replicas=0, generation=5, observed=5, updated=0, total=0,
                              available=0)  # fmt: skip
        self.retry_s = 1.0

    def get(self) -> dict[str, Any]:
        return copy.deepcopy(self.dep)

    def _next_state(self, rv: int, **changes: Any) -> dict[str, Any]:
        dep = copy.deepcopy(self.dep)
        spec, status = changes.pop("spec", {}), changes.pop("status", {})
        dep["spec"].update(spec)
        dep["status"].update(status)
        dep["metadata"].update(resourceVersion=str(rv), **changes)
        return dep

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(body)
        self.dep = self._next_state(101, generation=6, spec={**body["spec"], "replicas": 0})
        return self.get()

    def scale(self, replicas: int) -> None:
        self.events = [
            self._next_state(102, status={"observedGeneration": 6}),  # the apply, seen
            scaled := self._next_state(103, generation=7, spec={"replicas": replicas}),
        ]
        self.dep = scaled
        self.events.append(self._next_state(104, status={
            "observedGeneration": 7, "replicas": 2, "updatedReplicas": 2,
            "availableReplicas": 2, "readyReplicas": 2}))  # fmt: skip

    def watch(self, resource_version: str, timeout_s: float):
        for event in self.events:
            if int(event["metadata"]["resourceVersion"]) > int(resource_version):
                self.dep = event
                yield copy.deepcopy(event)

    def call(self, what: str, fn):
        return fn()

    def replica_sets(self, selector: str) -> list:
        return []


def test_a_withdrawn_deployment_is_rolled_out_only_once_its_scale_up_is(caplog):
    """CI, k8s tier: after a withdrawal, "v1 rolled out: 0 updated, 0 available, 0 in all,
    0 wanted": the rollout took the controller's status for the apply (0 replicas, generation
    seen) as the end, before the scale back to 2 was seen, and verification then found the
    Service without endpoints."""
    api = WithdrawnApi()
    target = KubernetesTarget(api, SETTINGS, tracking_uri=TRACKING)  # type: ignore[arg-type]
    with caplog.at_level("INFO", logger="serving.deploy.kubernetes"):
        outcome = target.deploy("models:/regression-model/1", "1")
    assert outcome["status"] == "rolled_out"
    rolled = [r.getMessage() for r in caplog.records if "rolled out:" in r.getMessage()]
    assert rolled == ["v1 rolled out: 2 updated, 2 available, 2 in all, 2 wanted"]
