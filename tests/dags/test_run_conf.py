"""A trigger conf with keys the DAG has no Param for fails the run at its first task.

Airflow merges ``dag_run.conf`` into the Params and validates the values of known keys, but
keeps an unknown key as a new, schema-less Param (``ParamsDict.update``,
``SerializedParamsDict.deep_merge``): ``{"epoch": 3}`` would run a whole training with the
default epochs. Both deploying DAGs check the conf in their first task; runs without a conf
(scheduled, asset-triggered by the registry webhook) are unaffected.

The runs go through Airflow's ``dag.test()`` on the test metadata DB; the tasks after the first
one are marked success without running (``mark_success_pattern``): only the check is under
test here.
"""

from __future__ import annotations

import pytest

from tests.dags.conftest import load_dag, task_states

# dag.test() imports Starlette's TestClient, which warns that it will move to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

TRAIN_PARAMS = (
    "batch_size, canary_bake_s, canary_steps, data_end_date, data_window_days, deploy_target, "
    "epochs, force_deploy, force_retrain, judge_error_ratio, judge_min_requests, "
    "judge_p99_ratio, judge_p99_slack_s, judge_psi, judge_shadow_diff_p99, learning_rate, "
    "max_regression, max_rmse, min_r2, require_approval, rollout_strategy, shadow_share"
)
DEPLOY_PARAMS = (
    "canary_bake_s, canary_steps, deploy_target, judge_error_ratio, judge_min_requests, "
    "judge_p99_ratio, judge_p99_slack_s, judge_psi, judge_shadow_diff_p99, reason, "
    "retry_failed, rollout_strategy, shadow_share, version"
)


@pytest.fixture
def env(airflow_db, tmp_path, monkeypatch):
    """Settings the first tasks read: data in a temp folder, an MLflow URI nobody calls."""
    monkeypatch.setenv("PIPELINE_DATA_PATH", str(tmp_path / "data"))
    monkeypatch.setenv("PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY", "50")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_DEPLOY_TARGET", "local")
    return tmp_path


class _DagRun:
    def __init__(self, conf):
        self.conf = conf


def _first_task(dag, task_id: str, conf):
    """Call the first task's own function with what the check reads of the run's context."""
    task = dag.get_task(task_id)
    return task.python_callable(dag=dag, dag_run=_DagRun(conf), params={}, run_id="manual__t")


@pytest.mark.parametrize(
    ("dag_id", "first", "conf", "unknown", "accepted"),
    [
        ("train_and_deploy", "load_window", {"unknown_param": 1}, "'unknown_param'", TRAIN_PARAMS),
        (
            "deploy_model",
            "request",
            {"version": 2, "unknown_param": 1, "epochs": 3},
            "'epochs', 'unknown_param'",
            DEPLOY_PARAMS,
        ),
    ],
)
def test_unknown_conf_keys_fail_the_first_task_naming_them_and_the_accepted_ones(
    dag_id, first, conf, unknown, accepted
):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException) as raised:
        _first_task(load_dag(dag_id), first, conf)
    assert str(raised.value) == (
        f"unknown key(s) in the run's conf: {unknown}; {dag_id} accepts: {accepted}"
    )


@pytest.mark.integration  # a whole dag.test() run
def test_unknown_conf_key_fails_deploy_model_at_once_and_deploys_nothing(env):
    dag_run = load_dag("deploy_model").test(
        run_conf={"version": 2, "unknown_param": 1},
        mark_success_pattern="rollout_(local|kubernetes)$",
    )
    assert str(dag_run.state) == "failed"
    states = task_states(dag_run)
    assert states["request"] == "failed"
    assert {
        states[t] for t in ("rollout_or_not", "in_sync", "rollout_local", "rollout_kubernetes")
    } == {"upstream_failed"}
    (request,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == "request"]
    assert request.try_number == 1  # failed for good: not retried


@pytest.mark.integration  # a whole dag.test() run
def test_known_conf_keys_pass_the_check(env):
    dag_run = load_dag("deploy_model").test(
        run_conf={"version": 2, "reason": "rollback by hand", "deploy_target": "local"},
        mark_success_pattern="rollout_(local|kubernetes)$",  # the branch itself runs
    )
    states = task_states(dag_run)
    assert states["request"] == "success"
    assert states["rollout_or_not"] == "success"
    assert states["rollout_local"] == "success"  # marked: the request chose it
    assert states["rollout_kubernetes"] == "skipped" and states["in_sync"] == "skipped"


@pytest.mark.integration  # a whole dag.test() run
def test_unknown_conf_key_fails_train_and_deploy_before_loading_anything(env):
    dag_run = load_dag("train_and_deploy").test(
        run_conf={"epochs": 2, "unknown_param": 1}, mark_success_pattern="(?!load_window$).*"
    )
    assert str(dag_run.state) == "failed"
    states = task_states(dag_run)
    assert states["load_window"] == "failed"
    assert states["train"] == "upstream_failed"
    assert not (env / "data").exists()  # the synthetic source wrote no partition


@pytest.mark.integration  # a whole dag.test() run
def test_known_conf_keys_run_train_and_deploy_s_first_task(env):
    dag_run = load_dag("train_and_deploy").test(
        run_conf={"epochs": 2, "data_window_days": 2, "data_end_date": "2026-03-10"},
        mark_success_pattern="(?!load_window$).*",
    )
    assert task_states(dag_run)["load_window"] == "success"
    assert sorted(p.name for p in (env / "data").iterdir()) == [
        "date=2026-03-08",
        "date=2026-03-09",
    ]


@pytest.mark.parametrize("conf", [None, {}])
def test_a_run_without_conf_passes_the_check(conf):
    """Scheduled runs and deploy_model's asset-triggered runs (the registry webhook) carry no
    conf: the check lets them through to the task's own work."""
    from _params import reject_unknown_conf
    from airflow.sdk.exceptions import AirflowFailException

    for dag_id in ("train_and_deploy", "deploy_model"):
        reject_unknown_conf({"dag": load_dag(dag_id), "dag_run": _DagRun(conf)})  # no raise
    with pytest.raises(AirflowFailException):
        reject_unknown_conf({"dag": load_dag("deploy_model"), "dag_run": _DagRun({"x": 1})})
