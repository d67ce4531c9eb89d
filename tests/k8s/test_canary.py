"""Canaries on the Kubernetes target, against the real control plane (fast: tiny bake times).

The rollout runs with the rollout ServiceAccount's own token (RBAC decides: the canary
Deployment is in the Role's resourceNames), the candidate is verified through its own
Service (tests/k8s/runtime.py), and a stand-in judge records what each step looked like in
the API (Prometheus and its judge are tested in tests/serving/deploy and tests/integration).
Then the Gateway API's HTTPRoute: its CRDs from the Go module pinned in
tests/k8s/controlplane/go.mod, read from the module cache, never copied into the repository.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

import serving.deploy.progressive as progressive
from serving.deploy.judge import Judgement
from serving.deploy.rollout import FAILED_TAG, Request, run
from serving.deploy.target import Verdict
from serving.server.contract import MODEL_URI_ENV
from tests.k8s.conftest import MODEL, wait


def _model(dep: dict) -> str:
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env}[MODEL_URI_ENV]


@pytest.fixture
def canary(serving, model_servers, monkeypatch):
    """The namespace's canary Service reachable, a judge that records each step's canary
    pods (and fails the steps in ``canary.failing``), and the target with the canary's URL."""
    from kubernetes import client

    from tests.k8s.runtime import ServiceProxy

    apps = client.AppsV1Api(serving.plane.api_client())
    ns = serving.settings.namespace
    proxy = ServiceProxy(serving.plane.api_client(), ns, "model-server-canary", model_servers)
    seen: list[tuple[str, int, list[str]]] = []

    class Judge:
        failing: set[str] = set()

        def __init__(self, settings, namespace=None):
            assert namespace == ns  # a cluster's series carry their namespace

        def judge(self, step, *, shadow):
            dep = apps.read_namespaced_deployment("model-server-canary", ns)
            seen.append((step, dep.spec.replicas, proxy.ready_model_uris()))
            failed = ["errors"] if step in Judge.failing else []
            return Judgement(step, 600, {"errors": 0.5 if failed else 0.0}, failed, {})

    monkeypatch.setattr(progressive, "Judge", Judge)
    monkeypatch.setattr(progressive.judging, "WINDOW_S", 0)
    target = serving.target(
        canary_url=proxy.url, rollout_strategy="canary", canary_steps=[25, 50],
        canary_bake_s=0.1, prometheus_url="http://prometheus.invalid",
    )  # fmt: skip
    yield target, Judge, seen, apps
    proxy.close()


def test_a_canary_earns_its_pods_and_a_failed_one_goes_in_seconds(
    serving, canary, registry, registry_settings
):
    target, judge, seen, apps = canary
    ns = serving.settings.namespace
    outcome = run(Request("version", "2", reason="test"), target, registry_settings,
                  tracking_uri=serving.tracking_uri, settings=target.settings)  # fmt: skip
    assert outcome.status == "rolled_out", outcome
    v2 = f"models:/{MODEL}/2"
    # No Gateway: no shadow step; 25% of 2 pods is 1 canary pod, 50% is 2; each judged with
    # its pods ready behind the canary Service.
    assert seen == [("canary 25%", 1, [v2]), ("canary 50%", 2, [v2, v2])]
    assert _model(serving.deployment()) == v2
    # The canary's pods leave the serving Service as they terminate.
    wait(lambda: serving.proxy.ready_model_uris() == [v2, v2], 5, "only the two v2 pods")
    assert apps.read_namespaced_deployment("model-server-canary", ns).spec.replicas == 0
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "2"
    tags = registry.get_model_version(MODEL, "2").tags
    assert tags["rollout.step.2"].startswith("canary 50%: passed")

    judge.failing = {"canary 25%"}
    seen.clear()
    with pytest.raises(Verdict, match=r"canary step 1 \(canary 25%\) failed on errors"):
        run(Request("version", "1", reason="test"), target, registry_settings,
            tracking_uri=serving.tracking_uri, settings=target.settings)  # fmt: skip
    failed = time.monotonic()
    v1 = f"models:/{MODEL}/1"
    assert seen == [("canary 25%", 1, [v1])]
    # Every request back on v2: the canary's pods leave the Service at once.
    wait(lambda: serving.proxy.ready_model_uris() == [v2, v2], 5, "only v2 behind the Service")
    print(f"\nBENCH k8s canary: traffic back on the stable pods {time.monotonic() - failed:.1f} s "
          "after the verdict")  # fmt: skip
    assert apps.read_namespaced_deployment("model-server-canary", ns).spec.replicas == 0
    assert _model(serving.deployment()) == v2
    assert "canary step 1 (canary 25%)" in registry.get_model_version(MODEL, "1").tags[FAILED_TAG]
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "2"


def _gateway_api_crds(plane) -> None:
    """The standard channel's CRDs of the gateway-api module tests/k8s/controlplane/go.mod
    pins, from the module cache (``go mod download``: fetched once, checked against go.sum)."""
    from tests.k8s.cluster import MODULE

    done = subprocess.run(["go", "mod", "download", "-json", "sigs.k8s.io/gateway-api"],
                          cwd=MODULE, capture_output=True, text=True, check=True)  # fmt: skip
    crds = f"{json.loads(done.stdout)['Dir']}/config/crd/standard"
    plane.kubectl("apply", "--server-side", "-f", crds)
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/httproutes.gateway.networking.k8s.io")  # fmt: skip


def test_the_http_route_is_accepted_and_the_rollout_may_move_its_weights(plane, registry_uri):
    """Rendered with a Gateway: the HTTPRoute (and the Role that lets the rollout patch it)
    pass a server-side dry-run; applied, the rollout's own token sets a canary's weight and a
    shadow's mirror on it, and nothing else."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from serving.deploy import manifests
    from serving.deploy.canary import http_route
    from serving.deploy.kube_api import KubeApi
    from serving.deploy.settings import DeploySettings
    from tests.k8s.conftest import SERVING_IMAGE

    _gateway_api_crds(plane)
    settings = DeploySettings(target="kubernetes", namespace="gateway", gateway_name="infra/edge",
                              serving_image=SERVING_IMAGE)  # fmt: skip
    objects = manifests.render(settings, f"models:/{MODEL}/1", "1", tracking_uri=registry_uri)
    plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(objects[0]))  # Namespace
    text = "\n---\n".join(json.dumps(o) for o in objects)
    dry = plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=text)
    assert "httproute.gateway.networking.k8s.io/model-server serverside-applied" in dry.stdout
    plane.kubectl("apply", "--server-side", "-f", "-", input=text)
    token = plane.token_kubeconfig(
        "gateway", settings.service_account, plane.root / "gw.kubeconfig"
    )
    api = KubeApi(plane.api_client(token), "gateway", settings.deployment_name)
    applied = api.apply_route(http_route(manifests.service(settings), "infra/edge", 0.25, 0.1))
    (rule,) = applied["spec"]["rules"]
    assert [b["weight"] for b in rule["backendRefs"]] == [75, 25]
    assert rule["filters"][0]["requestMirror"]["percent"] == 10
    routes = client.CustomObjectsApi(plane.api_client(token))
    with pytest.raises(ApiException) as refused:
        routes.delete_namespaced_custom_object(
            "gateway.networking.k8s.io", "v1", "gateway", "httproutes", "model-server"
        )
    assert refused.value.status == 403
