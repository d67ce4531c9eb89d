"""monitor_drift's graph and its contract with train_and_deploy: the drift asset, the reason."""

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


def test_score_branches_to_retrain_or_no_drift_and_only_retrain_emits(dags):
    from airflow.sdk.bases.branch import BranchMixIn

    dag = dags["monitor_drift"]
    assert dag.get_task("load_window").downstream_task_ids == {"score"}
    # score returns the report (a TaskFlow value); retrain_or_not routes on it; both ends
    # take the report as their argument.
    assert dag.get_task("score").downstream_task_ids == {"retrain_or_not", "retrain", "no_drift"}
    assert dag.get_task("retrain_or_not").downstream_task_ids == {"retrain", "no_drift"}
    assert not isinstance(dag.get_task("score"), BranchMixIn)
    assert isinstance(dag.get_task("retrain_or_not"), BranchMixIn)
    route = dag.get_task("retrain_or_not").python_callable
    assert route({"retrain": True}) == "retrain"
    assert route({"retrain": False}) == "no_drift"
    assert [a.uri for a in dag.get_task("retrain").outlets] == ["pipeline://drift/regression-model"]
    assert dag.get_task("no_drift").outlets == []
    assert dag.is_paused_upon_creation is False


def test_train_and_deploy_runs_nightly_and_on_the_drift_asset(dags):
    from airflow.sdk import AssetOrTimeSchedule

    schedule = dags["train_and_deploy"].timetable
    emitted = dags["monitor_drift"].get_task("retrain").outlets[0]
    assert isinstance(schedule, AssetOrTimeSchedule)
    # (or the live-error asset: test_monitor_quality.py)
    assert emitted.uri in [a.uri for a in schedule.asset_condition.objects]
    assert schedule.timetable.expression == "0 2 * * *"


def _context(run_type: str, events: dict | None = None) -> dict:
    return {"dag_run": SimpleNamespace(run_type=run_type), "triggering_asset_events": events}


def test_the_reason_a_run_started_is_the_drift_report_else_schedule_or_person():
    from _support import trigger_reason

    event = SimpleNamespace(extra={"reason": "drift against @champion v3: __target__: PSI 0.9"})
    asset_triggered = _context("asset_triggered", {"pipeline://drift/m": [event]})
    assert trigger_reason(asset_triggered) == "drift against @champion v3: __target__: PSI 0.9"
    assert trigger_reason(_context("scheduled")) == "schedule"
    assert trigger_reason(_context("DagRunType.MANUAL")) == "manual trigger"
