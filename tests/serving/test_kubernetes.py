"""The rollout pod: a real KubernetesPodOperator builds it; the Kubernetes schemas accept it."""

from __future__ import annotations

import os
import warnings

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes_validate.utils import all_versions, major_minor
from packaging.version import Version

from ml.settings import DeploySettings
from serving.kubernetes import rollout_pod_kwargs

MODEL_URI = "models:/regression-model/7"
TRACKING_URI = "http://mlflow.ml-platform.svc.cluster.local:5000"


def newest_minors(n: int = 3) -> list[str]:
    """The ``n`` newest Kubernetes minor versions kubernetes_validate ships schemas for."""
    minors = {major_minor(v) for v in all_versions()}
    return sorted(minors, key=Version)[-n:]


@pytest.fixture(scope="module")
def settings() -> DeploySettings:
    return DeploySettings(
        target="kubernetes",
        namespace="ml-serving",
        service_account="model-rollout",
        pipeline_image="registry.example.com/train-and-deploy/pipeline:1.2.3",
        kubernetes_conn_id="k8s_prod",
    )


@pytest.fixture(scope="module")
def kwargs(settings) -> dict:
    return rollout_pod_kwargs(settings, model_uri=MODEL_URI, version="7", tracking_uri=TRACKING_URI)


@pytest.fixture(scope="module")
def operator(kwargs):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated arguments
        return KubernetesPodOperator(task_id="rollout", **kwargs)


@pytest.fixture(scope="module")
def pod(operator) -> dict:
    # dry_run: no kube config or cluster needed to build the request object.
    return ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(dry_run=True))


def test_newest_minors_are_derived():
    minors = newest_minors()
    assert len(minors) == 3
    assert Version(minors[-1]) >= Version("1.31")


@pytest.mark.parametrize("k8s_version", newest_minors())
def test_pod_validates_strictly(pod, k8s_version):
    kubernetes_validate.validate(pod, k8s_version, strict=True)


def test_operator_settings(operator, settings):
    assert operator.kubernetes_conn_id == "k8s_prod"
    assert operator.namespace == settings.namespace
    assert operator.get_logs is True
    assert operator.on_finish_action.value == "delete_succeeded_pod"
    assert operator.durable is True and operator.reattach_on_restart is True
    assert operator.deferrable is False
    assert operator.startup_timeout_seconds >= 120


def test_command_pins_the_model_version(pod, settings):
    container = pod["spec"]["containers"][0]
    assert container["image"] == settings.pipeline_image
    assert container["command"] == ["python", "-m", "serving"]
    args = container["args"]
    assert args[0] == "rollout"
    assert args[args.index("--model-uri") + 1] == MODEL_URI
    assert args[args.index("--version") + 1] == "7"
    assert args[args.index("--namespace") + 1] == settings.namespace
    assert args[args.index("--deployment") + 1] == settings.deployment_name
    assert not any("@" in a for a in args), "an alias must never reach the rollout pod"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == TRACKING_URI


def test_pod_identity(pod, settings):
    meta = pod["metadata"]
    assert meta["namespace"] == settings.namespace
    assert meta["name"].startswith("model-rollout")
    assert meta["labels"]["app.kubernetes.io/name"] == "model-rollout"
    assert meta["labels"]["app.kubernetes.io/version"] == "7"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "airflow"
    assert pod["spec"]["serviceAccountName"] == settings.service_account
    assert pod["spec"]["restartPolicy"] == "Never"


def test_restricted_pod_security(pod):
    spec = pod["spec"]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not spec.get("hostNetwork")
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert sc.get("privileged") is not True
    # restricted allows only these volume types; a read-only root needs a writable /tmp.
    allowed = {
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
    for volume in spec.get("volumes", []):
        assert set(volume) <= allowed, volume
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert "/tmp" in mounts


def test_resources(pod):
    resources = pod["spec"]["containers"][0]["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"]
        assert key in resources["limits"]


@pytest.mark.parametrize(
    ("uri", "version"),
    [
        ("models:/regression-model@champion", "7"),
        ("models:/regression-model/latest", "7"),
        ("runs:/abc/model", "7"),
        ("models:/regression-model/8", "7"),
    ],
)
def test_rejects_unpinned_or_mismatched_uri(settings, uri, version):
    with pytest.raises(ValueError):
        rollout_pod_kwargs(settings, model_uri=uri, version=version, tracking_uri=TRACKING_URI)


def test_pod_env_reproduces_every_deploy_setting_in_the_pod(monkeypatch):
    from ml.settings import DeploySettings
    from serving.kubernetes import settings_env

    custom = DeploySettings(
        serving_cpu="2",
        serving_memory="3Gi",
        smoke_timeout_s=12.5,
        min_replicas=3,
        allowed_client_namespaces=["airflow", "batch"],
        monitoring_labels={"release": "kps"},
        service_url="http://model.example:80",
    )
    env = settings_env(custom)
    assert not any(key.startswith("PIPELINE_DEPLOY_LOCAL_") for key in env)
    # How workers reach the endpoint is not how the pod does (in-cluster Service).
    assert "PIPELINE_DEPLOY_SERVICE_URL" not in env
    for key in list(os.environ):
        if key.startswith("PIPELINE_DEPLOY_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rebuilt = DeploySettings()
    local_fields = {n for n in DeploySettings.model_fields if n.startswith("local_")}
    local_fields.add("service_url")
    assert rebuilt.model_dump(exclude=local_fields) == custom.model_dump(exclude=local_fields)
