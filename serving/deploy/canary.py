"""The canary beside the serving Deployment, on Kubernetes: its objects, made (pure) from the
serving Deployment and Service that :mod:`serving.deploy.manifests` renders.

- Deployment ``<name>-canary``: the serving Deployment's pod template with the candidate's
  model, its histograms in the live version's buckets (``--profile-from``), and the label
  ``track: canary`` (the serving Deployment's pods carry ``track: stable``). Its selector is
  the serving pods' labels plus the track, so the serving Service selects both: without a
  Gateway the requests split by replica ratio. No autoscaler: the rollout sets its replicas
  (0 between rollouts; an administrator creates it with the rest, at 0).
- Services ``<name>-stable`` and ``<name>-canary``: one track each. The candidate is verified
  through its own before a Gateway sends it any traffic; the HTTPRoute routes to both.
- HTTPRoute ``<name>`` (with ``gateway_name``): the two track Services with the canary's
  weight, and in a shadow step a ``RequestMirror`` of a share of the requests to the canary.

The track label is also what Prometheus sees (the ServiceMonitor's ``podTargetLabels``): the
rollout judge compares the two tracks (docker/k8s/monitoring/rollout-judge-rule.yaml).
"""

from __future__ import annotations

import copy
import math
from typing import Any

TRACK_LABEL = "track"
GATEWAY_API = "gateway.networking.k8s.io/v1"


def canary_name(settings: Any) -> str:
    """The canary Deployment's (and its Service's) name, beside ``settings.deployment_name``."""
    return f"{settings.deployment_name}-canary"


def canary_deployment(stable: dict[str, Any], *, live_uri: str, replicas: int) -> dict[str, Any]:
    """The canary of the serving Deployment ``stable`` (rendered for the candidate's model):
    ``replicas`` pods, measured in the buckets of ``live_uri``."""
    body = copy.deepcopy(stable)
    body["metadata"]["name"] = f"{stable['metadata']['name']}-canary"
    body["metadata"]["labels"][TRACK_LABEL] = "canary"
    spec = body["spec"]
    spec["replicas"] = replicas
    spec["selector"]["matchLabels"][TRACK_LABEL] = "canary"
    template = spec["template"]
    template["metadata"]["labels"][TRACK_LABEL] = "canary"
    container = template["spec"]["containers"][0]
    container["args"] = [*container["args"], "--profile-from", live_uri]
    for constraint in template["spec"].get("topologySpreadConstraints") or []:
        constraint["labelSelector"] = copy.deepcopy(spec["selector"])
    return body


def track_services(serving: dict[str, Any]) -> list[dict[str, Any]]:
    """``<name>-stable`` and ``<name>-canary``: the serving Service, one track each."""
    services = []
    for track in ("stable", "canary"):
        one = copy.deepcopy(serving)
        one["metadata"]["name"] = f"{serving['metadata']['name']}-{track}"
        one["metadata"]["labels"][TRACK_LABEL] = track
        one["spec"]["selector"][TRACK_LABEL] = track
        services.append(one)
    return services


def http_route(
    serving: dict[str, Any], gateway: str, weight: float = 0.0, mirror: float = 0.0
) -> dict[str, Any]:
    """The HTTPRoute from ``gateway`` (``name`` or ``namespace/name``) to the tracks of the
    serving Service: ``weight`` of the requests to the canary, ``mirror`` of them (0 to 1)
    mirrored to it."""
    namespace, _, name = gateway.rpartition("/")
    parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name}
    if namespace:
        parent["namespace"] = namespace
    port = serving["spec"]["ports"][0]["port"]

    def backend(track: str, **extra: Any) -> dict[str, Any]:
        return {"name": f"{serving['metadata']['name']}-{track}", "port": port, **extra}

    percent = round(weight * 100)
    rule: dict[str, Any] = {
        "backendRefs": [backend("stable", weight=100 - percent), backend("canary", weight=percent)]
    }
    if mirror:
        mirrored = {"backendRef": backend("canary"), "percent": round(mirror * 100)}
        rule["filters"] = [{"type": "RequestMirror", "requestMirror": mirrored}]
    return {
        "apiVersion": GATEWAY_API,
        "kind": "HTTPRoute",
        "metadata": copy.deepcopy(serving["metadata"]),
        "spec": {"parentRefs": [parent], "rules": [rule]},
    }


def canary_replicas(weight: float, stable_replicas: int) -> int:
    """Canary pods for ``weight`` of the requests beside ``stable_replicas`` pods (at least
    one: a replica-ratio split is coarse; the step log says the share it gives)."""
    if weight <= 0:
        return 1
    return max(1, math.floor(weight / (1 - weight) * max(1, stable_replicas) + 0.5))
