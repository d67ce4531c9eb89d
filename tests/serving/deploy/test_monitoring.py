"""The monitoring kustomize base (docker/k8s/monitoring): its files are the source, checked here.

The ServiceMonitor scrapes what the serving base's Service offers (its port name, /metrics) as
job model-server, the job every alert and panel selects by; the PrometheusRule's alerts, their
series (the server's really exported: tests/integration/test_server_runtime.py scrapes a real
one too) and runbook links; both against the part of the Prometheus Operator's CRD schemas they
use, transcribed from the operator's CRDs (v0.82-0.84) with unknown fields rejected
(kubernetes-validate has no schemas for custom resources). `kubectl kustomize` builds the base
(the dashboard's ConfigMap from the JSON) and the overlay docs/operations.md shows for
thresholds and the `release` label; without a kubectl those two skip with the reason.
The rules' behaviour is test_alert_rules.py's, the dashboard's test_dashboard.py's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.deploy.manifests import render, selector_labels
from serving.deploy.settings import DeploySettings
from tests.serving.deploy import monitoring
from tests.serving.deploy.monitoring import DASHBOARD, MONITORING, PROMETHEUS_RULE, SERVICE_MONITOR

REPO = monitoring.REPO
TRACKING = "http://mlflow.mlflow.svc.cluster.local:5000"
ALERTS = {
    "ModelServerHighErrorRate",
    "ModelServerHighLatency",
    "ModelServerNoReadyPods",
    "ModelServerDown",
    "ModelServedVersionNotChampion",
    "ModelInputDrift",
    "ModelPredictionDrift",
}
# Series of the alerts that others export (tests/serving/deploy/monitoring.py says who).
EXTERNAL = {
    "up",
    "mlflow_registry_alias_version",
    "pipeline_feature_drift_score",
    "pipeline_drift_threshold",
    "kube_deployment_status_replicas_available",
}
NO_KUBECTL = "no kubectl: `make k8s-tools` builds one (tests/k8s), or put one on PATH"


@pytest.fixture(scope="module")
def defaults() -> DeploySettings:
    """The settings the serving base (docker/k8s/base) is rendered with: the names the
    monitoring files spell out."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PIPELINE_DEPLOY_")}
    try:
        return DeploySettings(target="kubernetes")
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def service(defaults) -> dict:
    objects = render(defaults, "models:/regression-model/1", "1", tracking_uri=TRACKING)
    (svc,) = [
        o
        for o in objects
        if o["kind"] == "Service" and o["metadata"]["name"] == defaults.deployment_name
    ]
    return svc


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels; matchExpressions' Exists/DoesNotExist) on ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        if present != {"Exists": True, "DoesNotExist": False}[expression["operator"]]:
            return False
    return True


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def kubectl() -> str:
    """kubectl on PATH, else the k8s tier's (KUBEBUILDER_ASSETS or its build cache)."""
    from tests.k8s.cluster import cache_dir

    assets = os.environ.get("KUBEBUILDER_ASSETS")
    for folder in [Path(assets)] if assets else []:
        if os.access(folder / "kubectl", os.X_OK):
            return str(folder / "kubectl")
    found = shutil.which("kubectl")
    if found is None and os.access(cache_dir() / "kubectl", os.X_OK):
        found = str(cache_dir() / "kubectl")
    if found is None:
        pytest.skip(NO_KUBECTL)
    return found


SERVER_RULE, QUALITY_RULE = "PrometheusRule/model-server", "PrometheusRule/model-quality"
MONITOR, DASHBOARD_MAP = "ServiceMonitor/model-server", "ConfigMap/model-server-dashboard"


def kustomize(folder: Path) -> dict[str, dict]:
    """``kubectl kustomize folder``: the objects by ``kind/name``."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    keys = [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
    assert len(keys) == len(set(keys)), keys
    return dict(zip(keys, objects, strict=True))


# -- the kustomization ----------------------------------------------------------------------------


def test_the_kustomization_names_every_file():
    kustomization = _load(MONITORING / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {
        p.name for p in MONITORING.glob("*.yaml") if p.name != "kustomization.yaml"
    }
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [p.name for p in MONITORING.glob("*.json")] == [DASHBOARD.name]


def test_kustomize_builds_the_monitoring_objects(defaults):
    built = kustomize(MONITORING)
    rules = {f"PrometheusRule/{_load(p)['metadata']['name']}": _load(p)
             for p in MONITORING.glob("*rule.yaml")}  # fmt: skip
    assert SERVER_RULE in rules and QUALITY_RULE in rules
    assert set(built) == {MONITOR, DASHBOARD_MAP, *rules}
    assert built[MONITOR] == _load(SERVICE_MONITOR)
    assert {key: built[key] for key in rules} == rules
    # The dashboard for Grafana's sidecar, which loads ConfigMaps labelled grafana_dashboard: "1"
    config_map = built[DASHBOARD_MAP]
    assert config_map["metadata"]["name"] == f"{defaults.deployment_name}-dashboard"
    assert config_map["metadata"]["namespace"] == defaults.namespace
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    # A ConfigMap holds at most 1 MiB; client-side apply's annotation copy at most 256 KiB.
    assert len(yaml.safe_dump(config_map).encode()) < 200 * 1024
    labels = built[MONITOR]["metadata"]["labels"]
    for obj in built.values():
        assert obj["metadata"]["labels"].items() >= labels.items(), obj["kind"]
        assert obj["metadata"]["namespace"] == defaults.namespace


def _documented_overlay() -> str:
    """The overlay docs/operations.md shows (Alerts: changing a threshold)."""
    doc = (REPO / "docs" / "operations.md").read_text()
    (block,) = re.findall(r"```yaml\n(# overlays/monitoring/kustomization.yaml\n.*?)```", doc, re.S)
    return block


def test_the_documented_overlay_patches_a_threshold_and_adds_the_release_label(tmp_path):
    """What a cluster changes without editing this repository: a threshold and `for` of one
    alert (JSON patch, guarded by a `test` of the rule's name), and the `release` label that
    kube-prometheus-stack's Prometheus selects rules and monitors by."""
    overlay = tmp_path / "overlays" / "monitoring"
    overlay.mkdir(parents=True)
    text = _documented_overlay()
    base = "../../docker/k8s/monitoring"
    assert f"- {base}" in text
    # kustomize refuses an absolute path for a base
    text = text.replace(f"- {base}", f"- {os.path.relpath(MONITORING, overlay)}")
    (overlay / "kustomization.yaml").write_text(text)
    built = kustomize(overlay)
    for key, obj in built.items():
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", key
    assert built[MONITOR]["spec"] == _load(SERVICE_MONITOR)["spec"], "selector kept"
    patched = {r["alert"]: r for r in built[SERVER_RULE]["spec"]["groups"][0]["rules"]}
    latency = patched.pop("ModelServerHighLatency")
    assert latency["for"] == "15m" and latency["expr"].rstrip().endswith("> 0.5")
    assert (
        latency["expr"].replace("> 0.5", "> 0.25")
        == monitoring.alerts()["ModelServerHighLatency"]["expr"]
    )
    assert patched == {n: r for n, r in monitoring.alerts().items() if n != latency["alert"]}

    # the `test` op fails the build where the rule moved
    (overlay / "kustomization.yaml").write_text(text.replace("rules/1/alert", "rules/2/alert"))
    done = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True)
    assert done.returncode != 0 and "test" in done.stderr


# -- the ServiceMonitor --------------------------------------------------------------------------


def test_service_monitor_scrapes_the_services_metrics_route(defaults, service):
    from serving.server.app import _GET_ROUTES

    monitor = _load(SERVICE_MONITOR)
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics" and "/metrics" in _GET_ROUTES
    assert monitor["spec"]["selector"]["matchLabels"] == selector_labels(defaults)
    # One Service scraped, the serving one (its pods: both tracks), not the per-track Services
    # that select the same pods again (every series twice).
    services = render(defaults, "models:/regression-model/1", "1", tracking_uri=TRACKING)
    selected = [
        s["metadata"]["name"]
        for s in services
        if s["kind"] == "Service" and _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert selected == [defaults.deployment_name]
    assert _selects(service["spec"]["selector"], {**selector_labels(defaults), "track": "canary"})
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [defaults.namespace]}
    assert monitor["metadata"]["namespace"] == defaults.namespace


def test_the_server_is_job_model_server_in_a_cluster_as_locally(service):
    """The Prometheus Operator takes the job label from the Service label jobLabel names: the
    alerts and the dashboard select the server by job="model-server", the local Prometheus'
    job name too, whatever the Deployment is called."""
    from scripts.stacklib.prometheus import MODEL_SERVER_JOB

    source = _load(SERVICE_MONITOR)["spec"]["jobLabel"]
    assert service["metadata"]["labels"][source] == MODEL_SERVER_JOB == "model-server"
    other = DeploySettings(deployment_name="model-server-b", namespace="team-b")
    (svc,) = [
        o
        for o in render(other, "models:/m/1", "1", tracking_uri=TRACKING)
        if o["kind"] == "Service" and o["metadata"]["name"] == other.deployment_name
    ]
    assert svc["metadata"]["labels"][source] == MODEL_SERVER_JOB
    for rule in monitoring.alert_rules():
        for name, matchers in re.findall(r"\b(model_server_\w+|up)\{([^}]*)\}", rule["expr"]):
            assert f'job="{MODEL_SERVER_JOB}"' in matchers, (rule["alert"], name)


# -- the PrometheusRule ---------------------------------------------------------------------------


def test_alerts(defaults):
    from serving.server.metrics import ServerMetrics

    rules = monitoring.alert_rules()
    alerts = {r["alert"]: r for r in rules}
    assert set(alerts) == ALERTS and len(rules) == len(ALERTS)
    ns, name = defaults.namespace, defaults.deployment_name
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["labels"]["namespace"] == ns and rule["labels"]["deployment"] == name
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook_url"]
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
        # the server's series of this namespace, or of the local Prometheus (no namespace)
        for matchers in re.findall(r"\b(?:model_server_\w+|up)\{([^}]*)\}", expr):
            assert f'namespace=~"{ns}|"' in matchers, rule["alert"]
    assert 'status=~"5.."' in alerts["ModelServerHighErrorRate"]["expr"]
    assert "histogram_quantile(0.99" in alerts["ModelServerHighLatency"]["expr"]
    assert (
        f'kube_deployment_status_replicas_available{{namespace="{ns}",deployment="{name}"}}'
        in alerts["ModelServerNoReadyPods"]["expr"]
    )
    assert alerts["ModelServerDown"]["expr"] == f'up{{job="model-server",namespace=~"{ns}|"}} == 0'
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
    for rule in monitoring.alert_rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower() and anchor in headings, anchor


# -- CRD schemas ----------------------------------------------------------------------------------

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


SERVICE_MONITOR_SCHEMA = _crd(
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
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
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
RULE_SCHEMA = _crd(
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
    ("path", "schema"),
    [
        (SERVICE_MONITOR, SERVICE_MONITOR_SCHEMA),
        *((path, RULE_SCHEMA) for path in sorted(MONITORING.glob("*rule.yaml"))),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_monitoring_crds_match_their_schema(path, schema):
    jsonschema.validate(_load(path), schema)


def test_crd_schema_check_rejects_mistakes():
    """The hand-made schemas are strict enough to catch a typo."""
    monitor = _load(SERVICE_MONITOR)
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    rule = _load(PROMETHEUS_RULE)
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, RULE_SCHEMA)
