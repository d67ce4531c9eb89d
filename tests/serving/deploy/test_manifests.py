"""The Kubernetes manifests of the kubernetes deploy target (serving.manifests): fast checks.

Every kind validates strictly against the OpenAPI schemas kubernetes-validate ships, for the
three newest Kubernetes minors it knows. The monitoring objects are files, not rendered:
test_monitoring.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.deploy import manifests
from serving.deploy.manifests import UnpinnedModelURI, base_files, render
from serving.deploy.settings import DeploySettings
from tests.k8s_schemas import newest_minors

URI = "models:/regression-model/7"
TRACKING = "http://mlflow.mlflow.svc.cluster.local:5000"
REPO = Path(__file__).resolve().parents[3]
BASE = REPO / "docker" / "k8s" / "base"
# What docker/k8s/base/ was generated with (see the GENERATED_HEADER in its files).
BASE_ARGS = {"model_uri": "models:/regression-model/1", "version": "1", "tracking_uri": TRACKING}


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
    )


@pytest.fixture
def objects(settings) -> list[dict]:
    return render(settings, URI, "7", tracking_uri=TRACKING)


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
        "Service",  # the stable track's
        "Service",  # the canary track's
        "Deployment",
        "Deployment",  # the canary, at 0 replicas
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    assert one(objects, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


@pytest.mark.parametrize("k8s_version", newest_minors())
def test_builtin_kinds_validate_strictly(objects, k8s_version):
    for obj in objects:
        kubernetes_validate.validate(obj, k8s_version, strict=True)


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
    # exactly what serving.deploy.kube_api.KubeApi calls (tests/k8s runs every rollout with
    # this Role's token against a real API server), and nothing else: the serving Deployment
    # and its canary (without a Gateway, no HTTPRoute: test_canary.py)
    name = (settings.deployment_name, f"{settings.deployment_name}-canary")
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


# -- the committed base and the CLI ---------------------------------------------------------------


RENDER_COMMAND = (
    "python -m serving.deploy render --model-uri models:/regression-model/1 --version 1 "
    f"--tracking-uri {TRACKING} --out-dir docker/k8s/base"
)


def test_committed_base_matches_render(clean_env):
    settings = DeploySettings(target="kubernetes")
    expected = base_files(render(settings, **BASE_ARGS))
    committed = {p.name: p.read_text() for p in BASE.iterdir()}
    assert committed.keys() == expected.keys()
    for name, text in expected.items():
        assert committed[name] == text, f"{name} is stale: regenerate with `{RENDER_COMMAND}`"


def test_base_is_a_kustomization_of_all_files():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {
        p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"
    }


def test_render_cli_writes_the_files(clean_env, tmp_path):
    from serving.deploy.__main__ import main

    args = ["--model-uri", URI, "--version", "7", "--tracking-uri", TRACKING]
    assert main(["render", *args, "--out-dir", str(tmp_path / "base")]) == 0
    objects = render(DeploySettings(), URI, "7", tracking_uri=TRACKING)
    assert {p.name: p.read_text() for p in (tmp_path / "base").iterdir()} == base_files(objects)


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


def test_the_payload_log_goes_to_the_claim_or_the_url_never_to_the_pods_own_disk(settings):
    def pod(**changes):
        deployment = manifests.deployment(
            settings.model_copy(update=changes), URI, "7", tracking_uri=TRACKING
        )
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        return container, spec["volumes"]

    container, volumes = pod()  # neither: no payload log
    assert "--payload-log-path" not in container["args"]
    assert [v["name"] for v in volumes] == ["tmp"]
    container, volumes = pod(payload_log_claim="payload-log", payload_log_sample_percent=25)
    args = container["args"]
    assert args[args.index("--payload-log-path") + 1] == manifests.PAYLOAD_LOG_MOUNT
    assert args[args.index("--payload-log-sample-percent") + 1] == "25"
    assert {"name": "payload-log", "mountPath": manifests.PAYLOAD_LOG_MOUNT} in container[
        "volumeMounts"
    ]
    assert {"name": "payload-log", "persistentVolumeClaim": {"claimName": "payload-log"}} in volumes
    container, volumes = pod(payload_log_url="s3://bucket/payload-log")
    args = container["args"]
    assert args[args.index("--payload-log-path") + 1] == "s3://bucket/payload-log"
    assert [v["name"] for v in volumes] == ["tmp"]
    container, _ = pod(payload_log_url="s3://bucket/payload-log", payload_log_sample_percent=0)
    assert "--payload-log-path" not in container["args"]
