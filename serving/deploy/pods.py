"""Every KubernetesPodOperator pod of the pipeline (training, rollout), as keyword arguments.

Both run the pipeline image and share :func:`pipeline_pod_kwargs`: the restricted Pod Security
Standard, only ``/tmp`` writable, the settings carried over as env vars, optional credentials
from a Secret. Nothing here imports Airflow: the DAG file builds the operator.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from kubernetes.client import models as k8s
from pydantic_settings import BaseSettings

from ml.settings import DataSettings, RegistrySettings, TrainingSettings
from serving.deploy.manifests import RUN_AS_USER, label_value
from serving.deploy.settings import DeploySettings

_CPU = re.compile(r"^(?P<number>\d+(\.\d+)?)(?P<milli>m?)$")


def restricted_container_security_context() -> k8s.V1SecurityContext:
    """Pod Security Standard ``restricted``, container level."""
    return k8s.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS_USER,
        run_as_group=RUN_AS_USER,
        allow_privilege_escalation=False,
        privileged=False,
        read_only_root_filesystem=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def pipeline_pod_kwargs(
    deploy: DeploySettings, *, name: str, component: str, instance: str, env: dict[str, str],
    tracking_uri: str, tmp_size: str = "128Mi",
) -> dict[str, Any]:  # fmt: skip
    """What every pipeline pod shares; callers add command, resources and their own choices."""
    secret = deploy.pod_env_secret and k8s.V1SecretEnvSource(name=deploy.pod_env_secret)
    return {
        "kubernetes_conn_id": deploy.kubernetes_conn_id,
        "image": deploy.pipeline_image,
        # A random suffix is appended by the operator, so retries never collide on the name.
        "name": name,
        "labels": {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/instance": label_value(instance),
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "train-and-deploy",
            "app.kubernetes.io/managed-by": "airflow",
        },
        "env_vars": {
            # The pod reaches MLflow by this URI; a different in-cluster name may be configured.
            "MLFLOW_TRACKING_URI": deploy.pod_tracking_uri or tracking_uri,
            **env,
            # readOnlyRootFilesystem: anything that writes to $HOME (MLflow, Keras, the kube
            # client's cache) must land on the writable /tmp emptyDir.
            "HOME": "/tmp",
            "PYTHONUNBUFFERED": "1",
        },
        "env_from": [k8s.V1EnvFromSource(secret_ref=secret)] if secret else None,
        # Pod Security Standard `restricted` (pod level + container level).
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_AS_USER,
            run_as_group=RUN_AS_USER,
            fs_group=RUN_AS_USER,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": restricted_container_security_context(),
        # The only writable path: /tmp (Python, MLflow, Keras and the kube client write there).
        "volumes": [
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=tmp_size))
        ],
        "volume_mounts": [k8s.V1VolumeMount(name="tmp", mount_path="/tmp")],
        # Stream the pod's log into the Airflow task log: that is where people look.
        "get_logs": True,
        # Keep failed pods (and their logs/events) for debugging; succeeded pods are noise.
        "on_finish_action": "delete_succeeded_pod",
        "log_events_on_failure": True,
        # Re-attach to a running pod after a worker restart instead of starting a second one
        # racing the first. On Airflow >= 3.3 this is `durable` (`reattach_on_restart` is
        # deprecated there and only feeds `durable`); the effect is the same.
        "durable": True,
        # Image pull + scheduling budget: the pipeline image is large (TensorFlow), first
        # pulls on a fresh node take minutes.
        "startup_timeout_seconds": 600,
    }


def training_pod_kwargs(
    training: TrainingSettings, data: DataSettings, deploy: DeploySettings, *, window: str,
    tracking_uri: str, epochs: str, learning_rate: str, batch_size: str, tags: dict[str, str],
    execution_timeout_s: int, registry: RegistrySettings | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments for the ``train`` task as a ``KubernetesPodOperator``.

    The pod runs ``python -m ml train``; its run records the result (run id, model URI) in
    MLflow, tagged with the step's run key, and the next task reads it from there
    (``ml.pipeline.trained_by``): exactly what the in-worker ``train`` task returns.
    ``window``, ``epochs``, ``learning_rate``, ``batch_size``, ``tags`` values and
    ``tracking_uri`` are usually Jinja templates (XCom, Params), resolved at run time.
    The pod must be able to read the window's partitions: ``data.path`` is an object-store
    URL, or ``training.pod_data_claim`` mounts the volume holding it at the same path.
    The pod gets the registry settings of ``registry`` (default: the worker's): its run goes
    to the experiment where the next task looks for it.
    """
    threads = cpu_threads(training.pod_cpu)
    env = {
        # The pod's settings objects rebuild the worker's: same data schema, same split, same
        # model shape and seed (a hand-picked subset would silently reset the others).
        **settings_env(data),
        **settings_env(training.model_copy(update={"threads": threads}), skip_prefix="pod_"),
        # The same experiment: training_result finds the run there by its run key, and a
        # retry finds the run of an attempt that died there (ml.train.fail_dead_attempts).
        **settings_env(registry or RegistrySettings()),
        # TensorFlow and the BLAS underneath size their thread pools by the node's CPUs.
        "OMP_NUM_THREADS": str(threads),
    }
    # Keras, MLflow's model staging and plot rendering use /tmp: 2Gi.
    kwargs = pipeline_pod_kwargs(deploy, name="model-training", component="training",
                                 instance=f"{data.source}-data", env=env,
                                 tracking_uri=tracking_uri, tmp_size="2Gi")  # fmt: skip
    kwargs.update(
        namespace=training.pod_namespace or deploy.namespace,
        # Training talks to MLflow only, never to the API server: no token in the pod.
        automount_service_account_token=False,
        cmds=["python", "-m", "ml"],
        arguments=[
            "train",
            *("--window", window),
            *("--epochs", epochs),
            *("--learning-rate", learning_rate),
            *("--batch-size", batch_size),
            *(arg for key, value in tags.items() for arg in ("--tag", f"{key}={value}")),
        ],
        # Requests == limits: the Guaranteed QoS class, so a node under pressure evicts others
        # first, and TensorFlow's thread pools (sized to the limit) are never throttled.
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": training.pod_cpu, "memory": training.pod_memory},
            limits={"cpu": training.pod_cpu, "memory": training.pod_memory},
        ),
        # Longer than the task's execution_timeout would be pointless; shorter cuts a slow
        # run the Airflow task still accepts.
        active_deadline_seconds=execution_timeout_s,
        # Not deferrable: the log is streamed live, and max_active_runs=1 keeps it one slot.
        deferrable=False,
        # No XCom sidecar: the run records its result in MLflow (ml.pipeline.train), where
        # the next task reads it by the run key. Airflow needs no `pods/exec` right and the
        # cluster no sidecar image.
        do_xcom_push=False,
    )
    if training.pod_data_claim:
        if "://" in data.path or not data.path.startswith("/"):
            why = f"which must then be an absolute path, got {data.path!r}"
            raise ValueError(f"pod_data_claim mounts a volume at PIPELINE_DATA_PATH, {why}")
        claim = k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=training.pod_data_claim, read_only=True
        )
        kwargs["volumes"].append(k8s.V1Volume(name="data", persistent_volume_claim=claim))
        mount = k8s.V1VolumeMount(name="data", mount_path=data.path, read_only=True)
        kwargs["volume_mounts"].append(mount)
    return kwargs


def cpu_threads(quantity: str) -> int:
    """Threads for a CPU quantity: ``"2"`` -> 2, ``"1500m"`` -> 2, ``"250m"`` -> 1."""
    match = _CPU.match(quantity.strip())
    if match is None:
        raise ValueError(f"not a Kubernetes CPU quantity: {quantity!r} (e.g. '2' or '1500m')")
    cores = float(match["number"]) / (1000 if match["milli"] else 1)
    return max(1, math.ceil(cores))


def settings_env(
    settings: BaseSettings, *, skip_prefix: str | None = None, exclude: frozenset[str] = frozenset()
) -> dict[str, str]:
    """A settings object as the env vars (its own prefix) that reproduce it in a pod.

    ``None`` values are left out (the pod's default is ``None`` too), as are the fields in
    ``exclude`` and those whose name starts with ``skip_prefix``.
    """
    prefix = type(settings).model_config["env_prefix"]
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None or name in exclude or (skip_prefix and name.startswith(skip_prefix)):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        env[f"{prefix}{name.upper()}"] = text
    return env


def rollout_pod_kwargs(
    settings: DeploySettings,
    *,
    tracking_uri: str,
    request: Any,
    registry: RegistrySettings | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``KubernetesPodOperator(task_id=..., **rollout_pod_kwargs(...))``.

    The pod runs the whole rollout path for ``request`` (a rollout request as JSON; in a DAG
    the XComArg of the task that decided it): ``python -m serving.deploy rollout --request``
    plans, deploys, verifies, then promotes or restores, with the registry settings of
    ``registry``. Its exit code tells a verdict (1) and a refusal (2), final, from a fault (3),
    retried: :data:`ROLLOUT_FINAL_EXIT_CODES`. ``env``: more env vars, over the settings' (a
    run's Params, as templates).
    """
    overrides = dict(env or {})
    # The pod moves aliases and tags versions: it needs the same registry settings.
    env = deploy_settings_env(settings.model_copy(update={"target": "kubernetes"}))
    env |= settings_env(registry or RegistrySettings()) | overrides

    # The pod's DeploySettings() rebuilds the serving Deployment from env, so every setting
    # travels (a hand-picked subset would silently reset the others).
    kwargs = pipeline_pod_kwargs(settings, name="model-rollout", component="rollout",
                                 instance=settings.deployment_name, env=env,
                                 tracking_uri=tracking_uri)  # fmt: skip
    kwargs.update(
        namespace=settings.namespace,
        # The pod runs with the rollout ServiceAccount: RBAC limited to get/patch the serving
        # Deployment and read its ReplicaSets/Pods in this namespace (docker/k8s/).
        service_account_name=settings.service_account,
        # It talks to the API server, so it needs its token (restricted PSS allows this).
        automount_service_account_token=True,
        cmds=["python", "-m", "serving.deploy"],
        arguments=[
            "rollout",
            *("--request", request),
            *("--target", "kubernetes"),
            *("--namespace", settings.namespace),
            *("--deployment", settings.deployment_name),
        ],
        # A rollout is I/O-bound (API calls, waiting): small requests; limits keep a runaway
        # client from hurting the node. Memory requests == limits: no OOM-kill surprises
        # under node pressure for a pod that must not die half-way through a rollout.
        container_resources=k8s.V1ResourceRequirements(
            # 1Gi: a version without logged verification rows is verified against a local
            # load of the model (its input example), which may be a TensorFlow model.
            requests={"cpu": "100m", "memory": "1Gi", "ephemeral-storage": "64Mi"},
            limits={"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "256Mi"},
        ),
        # Hard stop for a wedged rollout: the new version's rollout, its undo or the previous
        # version's redeploy (each at most a progress deadline), API retries, plus slack.
        active_deadline_seconds=int(settings.progress_deadline_s * 3 + settings.api_retry_s * 2)
        + 300,
        # Not deferrable: a rollout takes a few minutes and we want its log streamed live;
        # deferring would free the worker slot but needs a triggerer and delays logs. The
        # nightly DAG runs one at a time (max_active_runs=1), so one held slot is cheap.
        deferrable=False,
        # The rollout's result is in its log and the registry aliases; no XCom sidecar.
        do_xcom_push=False,
    )
    return kwargs


def deploy_settings_env(settings: DeploySettings) -> dict[str, str]:
    """``DeploySettings`` as the ``PIPELINE_DEPLOY_*`` env vars that reproduce it in a pod.

    Local-target fields are left out: they mean nothing inside the cluster. So is
    ``service_url``: it is how Airflow workers reach the endpoint (an ingress, a tunnel),
    while the rollout pod verifies the new pods through the in-cluster Service.
    """
    return settings_env(settings, skip_prefix="local_", exclude=frozenset({"service_url"}))


# The rollout pod's exit codes (``python -m serving.deploy rollout``) that end the task
# without retries: 1 a verdict on the version, 2 a refusal. 3 (a fault) and anything else (an
# evicted or OOM-killed pod) are retried.
ROLLOUT_FINAL_EXIT_CODES = {1: "verdict", 2: "refused"}
