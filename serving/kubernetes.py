"""The ``kubernetes`` deploy target, seen from Airflow: the pod that performs a rollout.

:func:`rollout_pod_kwargs` returns keyword arguments for a ``KubernetesPodOperator`` that runs
``python -m serving rollout`` in the pipeline image. The pod does the cluster work (patch the
serving Deployment's pinned model URI, wait for the rolling update, smoke test, roll back on
failure) with its own ServiceAccount, so Airflow workers need no cluster-admin rights and the
DAG shape stays the same for both targets: only the operator changes.

Nothing here imports Airflow: the DAG file builds the operator, this module only describes it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kubernetes.client import models as k8s

from ml.settings import DeploySettings

# The restricted Pod Security Standard wants a non-root, fixed uid. 10001 is the `app` user the
# pipeline image is built with (docker/); it is outside the range of host system users.
RUN_AS_USER = 10001
# `models:/<name>/<version>`: a rollout pins a version; an alias (`@champion`) could move between
# the DAG's decision and the pod's start, and would make the rollout non-reproducible.
_PINNED_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


def rollout_pod_kwargs(
    settings: DeploySettings, *, model_uri: str, version: str, tracking_uri: str
) -> dict[str, Any]:
    """Keyword arguments for ``KubernetesPodOperator(task_id=..., **rollout_pod_kwargs(...))``.

    ``model_uri`` must be pinned (``models:/<name>/<version>``) and agree with ``version``. In a
    DAG both are usually Jinja templates resolved at run time (the version comes from XCom); then
    the check is left to ``python -m serving rollout``, which refuses an unpinned URI too.
    """
    version = str(version)
    templated = _is_template(model_uri) or _is_template(version)
    match = None if templated else _PINNED_URI.match(model_uri)
    if templated:
        pass
    elif match is None:
        raise ValueError(
            f"rollout needs a pinned model URI 'models:/<name>/<version>', got {model_uri!r} "
            "(resolve aliases before rolling out)"
        )
    elif match["version"] != version:
        raise ValueError(f"model URI {model_uri!r} does not name version {version!r}")

    labels = {
        "app.kubernetes.io/name": "model-rollout",
        "app.kubernetes.io/instance": _label_value(settings.deployment_name),
        "app.kubernetes.io/component": "rollout",
        "app.kubernetes.io/part-of": "train-and-deploy",
        "app.kubernetes.io/managed-by": "airflow",
        # The model version being rolled out: `kubectl get pods -l app.kubernetes.io/version=7`.
        "app.kubernetes.io/version": _label_value(version),
    }
    if templated:  # labels are not templated fields: a label cannot carry a Jinja expression
        del labels["app.kubernetes.io/version"]
    return {
        "kubernetes_conn_id": settings.kubernetes_conn_id,
        "namespace": settings.namespace,
        # The pod runs with the rollout ServiceAccount: RBAC limited to get/patch the serving
        # Deployment and read its ReplicaSets/Pods in this namespace (docker/k8s/).
        "service_account_name": settings.service_account,
        # It talks to the API server, so it needs its token (restricted PSS allows this).
        "automount_service_account_token": True,
        "image": settings.pipeline_image,
        # A random suffix is appended by the operator, so retries never collide on the name.
        "name": "model-rollout",
        "labels": labels,
        "cmds": ["python", "-m", "serving"],
        "arguments": [
            "rollout",
            *("--model-uri", model_uri),
            *("--version", version),
            *("--namespace", settings.namespace),
            *("--deployment", settings.deployment_name),
        ],
        "env_vars": {
            "MLFLOW_TRACKING_URI": tracking_uri,
            # The pod's DeploySettings() rebuilds the serving Deployment from these, so every
            # setting travels (a hand-picked subset would silently reset the others).
            **settings_env(settings.model_copy(update={"target": "kubernetes"})),
            # readOnlyRootFilesystem: anything that writes to $HOME (MLflow, kube config cache)
            # must land on the writable /tmp emptyDir.
            "HOME": "/tmp",
            "PYTHONUNBUFFERED": "1",
        },
        # A rollout is I/O-bound (API calls, waiting): small requests; limits keep a runaway
        # client from hurting the node. Memory requests == limits: no OOM-kill surprises
        # under node pressure for a pod that must not die half-way through a rollout.
        "container_resources": k8s.V1ResourceRequirements(
            requests={"cpu": "100m", "memory": "512Mi", "ephemeral-storage": "64Mi"},
            limits={"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "256Mi"},
        ),
        # Pod Security Standard `restricted` (pod level + container level).
        "security_context": k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_AS_USER,
            run_as_group=RUN_AS_USER,
            fs_group=RUN_AS_USER,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        "container_security_context": k8s.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_AS_USER,
            run_as_group=RUN_AS_USER,
            allow_privilege_escalation=False,
            privileged=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        # The only writable path: /tmp (Python, MLflow and the kube client write temp files).
        "volumes": [
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="128Mi"))
        ],
        "volume_mounts": [k8s.V1VolumeMount(name="tmp", mount_path="/tmp")],
        # Stream the rollout's log into the Airflow task log: that is where people look.
        "get_logs": True,
        # Keep failed pods (and their logs/events) for debugging; succeeded pods are noise.
        "on_finish_action": "delete_succeeded_pod",
        "log_events_on_failure": True,
        # Re-attach to a running rollout pod after a worker restart instead of starting a second
        # rollout racing the first. On Airflow >= 3.3 this is `durable` (`reattach_on_restart`
        # is deprecated there and only feeds `durable`); the effect is the same.
        "durable": True,
        # Image pull + scheduling budget: the pipeline image is large (TensorFlow), first pulls
        # on a fresh node take minutes.
        "startup_timeout_seconds": 600,
        # Hard stop for a wedged rollout: the Deployment's own wait (health_timeout_s) plus
        # slack for smoke test and a possible rollback.
        "active_deadline_seconds": int(settings.health_timeout_s) * 2 + 300,
        # Not deferrable: a rollout takes a few minutes and we want its log streamed live;
        # deferring would free the worker slot but needs a triggerer and delays logs. The
        # nightly DAG runs one at a time (max_active_runs=1), so one held slot is cheap.
        "deferrable": False,
        # The rollout's result is in its log and the registry aliases; no XCom sidecar (it
        # would need its own restricted security context).
        "do_xcom_push": False,
    }


def settings_env(settings: DeploySettings) -> dict[str, str]:
    """``DeploySettings`` as the ``PIPELINE_DEPLOY_*`` env vars that reproduce it in a pod.

    Local-target fields are left out: they mean nothing inside the cluster.
    """
    prefix = DeploySettings.model_config["env_prefix"]
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if name.startswith("local_") or value is None:
            continue
        if isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"{prefix}{name.upper()}"] = text
    return env


def _is_template(value: str) -> bool:
    return "{{" in value


def _label_value(value: str) -> str:
    """A valid label value: <= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = _LABEL_VALUE.sub("-", value)[:63].strip("-._")
    return cleaned or "unknown"
