"""Fixtures of the ``k8s`` tier: a real control plane (tests/k8s/cluster.py), a real MLflow
registry with tiny models, and the serving objects bootstrapped the documented way."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml.settings import RegistrySettings
from serving.deploy.settings import DeploySettings
from tests.integration.promotion_models import Linear, Noisy, log_version

MODEL = "k8s-model"
SERVING_IMAGE = "train-and-deploy/serving:test"
# The registry every test of the tier starts from: v1 and v2 good, v3 answers noise.
VERSIONS = {"1": Linear([1.0, 2.0, 3.0]), "2": Linear([-1.0, 0.5, 2.0]), "3": Noisy()}
_namespaces = itertools.count(1)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/k8s/" in str(item.fspath):
            item.add_marker(pytest.mark.k8s)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def plane(tmp_path_factory):
    from tests.k8s.cluster import KUBELET_PORT, ControlPlane, Unavailable
    from tests.k8s.runtime import KubeletLogs

    try:
        plane = ControlPlane(tmp_path_factory.mktemp("plane")).start()
    except Unavailable as exc:
        pytest.skip(f"k8s tier: {exc}")
    logs = KubeletLogs(plane.pki / "apiserver.crt", plane.pki / "apiserver.key", KUBELET_PORT)
    yield plane
    logs.close()
    plane.stop()


@pytest.fixture(scope="session")
def registry_uri(tmp_path_factory):
    """A SQLite registry holding :data:`VERSIONS` (logged once per session)."""
    import mlflow

    root = tmp_path_factory.mktemp("k8s-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment("k8s-tier")
        for number, model in VERSIONS.items():
            assert log_version(model, MODEL) == number
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    return uri


@pytest.fixture
def registry(registry_uri, monkeypatch):
    """The registry with @champion on v1 and no rollout tags, as each test expects."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_uri)
    client = MlflowClient(registry_uri, registry_uri)
    client.set_registered_model_alias(MODEL, "champion", "1")
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        for key in [k for k in version.tags if k.startswith("rollout.")]:
            client.delete_model_version_tag(MODEL, version.version, key)
    return client


@pytest.fixture(scope="session")
def model_servers(registry_uri, tmp_path_factory):
    from tests.k8s.runtime import ModelServers

    servers = ModelServers(registry_uri, tmp_path_factory.mktemp("model-servers"))
    yield servers
    servers.stop()


@dataclass
class Serving:
    """One namespace with the serving objects bootstrapped at v1, and how to reach them."""

    plane: object
    settings: DeploySettings
    proxy: object
    tracking_uri: str
    rollout_kubeconfig: Path

    def target(self, **changes):
        from serving.deploy.kube_api import KubeApi
        from serving.deploy.kubernetes import KubernetesTarget

        settings = self.settings.model_copy(update=changes)
        api = KubeApi(
            self.plane.api_client(self.rollout_kubeconfig),
            settings.namespace,
            settings.deployment_name,
            retry_s=settings.api_retry_s,
        )
        return KubernetesTarget(api, settings, tracking_uri=self.tracking_uri)

    def deployment(self) -> dict:
        import json

        from kubernetes import client

        apps = client.AppsV1Api(self.plane.api_client())
        raw = apps.read_namespaced_deployment(
            self.settings.deployment_name, self.settings.namespace, _preload_content=False
        )
        return json.loads(raw.data)


def render_cli(
    settings: DeploySettings, version: str, tracking_uri: str, *extra: str, model: str = MODEL
) -> str:
    """``python -m serving.deploy render`` as an administrator runs it (stdout: YAML)."""
    env = {
        "PIPELINE_DEPLOY_NAMESPACE": settings.namespace,
        "PIPELINE_DEPLOY_SERVING_IMAGE": settings.serving_image,
        "PIPELINE_DEPLOY_PROGRESS_DEADLINE_S": str(settings.progress_deadline_s),
        "PIPELINE_DEPLOY_MIN_READY_S": str(settings.min_ready_s),
        "PIPELINE_DEPLOY_MIN_REPLICAS": str(settings.min_replicas),
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    import os

    done = subprocess.run(
        [sys.executable, "-m", "serving.deploy", "render",
         "--model-uri", f"models:/{model}/{version}", "--version", version, *extra],
        env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout


@pytest.fixture
def bootstrap(plane, registry, registry_uri, model_servers, tmp_path):
    """``bootstrap(version)``: a fresh namespace with the documented first install at that
    version (render | kubectl apply --server-side), waited until available, and the rollout
    ServiceAccount's kubeconfig."""
    from serving.deploy.kube_objects import rollout_state
    from tests.k8s.runtime import ServiceProxy

    proxies = []

    def make(version: str = "1") -> Serving:
        namespace = f"serving-{next(_namespaces)}"
        settings = DeploySettings(
            target="kubernetes",
            namespace=namespace,
            serving_image=SERVING_IMAGE,
            progress_deadline_s=10,
            # A pod counts as available after 1 s ready (production: 5): the tier rolls often.
            min_ready_s=1,
            api_retry_s=5,
            min_replicas=2,
        )
        plane.kubectl("apply", "--server-side", "-f", "-",
                      input=render_cli(settings, version, registry_uri))  # fmt: skip
        proxy = ServiceProxy(plane.api_client(), namespace, settings.deployment_name, model_servers)
        proxies.append(proxy)
        settings = settings.model_copy(update={"service_url": proxy.url})
        kubeconfig = plane.token_kubeconfig(
            namespace, settings.service_account, tmp_path / f"{namespace}.kubeconfig"
        )
        ready = Serving(plane, settings, proxy, registry_uri, kubeconfig)
        wait(lambda: rollout_state(ready.deployment())[0] == "complete", 60, "available")
        return ready

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def serving(bootstrap) -> Serving:
    """A namespace bootstrapped at v1."""
    return bootstrap("1")


def wait(predicate, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout:g}s")


@pytest.fixture
def airflow_kubernetes(plane, monkeypatch):
    """Airflow's ``kubernetes_default`` Connection, pointing at the plane (cluster-admin, as
    an Airflow deployment's own ServiceAccount would be allowed to create pods)."""
    import json

    extra = {"kube_config_path": str(plane.admin_kubeconfig), "in_cluster": False}
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": extra})
    )
    return plane


@pytest.fixture
def registry_settings() -> RegistrySettings:
    return RegistrySettings(model_name=MODEL)
