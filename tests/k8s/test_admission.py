"""What the real API server decides about the project's objects: RBAC for the rollout
ServiceAccount, PodSecurity ``restricted`` for every pod the project creates, and validation
(server-side dry-run) of every rendered manifest."""

from __future__ import annotations

import json

import pytest

from serving.deploy import manifests
from serving.deploy.pods import rollout_pod_kwargs, training_pod_kwargs

TRACKING = "http://mlflow.mlflow.svc.cluster.local:5000"


def _status(call) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as exc:
        return exc.status
    return 200


def test_the_rollout_service_account_can_do_what_a_rollout_needs_and_nothing_else(serving):
    """Decided by the real RBAC authorizer for the ServiceAccount's own bound token."""
    from kubernetes import client

    api = serving.plane.api_client(serving.rollout_kubeconfig)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    ns, name = serving.settings.namespace, serving.settings.deployment_name
    allowed = {
        "get its Deployment": lambda: apps.read_namespaced_deployment(name, ns),
        "watch its Deployment": lambda: apps.list_namespaced_deployment(
            ns,
            field_selector=f"metadata.name={name}",
            watch=True,
            timeout_seconds=1,
            _preload_content=False,
        ),
        "scale its Deployment": lambda: apps.patch_namespaced_deployment_scale(
            name, ns, {"spec": {"replicas": 2}}
        ),
        "get its canary": lambda: apps.read_namespaced_deployment(f"{name}-canary", ns),
        "scale its canary": lambda: apps.patch_namespaced_deployment_scale(
            f"{name}-canary", ns, {"spec": {"replicas": 0}}
        ),
        "list ReplicaSets": lambda: apps.list_namespaced_replica_set(ns),
        "list Pods": lambda: core.list_namespaced_pod(ns),
    }
    denied = {
        "read Secrets": lambda: core.list_namespaced_secret(ns),
        "read a Secret by name": lambda: core.read_namespaced_secret("anything", ns),
        "list Deployments": lambda: apps.list_namespaced_deployment(ns),
        "get another Deployment": lambda: apps.read_namespaced_deployment("other", ns),
        "delete its Deployment": lambda: apps.delete_namespaced_deployment(name, ns),
        "create a Deployment": lambda: apps.create_namespaced_deployment(
            ns, {"metadata": {"name": "x"}, "spec": {}}
        ),
        "get the Deployment in another namespace": lambda: apps.read_namespaced_deployment(
            name, "default"
        ),
        "list Pods in another namespace": lambda: core.list_namespaced_pod("kube-system"),
        "create a Pod": lambda: core.create_namespaced_pod(ns, {"metadata": {"name": "x"}}),
        "exec into a Pod": lambda: core.connect_get_namespaced_pod_exec("x", ns),
        "create a Namespace": lambda: core.create_namespace({"metadata": {"name": "x"}}),
        "create a ClusterRoleBinding": lambda: rbac.create_cluster_role_binding(
            {"metadata": {"name": "x"}, "roleRef": {}, "subjects": []}
        ),
        "grant itself a Role": lambda: rbac.patch_namespaced_role(
            serving.settings.service_account, ns, {"rules": [{"apiGroups": ["*"]}]}
        ),
        "list Nodes": lambda: core.list_node(),
    }
    got = {what: _status(call) for what, call in {**allowed, **denied}.items()}
    assert {w: got[w] for w in allowed} == dict.fromkeys(allowed, 200)
    assert {w: got[w] for w in denied} == dict.fromkeys(denied, 403)


def _pod_from_operator(kwargs: dict, namespace: str) -> dict:
    """The pod a KubernetesPodOperator with these arguments creates (its own build)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes import client

    check = KubernetesPodOperator(task_id="check", **{**kwargs, "namespace": namespace})
    pod = check.build_pod_request_obj()
    return client.ApiClient().sanitize_for_serialization(pod)


def test_every_pod_the_project_creates_is_admitted_as_restricted(serving, airflow_kubernetes):
    """The namespace enforces PodSecurity `restricted` (the rendered Namespace says so): the
    serving pods are running, and the training and rollout pods are admitted as created."""
    from kubernetes import client

    from ml.settings import DataSettings, TrainingSettings

    core = client.CoreV1Api(serving.plane.api_client())
    ns = serving.settings.namespace
    labels = core.read_namespace(ns).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    serving_pods = core.list_namespaced_pod(ns, label_selector=manifests.label_selector(
        serving.settings)).items  # fmt: skip
    assert serving_pods and all(p.status.phase == "Running" for p in serving_pods)

    training = training_pod_kwargs(
        TrainingSettings(),
        DataSettings(path="s3://bucket/data"),
        serving.settings,
        window='{"partitions": []}',
        tracking_uri=TRACKING,
        epochs="3",
        learning_rate="0.01",
        batch_size="64",
        tags={"airflow_run_id": "manual__1"},
        execution_timeout_s=3600,
    )
    rollout = rollout_pod_kwargs(
        serving.settings, tracking_uri=TRACKING, request='{"kind": "champion"}'
    )
    for kwargs in (training, rollout):
        pod = _pod_from_operator(kwargs, ns)
        created = core.create_namespaced_pod(ns, pod, dry_run="All")
        assert created.metadata.namespace == ns
    # And a pod that is not restricted is refused by the same admission.
    privileged = _pod_from_operator({**rollout, "security_context": None,
                                     "container_security_context": None}, ns)  # fmt: skip
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(ns, privileged, dry_run="All")
    assert refused.value.status == 403 and "restricted" in refused.value.body


def test_every_rendered_manifest_passes_a_server_side_dry_run(plane, registry_uri):
    """The serving base (as `render` writes it) applied with server-side dry-run: validated
    and defaulted by the API server of the tier's Kubernetes release."""
    from serving.deploy.settings import DeploySettings

    settings = DeploySettings(target="kubernetes", namespace="dry-run")
    objects = manifests.render(settings, "models:/m/1", "1", tracking_uri=TRACKING)
    plane.kubectl("create", "namespace", "dry-run")
    text = "\n---\n".join(json.dumps(o) for o in objects)
    done = plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=text)
    applied = [line for line in done.stdout.splitlines() if "serverside-applied" in line]
    assert len(applied) == len(objects), done.stdout + done.stderr


def test_the_documented_first_install_creates_every_object(plane, tmp_path, registry_uri):
    """README / docs/operations.md: `kubectl apply --server-side -k docker/k8s/base` creates
    every object of the base; the monitoring base says what it needs (the Prometheus
    Operator's CRDs) instead of half-applying."""
    from pathlib import Path

    base = Path(__file__).resolve().parents[2] / "docker" / "k8s"
    done = plane.kubectl("apply", "--server-side", "-k", str(base / "base"))
    kinds = [line.split("/")[0] for line in done.stdout.splitlines()]
    expected = manifests.render(
        _base_settings(), "models:/regression-model/1", "1", tracking_uri=TRACKING
    )
    assert len(kinds) == len(expected), done.stdout
    monitoring = plane.kubectl("apply", "--server-side", "-k", str(base / "monitoring"),
                               check=False)  # fmt: skip
    assert monitoring.returncode != 0
    assert (
        "ServiceMonitor" in monitoring.stderr and "ensure CRDs are installed" in monitoring.stderr
    )


def _base_settings():
    """What docker/k8s/base was rendered with."""
    from serving.deploy.settings import DeploySettings

    return DeploySettings(target="kubernetes")
