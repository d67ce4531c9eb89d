"""The Kubernetes objects of the ``kubernetes`` deploy target, rendered by one pure function.

``render(settings, model_uri, version, tracking_uri=...)`` returns plain dicts (apply order):

    Namespace              Pod Security Admission labels: the namespace enforces `restricted`
    ServiceAccount x2      the model server's (no API token) and the rollout pod's
    Role, RoleBinding      what the rollout pod may do: get/patch THE Deployment, list RS/pods
    Service                ClusterIP, port 80 -> the server's 8080 (`http`); and one per track,
                           ``<name>-stable`` and ``<name>-canary`` (serving.deploy.canary)
    Deployment             the serving image pinned to ``models:/<name>/<version>``; and its
                           canary ``<name>-canary`` at 0 replicas
    HTTPRoute              with ``gateway_name``: the Gateway to the tracks (canary weights)
    HorizontalPodAutoscaler autoscaling/v2 on CPU
    PodDisruptionBudget    at most one pod voluntarily down at a time
    NetworkPolicy          ingress only from this namespace and the configured client namespaces
    ServiceMonitor         monitoring.coreos.com/v1 (Prometheus Operator): scrape /metrics
    PrometheusRule         alerts: error ratio, p99 latency, no ready pods, server down, served
                           version is not @champion, input and prediction drift
    ConfigMap              the Grafana dashboard (serving.deploy.dashboard), for its sidecar

``python -m serving.deploy render --model-uri models:/regression-model/3 --version 3`` prints them
as
multi-document YAML; ``--out-dir docker/k8s/base`` writes the committed kustomize base, and
``--prometheus-rules`` / ``--grafana-dashboard`` the same alerts as a plain Prometheus rule file
and the dashboard as JSON (docker/prometheus/rules.yml, docker/grafana/, for the local stack).

Who applies what. An administrator applies the whole set once (it contains the RBAC, which the
rollout pod must not be able to grant itself). After that, the rollout pod
(``serving.deploy.kubernetes``) server-side-applies only :func:`deployment`: a new model
version is a new pinned URI in the pod template, so every rollout and every rollback is an
ordinary rolling update. Its Role has no ``create`` (an apply that would create an object is
authorised as ``create``): the rollout can change the one Deployment and nothing else.

Probe sizing comes from a measurement of the server's start (model load and warm-up
prediction; docs/operations.md has the numbers and the command). In a cluster the artifact
download crosses the network and nodes may be busier, so the startup probe allows ~5x the
slowest measured start.
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
# Monitoring. The Prometheus job of the model server, in a cluster (the ServiceMonitor takes it
# from the Service label named by JOB_LABEL_SOURCE) and in the local stack's Prometheus alike.
METRICS_JOB = "model-server"
JOB_LABEL_SOURCE = "app.kubernetes.io/name"
# The registry alias that names what should be live (ml.settings.RegistrySettings's default),
# as the Airflow plugin labels mlflow_registry_alias_version.
CHAMPION_ALIAS = "champion"
# The pseudo-feature under which the drift DAG exports the predictions' PSI.
PREDICTION_FEATURE = "__prediction__"
# Grafana's dashboard sidecar loads ConfigMaps that carry this label (value "1").
GRAFANA_DASHBOARD_LABEL = "grafana_dashboard"

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
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(settings, settings.deployment_name, "serving"),
        "automountServiceAccountToken": False,
    }


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
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(settings, name, "rollout"),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(settings, name, "rollout"),
            "rules": [
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
                {
                    "apiGroups": ["apps"],
                    "resources": ["replicasets"],
                    "verbs": ["list"],
                },
                {
                    "apiGroups": [""],
                    "resources": ["pods"],
                    "verbs": ["list"],
                },
                *(routes if settings.gateway_name else []),
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(settings, name, "rollout"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": settings.namespace}],
        },
    ]


def service(settings: DeploySettings) -> dict[str, Any]:
    """ClusterIP Service named like the Deployment: ``http://<name>.<namespace>.svc``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(settings, settings.deployment_name, "serving"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(settings),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


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
    probe_get = {"port": "http", "scheme": "HTTP"}
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
        "startupProbe": {
            "httpGet": {"path": "/ping", **probe_get},
            "periodSeconds": STARTUP_PERIOD_S,
            "timeoutSeconds": 2,
            "failureThreshold": STARTUP_FAILURES,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ping", **probe_get},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "successThreshold": 1,
            "failureThreshold": 2,
        },
        # Only after the startup probe succeeded: a wedged server is restarted after ~30 s.
        "livenessProbe": {
            "httpGet": {"path": "/health", **probe_get},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
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
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
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


def horizontal_pod_autoscaler(settings: DeploySettings) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(settings, settings.deployment_name, "serving"),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": settings.deployment_name,
            },
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": HPA_CPU_UTILIZATION,
                        },
                    },
                }
            ],
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
    }


def pod_disruption_budget(settings: DeploySettings) -> dict[str, Any]:
    """At most one pod voluntarily down; never blocks a drain even at one replica."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(settings, settings.deployment_name, "serving"),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(settings)},
            # A crash-looping pod may be evicted even when the budget is spent.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def network_policy(settings: DeploySettings) -> dict[str, Any]:
    """Ingress to the model server's port only from this namespace (the rollout pod's
    verification, in-namespace clients) and the configured client namespaces (Airflow's verify task,
    Prometheus). Egress is left open: the server must reach MLflow and its artifact store,
    whose addresses are deployment-specific (often outside the cluster)."""
    peers: list[dict[str, Any]] = [{"podSelector": {}}]
    if settings.allowed_client_namespaces:
        peers.append(
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "In",
                            "values": list(settings.allowed_client_namespaces),
                        }
                    ]
                }
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(settings, settings.deployment_name, "serving"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(settings)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": peers, "ports": [{"protocol": "TCP", "port": CONTAINER_PORT}]},
            ],
        },
    }


def service_monitor(settings: DeploySettings) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(
            settings, settings.deployment_name, "monitoring", labels=settings.monitoring_labels
        ),
        "spec": {
            # job="model-server" (the Service's app.kubernetes.io/name), as in the local
            # Prometheus: the alert rules and the dashboard select the server by it.
            "jobLabel": JOB_LABEL_SOURCE,
            # stable or canary: what the rollout judge compares (rollout-judge.yml).
            "podTargetLabels": [TRACK_LABEL],
            "selector": {"matchLabels": selector_labels(settings)},
            "namespaceSelector": {"matchNames": [settings.namespace]},
            "endpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "scheme": "http",
                    "interval": "30s",
                    "scrapeTimeout": "10s",
                }
            ],
        },
    }


def prometheus_duration(seconds: int) -> str:
    """``600`` -> ``"10m"``: a Prometheus duration for a whole number of seconds."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def server_selector(settings: DeploySettings) -> str:
    """Label matchers of the model server's own series, in a cluster and locally alike.

    ``job``: the ServiceMonitor takes it from the Service's ``app.kubernetes.io/name`` label
    (``model-server``), and the local Prometheus scrapes the server as job ``model-server``.
    ``namespace``: the Prometheus Operator adds it to every series it scrapes; the local
    Prometheus adds none, and ``=~"<ns>|"`` matches both (a missing label is the empty string).
    """
    return f'job="{METRICS_JOB}",namespace=~"{settings.namespace}|"'


def alert_rules(settings: DeploySettings) -> list[dict[str, Any]]:
    """The alerts of the PrometheusRule, and of docker/prometheus/rules.yml (local stack).

    Serving health from the server's own series (serving/server/metrics.py), no ready pod from
    kube-state-metrics, and whether the right model is served and still fits its data from the
    Airflow plugin's series (plugins/registry_events/exporter.py):
    ``mlflow_registry_alias_version{model,alias}`` (the version an alias points at) and the
    drift DAG's latest result, ``pipeline_feature_drift_score{model,feature}`` (PSI per column:
    the features, ``__target__``, and ``__prediction__`` for the predictions) and
    ``pipeline_drift_threshold{model,feature}`` (each column's threshold). Those come from
    another scrape job (and, in a cluster, another namespace), so they are not selected by job
    or namespace.
    """
    ns, name = settings.namespace, settings.deployment_name
    sel = server_selector(settings)
    inv = f'{sel},route="/invocations"'
    runbook = "docs/operations.md#"
    pct = f"{settings.alert_error_ratio:.0%}"
    p99_s = f"{settings.alert_p99_latency_s:g}s"
    error_ratio = (
        f'sum(rate(model_server_requests_total{{{inv},status=~"5.."}}[5m]))\n'
        f"/\nsum(rate(model_server_requests_total{{{inv}}}[5m]))\n"
        f"> {settings.alert_error_ratio:g}"
    )
    p99 = (
        "histogram_quantile(0.99,\n"
        f"  sum by (le) (rate(model_server_request_duration_seconds_bucket{{{inv}}}[5m]))\n"
        f") > {settings.alert_p99_latency_s:g}"
    )
    # No ready pod: kube-state-metrics says none is available, or Prometheus scrapes none.
    no_ready = (
        f'max(kube_deployment_status_replicas_available{{namespace="{ns}",deployment="{name}"}})'
        f" < 1\nor\n"
        f"absent(up{{{sel}}} == 1)"
    )
    down = f"up{{{sel}}} == 0"
    champion = f'max by (model) (mlflow_registry_alias_version{{alias="{CHAMPION_ALIAS}"}})'
    # Per server process: its version (model_server_model_version, absent for a model not
    # from the registry) labelled with its registered model's name (model_server_model_info,
    # one series per process; `max by` keeps it one while an old version's series is still
    # within the lookback window); any process serving another version than @champion keeps
    # the alert pending.
    not_champion = (
        "max by (model) (\n"
        "  label_replace(\n"
        f"    model_server_model_version{{{sel}}}\n"
        "    * on (instance, job) group_left (name)\n"
        f"    max by (instance, job, name) (model_server_model_info{{{sel}}}),\n"
        '    "model", "$1", "name", "(.+)"\n'
        "  )\n"
        f"  != on (model) group_left ()\n  {champion}\n"
        ")"
    )
    # Each column is compared with its own threshold (features, target and predictions each
    # have theirs: ml.settings.DriftSettings).
    not_pred, pred = f'feature!="{PREDICTION_FEATURE}"', f'feature="{PREDICTION_FEATURE}"'
    input_drift = (
        f"max by (model, feature) (pipeline_feature_drift_score{{{not_pred}}})\n"
        f"> on (model, feature)\nmax by (model, feature) (pipeline_drift_threshold{{{not_pred}}})"
    )
    prediction_drift = (
        f"max by (model) (pipeline_feature_drift_score{{{pred}}})\n"
        f"> on (model)\nmax by (model) (pipeline_drift_threshold{{{pred}}})"
    )

    def threshold_now(feature: str) -> str:
        return (
            '{{ with printf "max(pipeline_drift_threshold{model=%q,feature=%q})" $labels.model '
            f'{feature} | query }}}}{{{{ . | first | value | printf "%.3g" }}}}{{{{ end }}}}'
        )

    champion_now = (
        "{{ with printf "
        f'"max(mlflow_registry_alias_version{{model=%q,alias=\\"{CHAMPION_ALIAS}\\"}})"'
        " $labels.model | query }}{{ . | first | value }}{{ end }}"
    )
    common = {"namespace": ns, "deployment": name}

    def alert(
        name_: str, expr: str, for_s: int, severity: str, summary: str, description: str
    ) -> dict[str, Any]:
        return {
            "alert": name_,
            "expr": expr,
            "for": prometheus_duration(for_s),
            "labels": {"severity": severity, **common},
            "annotations": {
                "summary": summary,
                "description": description,
                "runbook_url": f"{runbook}{name_.lower()}",
            },
        }

    return [
        alert(
            "ModelServerHighErrorRate",
            error_ratio,
            300,
            "critical",
            f"More than {pct} of predictions fail (5xx)",
            "{{ $value | humanizePercentage }} of /invocations "
            f"requests to {ns}/{name} answered 5xx over 5 minutes.",
        ),
        alert(
            "ModelServerHighLatency",
            p99,
            600,
            "warning",
            f"p99 prediction latency above {p99_s}",
            f"p99 of /invocations on {ns}/{name} is "
            "{{ $value | humanizeDuration }} over 5 minutes.",
        ),
        alert(
            "ModelServerNoReadyPods",
            no_ready,
            120,
            "critical",
            "No model-server pod is ready: predictions fail",
            f"{ns}/{name} has no available replica, or Prometheus cannot scrape any of its pods.",
        ),
        alert(
            "ModelServerDown",
            down,
            settings.alert_server_down_for_s,
            "critical",
            "A model server does not answer Prometheus' scrapes",
            "{{ $labels.instance }} (job {{ $labels.job }}) has answered no /metrics scrape for "
            f"{prometheus_duration(settings.alert_server_down_for_s)}: the process is down, "
            "hung or unreachable.",
        ),
        alert(
            "ModelServedVersionNotChampion",
            not_champion,
            settings.alert_version_mismatch_for_s,
            "warning",
            f"The served model version is not @{CHAMPION_ALIAS}",
            "{{ $labels.model }}: a model server serves version {{ $value }} while "
            f"@{CHAMPION_ALIAS} is version {champion_now}, for "
            f"{prometheus_duration(settings.alert_version_mismatch_for_s)}: a rollout failed "
            "or did not run.",
        ),
        alert(
            "ModelInputDrift",
            input_drift,
            settings.alert_drift_for_s,
            "warning",
            "A model input column drifted from the training data",
            "{{ $labels.model }}: PSI of column {{ $labels.feature }} is "
            '{{ $value | printf "%.3g" }}, above its threshold '
            + threshold_now("$labels.feature")
            + ".",
        ),
        alert(
            "ModelPredictionDrift",
            prediction_drift,
            settings.alert_drift_for_s,
            "warning",
            "The model's predictions drifted from its holdout predictions",
            "{{ $labels.model }}: PSI of the predictions is "
            '{{ $value | printf "%.3g" }}, above their threshold '
            + threshold_now(f'"{PREDICTION_FEATURE}"')
            + ".",
        ),
    ]


def prometheus_rule(settings: DeploySettings) -> dict[str, Any]:
    """The alerts (:func:`alert_rules`) for the Prometheus Operator."""
    name = settings.deployment_name
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta(settings, name, "monitoring", labels=settings.monitoring_labels),
        "spec": {"groups": [{"name": f"{name}.rules", "rules": alert_rules(settings)}]},
    }


def prometheus_rules_file(settings: DeploySettings) -> str:
    """The PrometheusRule's groups as a plain Prometheus rule file (docker/prometheus/rules.yml,
    for a Prometheus without the operator: the local stack's)."""
    groups = prometheus_rule(settings)["spec"]
    return RULES_HEADER + to_yaml([groups])


def grafana_dashboard_config_map(settings: DeploySettings) -> dict[str, Any]:
    """The dashboard (serving.deploy.dashboard) as a ConfigMap that Grafana's dashboard sidecar
    (kube-prometheus-stack, the Grafana Helm chart) loads: it watches for the label
    ``grafana_dashboard: "1"``."""
    from serving.deploy.dashboard import DASHBOARD_FILE, dashboard_json

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            settings,
            f"{settings.deployment_name}-dashboard",
            "monitoring",
            labels={GRAFANA_DASHBOARD_LABEL: "1"},
        ),
        "data": {DASHBOARD_FILE: dashboard_json(settings)},
    }


def render(
    settings: DeploySettings,
    model_uri: str,
    version: str | int,
    *,
    tracking_uri: str,
    include_namespace: bool = True,
) -> list[dict[str, Any]]:
    """Every object of the kubernetes target, in apply order. Pure: no I/O, no clock."""
    parse_pinned_uri(model_uri, version)
    objects: list[dict[str, Any]] = []
    if include_namespace:
        objects.append(namespace(settings))
    objects.append(server_service_account(settings))
    objects.extend(rollout_rbac(settings))
    objects.append(service(settings))
    objects.extend(track_services(service(settings)))
    serving = deployment(settings, model_uri, version, tracking_uri=tracking_uri)
    objects.append(serving)
    objects.append(canary_deployment(serving, live_uri=model_uri, replicas=0))
    if settings.gateway_name:
        objects.append(http_route(service(settings), settings.gateway_name))
    objects.append(horizontal_pod_autoscaler(settings))
    objects.append(pod_disruption_budget(settings))
    objects.append(network_policy(settings))
    return objects


def render_monitoring(settings: DeploySettings) -> list[dict[str, Any]]:
    """The monitoring objects: they need the Prometheus Operator's CRDs (ServiceMonitor,
    PrometheusRule) and a Grafana dashboard sidecar (the ConfigMap), so they are a kustomize
    base of their own (docker/k8s/monitoring), applied where those exist."""
    return [
        service_monitor(settings),
        prometheus_rule(settings),
        grafana_dashboard_config_map(settings),
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
    "monitoring.yaml": ("ServiceMonitor", "PrometheusRule"),
    "dashboards.yaml": ("ConfigMap",),
}
GENERATED_HEADER = (
    "# Generated by `python -m serving.deploy render --out-dir docker/k8s/base`\n"
    "# (serving/deploy/manifests.py).\n"
    "# Do not edit: change render() and regenerate;\n"
    "# tests/serving/deploy/test_manifests.py checks it.\n"
)


# The alert rules as a plain Prometheus rule file, for the local stack's Prometheus.
RULES_FILE = "docker/prometheus/rules.yml"
RULES_HEADER = (
    "# Generated by `python -m serving.deploy render --prometheus-rules "
    f"{RULES_FILE}`\n"
    "# (serving/deploy/manifests.py: the groups of the PrometheusRule in monitoring.yaml).\n"
    "# Do not edit: change alert_rules() and regenerate; tests/serving/deploy/\n"
    "# test_manifests.py checks it, test_alert_rules.py runs promtool on it.\n"
)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order render() built them."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return "---\n".join(
        yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for obj in objects
    )


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
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    files["kustomization.yaml"] = GENERATED_HEADER + to_yaml([kustomization])
    return files
