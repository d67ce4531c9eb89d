"""The plugin's /metrics: registry aliases and the newest drift check, read from a real MLflow
store (SQLite) and parsed back with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from registry_events.exporter import CachedExposition, RegistrySnapshot, read_snapshot, render

from ml.settings import DriftSettings, RegistrySettings
from tests.conftest import free_port

SETTINGS = RegistrySettings(model_name="exported-model", experiment_name="exported")


def samples(body: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_render_names_versions_scores_and_per_kind_thresholds():
    snapshot = RegistrySnapshot(
        up=True,
        aliases={"champion": "4", "challenger": "5"},
        drift_scores={"temperature_c": 0.12, "__target__": 0.9},
        drift_retrain=True,
        drift_checked_at_s=1_800_000_000.0,
        champion=("4", True),
    )
    got = samples(render(snapshot, "m", DriftSettings(target_psi=0.5)))
    assert got[("pipeline_champion_uncleared", (("model", "m"), ("version", "4")))] == 1.0
    assert got[("mlflow_registry_up", ())] == 1.0
    assert got[("mlflow_registry_alias_version", (("alias", "champion"), ("model", "m")))] == 4.0
    assert got[("mlflow_registry_alias_version", (("alias", "challenger"), ("model", "m")))] == 5.0
    score = ("pipeline_feature_drift_score", (("feature", "__target__"), ("model", "m")))
    assert got[score] == 0.9
    assert got[("pipeline_drift_threshold", (("feature", "__target__"), ("model", "m")))] == 0.5
    feature_threshold = ("pipeline_drift_threshold", (("feature", "temperature_c"), ("model", "m")))
    assert got[feature_threshold] == 0.25
    assert got[("pipeline_drift_retrain", (("model", "m"),))] == 1.0
    assert got[("pipeline_drift_check_timestamp_seconds", (("model", "m"),))] == 1.8e9


def test_a_registry_that_is_down_exports_up_zero_and_nothing_else(mlflow_store):
    # mlflow_store also sets a process-wide registry URI (as other code may): the exporter
    # must still ask the tracking server it was given, not that registry.
    snapshot = read_snapshot(f"http://127.0.0.1:{free_port()}", SETTINGS)
    assert snapshot == RegistrySnapshot(up=False)
    got = samples(render(snapshot, "m", DriftSettings()))
    assert got == {("mlflow_registry_up", ()): 0.0}


def test_reads_the_aliases_and_the_newest_drift_run(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    assert read_snapshot(mlflow_store, SETTINGS) == RegistrySnapshot(up=True)  # nothing yet

    client.create_registered_model(SETTINGS.model_name)
    for _ in range(2):
        client.create_model_version(SETTINGS.model_name, source=str(tmp_path))
    client.set_registered_model_alias(SETTINGS.model_name, "champion", "2")
    experiment = client.create_experiment(f"{SETTINGS.experiment_name}-drift")
    for retrain, psi in (("false", 0.01), ("true", 0.7)):  # the second one is the newest
        run = client.create_run(experiment, tags={"drift.retrain": retrain})
        client.log_metric(run.info.run_id, "psi.__target__", psi)
        client.log_metric(run.info.run_id, "drifted_columns", 1.0)  # not a score
        client.set_terminated(run.info.run_id)

    snapshot = read_snapshot(mlflow_store, SETTINGS)
    assert snapshot.up and snapshot.aliases == {"champion": "2"}
    assert snapshot.champion == ("2", True)  # never gated, no force reason
    client.set_model_version_tag(SETTINGS.model_name, "2", "gate.passed", "true")
    assert read_snapshot(mlflow_store, SETTINGS).champion == ("2", False)
    assert snapshot.drift_scores == {"__target__": 0.7}
    assert snapshot.drift_retrain is True and snapshot.drift_checked_at_s > 1.7e9


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_route_answers_prometheus_text_and_caches_reads(mlflow_store, monkeypatch):
    from fastapi.testclient import TestClient
    from registry_events import app as app_module

    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", SETTINGS.model_name)
    reads = []
    original = CachedExposition._read
    monkeypatch.setattr(
        CachedExposition, "_read", staticmethod(lambda: reads.append(1) or original())
    )
    monkeypatch.setattr(app_module, "_exposition", CachedExposition(ttl_s=60))
    with TestClient(app_module.app) as client:
        first = client.get("/metrics")
        second = client.get("/metrics")
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    assert samples(first.content)[("mlflow_registry_up", ())] == 1.0
    assert second.content == first.content and reads == [1]


def test_render_exports_the_newest_quality_check():
    snapshot = RegistrySnapshot(
        up=True,
        aliases={"champion": "4"},
        live={"rmse": {"3": 4.5, "4": 1.2}, "mae": {"3": 3.0, "4": 1.0}, "rows": {"4": 80.0}},
        quality={"served": 500.0, "labelled": 120.0, "max_rmse": 3.0},
        quality_champion="4",
        quality_retrain=False,
        suggested=("5",),
        quality_checked_at_s=1_800_000_000.0,
    )
    got = samples(render(snapshot, "m", DriftSettings()))
    assert got[("pipeline_live_rmse", (("model", "m"), ("version", "3")))] == 4.5
    assert got[("pipeline_live_mae", (("model", "m"), ("version", "4")))] == 1.0
    assert got[("pipeline_live_rows", (("model", "m"), ("version", "4")))] == 80.0
    assert got[("pipeline_champion_live_rmse", (("model", "m"), ("version", "4")))] == 1.2
    assert got[("pipeline_live_rmse_bar", (("model", "m"),))] == 3.0
    assert got[("pipeline_quality_rows", (("kind", "labelled"), ("model", "m")))] == 120.0
    assert got[("pipeline_quality_retrain", (("model", "m"),))] == 0.0
    assert got[("pipeline_retro_challenger", (("model", "m"), ("version", "5")))] == 1.0
    assert got[("pipeline_quality_check_timestamp_seconds", (("model", "m"),))] == 1.8e9
    before_any_check = samples(render(RegistrySnapshot(up=True), "m", DriftSettings()))
    assert not [name for name, _ in before_any_check if "quality" in name or "live" in name]


def test_reads_the_newest_quality_run(mlflow_store):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment(f"{SETTINGS.experiment_name}-quality")
    for version, rmse in (("2", 9.0), ("3", 4.0)):  # the second run is the newest
        tags = {"quality.retrain": "true", "quality.suggested": "5,6", "champion_version": version}
        run = client.create_run(experiment, tags=tags)
        for key, value in {f"live_rmse.v{version}": rmse, "max_rmse": 3.0, "served": 10}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    snapshot = read_snapshot(mlflow_store, SETTINGS)
    assert snapshot.live["rmse"] == {"3": 4.0}
    assert snapshot.quality == {"served": 10.0, "max_rmse": 3.0}
    assert snapshot.quality_champion == "3" and snapshot.quality_retrain is True
    assert snapshot.suggested == ("5", "6") and snapshot.quality_checked_at_s > 1.7e9
