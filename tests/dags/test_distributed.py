"""What the DAGs need of a distributed executor: the tasks that look at or change the local
target on the serving host's queue, and no data folder that only one worker can see."""

from __future__ import annotations

import pytest

from tests.dags.conftest import load_dag

LOCAL_TARGET_TASKS = {
    "train_and_deploy": {"rollout_local"},
    "deploy_model": {"request", "rollout_local"},
    "reconcile_deployment": {"check"},
}


@pytest.mark.parametrize("dag_id", sorted(LOCAL_TARGET_TASKS))
def test_the_tasks_of_the_local_target_run_on_the_serving_hosts_queue(dag_id, monkeypatch):
    monkeypatch.setenv("PIPELINE_DEPLOY_LOCAL_QUEUE", "serving")
    queues = {task.task_id: task.queue for task in load_dag(dag_id).tasks}
    serving = {task_id for task_id, queue in queues.items() if queue == "serving"}
    assert serving == LOCAL_TARGET_TASKS[dag_id]
    assert {queues[t] for t in set(queues) - serving} == {"default"}


@pytest.mark.parametrize("path", ["/srv/data", "file:///srv/data"])
def test_a_data_folder_is_refused_when_tasks_run_on_other_workers(path, monkeypatch):
    import _params
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("PIPELINE_DATA_PATH", path)
    assert _params.data_settings({}).path == path  # the LocalExecutor: one machine
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    with pytest.raises(AirflowFailException, match="s3://"):
        _params.data_settings({})
    monkeypatch.setenv("PIPELINE_DATA_PATH", "s3://pipeline/data")
    assert _params.data_settings({}).path == "s3://pipeline/data"
