"""Every pipeline pod (training, rollout): a real KubernetesPodOperator builds it; the Kubernetes
schemas accept it."""

from __future__ import annotations

import json
import os
import warnings

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from ml.settings import DataSettings, TrainingSettings
from serving.deploy.pods import cpu_threads, rollout_pod_kwargs, training_pod_kwargs
from serving.deploy.settings import DeploySettings
from tests.k8s_schemas import newest_minors

TRACKING_URI = "http://mlflow.ml-platform.svc.cluster.local:5000"
PIPELINE_IMAGE = "registry.example.com/train-and-deploy/pipeline:1.2.3"
WINDOW = '{"start": "2026-03-01", "end": "2026-03-08", "partitions": []}'


def _settings(**training) -> tuple[TrainingSettings, DataSettings, DeploySettings]:
    return (
        TrainingSettings(runner="kubernetes", pod_cpu="1500m", pod_memory="3Gi", **training),
        DataSettings(path="/data/electricity", feature_columns=["a", "b"], window_days=14),
        DeploySettings(
            namespace="ml-serving",
            pipeline_image=PIPELINE_IMAGE,
            kubernetes_conn_id="k8s_prod",
            pod_env_secret="mlflow-credentials",
        ),
    )


def _kwargs(training, data, deploy) -> dict:
    return training_pod_kwargs(
        training,
        data,
        deploy,
        window=WINDOW,
        tracking_uri=TRACKING_URI,
        epochs="12",
        learning_rate="0.01",
        batch_size="32",
        tags={"airflow_dag_id": "train_and_deploy", "airflow_run_id": "manual__1"},
        execution_timeout_s=3600,
    )


@pytest.fixture(autouse=True, scope="module")
def kubernetes_connection():
    """The Connection the pods' operator reads. It names an XCom sidecar image: no pipeline
    pod may get a sidecar all the same (their results are in MLflow, not in XCom)."""
    extra = {"xcom_sidecar_container_image": PIPELINE_IMAGE, "in_cluster": False}
    mp = pytest.MonkeyPatch()
    mp.setenv("AIRFLOW_CONN_K8S_PROD", json.dumps({"conn_type": "kubernetes", "extra": extra}))
    yield
    mp.undo()


def _pod(kwargs) -> dict:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated arguments
        train = KubernetesPodOperator(task_id="train", **kwargs)
    # dry_run: no kube config or cluster needed (an XCom sidecar would be added all the same).
    return ApiClient().sanitize_for_serialization(train.build_pod_request_obj(dry_run=True))


@pytest.fixture(scope="module")
def settings():
    return _settings(pod_data_claim="training-data")


@pytest.fixture(scope="module")
def pod(settings) -> dict:
    return _pod(_kwargs(*settings))


@pytest.mark.parametrize("k8s_version", newest_minors())
def test_training_pod_validates_strictly(pod, k8s_version):
    kubernetes_validate.validate(pod, k8s_version, strict=True)


def test_runs_ml_train_with_no_xcom_sidecar(settings, pod):
    """The run records its result in MLflow (ml.pipeline.train), where the next task reads it
    (ml.pipeline.trained_by): no sidecar, no XCom file, no `pods/exec` right for Airflow."""
    assert _kwargs(*settings)["do_xcom_push"] is False
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"base"}
    main = containers["base"]
    assert main["image"] == PIPELINE_IMAGE
    assert main["command"] == ["python", "-m", "ml"]
    args = main["args"]
    assert args[0] == "train"
    assert args[args.index("--window") + 1] == WINDOW
    assert args[args.index("--epochs") + 1] == "12"
    assert "--output" not in args
    tags = [args[i + 1] for i, a in enumerate(args) if a == "--tag"]
    assert tags == ["airflow_dag_id=train_and_deploy", "airflow_run_id=manual__1"]
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert "/airflow/xcom" not in mounts


def test_every_container_is_restricted(pod):
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", container["name"]
    # Training never talks to the API server.
    assert spec["automountServiceAccountToken"] is False


def test_guaranteed_resources_and_threads_sized_to_the_limit(pod):
    main = pod["spec"]["containers"][0]
    assert main["resources"]["requests"] == main["resources"]["limits"]
    assert main["resources"]["limits"] == {"cpu": "1500m", "memory": "3Gi"}
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["PIPELINE_TRAIN_THREADS"] == "2"
    assert env["OMP_NUM_THREADS"] == "2"
    assert pod["spec"]["activeDeadlineSeconds"] == 3600


def test_data_claim_is_mounted_read_only_at_the_data_path(pod):
    claims = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "training-data", "readOnly": True}}
    ]
    mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/data/electricity", "readOnly": True}


@pytest.mark.parametrize("path", ["s3://bucket/data", "relative/data"])
def test_data_claim_needs_an_absolute_data_path(path):
    training, data, deploy = _settings(pod_data_claim="training-data")
    with pytest.raises(ValueError, match="absolute path"):
        _kwargs(training, data.model_copy(update={"path": path}), deploy)


def test_credentials_come_from_the_secret_and_the_uri_may_differ_for_pods(settings):
    training, data, deploy = settings
    pod = _pod(_kwargs(training, data, deploy.model_copy(update={"pod_tracking_uri": "http://m"})))
    main = pod["spec"]["containers"][0]
    assert main["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://m"
    assert not any("PASSWORD" in name for name in env)


def test_pod_env_rebuilds_the_workers_data_and_training_settings(settings, monkeypatch):
    training, data, deploy = settings
    pod = _pod(_kwargs(training, data, deploy))
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    for key in list(os.environ):
        if key.startswith(("PIPELINE_DATA_", "PIPELINE_TRAIN_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert DataSettings() == data
    pod_fields = {n for n in TrainingSettings.model_fields if n.startswith("pod_")}
    rebuilt = TrainingSettings().model_dump(exclude=pod_fields | {"threads"})
    assert rebuilt == training.model_dump(exclude=pod_fields | {"threads"})
    assert TrainingSettings().threads == 2


def test_the_pod_trains_in_the_experiment_the_next_task_reads_it_from(settings, monkeypatch):
    """training_result finds the pod's run by its run key in the worker's experiment
    (ml.pipeline.trained_by): the pod must log there, not in the default one."""
    from ml.settings import RegistrySettings

    training, data, deploy = settings
    for key in list(os.environ):
        if key.startswith("PIPELINE_REGISTRY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIPELINE_REGISTRY_EXPERIMENT_NAME", "sales-nightly")
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", "sales-forecast")
    worker = RegistrySettings()
    pod = _pod(_kwargs(training, data, deploy))
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    monkeypatch.delenv("PIPELINE_REGISTRY_EXPERIMENT_NAME")
    monkeypatch.delenv("PIPELINE_REGISTRY_MODEL_NAME")
    assert RegistrySettings().experiment_name != "sales-nightly"  # the default differs
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert RegistrySettings() == worker
    explicit = RegistrySettings(experiment_name="other")
    kwargs = training_pod_kwargs(
        training, data, deploy, window=WINDOW, tracking_uri=TRACKING_URI, epochs="1",
        learning_rate="0.1", batch_size="8", tags={}, execution_timeout_s=60, registry=explicit,
    )  # fmt: skip
    assert kwargs["env_vars"]["PIPELINE_REGISTRY_EXPERIMENT_NAME"] == "other"


@pytest.mark.parametrize(
    ("quantity", "threads"), [("1", 1), ("2", 2), ("1500m", 2), ("250m", 1), ("0.5", 1)]
)
def test_cpu_threads(quantity, threads):
    assert cpu_threads(quantity) == threads


@pytest.mark.parametrize("quantity", ["two", "1.5k", "-1", ""])
def test_cpu_threads_rejects_non_quantities(quantity):
    with pytest.raises(ValueError, match="CPU quantity"):
        cpu_threads(quantity)


# -- the rollout pod ------------------------------------------------------------------------

REQUEST = json.dumps({"kind": "version", "version": "7", "reason": "roll 'back' <now>"})


@pytest.fixture(scope="module")
def rollout_settings() -> DeploySettings:
    return DeploySettings(
        target="kubernetes",
        namespace="ml-serving",
        service_account="model-rollout",
        pipeline_image="registry.example.com/train-and-deploy/pipeline:1.2.3",
        kubernetes_conn_id="k8s_prod",
    )


@pytest.fixture(scope="module")
def rollout_kwargs(rollout_settings) -> dict:
    return rollout_pod_kwargs(rollout_settings, request=REQUEST, tracking_uri=TRACKING_URI)


@pytest.fixture(scope="module")
def rollout_operator(rollout_kwargs):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated arguments
        return KubernetesPodOperator(task_id="rollout", **rollout_kwargs)


@pytest.fixture(scope="module")
def rollout_pod(rollout_operator) -> dict:
    # dry_run: no kube config or cluster needed to build the request object.
    return ApiClient().sanitize_for_serialization(
        rollout_operator.build_pod_request_obj(dry_run=True)
    )


@pytest.mark.parametrize("k8s_version", newest_minors())
def test_pod_validates_strictly(rollout_pod, k8s_version):
    kubernetes_validate.validate(rollout_pod, k8s_version, strict=True)


def test_operator_settings(rollout_operator, rollout_settings):
    assert rollout_operator.kubernetes_conn_id == "k8s_prod"
    assert rollout_operator.namespace == rollout_settings.namespace
    assert rollout_operator.get_logs is True
    assert rollout_operator.on_finish_action.value == "delete_succeeded_pod"
    assert rollout_operator.durable is True and rollout_operator.reattach_on_restart is True
    assert rollout_operator.deferrable is False
    assert rollout_operator.startup_timeout_seconds >= 120


def test_command_runs_the_rollout_path_for_the_request(rollout_pod, rollout_settings):
    from serving.deploy.__main__ import build_parser
    from serving.deploy.rollout import Request

    container = rollout_pod["spec"]["containers"][0]
    assert container["image"] == rollout_settings.pipeline_image
    assert container["command"] == ["python", "-m", "serving.deploy"]
    args = container["args"]
    assert args == [
        "rollout",
        *("--request", REQUEST),
        *("--target", "kubernetes"),
        *("--namespace", rollout_settings.namespace),
        *("--deployment", rollout_settings.deployment_name),
    ]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "rollout" and parsed.version is None
    assert Request.from_dict(parsed.request) == Request.from_dict(REQUEST)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == TRACKING_URI
    # The pod moves @champion and tags versions: the registry settings travel too.
    assert env["PIPELINE_REGISTRY_MODEL_NAME"] and env["PIPELINE_REGISTRY_CHAMPION_ALIAS"]
    assert env["PIPELINE_DEPLOY_TARGET"] == "kubernetes"


def test_the_request_is_the_only_thing_a_rollout_pod_is_told():
    """No pinned URI or version bypasses the rollout path: the request (JSON text, or in a
    DAG the XComArg of the task that decided it) is required, keyword-only."""
    import inspect

    signature = inspect.signature(rollout_pod_kwargs)
    # env: settings only (a run's Params as templates); what goes live is the request's.
    assert set(signature.parameters) == {"settings", "tracking_uri", "request", "registry", "env"}
    request = signature.parameters["request"]
    assert request.kind is inspect.Parameter.KEYWORD_ONLY
    assert request.default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        rollout_pod_kwargs(DeploySettings(), tracking_uri=TRACKING_URI)  # type: ignore[call-arg]


def test_the_pod_outlives_a_wedged_rollout_by_its_own_deadlines():
    """activeDeadlineSeconds: the version's rollout, its undo or the previous version's
    redeploy (each at most a progress deadline), two API retry windows, 5 minutes' slack."""
    settings = DeploySettings(progress_deadline_s=200, api_retry_s=30.5)
    kwargs = rollout_pod_kwargs(settings, request=REQUEST, tracking_uri=TRACKING_URI)
    assert kwargs["active_deadline_seconds"] == 200 * 3 + 61 + 300
    assert kwargs["do_xcom_push"] is False


def test_pod_identity(rollout_pod, rollout_settings):
    meta = rollout_pod["metadata"]
    assert meta["namespace"] == rollout_settings.namespace
    assert meta["name"].startswith("model-rollout")
    assert meta["labels"]["app.kubernetes.io/name"] == "model-rollout"
    # The version is decided when the rollout runs (a request may be "what @champion names"):
    # labels are not templated, so the pod carries none.
    assert "app.kubernetes.io/version" not in meta["labels"]
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "airflow"
    assert rollout_pod["spec"]["serviceAccountName"] == rollout_settings.service_account
    assert rollout_pod["spec"]["restartPolicy"] == "Never"


def test_restricted_pod_security(rollout_pod):
    spec = rollout_pod["spec"]
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


def test_resources(rollout_pod):
    resources = rollout_pod["spec"]["containers"][0]["resources"]
    for key in ("cpu", "memory"):
        assert key in resources["requests"]
        assert key in resources["limits"]


def test_pod_env_reproduces_every_deploy_setting_in_the_pod(monkeypatch):
    from serving.deploy.pods import deploy_settings_env as settings_env
    from serving.deploy.settings import DeploySettings

    custom = DeploySettings(
        serving_cpu="2",
        serving_memory="3Gi",
        progress_deadline_s=200,
        api_retry_s=12.5,
        min_replicas=3,
        allowed_client_namespaces=["airflow", "batch"],
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
