"""monitor_quality's graph and its contract with train_and_deploy: the live-error asset, the
reason that travels in its event."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.dags.test_dag_integrity import DAGS_DIR


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    assert bag.import_errors == {}
    return bag.dags


def test_check_branches_to_retrain_or_not_and_only_retrain_emits(dags):
    from airflow.sdk.bases.branch import BranchMixIn

    dag = dags["monitor_quality"]
    assert dag.get_task("check").downstream_task_ids == {"retrain_or_not", "retrain", "no_retrain"}
    assert isinstance(dag.get_task("retrain_or_not"), BranchMixIn)
    route = dag.get_task("retrain_or_not").python_callable
    assert route({"retrain": True}) == "retrain"
    assert route({"retrain": False}) == "no_retrain"
    assert [a.uri for a in dag.get_task("retrain").outlets] == [
        "pipeline://live-error/regression-model"
    ]
    assert dag.get_task("no_retrain").outlets == []
    assert dag.is_paused_upon_creation is False
    assert set(dag.params.keys()) == {"data_end_date"}


def test_train_and_deploy_runs_on_the_live_error_asset_too(dags):
    schedule = dags["train_and_deploy"].timetable
    emitted = dags["monitor_quality"].get_task("retrain").outlets[0]
    drift = dags["monitor_drift"].get_task("retrain").outlets[0]
    assert sorted(a.uri for a in schedule.asset_condition.objects) == sorted(
        [emitted.uri, drift.uri]
    )
    assert type(schedule.asset_condition).__name__ == "AssetAny"  # either one starts a run


def test_the_event_carries_the_reason_train_and_deploy_records(dags):
    from _support import trigger_reason

    report = {
        "window_start": "2026-03-03",
        "window_end": "2026-03-10",
        "summary": "@champion v3: live RMSE above the gate's max_rmse 3 on 2 day(s) (...)",
        "run_id": "abc",
        "champion_version": "3",
    }
    retrain = dags["monitor_quality"].get_task("retrain").python_callable
    asset = dags["monitor_quality"].get_task("retrain").outlets[0]
    events = {asset: SimpleNamespace(extra=None)}
    reason = retrain(report, outlet_events=events)
    assert events[asset].extra == {
        "reason": reason,
        "quality_run_id": "abc",
        "champion_version": "3",
    }
    context = {
        "dag_run": SimpleNamespace(run_type="asset_triggered"),
        "triggering_asset_events": {asset.uri: [events[asset]]},
    }
    assert trigger_reason(context) == reason
    assert reason.startswith("live error in 2026-03-03..2026-03-10: @champion v3")
