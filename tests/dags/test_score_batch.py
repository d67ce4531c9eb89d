"""score_batch's graph and its assets: scheduled on the data asset train_and_deploy's
load_window emits, emitting the predictions asset; its window Param generated from the
settings (test_params.py)."""

from __future__ import annotations

import pytest

from tests.dags.test_dag_integrity import DAGS_DIR


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    assert bag.import_errors == {}
    return bag.dags


def test_resolve_check_score_on_the_data_asset(dags):
    dag = dags["score_batch"]
    assert dag.get_task("resolve").downstream_task_ids == {"check", "score"}
    assert dag.get_task("check").downstream_task_ids == {"score"}
    assert [a.uri for a in dag.get_task("score").outlets] == [
        "pipeline://predictions/regression-model"
    ]
    emitted = dags["train_and_deploy"].get_task("load_window").outlets
    assert [a.uri for a in emitted] == ["pipeline://data/regression-model"]
    assert dag.timetable.asset_condition.uri == emitted[0].uri
    assert set(dag.params.keys()) == {"data_end_date", "batch_window_days"}
    assert dag.params["batch_window_days"] == 1
