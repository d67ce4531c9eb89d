"""The Kubernetes objects of the ``kubernetes`` deploy target, rendered by one pure function.

``render(settings, model_uri, version, tracking_uri=...)`` returns plain dicts (apply order):

    Namespace              Pod Security Admission labels: the namespace enforces `restricted`
    ServiceAccount x2      the model server's (no API token) and the rollout pod's
    Role, RoleBinding      what the rollout pod may do: get/watch/patch THE Deployment (and its
                           canary) and their scale, list ReplicaSets and pods; with a Gateway,
                           get/patch THE HTTPRoute
    Service                ClusterIP, port 80 -> the server's 8080 (`http`); and one per track,
                           ``<name>-stable`` and ``<name>-canary`` (serving.deploy.canary)
    Deployment             the serving image pinned to ``models:/<name>/<version>``; and its
                           canary ``<name>-canary`` at 0 replicas
    HTTPRoute              with ``gateway_name``: the Gateway to the tracks (canary weights)
    HorizontalPodAutoscaler autoscaling/v2 on CPU
    PodDisruptionBudget    at most one pod voluntarily down at a time
    NetworkPolicy          ingress only from this namespace and the configured client namespaces

``python -m serving.deploy render ... [--out-dir docker/k8s/base]`` prints them as YAML or writes
the committed kustomize base (the monitoring objects' YAML in docker/k8s/monitoring is their
source). An administrator applies the whole set once (its RBAC the rollout pod must not grant
itself); the rollout pod then server-side-applies only :func:`deployment` (a new pinned URI:
every rollout and rollback is an ordinary rolling update), and its Role has no ``create``.
The startup probe allows ~5x the slowest measured start (docs/operations.md): in a cluster the
artifact download crosses the network and nodes may be busier.
"""

from __future__ import annotations

import re
from typing import Any

from serving.deploy.canary import (
    TRACK_LABEL,
    canary_deployment,
    canary_name,
    http_route,
    track_services,
)
from serving.deploy.settings import DeploySettings
from serving.server.contract import MODEL_URI_ENV

FIELD_MANAGER = "train-and-deploy"
PART_OF = "train-and-deploy"
CONTAINER_NAME = "model-server"
CONTAINER_PORT = 8080
# Where a payload log claim is mounted in a serving pod (DeploySettings.payload_log_claim).
PAYLOAD_LOG_MOUNT = "/var/lib/payload-log"
SERVICE_PORT = 80
# The restricted Pod Security Standard wants a non-root, fixed uid. 10001 is the `app` user both
# images are built with (docker/*.Dockerfile); it is outside the range of host system users.
# Shared with the pipeline's own pods (serving.deploy.pods).
RUN_AS_USER = 10001
ANNOTATION_PREFIX = "train-and-deploy"
MODEL_URI_ANNOTATION = f"{ANNOTATION_PREFIX}/model-uri"
MODEL_VERSION_ANNOTATION = f"{ANNOTATION_PREFIX}/model-version"
VERSION_LABEL = "app.kubernetes.io/version"

# The slowest measured start (docs/operations.md, "Probes"): what the budgets below scale.
MEASURED_READY_S = 16.4
# Startup probe: every 2 s (a ready pod is noticed within 2 s), up to 45 failures = 90 s.
STARTUP_PERIOD_S = 2
STARTUP_FAILURES = 45
STARTUP_BUDGET_S = STARTUP_PERIOD_S * STARTUP_FAILURES
# SIGTERM: the server drains in-flight requests for up to GRACEFUL_S; preStop first waits
# PRE_STOP_S so that kube-proxy/ingress stop sending new requests to a terminating pod.
PRE_STOP_S = 5
GRACEFUL_S = 25
TERMINATION_GRACE_S = PRE_STOP_S + GRACEFUL_S + 5
HPA_CPU_UTILIZATION = 70

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")
_PINNED_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class UnpinnedModelURI(ValueError):
    """The model URI is an alias, ``latest``, a run URI... : not ``models:/<name>/<version>``."""


def parse_pinned_uri(model_uri: str, version: str | int | None = None) -> tuple[str, str]:
    """``(name, version)`` of a pinned registry URI; raises :class:`UnpinnedModelURI`.

    An alias (``models:/name@champion``) can move between the decision to deploy and the pods'
    start, and pods started later (scale-up, node drain) would load a different model than
    their siblings: only a pinned version is reproducible.
    """
    match = _PINNED_URI.match(model_uri or "")
    if match is None:
        raise UnpinnedModelURI(
            f"a rollout needs a pinned model URI 'models:/<name>/<version>', got {model_uri!r} "
            "(resolve aliases such as @champion to their version first)"
        )
    if version is not None and str(version) != match["version"]:
        raise UnpinnedModelURI(f"model URI {model_uri!r} does not name version {version!r}")
    return match["name"], match["version"]


def label_value(value: str) -> str:
    """A valid label value: <= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = _LABEL_VALUE.sub("-", value)[:63].strip("-._")
    return cleaned or "unknown"


def selector_labels(settings: DeploySettings) -> dict[str, str]:
    """The model-server pods' identity; stable across versions (a selector is immutable)."""
    return {
        "app.kubernetes.io/name": "model-server",
        "app.kubernetes.io/instance": label_value(settings.deployment_name),
    }


def label_selector(settings: DeploySettings) -> str:
    """:func:`selector_labels` as a label selector (``kubectl get pods -l ...``)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(settings).items())


def _labels(settings: DeploySettings, component: str, **extra: str) -> dict[str, str]:
    return {
        **selector_labels(settings),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        **extra,
    }


def _meta(settings: DeploySettings, name: str, component: str, **extra: Any) -> dict[str, Any]:
    labels = _labels(settings, component, **extra.pop("labels", {}))
    return {"name": name, "namespace": settings.namespace, "labels": labels, **extra}


def _object(
    settings: DeploySettings, api_version: str, kind: str, component="serving", name=None, **body
) -> dict[str, Any]:
    """``apiVersion``, ``kind``, the metadata (named like the Deployment by default), ``body``."""
    meta = _meta(settings, name or settings.deployment_name, component)
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, **body}


# -- the objects ---------------------------------------------------------------------------------


def namespace(settings: DeploySettings) -> dict[str, Any]:
    """The namespace, labelled so that Pod Security Admission enforces ``restricted``."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": settings.namespace,
            "labels": {
                "app.kubernetes.io/part-of": PART_OF,
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
                "pod-security.kubernetes.io/warn": "restricted",
                "pod-security.kubernetes.io/audit": "restricted",
            },
        },
    }


def server_service_account(settings: DeploySettings) -> dict[str, Any]:
    """The model server's identity: it never talks to the API server, so no token."""
    return _object(settings, "v1", "ServiceAccount", automountServiceAccountToken=False)


def rollout_rbac(settings: DeploySettings) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding of the rollout pod: least privilege.

    - ``deployments``: ``get`` and ``watch`` (the live revision and the rollout's progress;
      a watch of one object by ``fieldSelector=metadata.name``) and ``patch`` (server-side
      apply), only on the serving Deployment and its canary (``resourceNames``);
      ``deployments/scale``: ``patch`` (withdraw: scale to zero, and back; the canary's
      steps). No ``create`` (an administrator bootstraps both), no ``list``, no ``delete``,
      no ``update``.
    - ``httproutes`` (with a Gateway): ``get`` and ``patch`` of the one HTTPRoute: a canary's
      weight and a shadow's mirror.
    - ``replicasets``, ``pods``: ``list`` only, to tell a stuck rollout's reason (image pull
      errors, crash loops) and to find the previous revision's template. ``list`` cannot be
      narrowed by name; both are read-only.
    The token is not mounted by default: the rollout pod asks for it explicitly.
    """
    name = settings.service_account
    rbac, ours = "rbac.authorization.k8s.io/v1", {"component": "rollout", "name": name}
    deployments = [settings.deployment_name, canary_name(settings)]
    routes = [
        {
            "apiGroups": ["gateway.networking.k8s.io"],
            "resources": ["httproutes"],
            "resourceNames": [settings.deployment_name],
            "verbs": ["get", "patch"],
        }
    ]
    return [
        _object(settings, "v1", "ServiceAccount", **ours, automountServiceAccountToken=False),
        _object(
            settings,
            rbac,
            "Role",
            **ours,
            rules=[
                {
                    "apiGroups": ["apps"],
                    "resources": ["deployments"],
                    "resourceNames": deployments,
                    "verbs": ["get", "watch", "patch"],
                },
                {
                    "apiGroups": ["apps"],
                    "resources": ["deployments/scale"],
                    "resourceNames": deployments,
                    "verbs": ["patch"],
                },
                {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
                *(routes if settings.gateway_name else []),
            ],
        ),
        _object(
            settings,
            rbac,
            "RoleBinding",
            **ours,
            roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            subjects=[{"kind": "ServiceAccount", "name": name, "namespace": settings.namespace}],
        ),
    ]


def service(settings: DeploySettings) -> dict[str, Any]:
    """ClusterIP Service named like the Deployment: ``http://<name>.<namespace>.svc``."""
    port = {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
    spec = {"type": "ClusterIP", "selector": selector_labels(settings), "ports": [port]}
    return _object(settings, "v1", "Service", spec=spec)


def deployment(
    settings: DeploySettings, model_uri: str, version: str | int, *, tracking_uri: str
) -> dict[str, Any]:
    """The serving Deployment, pinned to ``model_uri``; the only object a rollout applies.

    ``spec.replicas`` is left out on purpose: the HPA owns it. With server-side apply a
    manifest that set it would take it back from the HPA on every rollout.
    """
    _, version = parse_pinned_uri(model_uri, version)
    annotations = {MODEL_URI_ANNOTATION: model_uri, MODEL_VERSION_ANNOTATION: version}
    version_label = {VERSION_LABEL: label_value(version)}
    # The stable track; a canary beside it is `canary` (serving.deploy.canary).
    pod_labels = {**version_label, TRACK_LABEL: "stable"}

    def probe(path: str, period: int, *, timeout: int, failures: int, **extra: int) -> dict:
        get = {"path": path, "port": "http", "scheme": "HTTP"}
        return {"httpGet": get, "periodSeconds": period, "timeoutSeconds": timeout, **extra,
                "failureThreshold": failures}  # fmt: skip

    container = {
        "name": CONTAINER_NAME,
        "image": settings.serving_image,
        "imagePullPolicy": "IfNotPresent",
        # Explicit, so the manifest does not depend on the image's ENTRYPOINT/CMD.
        "command": ["python", "-m", "serving.server"],
        "args": [
            *("--model-uri", f"$({MODEL_URI_ENV})"),
            *("--host", "0.0.0.0"),
            *("--port", str(CONTAINER_PORT)),
            *("--graceful-timeout", str(GRACEFUL_S)),
            # 400 for columns not in the model's input schema and non-numbers in numeric
            # columns, where stock MLflow drops or converts them (serving/server/app.py).
            "--strict",
            *_payload_log_args(settings),
        ],
        "env": [
            {"name": MODEL_URI_ENV, "value": model_uri},
            {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri},
            # readOnlyRootFilesystem: MLflow downloads artifacts and TensorFlow writes
            # caches under $HOME / $TMPDIR, both on the /tmp emptyDir.
            {"name": "HOME", "value": "/tmp"},
            {"name": "TMPDIR", "value": "/tmp"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        # MLflow credentials (MLFLOW_TRACKING_TOKEN, AWS_*, ...) if the cluster needs them.
        "envFrom": [
            {"secretRef": {"name": f"{settings.deployment_name}-mlflow", "optional": True}}
        ],
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        # /ping is 503 until the model is loaded and a warm-up prediction succeeded.
        "startupProbe": probe("/ping", STARTUP_PERIOD_S, timeout=2, failures=STARTUP_FAILURES),
        "readinessProbe": probe("/ping", 5, timeout=2, successThreshold=1, failures=2),
        # Only after the startup probe succeeded: a wedged server is restarted after ~30 s.
        "livenessProbe": probe("/health", 10, timeout=3, failures=3),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_S}}},
        # Memory request == limit (~750 MiB RSS measured, TensorFlow spikes on big batches):
        # no eviction surprise. A CPU limit well above the request bounds a runaway pod
        # without throttling normal bursts (throttling is what p99 latency alerts catch).
        "resources": {
            "requests": {
                "cpu": settings.serving_cpu,
                "memory": settings.serving_memory,
                "ephemeral-storage": "256Mi",
            },
            "limits": {"cpu": "2", "memory": settings.serving_memory, "ephemeral-storage": "1Gi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    if settings.payload_log_claim and settings.payload_log_sample_percent:
        container["volumeMounts"].append({"name": "payload-log", "mountPath": PAYLOAD_LOG_MOUNT})
        claim = {"claimName": settings.payload_log_claim}
        volumes.append({"name": "payload-log", "persistentVolumeClaim": claim})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            settings,
            settings.deployment_name,
            "serving",
            labels=version_label,
            annotations=dict(annotations),
        ),
        "spec": {
            "selector": {"matchLabels": selector_labels(settings)},
            "strategy": {
                "type": "RollingUpdate",
                # Never fewer ready pods than wanted: a new pod must be ready before an old
                # one goes. One extra pod at a time keeps the surge cheap.
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "minReadySeconds": settings.min_ready_s,
            "progressDeadlineSeconds": settings.progress_deadline_s,
            # The rollout reads the previous revision from its ReplicaSet when it resumes.
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {
                    "labels": _labels(settings, "serving", **pod_labels),
                    "annotations": dict(annotations),
                },
                "spec": {
                    "serviceAccountName": settings.deployment_name,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                    # Spread replicas over nodes, so a node loss takes out one of them.
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector_labels(settings)},
                        }
                    ],
                },
            },
        },
    }


def _payload_log_args(settings: DeploySettings) -> list[str]:
    """The payload log's flags: to the claim's mount, else the object-store URL, else none
    (a pod's own disk would lose it)."""
    where = PAYLOAD_LOG_MOUNT if settings.payload_log_claim else settings.payload_log_url
    if not where or not settings.payload_log_sample_percent:
        return []
    sample = f"{settings.payload_log_sample_percent:g}"
    return ["--payload-log-path", where, "--payload-log-sample-percent", sample]


def horizontal_pod_autoscaler(settings: DeploySettings) -> dict[str, Any]:
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": settings.deployment_name}
    cpu = {"type": "Utilization", "averageUtilization": HPA_CPU_UTILIZATION}
    return _object(
        settings,
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        spec={
            "scaleTargetRef": target,
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": cpu}}],
            "behavior": {
                # Scale down slowly (a model pod takes ~15 s to come back), up promptly.
                "scaleDown": {
                    "stabilizationWindowSeconds": 300,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}],
                },
            },
        },
    )


def pod_disruption_budget(settings: DeploySettings) -> dict[str, Any]:
    """At most one pod voluntarily down; never blocks a drain even at one replica."""
    spec = {
        "maxUnavailable": 1,
        "selector": {"matchLabels": selector_labels(settings)},
        # A crash-looping pod may be evicted even when the budget is spent.
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    return _object(settings, "policy/v1", "PodDisruptionBudget", spec=spec)


def network_policy(settings: DeploySettings) -> dict[str, Any]:
    """Ingress to the model server's port only from this namespace (the rollout pod's
    verification, in-namespace clients) and the configured client namespaces (Airflow's verify task,
    Prometheus). Egress is left open: the server must reach MLflow and its artifact store,
    whose addresses are deployment-specific (often outside the cluster)."""
    peers: list[dict[str, Any]] = [{"podSelector": {}}]
    if names := list(settings.allowed_client_namespaces):
        named = {"key": "kubernetes.io/metadata.name", "operator": "In", "values": names}
        peers.append({"namespaceSelector": {"matchExpressions": [named]}})
    ingress = {"from": peers, "ports": [{"protocol": "TCP", "port": CONTAINER_PORT}]}
    selector = {"matchLabels": selector_labels(settings)}
    spec = {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": [ingress]}
    return _object(settings, "networking.k8s.io/v1", "NetworkPolicy", spec=spec)


def render(
    settings: DeploySettings, model_uri: str, version: str | int, *, tracking_uri: str,
    include_namespace: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every object of the kubernetes target, in apply order. Pure: no I/O, no clock."""
    parse_pinned_uri(model_uri, version)
    serving = deployment(settings, model_uri, version, tracking_uri=tracking_uri)
    return [
        *([namespace(settings)] if include_namespace else []),
        server_service_account(settings),
        *rollout_rbac(settings),
        service(settings),
        *track_services(service(settings)),
        serving,
        canary_deployment(serving, live_uri=model_uri, replicas=0),
        *([http_route(service(settings), settings.gateway_name)] if settings.gateway_name else []),
        horizontal_pod_autoscaler(settings),
        pod_disruption_budget(settings),
        network_policy(settings),
    ]


# -- YAML ----------------------------------------------------------------------------------------

# One file per concern in the committed kustomize base (docker/k8s/base/).
BASE_FILES: dict[str, tuple[str, ...]] = {
    "namespace.yaml": ("Namespace",),
    "rbac.yaml": ("ServiceAccount", "Role", "RoleBinding"),
    "service.yaml": ("Service",),
    "deployment.yaml": ("Deployment",),
    "httproute.yaml": ("HTTPRoute",),
    "autoscaling.yaml": ("HorizontalPodAutoscaler", "PodDisruptionBudget"),
    "networkpolicy.yaml": ("NetworkPolicy",),
}
GENERATED_HEADER = (
    "# Generated by `python -m serving.deploy render --out-dir docker/k8s/base`\n"
    "# (serving/deploy/manifests.py).\n"
    "# Do not edit: change render() and regenerate;\n"
    "# tests/serving/deploy/test_manifests.py checks it.\n"
)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order render() built them."""
    import yaml

    return "---\n".join(yaml.safe_dump(o, sort_keys=False, width=100) for o in objects)


def base_files(objects: list[dict[str, Any]]) -> dict[str, str]:
    """File name -> content of the kustomize base for ``objects`` (render() output)."""
    files: dict[str, str] = {}
    placed: set[int] = set()
    for filename, kinds in BASE_FILES.items():
        chosen = [o for o in objects if o["kind"] in kinds]
        if chosen:
            files[filename] = GENERATED_HEADER + to_yaml(chosen)
            placed.update(id(o) for o in chosen)
    unplaced = [o["kind"] for o in objects if id(o) not in placed]
    if unplaced:  # pragma: no cover - a new kind needs a file
        raise ValueError(f"no base file for kinds {unplaced}")
    kind = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    files["kustomization.yaml"] = GENERATED_HEADER + to_yaml([{**kind, "resources": list(files)}])
    return files
