"""serving.promotion: which version deploy_model rolls out, and what happens to the alias.

A real MLflow registry (SQLite store); "what is live" is the local target's ``active.json``
written by hand, and restoring a version is recorded instead of starting model servers (the
rollout itself is covered by tests/integration/test_promotion.py).
"""

from __future__ import annotations

import json
import os

import pytest

from ml.settings import RegistrySettings
from serving.deploy import promotion
from serving.deploy.settings import DeploySettings

MODEL = "promo-unit-model"


@pytest.fixture
def registry(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    client.create_registered_model(MODEL)
    for _ in range(4):
        client.create_model_version(MODEL, source=str(tmp_path / "model"), run_id=None)
    yield client
    # mlflow.set_registry_uri(None) (the mlflow_store teardown) leaves MLFLOW_REGISTRY_URI set.
    if os.environ.get("MLFLOW_REGISTRY_URI") == mlflow_store:
        del os.environ["MLFLOW_REGISTRY_URI"]


@pytest.fixture
def settings():
    return RegistrySettings(model_name=MODEL)


@pytest.fixture
def deploy(tmp_path):
    return DeploySettings(local_state_dir=str(tmp_path / "serving"))


@pytest.fixture
def restored(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(
        promotion, "restore_version", lambda previous, *a, **k: calls.append(previous["version"])
    )
    return calls


@pytest.fixture
def withdrawn(monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(promotion, "withdraw", lambda *a, **k: calls.append(True))
    return calls


def set_live(deploy: DeploySettings, version: str | None) -> None:
    path = deploy.local_state_dir
    os.makedirs(path, exist_ok=True)
    active = os.path.join(path, "active.json")
    if version is None:
        if os.path.exists(active):
            os.remove(active)
        return
    with open(active, "w") as fh:
        json.dump({"version": version, "model_uri": f"models:/{MODEL}/{version}", "port": 1}, fh)


def champion(client) -> str | None:
    version = client.get_registered_model(MODEL).aliases.get("champion")
    return None if version is None else str(version)


def resolve(mlflow_store, settings, deploy, **kwargs):
    return promotion.resolve(settings, deploy, tracking_uri=mlflow_store, **kwargs)


def test_resolve_pins_the_alias_current_target_and_the_starting_state(
    mlflow_store, registry, settings, deploy
):
    registry.set_registered_model_alias(MODEL, "champion", "3")
    set_live(deploy, "2")
    # An event said v2, but the alias names v3 by now: the later promotion wins.
    got = resolve(mlflow_store, settings, deploy, events=[{"version": "2", "alias": "champion"}])
    assert got["version"] == "3" and got["model_uri"] == f"models:/{MODEL}/3"
    assert got["requested"] == "@champion"
    assert got["champion_at_start"] == "3"
    assert got["live_at_start"] == "2" and got["previous"]["version"] == "2"
    assert got["live_known"] is True
    assert got["links"] == {}  # a database URI has no UI to link to


def test_a_version_param_wins_over_the_alias(mlflow_store, registry, settings, deploy):
    registry.set_registered_model_alias(MODEL, "champion", "3")
    got = resolve(mlflow_store, settings, deploy, version=1, alias="champion")
    assert got["version"] == "1" and got["requested"] == "1"
    assert got["live_at_start"] is None and got["previous"] is None
    with pytest.raises(ValueError, match="number"):
        resolve(mlflow_store, settings, deploy, version="latest")
    with pytest.raises(LookupError, match="no version 9"):
        resolve(mlflow_store, settings, deploy, version=9)
    with pytest.raises(LookupError, match="no alias @gold"):
        resolve(mlflow_store, settings, deploy, alias="gold")


def test_promote_moves_the_alias_when_nobody_else_did(mlflow_store, registry, settings, deploy):
    registry.set_registered_model_alias(MODEL, "champion", "1")
    resolution = resolve(mlflow_store, settings, deploy, version=2)  # the rollback path
    result = promotion.promote(resolution, settings, tracking_uri=mlflow_store)
    assert result["moved"] is True and champion(registry) == "2"


def test_promote_writes_nothing_when_the_alias_is_already_there(
    mlflow_store, registry, settings, deploy
):
    registry.set_registered_model_alias(MODEL, "champion", "2")
    registry.set_model_version_tag(MODEL, "2", "rollout.failed", "an earlier attempt")
    resolution = resolve(mlflow_store, settings, deploy)
    result = promotion.promote(resolution, settings, tracking_uri=mlflow_store)
    assert result["moved"] is False and champion(registry) == "2"
    # It rolled out and verified now: no longer a failed rollout.
    assert "rollout.failed" not in registry.get_model_version(MODEL, "2").tags


def test_promote_never_overrides_a_promotion_made_during_the_run(
    mlflow_store, registry, settings, deploy
):
    registry.set_registered_model_alias(MODEL, "champion", "1")
    resolution = resolve(mlflow_store, settings, deploy, version=2)
    registry.set_registered_model_alias(MODEL, "champion", "4")  # someone, meanwhile
    result = promotion.promote(resolution, settings, tracking_uri=mlflow_store)
    assert result["moved"] is False and result["superseded"] is True
    assert champion(registry) == "4"


def test_roll_back_restores_what_was_live_moves_the_alias_back_and_tags(
    mlflow_store, registry, settings, deploy, restored
):
    set_live(deploy, "2")
    registry.set_registered_model_alias(MODEL, "champion", "3")  # a person promoted v3
    resolution = resolve(mlflow_store, settings, deploy)
    result = promotion.roll_back(
        resolution, "verify: it lies", deploy, settings, tracking_uri=mlflow_store
    )
    assert restored == ["2"]
    assert champion(registry) == "2"
    assert registry.get_model_version(MODEL, "3").tags["rollout.failed"] == "verify: it lies"
    assert result == {
        "failed_version": "3",
        "restored_version": "2",
        "alias_moved": True,
        "alias_now": "2",
        "reason": "verify: it lies",
    }


def test_roll_back_leaves_an_alias_someone_moved_meanwhile(
    mlflow_store, registry, settings, deploy, restored
):
    set_live(deploy, "2")
    registry.set_registered_model_alias(MODEL, "champion", "3")
    resolution = resolve(mlflow_store, settings, deploy)
    registry.set_registered_model_alias(MODEL, "champion", "4")
    result = promotion.roll_back(resolution, "boom", deploy, settings, tracking_uri=mlflow_store)
    assert restored == ["2"]  # production goes back; v4's own run deploys v4 next
    assert champion(registry) == "4" and result["alias_moved"] is False


def test_a_failed_first_rollout_is_withdrawn_and_the_alias_removed(
    mlflow_store, registry, settings, deploy, restored, withdrawn
):
    registry.set_registered_model_alias(MODEL, "champion", "1")
    resolution = resolve(mlflow_store, settings, deploy)  # nothing live yet
    set_live(deploy, "1")  # v1 went live, then failed verification
    result = promotion.roll_back(resolution, "boom", deploy, settings, tracking_uri=mlflow_store)
    assert restored == [] and withdrawn == [True]
    assert champion(registry) is None and result["alias_now"] is None


def test_kubernetes_with_unknown_live_version_keeps_the_alias(
    mlflow_store, registry, settings, tmp_path, restored
):
    from tests.conftest import free_port

    # Nothing answers /version: what is live is unknown, which is not "nothing is live".
    k8s = DeploySettings(target="kubernetes", service_url=f"http://127.0.0.1:{free_port()}")
    registry.set_registered_model_alias(MODEL, "champion", "3")
    resolution = resolve(mlflow_store, settings, k8s)
    assert resolution["live_at_start"] is None and resolution["live_known"] is False
    result = promotion.roll_back(resolution, "boom", k8s, settings, tracking_uri=mlflow_store)
    assert champion(registry) == "3" and result["alias_moved"] is False
    assert registry.get_model_version(MODEL, "3").tags["rollout.failed"] == "boom"


def test_drift(mlflow_store, registry, settings, deploy):
    def check():
        return promotion.drift(settings, deploy, tracking_uri=mlflow_store)

    assert check()["converge"] is False and "no @champion" in check()["reason"]
    registry.set_registered_model_alias(MODEL, "champion", "2")
    assert check()["converge"] is True  # nothing live yet
    set_live(deploy, "2")
    assert check() == {
        "alias": "champion",
        "alias_version": "2",
        "live_version": "2",
        "converge": False,
        "reason": "in sync",
    }
    set_live(deploy, "1")  # changed behind the pipeline's back
    assert check()["converge"] is True
    registry.set_model_version_tag(MODEL, "2", "rollout.failed", "verify: mismatch")
    report = check()
    assert report["converge"] is False and "not retrying" in report["reason"]


def test_alias_asset_and_ui_links():
    assert promotion.alias_asset("m", "@champion") == {
        "name": "mlflow-alias/m@champion",
        "uri": "mlflow://models/m/aliases/champion",
    }
    links = promotion.mlflow_ui_links(
        "http://mlflow:5000/", "my model", "3", run_id="abc", experiment_id="7"
    )
    assert links == {
        "model_version": "http://mlflow:5000/#/models/my%20model/versions/3",
        "run": "http://mlflow:5000/#/experiments/7/runs/abc",
    }
    assert promotion.mlflow_ui_links("sqlite:///x.db", "m", "1") == {}


def test_alias_mode_without_the_alias_fails_clearly(mlflow_store, registry, settings, deploy):
    with pytest.raises(LookupError, match="no alias @champion"):
        resolve(mlflow_store, settings, deploy)
