"""The pipeline image, built here with podman, running the pods the DAGs build.

No cluster exists here, so the pod is not scheduled: the test builds it exactly as the DAG
does (``KubernetesPodOperator(...).build_pod_request_obj()`` from the same kwargs function)
and starts its container with podman the way a kubelet would: the pod's command, args, env,
user, read-only root, dropped capabilities, the ``/tmp`` emptyDir and the data volume. Host
network, so the container reaches the test's loopback MLflow server. CPU and memory limits
are not applied (podman's cgroup setup varies by machine); the rest of the pod is.

* **training pod**: ``python -m ml train`` trains on the window's partitions and logs to a real
  ``mlflow server``, its run tagged with the step's run key; there is no XCom sidecar: the
  next DAG step reads the result from the run (``ml.pipeline.trained_by``, as the DAG's
  ``training_result`` does) and the steps after it (evaluate, register) consume it.

The rollout pod is run against a real control plane by tests/k8s (in-process there).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient

from ml.settings import DataSettings, RegistrySettings, TrainingSettings
from serving.deploy.settings import DeploySettings
from tests.container.conftest import build_image, podman, tail

pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.timeout(1800)]

IMAGE = os.environ.get("PIPELINE_IMAGE", "train-and-deploy/pipeline:latest")
LOCAL_IMAGE = IMAGE if IMAGE.startswith("localhost/") else f"localhost/{IMAGE}"
MODEL = "pipeline-image-test-model"
NAMESPACE = "ml-serving"
DEPLOYMENT = "model-server"


@pytest.fixture(scope="session")
def pipeline_image(container_base) -> str:
    """The pipeline image, freshly built (after the base: skips where containers cannot run)."""
    build_image("pipeline", IMAGE)
    return LOCAL_IMAGE


@pytest.fixture(scope="module")
def host_dirs():
    """Host folders standing in for the pod's volumes, readable by the image's user."""
    root = Path(tempfile.mkdtemp(prefix="tad-pipeline-pod-"))
    dirs = {name: root / name for name in ("data",)}
    for path in dirs.values():
        path.mkdir()
    yield dirs
    shutil.rmtree(root, ignore_errors=True)


def _open_up(path: Path, *, writable: bool = False) -> None:
    """uid 10001 in the container must read (and for emptyDirs, write) the bind mounts."""
    mode = 0o777 if writable else 0o755
    for item in [path, *path.rglob("*")]:
        item.chmod(mode if item.is_dir() else (mode & 0o666 if writable else 0o644))
    path.chmod(mode | (stat.S_ISVTX if writable else 0))


def _pod(operator_kwargs: dict[str, Any], task_id: str) -> dict[str, Any]:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    operator = KubernetesPodOperator(task_id=task_id, **operator_kwargs)
    return ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(dry_run=True))


def _container_args(
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    image: str,
    name: str,
    host_paths: dict[str, Path],
    extra_env: dict[str, str] | None = None,
    extra_volumes: tuple[str, ...] = (),
    detach: bool = False,
) -> list[str]:
    """``podman run`` arguments that start ``container`` of ``pod`` like a kubelet would."""
    sc = {**pod["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    args = ["run", *(["--detach"] if detach else []), "--name", name, "--network", "host"]
    args += ["--pull", "never"]
    args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    if "ALL" in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", "ALL"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    assert not sc.get("privileged"), "a restricted pod never runs privileged"
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for key, value in {**env, **(extra_env or {})}.items():
        args += ["--env", f"{key}={value}"]
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        read_only = ",ro" if mount.get("readOnly") else ""
        if mount["name"] in host_paths:  # shared emptyDir or a PVC: a host folder
            args += ["--volume", f"{host_paths[mount['name']]}:{mount['mountPath']}:Z{read_only}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "64Mi").replace("i", "").lower()
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
        else:
            raise AssertionError(f"volume {volume} has no stand-in here")
    for volume_arg in extra_volumes:
        args += ["--volume", volume_arg]
    command = container["command"]
    return [*args, "--entrypoint", command[0], image, *command[1:], *container.get("args", [])]


def _logs(name: str) -> str:
    logs = podman("logs", name)
    return tail(logs.stdout + logs.stderr, 80)


def _settings(host_dirs, mlflow_server) -> tuple[DataSettings, TrainingSettings, DeploySettings]:
    data = DataSettings(path=str(host_dirs["data"]), window_days=3, synthetic_rows_per_day=200)
    training = TrainingSettings(
        runner="kubernetes", epochs=3, hidden_units=[16], pod_cpu="1", pod_data_claim="data"
    )
    deploy = DeploySettings(
        target="kubernetes",
        namespace=NAMESPACE,
        deployment_name=DEPLOYMENT,
        pipeline_image=LOCAL_IMAGE,
        health_timeout_s=90,
    )
    return data, training, deploy


@pytest.fixture(scope="module")
def kubernetes_connection():
    """The Connection the operator reads; it names an XCom sidecar image, and the training
    pod gets no sidecar all the same."""
    mp = pytest.MonkeyPatch()
    extra = {"xcom_sidecar_container_image": LOCAL_IMAGE}
    mp.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": extra})
    )
    yield
    mp.undo()


RUN_KEY = "train_and_deploy/container__1/train"
REGISTRY = RegistrySettings(model_name=MODEL, experiment_name="pipeline-image-test")


@pytest.fixture(scope="module")
def trained_in_pod(pipeline_image, mlflow_server, host_dirs, kubernetes_connection):
    """Run the training pod; return the window, the settings and the result the next task
    reads from the pod's run."""
    from ml import pipeline
    from serving.deploy.pods import training_pod_kwargs

    data, training, deploy = _settings(host_dirs, mlflow_server)
    window = pipeline.load_window(data, date(2026, 3, 10))
    assert len(window["partitions"]) == 3
    _open_up(host_dirs["data"])

    kwargs = training_pod_kwargs(
        training,
        data,
        deploy,
        window=json.dumps(window),
        tracking_uri=mlflow_server,
        epochs="3",
        learning_rate="0.01",
        batch_size="32",
        tags={
            "airflow_dag_id": "train_and_deploy",
            "airflow_run_id": "container__1",
            "pipeline_run_key": RUN_KEY,
        },
        execution_timeout_s=900,
        registry=REGISTRY,
    )
    pod = _pod(kwargs, "train")
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"base"}, "no XCom sidecar"
    main_name = f"tad-train-{os.getpid()}"
    host_paths = {"data": host_dirs["data"]}
    podman("rm", "--force", "--ignore", main_name)
    try:
        began = time.monotonic()
        run = podman(
            *_container_args(
                pod, containers["base"], image=pipeline_image, name=main_name, host_paths=host_paths
            ),
            timeout=900,
        )
        print(f"training pod ran {time.monotonic() - began:.1f}s, exit {run.returncode}")
        assert run.returncode == 0, f"training pod failed:\n{_logs(main_name)}"
        # What the DAG's training_result task does next: the result, from the pod's run.
        trained = pipeline.trained_by(RUN_KEY, REGISTRY, tracking_uri=mlflow_server)
        yield {"window": window, "trained": trained, "settings": (data, training, deploy)}
    except BaseException:
        print(f"training pod logs:\n{_logs(main_name)}")
        raise
    finally:
        podman("rm", "--force", "--ignore", "--time", "5", main_name, timeout=60)


@pytest.fixture(scope="module")
def registered(trained_in_pod, mlflow_server):
    """The DAG's next steps, in this process, on what the pod handed over: evaluate, register.

    A first version of the same model is registered before, as the one already live.
    """
    import mlflow

    from ml import pipeline

    window, trained = trained_in_pod["window"], trained_in_pod["trained"]
    data, _, _ = trained_in_pod["settings"]
    registry = REGISTRY
    mlflow.set_tracking_uri(mlflow_server)
    try:
        live = mlflow.register_model(trained["model_uri"], MODEL).version
        evaluation = pipeline.evaluate(window, trained, data, registry, tracking_uri=mlflow_server)
        version = pipeline.register(
            window, trained, evaluation, registry, tracking_uri=mlflow_server
        )
    finally:
        mlflow.set_tracking_uri(None)
    return {"live": str(live), "version": version, "evaluation": evaluation}


def test_training_pod_logs_the_run_and_hands_it_over(
    pipeline_image, trained_in_pod, registered, mlflow_server
):
    from mlflow import MlflowClient

    trained = trained_in_pod["trained"]
    run = MlflowClient(mlflow_server).get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["airflow_run_id"] == "container__1"
    assert run.data.tags["pipeline_run_key"] == RUN_KEY
    # The pod ran in the worker's experiment: where training_result looks for it.
    assert MlflowClient(mlflow_server).get_experiment(run.info.experiment_id).name == (
        REGISTRY.experiment_name
    )
    assert run.data.tags["data_digest"] == trained_in_pod["window"]["digest"]
    # Resources became threads; the Params came through the pod's arguments.
    assert run.data.params["threads"] == "1"
    assert run.data.params["epochs"] == "3"
    assert run.data.params["learning_rate"] == "0.01"
    # The next steps took the pod's result as they take the in-worker task's.
    assert registered["evaluation"]["candidate"]["rmse"] > 0
    version = registered["version"]
    assert int(version["version"]) == int(registered["live"]) + 1
    assert version["model_uri"] == f"models:/{MODEL}/{version['version']}"
