"""The pipeline image, built here with podman, running the pods the DAGs build.

No cluster exists here, so the pods are not scheduled: each test builds its pod exactly as the
DAG does (``KubernetesPodOperator(...).build_pod_request_obj()`` from the same kwargs
functions) and starts its containers with podman the way a kubelet would: the pod's command,
args, env, user, read-only root, dropped capabilities, emptyDir volumes (``/tmp``, the XCom
folder shared with the sidecar) and the data volume. Host network, so the containers reach
the test's loopback servers. CPU and memory limits are not applied (podman's cgroup setup
varies by machine); the rest of the pod is.

* **training pod**: ``python -m ml train`` trains on the window's partitions and logs to a real
  ``mlflow server``; the XCom sidecar (the pipeline image standing in for alpine, as
  docs/operations.md suggests for clusters that cannot pull it) hands the result over with
  the provider's own commands; the next DAG steps (evaluate, register) consume it.
* **rollout pod**: ``python -m serving.deploy rollout`` in the image, through the real
  ``kubernetes`` client and a kubeconfig, against the Kubernetes API test double
  (tests/serving/deploy/k8s_fake.py)
  serving real HTTP, rolls the registered version out.
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
    dirs = {name: root / name for name in ("data", "xcom", "kube")}
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
        smoke_timeout_s=20,
    )
    return data, training, deploy


@pytest.fixture(scope="module")
def kubernetes_connection():
    """The Connection the operator reads the XCom sidecar's image from: the pipeline image."""
    mp = pytest.MonkeyPatch()
    extra = {"xcom_sidecar_container_image": LOCAL_IMAGE}
    mp.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": extra})
    )
    yield
    mp.undo()


@pytest.fixture(scope="module")
def trained_in_pod(pipeline_image, mlflow_server, host_dirs, kubernetes_connection):
    """Run the training pod; return the window, the settings and the XCom it handed over."""
    from airflow.providers.cncf.kubernetes.utils.pod_manager import EMPTY_XCOM_RESULT
    from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults

    from ml import pipeline
    from serving.deploy.pods import training_pod_kwargs

    data, training, deploy = _settings(host_dirs, mlflow_server)
    window = pipeline.load_window(data, date(2026, 3, 10))
    assert len(window["partitions"]) == 3
    _open_up(host_dirs["data"])
    _open_up(host_dirs["xcom"], writable=True)

    kwargs = training_pod_kwargs(
        training,
        data,
        deploy,
        window=json.dumps(window),
        tracking_uri=mlflow_server,
        epochs="3",
        learning_rate="0.01",
        batch_size="32",
        tags={"airflow_dag_id": "train_and_deploy", "airflow_run_id": "container__1"},
        execution_timeout_s=900,
    )
    pod = _pod(kwargs, "train")
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    sidecar_spec = containers[PodDefaults.SIDECAR_CONTAINER_NAME]
    assert sidecar_spec["image"] == LOCAL_IMAGE
    suffix = os.getpid()
    main_name, sidecar_name = f"tad-train-{suffix}", f"tad-xcom-{suffix}"
    host_paths = {"xcom": host_dirs["xcom"], "data": host_dirs["data"]}
    for name in (main_name, sidecar_name):
        podman("rm", "--force", "--ignore", name)
    started = podman(
        *_container_args(
            pod,
            sidecar_spec,
            image=LOCAL_IMAGE,
            name=sidecar_name,
            host_paths=host_paths,
            detach=True,
        )
    )
    assert started.returncode == 0, started.stderr
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
        # What PodManager.extract_xcom_json runs in the sidecar, then its fallback kill.
        read = podman(
            "exec",
            sidecar_name,
            "/bin/sh",
            "-c",
            f"if [ -s {PodDefaults.XCOM_MOUNT_PATH}/return.json ]; "
            f"then cat {PodDefaults.XCOM_MOUNT_PATH}/return.json; "
            f"else echo {EMPTY_XCOM_RESULT}; fi",
        )
        assert read.returncode == 0, read.stderr
        assert read.stdout.strip() != EMPTY_XCOM_RESULT, "the pod wrote no XCom result"
        trained = json.loads(read.stdout)
        kill = podman(
            "exec",
            sidecar_name,
            "/bin/sh",
            "-c",
            "for f in /proc/[0-9]*/comm; do "
            '[ -O $f ] && read c < $f && [ "$c" = "sh" ] && pid=${f%/comm} && kill -2 ${pid##*/}; '
            "done",
        )
        # The exec's own shell is an `sh` too and gets the SIGINT (130), as in the provider.
        assert kill.returncode in (0, 130), kill.stderr
        exited = podman("wait", sidecar_name, timeout=30)
        assert exited.stdout.strip() == "0", f"sidecar exit {exited.stdout}{exited.stderr}"
        yield {"window": window, "trained": trained, "settings": (data, training, deploy)}
    except BaseException:
        print(f"training pod logs:\n{_logs(main_name)}")
        raise
    finally:
        for name in (main_name, sidecar_name):
            podman("rm", "--force", "--ignore", "--time", "5", name, timeout=60)


@pytest.fixture(scope="module")
def registered(trained_in_pod, mlflow_server):
    """The DAG's next steps, in this process, on what the pod handed over: evaluate, register.

    A first version of the same model is registered before, as the one already live.
    """
    import mlflow

    from ml import pipeline

    window, trained = trained_in_pod["window"], trained_in_pod["trained"]
    data, _, _ = trained_in_pod["settings"]
    registry = RegistrySettings(model_name=MODEL, experiment_name="pipeline-image-test")
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


def test_rollout_pod_rolls_the_registered_version_out(
    pipeline_image, registered, trained_in_pod, mlflow_server, host_dirs
):
    """The rollout pod as the DAG builds it: the whole rollout path for the gate's request
    (deploy through the API test double, verify on the rows logged at evaluation, move
    @champion), in the pipeline image."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow import MlflowClient

    from ml.registry import use_mlflow
    from serving.deploy import manifests
    from serving.deploy.pods import rollout_pod_kwargs
    from tests.serving.deploy.k8s_fake import FakeCluster, FakeModelServer

    _, _, deploy = trained_in_pod["settings"]
    live_uri = f"models:/{MODEL}/{registered['live']}"
    new = registered["version"]
    # Both versions hold the model the pod trained: the fake pods answer with its predictions.
    use_mlflow(mlflow_server)
    try:
        model = mlflow.pyfunc.load_model(trained_in_pod["trained"]["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)

    def predict(version: str, split: dict) -> list[float]:
        frame = pd.DataFrame(split["data"], columns=split["columns"])
        return [float(v) for v in pd.DataFrame(model.predict(frame)).iloc[:, 0]]

    cluster = FakeCluster(namespace=NAMESPACE).start()
    model_server = FakeModelServer(cluster, predictor=predict)
    request = {
        "kind": "candidate",
        "version": str(new["version"]),
        "champion_at_eval": registered["evaluation"]["champion_version"],
        "reason": "container test",
        "run_id": "container__1",
    }
    name = f"tad-rollout-{os.getpid()}"
    try:
        deploy = deploy.model_copy(update={"service_url": model_server.url})
        cluster.seed(
            manifests.deployment(deploy, live_uri, registered["live"], tracking_uri=mlflow_server)
        )
        cluster.kubeconfig(str(host_dirs["kube"] / "config"))
        _open_up(host_dirs["kube"])
        pod = _pod(
            rollout_pod_kwargs(
                deploy,
                registry=RegistrySettings(model_name=MODEL),
                request=json.dumps(request),
                tracking_uri=mlflow_server,
            ),
            "rollout_kubernetes",
        )
        assert pod["spec"]["automountServiceAccountToken"] is True
        # Outside a cluster the client falls back from in-cluster config to KUBECONFIG.
        args = _container_args(
            pod,
            pod["spec"]["containers"][0],
            image=pipeline_image,
            name=name,
            host_paths={},
            # The fake model server stands in for the Service's in-cluster DNS name.
            extra_env={
                "KUBECONFIG": "/etc/kube/config",
                "PIPELINE_DEPLOY_SERVICE_URL": model_server.url,
            },
            extra_volumes=(f"{host_dirs['kube']}:/etc/kube:Z,ro",),
        )
        run = podman(*args, timeout=600)
        assert run.returncode == 0, f"rollout pod failed:\n{_logs(name)}"
        result = json.loads(run.stdout)
        assert result["status"] == "rolled_out", result
        assert result["version"] == str(new["version"])
        assert result["verification"]["rows_from"].startswith("logged with run")
        assert cluster.live_model_uri(DEPLOYMENT) == new["model_uri"]
        (patch,) = cluster.patches
        assert patch.model_uri == new["model_uri"]
        champion = MlflowClient(mlflow_server, mlflow_server).get_model_version_by_alias(
            MODEL, "champion"
        )
        assert str(champion.version) == str(new["version"])
    except BaseException:
        print(f"rollout pod logs:\n{_logs(name)}")
        raise
    finally:
        podman("rm", "--force", "--ignore", "--time", "5", name, timeout=60)
        model_server.stop()
        cluster.stop()
