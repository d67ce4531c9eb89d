"""The rollout path on the Kubernetes target, against the Kubernetes API test double.

No cluster exists here: :class:`FakeCluster` speaks the Kubernetes REST API over real HTTP to
the real ``kubernetes`` client, and :class:`FakeModelServer` stands for the Service in front of
the model-server pods, answering each request as a pod of the version it routes to would (the
registered versions' own predictions; version 4 is broken and answers noise). The registry is
a real MLflow store with real tiny models.

What it shows: a version that rolls out fine but then fails verification is rolled back inside
the same run (the previous version's pods serve again), tagged with the reason, and the
promotion that asked for it is undone; a good promotion goes live and verifies.
"""

from __future__ import annotations

import numpy as np
import pytest

from ml.settings import RegistrySettings
from serving.deploy import manifests
from serving.deploy.kubernetes import KubeClient, KubernetesTarget, Smoke
from serving.deploy.rollout import FAILED_TAG, Request, VerificationFailed, run
from serving.deploy.settings import DeploySettings
from tests.integration.promotion_models import FEATURES, Linear, Noisy, log_version
from tests.serving.deploy.k8s_fake import FakeCluster, FakeModelServer

NS, NAME, MODEL = "ml-serving", "model-server", "k8s-model"
WEIGHTS = {"1": [1.0, 2.0, 3.0], "2": [-1.0, 0.5, 2.0]}


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite registry with the four versions, logged once for the module."""
    import mlflow

    root = tmp_path_factory.mktemp("k8s-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("k8s-target")
    models = [Linear(WEIGHTS["1"]), Linear(WEIGHTS["2"]), Linear([0.0, 0.0, 1.0]), Noisy()]
    for number, model in enumerate(models, start=1):
        assert log_version(model, MODEL) == str(number)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    mp.undo()


@pytest.fixture
def registry(store):
    """The module's registry, @champion on v1 and no rollout tags, as each test expects."""
    from mlflow import MlflowClient

    client = MlflowClient(store, store)
    client.set_registered_model_alias(MODEL, "champion", "1")
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        for key in list(version.tags):
            if key.startswith("rollout."):
                client.delete_model_version_tag(MODEL, version.version, key)
    return client


@pytest.fixture
def mlflow_store(store):
    return store


def _predict(version: str, split: dict) -> list[float]:
    rows = np.asarray(split["data"], dtype=float)
    columns = split["columns"]
    rows = rows[:, [columns.index(c) for c in FEATURES]]
    if version in WEIGHTS:
        return (rows @ np.asarray(WEIGHTS[version])).tolist()
    return np.random.default_rng().normal(size=len(rows)).tolist()


@pytest.fixture
def cluster():
    settings = DeploySettings(target="kubernetes", namespace=NS, deployment_name=NAME)
    fake = FakeCluster(namespace=NS).start()
    fake.seed(manifests.deployment(settings, f"models:/{MODEL}/1", "1", tracking_uri="http://x"))
    server = FakeModelServer(fake, predictor=_predict)
    yield fake, server, settings
    server.stop()
    fake.stop()


def _target(cluster, tracking_uri: str) -> KubernetesTarget:
    fake, server, settings = cluster
    kube = KubeClient(fake.api_client(), NS, NAME, retry_delay_s=0.01)
    return KubernetesTarget(
        kube,
        settings,
        tracking_uri=tracking_uri,
        service_url=server.url,
        input_example=lambda uri: None,
        smoke=Smoke(passes=2, interval_s=0.02, request_timeout_s=5),
        timeout_s=5,
        smoke_timeout_s=3,
        poll_s=0.02,
        backoff_s=0.01,
    )


def _registry() -> RegistrySettings:
    return RegistrySettings(model_name=MODEL)


def test_live_reads_the_deployment(cluster, registry, mlflow_store):
    live = _target(cluster, mlflow_store).live()
    assert (live.version, live.healthy) == ("1", True)


def test_a_promotion_rolls_out_and_verifies(cluster, registry, mlflow_store):
    fake = cluster[0]
    registry.set_registered_model_alias(MODEL, "champion", "2")
    outcome = run(
        Request("champion", reason="promotion", retry_failed=True),
        _target(cluster, mlflow_store),
        _registry(),
        tracking_uri=mlflow_store,
    )
    assert outcome.status == "rolled_out" and outcome.version == "2"
    assert fake.live_model_uri(NAME) == f"models:/{MODEL}/2"
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "2"
    # Again: already live and answering right, ends without touching the cluster.
    patches = len(fake.applied())
    again = run(Request("champion"), _target(cluster, mlflow_store), _registry(),
                tracking_uri=mlflow_store)  # fmt: skip
    assert again.status == "unchanged" and len(fake.applied()) == patches


def test_a_failed_verification_rolls_back_in_the_same_run(cluster, registry, mlflow_store):
    fake = cluster[0]
    registry.set_registered_model_alias(MODEL, "champion", "4")  # a person promotes v4
    with pytest.raises(VerificationFailed) as failed:
        run(
            Request("champion", reason="promotion", retry_failed=True, run_id="run-1"),
            _target(cluster, mlflow_store),
            _registry(),
            tracking_uri=mlflow_store,
        )
    assert "differ from version 4" in str(failed.value)
    # v4 went live (its pods were ready and answered the smoke test) and was then replaced
    # by v1 again, in this run: two applies, the second one the previous version.
    uris = [patch.model_uri for patch in fake.applied()]
    assert uris == [f"models:/{MODEL}/4", f"models:/{MODEL}/1"], uris
    assert fake.live_model_uri(NAME) == f"models:/{MODEL}/1"
    assert set(fake.ready_versions()) == {"1"}
    version = registry.get_model_version(MODEL, "4")
    assert "first mismatch at row" in version.tags[FAILED_TAG]
    assert version.tags["rollout.failed_by"] == "run-1"
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "1"

    # The retried pod of the same run fails again instead of reporting v1 "unchanged".
    with pytest.raises(VerificationFailed, match="this run already failed"):
        run(
            Request("champion", retry_failed=True, run_id="run-1", champion_at_request="4"),
            _target(cluster, mlflow_store),
            _registry(),
            tracking_uri=mlflow_store,
        )


def test_a_version_the_registry_does_not_have_is_refused_without_touching_the_cluster(
    cluster, registry, mlflow_store
):
    from serving.deploy.rollout import RequestRejected

    fake = cluster[0]
    with pytest.raises(RequestRejected, match="v99"):
        run(Request("version", "99"), _target(cluster, mlflow_store), _registry(),
            tracking_uri=mlflow_store)  # fmt: skip
    assert fake.applied() == []
