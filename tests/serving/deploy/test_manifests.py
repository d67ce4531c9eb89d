"""The Kubernetes manifests of the kubernetes deploy target (serving.manifests): fast checks.

Built-in kinds validate strictly against the OpenAPI schemas kubernetes-validate ships, for the
three newest Kubernetes minors it knows. kubernetes-validate has no schemas for custom
resources, so the Prometheus Operator's ServiceMonitor and PrometheusRule (monitoring.coreos.com
/v1) are checked here against the part of their CRD schemas that the manifests use,
transcribed from the operator's CRDs (v0.82-0.84), with unknown fields rejected.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.deploy import manifests
from serving.deploy.manifests import UnpinnedModelURI, base_files, render, render_monitoring
from serving.deploy.settings import DeploySettings
from tests.k8s_schemas import newest_minors

URI = "models:/regression-model/7"
TRACKING = "http://mlflow.mlflow.svc.cluster.local:5000"
REPO = Path(__file__).resolve().parents[3]
BASE = REPO / "docker" / "k8s" / "base"
MONITORING = REPO / "docker" / "k8s" / "monitoring"
# What docker/k8s/base/ was generated with (see the GENERATED_HEADER in its files).
BASE_ARGS = {"model_uri": "models:/regression-model/1", "version": "1", "tracking_uri": TRACKING}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture
def clean_env(monkeypatch):
    """DeploySettings() reads PIPELINE_DEPLOY_*: the defaults only, whatever the shell has."""
    import os

    for key in list(os.environ):
        if key.startswith("PIPELINE_DEPLOY_"):
            monkeypatch.delenv(key)


@pytest.fixture
def settings(clean_env) -> DeploySettings:
    return DeploySettings(
        target="kubernetes",
        serving_image="registry.example.com/train-and-deploy/serving:1.2.3",
        monitoring_labels={"release": "kube-prometheus-stack"},
    )


@pytest.fixture
def objects(settings) -> list[dict]:
    """Both kustomize bases' objects: the serving objects and the monitoring ones."""
    return render(settings, URI, "7", tracking_uri=TRACKING) + render_monitoring(settings)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    """The serving object of ``kind`` (not the canary's or a track's: test_canary.py)."""
    (obj,) = [
        o for o in by_kind(objects, kind) if not o["metadata"]["name"].endswith(TRACK_SUFFIXES)
    ]
    return obj


TRACK_SUFFIXES = ("-canary", "-stable")


# -- schemas --------------------------------------------------------------------------------------


def test_renders_every_kind(objects):
    assert [o["kind"] for o in objects] == [
        "Namespace",
        "ServiceAccount",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ]
    assert one(objects, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


@pytest.mark.parametrize("k8s_version", newest_minors())
def test_builtin_kinds_validate_strictly(objects, k8s_version):
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(obj, k8s_version, strict=True)


_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}


def _crd(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        "additionalProperties": False,
    }


SERVICE_MONITOR = _crd(
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": {
                "type": "object",
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
                "additionalProperties": False,
            },
            "jobLabel": {"type": "string"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)
PROMETHEUS_RULE = _crd(
    "PrometheusRule",
    {
        "type": "object",
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "properties": {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"type": ["string", "integer"]},
                                    "for": {"type": "string", "pattern": _DURATION},
                                    "keep_firing_for": {"type": "string", "pattern": _DURATION},
                                    "labels": _STR_MAP,
                                    "annotations": _STR_MAP,
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
            }
        },
        "additionalProperties": False,
    },
)


@pytest.mark.parametrize(
    ("kind", "schema"), [("ServiceMonitor", SERVICE_MONITOR), ("PrometheusRule", PROMETHEUS_RULE)]
)
def test_monitoring_crds_match_their_schema(objects, kind, schema):
    jsonschema.validate(one(objects, kind), schema)


def test_crd_schema_check_rejects_mistakes(objects):
    """The hand-made schemas are strict enough to catch a typo."""
    monitor = one(objects, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR)
    rule = one(objects, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUS_RULE)


# -- the Deployment -------------------------------------------------------------------------------


def test_pinned_model_uri(objects, settings):
    dep = one(objects, "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    from serving.server.contract import MODEL_URI_ENV

    assert manifests.MODEL_URI_ENV == MODEL_URI_ENV, "the variable the server reads"
    assert env[MODEL_URI_ENV] == URI
    assert env["MLFLOW_TRACKING_URI"] == TRACKING
    assert container["image"] == settings.serving_image
    assert "--model-uri" in container["args"]
    assert container["args"][container["args"].index("--model-uri") + 1] == f"$({MODEL_URI_ENV})"
    assert container["args"][container["args"].index("--host") + 1] == "0.0.0.0"
    template_meta = dep["spec"]["template"]["metadata"]
    assert template_meta["annotations"][manifests.MODEL_URI_ANNOTATION] == URI
    assert template_meta["labels"][manifests.VERSION_LABEL] == "7"
    assert "@" not in yaml.safe_dump(dep)


def test_the_server_runs_in_strict_mode_with_args_it_accepts(objects):
    from serving.server.__main__ import build_parser
    from serving.server.contract import MODEL_URI_ENV

    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "serving.server"]
    assert "--strict" in container["args"]
    args = [URI if a == f"$({MODEL_URI_ENV})" else a for a in container["args"]]
    parsed = build_parser().parse_args(args)  # exits on an argument the server does not know
    assert parsed.strict is True
    assert parsed.model_uri == URI


@pytest.mark.parametrize(
    ("uri", "version"),
    [
        ("models:/regression-model@champion", "7"),
        ("models:/regression-model/latest", "7"),
        ("models:/regression-model", "7"),
        ("runs:/0123abc/model", "7"),
        ("models:/regression-model/8", "7"),
    ],
)
def test_aliases_and_mismatches_are_refused(settings, uri, version):
    with pytest.raises(UnpinnedModelURI):
        render(settings, uri, version, tracking_uri=TRACKING)
    with pytest.raises(UnpinnedModelURI):
        manifests.deployment(settings, uri, version, tracking_uri=TRACKING)


def test_rolling_update_never_drops_below_ready(objects):
    spec = one(objects, "Deployment")["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    assert "replicas" not in spec, "the HPA owns spec.replicas"
    assert spec["revisionHistoryLimit"] >= 2, "the rollout reads the previous revision's RS"


def test_probes_are_sized_from_the_measured_start_time(objects):
    from serving.server.app import _GET_ROUTES

    spec = one(objects, "Deployment")["spec"]
    container = spec["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget == manifests.STARTUP_BUDGET_S
    assert budget >= 4 * manifests.MEASURED_READY_S, "room for a slower node and a remote MLflow"
    assert startup["periodSeconds"] <= 5, "a ready pod is noticed quickly"
    assert spec["progressDeadlineSeconds"] > budget
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in _GET_ROUTES
        assert get["port"] == "http"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": manifests.CONTAINER_PORT}
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > manifests.PRE_STOP_S + manifests.GRACEFUL_S


def test_resources(objects):
    resources = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


ALLOWED_VOLUME_KEYS = {
    "name",
    "emptyDir",
    "configMap",
    "secret",
    "projected",
    "downwardAPI",
    "persistentVolumeClaim",
    "csi",
    "ephemeral",
}


def test_pod_security_restricted(objects, settings):
    ns = one(objects, "Namespace")
    assert ns["metadata"]["name"] == settings.namespace
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert pod["automountServiceAccountToken"] is False, "the server never calls the API"
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert all("hostPort" not in p for p in container["ports"])
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    for volume in pod["volumes"]:
        assert set(volume) <= ALLOWED_VOLUME_KEYS, volume
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]


# -- Service, HPA, PDB, NetworkPolicy -------------------------------------------------------------


def test_selectors_agree(objects, settings):
    dep = one(objects, "Deployment")
    selector = dep["spec"]["selector"]["matchLabels"]
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert manifests.VERSION_LABEL not in selector, "a selector is immutable across versions"
    assert one(objects, "Service")["spec"]["selector"] == selector
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == selector
    assert one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= one(objects, "Service")["metadata"]["labels"].items()


def test_service_is_what_the_endpoint_url_names(objects, settings):
    svc = one(objects, "Service")
    assert svc["metadata"]["name"] == settings.deployment_name
    (port,) = svc["spec"]["ports"]
    assert port == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    assert settings.endpoint_url == (
        f"http://{svc['metadata']['name']}.{settings.namespace}.svc.cluster.local"
    )


def test_hpa_and_pdb_are_sane(objects, settings):
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": settings.deployment_name,
    }
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert "minAvailable" not in pdb
    # a drain can always proceed, and one pod stays up while it does (minReplicas >= 2)
    assert pdb["maxUnavailable"] == 1 < hpa["minReplicas"]


def test_replica_range_is_validated(clean_env):
    with pytest.raises(ValueError, match="max_replicas"):
        DeploySettings(min_replicas=4, max_replicas=3)


def test_network_policy(objects, settings):
    np = one(objects, "NetworkPolicy")["spec"]
    assert np["policyTypes"] == ["Ingress"]
    (rule,) = np["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": manifests.CONTAINER_PORT}]
    assert {"podSelector": {}} in rule["from"], "the rollout pod's verification, same namespace"
    (ns_peer,) = [p for p in rule["from"] if "namespaceSelector" in p]
    (expr,) = ns_peer["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "kubernetes.io/metadata.name"
    assert expr["values"] == settings.allowed_client_namespaces


# -- RBAC -----------------------------------------------------------------------------------------

FORBIDDEN_VERBS = {"*", "create", "update", "delete", "deletecollection", "escalate", "bind"}


def test_rbac_least_privilege(objects, settings):
    accounts = {o["metadata"]["name"]: o for o in by_kind(objects, "ServiceAccount")}
    assert set(accounts) == {settings.service_account, settings.deployment_name}
    assert all(a["automountServiceAccountToken"] is False for a in accounts.values())
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")

    role = one(objects, "Role")
    assert role["metadata"]["namespace"] == settings.namespace
    granted = set()
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(key, []), f"wildcard in {key}: {rule}"
        assert not set(rule["verbs"]) & FORBIDDEN_VERBS, rule
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb, tuple(rule.get("resourceNames", []))))
    # exactly what serving.deploy.kubernetes.KubeApi calls (tests/k8s runs every rollout with
    # this Role's token against a real API server), and nothing else
    name = (settings.deployment_name,)
    assert granted == {
        ("apps", "deployments", "get", name),
        ("apps", "deployments", "watch", name),
        ("apps", "deployments", "patch", name),
        ("apps", "deployments/scale", "patch", name),
        ("apps", "replicasets", "list", ()),
        ("", "pods", "list", ()),
    }

    binding = one(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": settings.service_account,
            "namespace": settings.namespace,
        }
    ]


# -- monitoring -----------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_route(objects, settings):
    from serving.server.app import _GET_ROUTES

    monitor = one(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == one(objects, "Service")["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics" and "/metrics" in _GET_ROUTES
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [settings.namespace]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(objects, "PrometheusRule")["metadata"]["labels"]["release"] == (
        "kube-prometheus-stack"
    )


def test_the_server_is_job_model_server_in_a_cluster_as_locally(objects, settings):
    """The Prometheus Operator takes the job label from the Service label jobLabel names: the
    alerts and the dashboard select the server by job="model-server", the local Prometheus'
    job name too."""
    monitor = one(objects, "ServiceMonitor")
    source = monitor["spec"]["jobLabel"]
    assert source == manifests.JOB_LABEL_SOURCE
    assert one(objects, "Service")["metadata"]["labels"][source] == manifests.METRICS_JOB
    other = DeploySettings(deployment_name="model-server-b", namespace="team-b")
    assert (
        one(render(other, URI, "7", tracking_uri=TRACKING), "Service")["metadata"]["labels"][source]
        == manifests.METRICS_JOB
    )
    assert manifests.server_selector(other) == 'job="model-server",namespace=~"team-b|"'


ALERTS = {
    "ModelServerHighErrorRate",
    "ModelServerHighLatency",
    "ModelServerNoReadyPods",
    "ModelServerDown",
    "ModelServedVersionNotChampion",
    "ModelInputDrift",
    "ModelPredictionDrift",
}
# Series of the alerts that others export (serving/deploy/dashboard.py documents them).
EXTERNAL = {
    "up",
    "mlflow_registry_alias_version",
    "pipeline_feature_drift_score",
    "pipeline_drift_threshold",
    "kube_deployment_status_replicas_available",
}


def test_alerts(objects):
    from serving.server.metrics import ServerMetrics

    rules = one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert set(alerts) == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook_url"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
    assert 'status=~"5.."' in alerts["ModelServerHighErrorRate"]["expr"]
    assert "histogram_quantile(0.99" in alerts["ModelServerHighLatency"]["expr"]
    assert "kube_deployment_status_replicas_available" in alerts["ModelServerNoReadyPods"]["expr"]
    assert (
        alerts["ModelServerDown"]["expr"] == 'up{job="model-server",namespace=~"ml-serving|"} == 0'
    )
    assert 'alias="champion"' in alerts["ModelServedVersionNotChampion"]["expr"]
    assert 'feature!="__prediction__"' in alerts["ModelInputDrift"]["expr"]
    assert 'feature="__prediction__"' in alerts["ModelPredictionDrift"]["expr"]
    series_used = {
        name for rule in rules for name in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", rule["expr"])
    }
    assert series_used - EXTERNAL == {
        "model_server_requests_total",
        "model_server_request_duration_seconds_bucket",
        "model_server_model_version",
        "model_server_model_info",
    }

    # every model_server_* series and label the alerts use is one the server exports
    # (tests/integration/test_server_runtime.py checks it against a real server too)
    metrics = ServerMetrics()
    metrics.observe_request("/invocations", "POST", 500, 0.01)
    model = {"name": "regression-model", "version": "4", "uri": "models:/regression-model/4"}
    metrics.set_model({**model, "flavor": "python_function", "fast_path": "true"}, 1.0)
    exported = metrics.render().decode()
    missing = set()
    for rule in rules:
        for name in re.findall(r"\b(model_server_\w+)\{([^}]*)\}", rule["expr"]):
            series, labels = name
            if not re.search(rf"^{series}(\{{| )", exported, re.M):
                missing.add(series)
                continue
            for label in re.findall(r"(\w+)=~?\"", labels):
                if label in ("job", "namespace"):  # added by Prometheus
                    continue
                assert re.search(rf"^{series}\{{[^}}]*\b{label}=", exported, re.M), label
    assert 'route="/invocations"' in exported
    assert not missing, missing


def test_runbook_anchors_exist():
    """Each alert's runbook_url points at a heading of docs/operations.md."""
    doc = (REPO / "docs" / "operations.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    rules = manifests.prometheus_rule(DeploySettings())["spec"]["groups"][0]["rules"]
    for rule in rules:
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in headings, anchor


# -- the committed base and the CLI ---------------------------------------------------------------


RENDER_COMMAND = (
    "python -m serving.deploy render --model-uri models:/regression-model/1 --version 1 "
    f"--tracking-uri {TRACKING} --out-dir docker/k8s/base --prometheus-rules "
    "docker/prometheus/rules.yml --grafana-dashboard docker/grafana/model-server-dashboard.json"
    " && python -m serving.deploy render --model-uri models:/regression-model/1 --version 1 "
    f"--tracking-uri {TRACKING} --monitoring --out-dir docker/k8s/monitoring"
)


def test_committed_base_matches_render(clean_env):
    from serving.deploy.dashboard import DASHBOARD_PATH, dashboard_json

    settings = DeploySettings(target="kubernetes")
    expected = {
        f"docker/k8s/base/{name}": text
        for name, text in base_files(render(settings, **BASE_ARGS)).items()
    } | {
        f"docker/k8s/monitoring/{name}": text
        for name, text in base_files(render_monitoring(settings)).items()
    }
    expected[manifests.RULES_FILE] = manifests.prometheus_rules_file(settings)
    expected[DASHBOARD_PATH] = dashboard_json(settings)
    committed = {path: (REPO / path).read_text() for path in expected if (REPO / path).exists()} | {
        f"docker/k8s/{p.parent.name}/{p.name}": p.read_text()
        for p in [*BASE.glob("*.yaml"), *MONITORING.glob("*.yaml")]
    }
    assert committed.keys() == expected.keys()
    for path, text in expected.items():
        assert committed[path] == text, f"{path} is stale: regenerate with `{RENDER_COMMAND}`"


def test_rules_file_is_the_prometheus_rules_groups(clean_env):
    settings = DeploySettings(target="kubernetes")
    rules_file = yaml.safe_load(manifests.prometheus_rules_file(settings))
    assert rules_file == {"groups": manifests.prometheus_rule(settings)["spec"]["groups"]}


def test_dashboard_config_map_for_grafanas_sidecar(objects, settings):
    from serving.deploy.dashboard import DASHBOARD_FILE, dashboard_json

    config_map = one(objects, "ConfigMap")
    assert config_map["metadata"]["namespace"] == settings.namespace
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {DASHBOARD_FILE: dashboard_json(settings)}
    # A ConfigMap holds at most 1 MiB; client-side apply's annotation copy at most 256 KiB.
    assert len(yaml.safe_dump(config_map).encode()) < 200 * 1024


@pytest.mark.parametrize("base", [BASE, MONITORING], ids=["base", "monitoring"])
def test_base_is_a_kustomization_of_all_files(base):
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {
        p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml"
    }


def test_render_cli_writes_the_files(clean_env, tmp_path):
    from serving.deploy.__main__ import main
    from serving.deploy.dashboard import dashboard_json

    rules, board = tmp_path / "prometheus" / "rules.yml", tmp_path / "grafana" / "board.json"
    args = ["--model-uri", URI, "--version", "7", "--tracking-uri", TRACKING]
    assert main(["render", *args, "--out-dir", str(tmp_path / "base")]) == 0
    assert main(["render", *args, "--prometheus-rules", str(rules)]) == 0
    assert main(["render", *args, "--grafana-dashboard", str(board)]) == 0
    settings = DeploySettings()
    objects = render(settings, URI, "7", tracking_uri=TRACKING)
    assert {p.name: p.read_text() for p in (tmp_path / "base").iterdir()} == base_files(objects)
    assert rules.read_text() == manifests.prometheus_rules_file(settings)
    assert board.read_text() == dashboard_json(settings)


def test_render_cli_prints_the_same_objects(clean_env, capsys):
    from serving.deploy.__main__ import main

    assert main(["render", "--model-uri", URI, "--version", "7", "--tracking-uri", TRACKING]) == 0
    printed = list(yaml.safe_load_all(io.StringIO(capsys.readouterr().out)))
    assert printed == render(DeploySettings(), URI, "7", tracking_uri=TRACKING)


def test_render_cli_refuses_an_alias(clean_env, capsys):
    from serving.deploy.__main__ import main

    code = main(["render", "--model-uri", "models:/regression-model@champion", "--version", "7"])
    assert code == 2
    assert capsys.readouterr().out == ""


def test_rollout_applies_the_rendered_deployment(settings):
    """The rollout applies exactly render()'s Deployment: one source of truth."""
    from serving.deploy.kubernetes import KubernetesTarget

    target = KubernetesTarget(api=None, settings=settings, tracking_uri=TRACKING)  # type: ignore
    rendered = one(render(settings, URI, "7", tracking_uri=TRACKING), "Deployment")
    assert target._render(URI, "7") == rendered
