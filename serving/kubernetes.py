"""The ``kubernetes`` deploy target, seen from Airflow: the pod that performs a rollout.

:func:`rollout_pod_kwargs` returns keyword arguments for a ``KubernetesPodOperator`` that runs
``python -m serving rollout`` in the pipeline image (the parts every pipeline pod shares,
restricted security context included, come from :func:`ml.kubernetes.pipeline_pod_kwargs`).
The pod does the cluster work (patch the serving Deployment's pinned model URI, wait for the
rolling update, smoke test, roll back on failure) with its own ServiceAccount, so Airflow
workers need no cluster-admin rights and the DAG shape stays the same for both targets: only
the operator changes.

Nothing here imports Airflow: the DAG file builds the operator, this module only describes it.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client import models as k8s

from ml.kubernetes import label_value, pipeline_pod_kwargs
from ml.kubernetes import settings_env as _settings_env
from ml.settings import DeploySettings
from serving.manifests import parse_pinned_uri


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
    if not templated:
        parse_pinned_uri(model_uri, version)  # UnpinnedModelURI (a ValueError) otherwise

    kwargs = pipeline_pod_kwargs(
        settings,
        name="model-rollout",
        component="rollout",
        instance=settings.deployment_name,
        # The pod's DeploySettings() rebuilds the serving Deployment from these, so every
        # setting travels (a hand-picked subset would silently reset the others).
        env=settings_env(settings.model_copy(update={"target": "kubernetes"})),
        tracking_uri=tracking_uri,
    )
    if not templated:  # labels are not templated fields: a label cannot carry a Jinja expression
        # The model version being rolled out: `kubectl get pods -l app.kubernetes.io/version=7`.
        kwargs["labels"]["app.kubernetes.io/version"] = label_value(version)
    kwargs.update(
        namespace=settings.namespace,
        # The pod runs with the rollout ServiceAccount: RBAC limited to get/patch the serving
        # Deployment and read its ReplicaSets/Pods in this namespace (docker/k8s/).
        service_account_name=settings.service_account,
        # It talks to the API server, so it needs its token (restricted PSS allows this).
        automount_service_account_token=True,
        cmds=["python", "-m", "serving"],
        arguments=[
            "rollout",
            *("--model-uri", model_uri),
            *("--version", version),
            *("--namespace", settings.namespace),
            *("--deployment", settings.deployment_name),
        ],
        # A rollout is I/O-bound (API calls, waiting): small requests; limits keep a runaway
        # client from hurting the node. Memory requests == limits: no OOM-kill surprises
        # under node pressure for a pod that must not die half-way through a rollout.
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": "100m", "memory": "512Mi", "ephemeral-storage": "64Mi"},
            limits={"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "256Mi"},
        ),
        # Hard stop for a wedged rollout: the Deployment's own wait (health_timeout_s) plus
        # slack for smoke test and a possible rollback.
        active_deadline_seconds=int(settings.health_timeout_s) * 2 + 300,
        # Not deferrable: a rollout takes a few minutes and we want its log streamed live;
        # deferring would free the worker slot but needs a triggerer and delays logs. The
        # nightly DAG runs one at a time (max_active_runs=1), so one held slot is cheap.
        deferrable=False,
        # The rollout's result is in its log and the registry aliases; no XCom sidecar.
        do_xcom_push=False,
    )
    return kwargs


def settings_env(settings: DeploySettings) -> dict[str, str]:
    """``DeploySettings`` as the ``PIPELINE_DEPLOY_*`` env vars that reproduce it in a pod.

    Local-target fields are left out: they mean nothing inside the cluster. So is
    ``service_url``: it is how Airflow workers reach the endpoint (an ingress, a tunnel),
    while the rollout pod smoke-tests the new pods through the in-cluster Service.
    """
    return _settings_env(settings, skip_prefix="local_", exclude=frozenset({"service_url"}))


def _is_template(value: str) -> bool:
    return "{{" in value
