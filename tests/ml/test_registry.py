"""The registry wrapper against a real (SQLite) MLflow store."""

from __future__ import annotations

import socket

import pytest

from ml.registry import Registry, RegistryUnavailableError, VersionInfo
from ml.settings import RegistrySettings

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
    # The registered model was created with a description.
    from mlflow import MlflowClient

    assert (
        "@champion"
        in MlflowClient(registry.tracking_uri).get_registered_model("test-model").description
    )
    # The pinned URI loads and predicts.
    assert mlflow.pyfunc.load_model(v1.model_uri).predict([[1.0, 2.0]]) == [3.0]


def test_aliases_champion_and_promotion(registry, logged):
    assert registry.champion() is None  # no model yet
    assert registry.latest_version() is None
    registry.delete_alias("challenger")  # no model yet: not an error

    v1 = registry.register(*logged, {})
    v2 = registry.register(*logged, {})
    assert registry.champion() is None  # model, but no alias yet

    assert registry.promote_champion(v1.version) is None
    assert registry.champion().version == "1"
    assert registry.champion().aliases == ("champion",)

    registry.set_alias("challenger", v2.version)
    assert registry.get("@challenger").version == "2"
    assert registry.get("challenger").version == "2"

    assert registry.promote_champion(v2.version) == "1"
    assert registry.get("@champion").version == "2"
    with pytest.raises(LookupError, match="challenger"):
        registry.get("@challenger")  # cleared: v2 is live now, not rolling out

    # A challenger pointing at another version is left alone by a promotion (rollback to v1).
    registry.set_alias("challenger", v2.version)
    assert registry.promote_champion(v1.version) == "2"
    assert registry.get("@challenger").version == "2"

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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    registry = Registry(uri, SETTINGS)

    with pytest.raises(RegistryUnavailableError, match=uri):
        registry.check_available()
    # Ordinary calls probe first, so they fail the same way instead of retrying for minutes.
    with pytest.raises(RegistryUnavailableError, match=uri):
        registry.champion()


class _PollingClient:
    """get_model_version answers the given statuses in turn (the last one for ever after)."""

    def __init__(self, *statuses: str) -> None:
        self.statuses = list(statuses)
        self.calls = 0

    def get_model_version(self, name, version):
        from types import SimpleNamespace

        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        return SimpleNamespace(
            name=name,
            version=version,
            run_id="r1",
            source="models:/m-1",
            tags={},
            aliases=[],
            status=status,
            status_message="copy failed" if status == "FAILED_REGISTRATION" else None,
        )


def _polling_registry(monkeypatch, *statuses: str) -> tuple[Registry, _PollingClient]:
    import ml.registry

    monkeypatch.setattr(ml.registry, "READY_POLL_S", 0.01)
    registry = Registry("sqlite:///never-opened.db", SETTINGS)
    registry._checked = True  # no probe: the fake client is the registry
    client = _PollingClient(*statuses)
    registry.__dict__["client"] = client  # the cached_property's slot
    return registry, client


def test_wait_ready_polls_while_pending(monkeypatch):
    registry, client = _polling_registry(
        monkeypatch, "PENDING_REGISTRATION", "PENDING_REGISTRATION", "READY"
    )
    info = registry._wait_ready("4")
    assert (info.name, info.version, info.run_id) == ("test-model", "4", "r1")
    assert client.calls == 3


def test_wait_ready_fails_at_once_on_a_failed_registration(monkeypatch):
    registry, client = _polling_registry(monkeypatch, "PENDING_REGISTRATION", "FAILED_REGISTRATION")
    with pytest.raises(
        RuntimeError,
        match=r"'test-model' version 4 failed to register: "
        r"status FAILED_REGISTRATION \(copy failed\)",
    ):
        registry._wait_ready("4")
    assert client.calls == 2


def test_wait_ready_gives_up_at_the_deadline(monkeypatch):
    registry, client = _polling_registry(monkeypatch, "PENDING_REGISTRATION")
    with pytest.raises(
        TimeoutError, match=r"'test-model' version 4 still PENDING_REGISTRATION after 0s"
    ):
        registry._wait_ready("4", timeout_s=0.05)
    assert client.calls >= 2
