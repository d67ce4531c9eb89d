"""The registry wrapper against a real (SQLite) MLflow store."""

from __future__ import annotations

import pytest

from ml.registry import Registry, RegistryUnavailableError, VersionInfo
from ml.settings import RegistrySettings
from tests.ports import free_port

SETTINGS = RegistrySettings(model_name="test-model", experiment_name="test-registry")


def _log_tiny_model() -> tuple[str, str]:
    """Log a pyfunc that returns the row sum; returns (model_uri, run_id)."""
    import mlflow
    import mlflow.pyfunc

    class RowSum(mlflow.pyfunc.PythonModel):
        # Typed input: MLflow infers the signature from it (and does not warn about its absence).
        def predict(self, model_input: list[list[float]], params=None) -> list[float]:
            return [sum(row) for row in model_input]

    mlflow.set_experiment(SETTINGS.experiment_name)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=RowSum(),
            input_example=[[1.0, 3.0], [2.0, 4.0]],
            pip_requirements=["mlflow"],  # skips requirement inference (a slow subprocess)
        )
    return info.model_uri, run.info.run_id


@pytest.fixture
def registry(mlflow_store) -> Registry:
    return Registry(mlflow_store, SETTINGS)


@pytest.fixture
def logged(mlflow_store) -> tuple[str, str]:
    return _log_tiny_model()


def test_register_versions_tags_and_load(registry, logged):
    import mlflow

    model_uri, run_id = logged
    v1 = registry.register(model_uri, run_id, {"data_digest": "abc", "n": 3})
    v2 = registry.register(model_uri, run_id, {"data_digest": "def"})

    assert (v1.version, v2.version) == ("1", "2")
    assert v1.name == "test-model"
    assert v1.run_id == run_id
    assert v1.tags == {"data_digest": "abc", "n": "3"}
    assert v1.model_uri == "models:/test-model/1"
    assert registry.latest_version().version == "2"
    # The registered model was created with a description, each version says its run, and the
    # logged model links to the versions made from it.
    import json

    from mlflow import MlflowClient

    client = MlflowClient(registry.tracking_uri)
    assert "@champion" in client.get_registered_model("test-model").description
    card = client.get_model_version("test-model", "1").description
    assert card.startswith("### test-model v1") and "not rolled out yet" in card
    logged_model = client.get_logged_model(model_uri.removeprefix("models:/"))
    links = json.loads(logged_model.tags["mlflow.modelVersions"])
    assert [(link["name"], str(link["version"])) for link in links] == [
        ("test-model", "1"),
        ("test-model", "2"),
    ]
    # The pinned URI loads and predicts.
    assert mlflow.pyfunc.load_model(v1.model_uri).predict([[1.0, 2.0]]) == [3.0]


def test_aliases_champion_and_promotion(registry, logged):
    assert registry.champion() is None  # no model yet
    assert registry.latest_version() is None
    registry.delete_alias("challenger")  # no model yet: not an error

    v1 = registry.register(*logged, {})
    v2 = registry.register(*logged, {})
    assert registry.champion() is None  # model, but no alias yet

    registry.set_alias("champion", v1.version)
    assert registry.champion().version == "1"
    assert registry.champion().aliases == ("champion",)

    registry.set_alias("challenger", v2.version)
    assert registry.get("@challenger").version == "2"
    assert registry.get("challenger").version == "2"

    registry.delete_alias("challenger")
    registry.delete_alias("challenger")  # absent: not an error
    assert registry.get(1).aliases == ("champion",)


def test_get_by_number_and_unknowns(registry, logged):
    with pytest.raises(LookupError, match="does not exist"):
        registry.get("@champion")
    registry.register(*logged, {})

    assert registry.get(1).version == "1"
    assert registry.get("1").version == "1"
    assert registry.get("latest").version == "1"
    with pytest.raises(LookupError, match="no version 7"):
        registry.get("7")
    with pytest.raises(LookupError, match="no alias @nope"):
        registry.get("@nope")
    with pytest.raises(LookupError):
        registry.set_alias("champion", "7")
    with pytest.raises(LookupError):
        registry.tag_version("7", {"a": "b"})


def test_tag_version(registry, logged):
    v1 = registry.register(*logged, {"keep": "me"})
    registry.tag_version(v1.version, {"gate.passed": "false", "gate.reasons": "too slow"})
    assert registry.get(v1.version).tags == {
        "keep": "me",
        "gate.passed": "false",
        "gate.reasons": "too slow",
    }


def test_version_info_dict_roundtrip(registry, logged):
    info = registry.register(*logged, {"k": "v"})
    data = info.to_dict()
    assert data["model_uri"] == "models:/test-model/1"
    assert VersionInfo.from_dict(data) == info


def test_check_available_on_sqlite(registry):
    registry.check_available()


def test_check_available_fails_fast_on_closed_port():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    registry = Registry(uri, SETTINGS)

    with pytest.raises(RegistryUnavailableError, match=uri):
        registry.check_available()
    # Ordinary calls probe first, so they fail the same way instead of retrying for minutes.
    with pytest.raises(RegistryUnavailableError, match=uri):
        registry.champion()


@pytest.fixture
def registration_statuses(monkeypatch):
    """The SQLite store as a remote registry that copies artifacts: a new version starts
    PENDING_REGISTRATION and reads as each status of the returned list in turn (the last for
    ever after), and creating it waits the way MLflow's REST store does (a SQL store creates
    READY versions and does not wait). Returns that list and a list of the statuses read."""
    from mlflow.store.model_registry import abstract_store
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    monkeypatch.setattr(abstract_store, "AWAIT_MODEL_VERSION_CREATE_SLEEP_INTERVAL_SECONDS", 0.01)
    statuses: list[str] = []
    read: list[str] = []
    create, get = SqlAlchemyStore.create_model_version, SqlAlchemyStore.get_model_version

    def pending(self, *args, **kwargs):
        mv = create(self, *args, **kwargs)
        mv._status = "PENDING_REGISTRATION"
        return mv

    def scripted(self, name, version):
        mv = get(self, name, version)
        mv._status = statuses[min(len(read), len(statuses) - 1)]
        mv._status_message = "copy failed" if mv._status == "FAILED_REGISTRATION" else None
        read.append(mv._status)
        return mv

    monkeypatch.setattr(SqlAlchemyStore, "create_model_version", pending)
    monkeypatch.setattr(SqlAlchemyStore, "get_model_version", scripted)
    monkeypatch.setattr(
        SqlAlchemyStore,
        "_await_model_version_creation",
        abstract_store.AbstractStore._await_model_version_creation,
    )
    return statuses, read


def test_register_waits_while_the_version_is_pending(registry, logged, registration_statuses):
    statuses, read = registration_statuses
    statuses += ["PENDING_REGISTRATION", "PENDING_REGISTRATION", "READY"]
    model_uri, run_id = logged
    info = registry.register(model_uri, run_id, {"data_digest": "abc"})
    assert (info.version, info.run_id, info.tags) == ("1", run_id, {"data_digest": "abc"})
    assert read[:3] == statuses


def test_register_fails_at_once_on_a_failed_registration(registry, logged, registration_statuses):
    from mlflow.exceptions import MlflowException

    statuses, read = registration_statuses
    statuses += ["PENDING_REGISTRATION", "FAILED_REGISTRATION", "READY"]
    with pytest.raises(MlflowException) as failed:
        registry.register(*logged, {})
    message = str(failed.value)
    assert "test-model" in message and "FAILED_REGISTRATION" in message
    assert "copy failed" in message
    assert read == statuses[:2]  # not polled after the verdict


def test_register_gives_up_at_the_deadline(registry, logged, registration_statuses, monkeypatch):
    from mlflow.exceptions import MlflowException

    import ml.registry

    monkeypatch.setattr(ml.registry, "READY_TIMEOUT_S", 0.05)
    statuses, read = registration_statuses
    statuses.append("PENDING_REGISTRATION")
    with pytest.raises(MlflowException, match=r"test-model version: 1 to become READY") as late:
        registry.register(*logged, {})
    assert "PENDING_REGISTRATION" in str(late.value)
    assert len(read) >= 2
