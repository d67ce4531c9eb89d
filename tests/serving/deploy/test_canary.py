"""The canary's Kubernetes objects (``serving.deploy.canary``) as ``render`` adds them: which
pods each Deployment and Service selects, the HTTPRoute of a Gateway, the Role's names."""

from __future__ import annotations

import pytest
import yaml

from serving.deploy.canary import canary_replicas, http_route
from serving.deploy.manifests import render, service
from serving.deploy.settings import DeploySettings
from tests.serving.deploy.monitoring import SERVICE_MONITOR

SETTINGS = DeploySettings(target="kubernetes")


def _objects(settings: DeploySettings = SETTINGS) -> dict[tuple[str, str], dict]:
    objects = render(settings, "models:/m/3", "3", tracking_uri="http://mlflow")
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_canary_is_the_serving_deployment_on_its_own_track_at_zero():
    objects = _objects()
    stable = objects["Deployment", "model-server"]
    canary = objects["Deployment", "model-server-canary"]
    stable_pods = stable["spec"]["template"]["metadata"]["labels"]
    canary_pods = canary["spec"]["template"]["metadata"]["labels"]
    assert (stable_pods["track"], canary_pods["track"]) == ("stable", "canary")
    assert canary["spec"]["replicas"] == 0 and "replicas" not in stable["spec"]  # the HPA's
    # Each Deployment selects its own pods; the serving Service selects both (replica ratio),
    # each track's Service one.
    assert _selects(canary["spec"]["selector"]["matchLabels"], canary_pods)
    assert not _selects(canary["spec"]["selector"]["matchLabels"], stable_pods)
    serving = objects["Service", "model-server"]["spec"]["selector"]
    assert _selects(serving, stable_pods) and _selects(serving, canary_pods)
    for track, pods, other in (("stable", stable_pods, canary_pods),
                               ("canary", canary_pods, stable_pods)):  # fmt: skip
        selector = objects["Service", f"model-server-{track}"]["spec"]["selector"]
        assert _selects(selector, pods) and not _selects(selector, other), track
    args = canary["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--profile-from", "models:/m/3"]
    assert "--profile-from" not in stable["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_rollout_may_change_the_canary_and_a_route_only_with_a_gateway():
    def rules(settings):
        return _objects(settings)["Role", "model-rollout"]["rules"]

    for rule in rules(SETTINGS)[:2]:  # deployments, deployments/scale
        assert rule["resourceNames"] == ["model-server", "model-server-canary"]
    assert not any("httproutes" in r["resources"] for r in rules(SETTINGS))
    assert ("HTTPRoute", "model-server") not in _objects()
    with_gateway = SETTINGS.model_copy(update={"gateway_name": "infra/edge"})
    (route_rule,) = [r for r in rules(with_gateway) if "httproutes" in r["resources"]]
    assert route_rule["resourceNames"] == ["model-server"]
    assert route_rule["verbs"] == ["get", "patch"]
    assert ("HTTPRoute", "model-server") in _objects(with_gateway)


@pytest.mark.parametrize(
    ("gateway", "weight", "mirror", "weights", "mirrored", "parent"),
    [
        ("edge", 0.0, 0.0, [100, 0], None, {"name": "edge"}),
        ("infra/edge", 0.0, 0.1, [100, 0], 10, {"name": "edge", "namespace": "infra"}),
        ("edge", 0.25, 0.0, [75, 25], None, {"name": "edge"}),
    ],
)
def test_the_http_route_weights_and_mirrors(gateway, weight, mirror, weights, mirrored, parent):
    route = http_route(service(SETTINGS), gateway, weight, mirror)
    (rule,) = route["spec"]["rules"]
    assert [(b["name"], b["weight"]) for b in rule["backendRefs"]] == list(
        zip(["model-server-stable", "model-server-canary"], weights, strict=True)
    )
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", **parent}
    ]
    if mirrored is None:
        assert "filters" not in rule
    else:
        (mirror_filter,) = rule["filters"]
        assert mirror_filter["requestMirror"] == {
            "backendRef": {"name": "model-server-canary", "port": 80},
            "percent": mirrored,
        }


@pytest.mark.parametrize(
    ("weight", "stable", "replicas"),
    [(0.0, 2, 1), (0.05, 2, 1), (0.25, 6, 2), (0.5, 2, 2), (0.5, 5, 5), (0.25, 0, 1)],
)
def test_canary_pods_for_a_share_beside_the_stable_ones(weight, stable, replicas):
    assert canary_replicas(weight, stable) == replicas


def test_prometheus_sees_the_track_of_each_pod():
    monitor = yaml.safe_load(SERVICE_MONITOR.read_text())
    assert monitor["spec"]["podTargetLabels"] == ["track"]
    stable = _objects()["Deployment", "model-server"]["spec"]["template"]["metadata"]["labels"]
    assert stable["track"] == "stable"
