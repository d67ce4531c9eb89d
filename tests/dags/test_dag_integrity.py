"""Every DAG imports cleanly, is configured like a production DAG, and parses light."""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import pytest
from airflow.sdk.bases.branch import BranchMixIn

from serving.deploy.settings import DeploySettings
from tests.dags.conftest import DAG_FILES, DAGS_DIR

TRAIN_AND_DEPLOY_EDGES = {
    # Same data digest, code version and parameters as @champion: ends at `unchanged`.
    ("load_window", "unchanged_check"),
    ("unchanged_check", "train_or_not"),
    ("unchanged_check", "unchanged"),  # the decision, as a TaskFlow value
    ("train_or_not", "unchanged"),
    ("train_or_not", "validate_data"),
    ("load_window", "validate_data"),
    ("load_window", "train"),
    ("load_window", "evaluate"),
    ("load_window", "register"),
    ("validate_data", "train"),
    ("train", "evaluate"),
    ("train", "register"),
    ("evaluate", "register"),
    ("evaluate", "gate"),
    ("register", "gate"),
    ("register", "not_deployed"),
    # gate returns the decision, the route, the rollout request and what the approval asks;
    # deploy_or_not routes to not_deployed or approval, which routes to the target's rollout.
    ("gate", "deploy_or_not"),
    ("gate", "not_deployed"),  # the gate's summary
    ("gate", "approval"),  # what it asks
    ("gate", "rollout_local"),  # the gate's request
    ("gate", "rollout_kubernetes"),  # the gate's request
    ("deploy_or_not", "not_deployed"),
    ("deploy_or_not", "approval"),
    ("approval", "rollout_local"),
    ("approval", "rollout_kubernetes"),
}
GATE_NEW_VERSION_EDGES = {
    ("versions", "judge"),
    ("load_window", "judge"),
    ("judge", "decide"),  # one per version, mapped
    ("decide", "deploy_or_not"),
    ("decide", "not_deployed"),
    ("decide", "approval"),
    ("decide", "rollout_local"),
    ("decide", "rollout_kubernetes"),
    ("deploy_or_not", "not_deployed"),
    ("deploy_or_not", "approval"),
    ("approval", "rollout_local"),
    ("approval", "rollout_kubernetes"),
}
# The same with training in a pod: the pod returns nothing through XCom (no sidecar), the
# task after it reads the run's result from MLflow and hands it on.
TRAIN_IN_POD_EDGES = (TRAIN_AND_DEPLOY_EDGES - {("train", "evaluate"), ("train", "register")}) | {
    ("train", "training_result"),
    ("training_result", "evaluate"),
    ("training_result", "register"),
}


def _edges(dag) -> set[tuple[str, str]]:
    return {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}


class RunningTaskInstance:
    """What a template (or an XComArg) sees as ``ti``: ``xcom_pull`` from a dict of
    ``{(task_id, key): value}``; any other pull fails the test."""

    def __init__(self, xcoms: dict[tuple[str, str], object]) -> None:
        self.xcoms = xcoms
        self.pulled: list[tuple[str, str]] = []

    def xcom_pull(self, task_ids, key="return_value", **_):
        self.pulled.append((task_ids, key))
        assert (task_ids, key) in self.xcoms, (task_ids, key)
        return self.xcoms[(task_ids, key)]


def render(task, dag, xcoms: dict[tuple[str, str], object], **context):
    """A copy of ``task`` with its templated fields rendered as a run renders them."""
    rendered = copy.deepcopy(task)
    params = {name: dag.params[name] for name in dag.params}
    params.update(context.pop("params", {}))
    ti = RunningTaskInstance(xcoms)
    rendered.render_template_fields(
        {"ti": ti, "params": params, "dag": dag, "task": rendered, "run_id": "manual__7"} | context
    )
    return rendered, ti


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {Path(d.fileloc).name for d in dagbag.dags.values()} == {p.name for p in DAG_FILES}


def test_dags_have_tags_retries_schedule_and_docs(dagbag):
    for dag in dagbag.dags.values():
        assert dag.tags, dag.dag_id
        assert dag.doc_md and dag.doc_md.strip(), dag.dag_id
        assert dag.max_active_runs == 1, dag.dag_id
        assert dag.catchup is False, dag.dag_id
        for task in dag.tasks:
            assert task.retries is not None, task.task_id
            assert task.execution_timeout is not None, task.task_id


def test_train_and_deploy_graph(dagbag):
    dag = dagbag.dags["train_and_deploy"]
    assert dag.timetable.timetable.expression == "0 2 * * *"  # + drift asset: test_monitor_drift
    assert _edges(dag) == TRAIN_AND_DEPLOY_EDGES
    # The decisions are plain tasks returning TaskFlow values; only the branch tasks route.
    for task_id in ("train_or_not", "deploy_or_not", "approval"):
        assert isinstance(dag.get_task(task_id), BranchMixIn), task_id
    for task_id in ("unchanged_check", "gate"):
        assert not isinstance(dag.get_task(task_id), BranchMixIn), task_id
    assert dag.get_task("gate").multiple_outputs is True


def test_gate_new_version_graph_and_schedule(dagbag):
    from airflow.sdk import Asset

    from serving.deploy.assets import version_asset

    dag = dagbag.dags["gate_new_version"]
    assert _edges(dag) == GATE_NEW_VERSION_EDGES
    assert dag.schedule == Asset(**version_asset("regression-model"))
    assert dag.is_paused_upon_creation is False  # a notebook's version is judged at once
    assert isinstance(dag.get_task("deploy_or_not"), BranchMixIn)
    assert dag.get_task("decide").multiple_outputs is True


def test_versions_are_the_events_or_the_param(dagbag):
    """Of an asset-triggered run: every version its events name, oldest first; a manual
    run: the ``version`` Param."""
    from types import SimpleNamespace

    dag = dagbag.dags["gate_new_version"]
    task = dag.get_task("versions")
    params = {name: dag.params[name] for name in dag.params}
    events = {"asset": [SimpleNamespace(extra={"version": v}) for v in ("12", "9", "12")]}
    run = SimpleNamespace(conf={})
    got = task.python_callable(dag=dag, dag_run=run, params=params, triggering_asset_events=events)
    assert got == ["9", "12"]
    by_hand = task.python_callable(dag=dag, dag_run=run, params=params | {"version": 4})
    assert by_hand == ["4"]


def test_decide_rolls_out_the_newest_version_that_passed(dagbag, monkeypatch):
    from serving.deploy.rollout import Request

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    dag = dagbag.dags["gate_new_version"]
    params = {name: dag.params[name] for name in dag.params}

    def judged(version: str, passed: bool) -> dict:
        decision = {"passed": passed, "summary": "approved" if passed else "rejected: worse"}
        return {"version": version, "decision": decision, "evaluation": {"champion_version": "2"}}

    decide = dag.get_task("decide").python_callable
    got = decide(
        [judged("5", True), judged("7", False), judged("4", True)],
        dag=dag, params=params, run_id="asset_triggered__1",
    )  # fmt: skip
    assert got["route"] == "approval" and got["summary"].startswith("v4 approved; v5 approved")
    request = Request.from_dict(got["request"])
    assert (request.kind, request.version, request.champion_at_eval) == ("candidate", "5", "2")
    assert got["ask"] == {
        "required": False,
        "route": "rollout_local",
        "version": "5",
        "timeout_s": 86_400,
    }
    none = decide([judged("7", False)], dag=dag, params=params, run_id="asset_triggered__1")
    assert (none["route"], none["request"], none["ask"]) == ("not_deployed", None, None)


def test_io_steps_retry_with_backoff_and_bad_data_fails_fast(dagbag):
    dag = dagbag.dags["train_and_deploy"]
    for task_id in (
        "load_window",
        "unchanged_check",
        "evaluate",
        "register",
        "gate",
        "rollout_local",
    ):
        task = dag.get_task(task_id)
        assert task.retries >= 1 and task.retry_exponential_backoff, task_id
        assert task.retry_delay >= timedelta(seconds=10), task_id
    assert dag.get_task("validate_data").retries == 0


def test_every_rollout_task_of_every_dag_runs_in_the_one_rollout_pool(dagbag):
    """One rollout at a time across DAGs: the same pool (make run creates it with 1 slot)."""
    from serving.deploy.settings import DeploySettings

    pool = DeploySettings().rollout_pool
    in_pool = {
        (dag.dag_id, task.task_id): task
        for dag in dagbag.dags.values()
        for task in dag.tasks
        if task.pool == pool
    }
    assert set(in_pool) == {
        ("train_and_deploy", "rollout_local"),
        ("train_and_deploy", "rollout_kubernetes"),
        ("deploy_model", "rollout_local"),
        ("deploy_model", "rollout_kubernetes"),
        ("gate_new_version", "rollout_local"),
        ("gate_new_version", "rollout_kubernetes"),
    }
    for key, task in in_pool.items():
        # Retried (a fault marks nothing); a verdict or a refusal fails without retry.
        assert task.retries >= 1, key
    # The routing branch is not a rollout: it holds no rollout slot, nor does an approval,
    # which waits for a person (awaiting_input holds no pool slot in any case).
    assert dagbag.dags["deploy_model"].get_task("rollout_or_not").pool != pool
    for dag_id in ("train_and_deploy", "gate_new_version"):
        assert dagbag.dags[dag_id].get_task("approval").pool != pool
    # Nothing in any DAG runs because another task failed: no rollback-on-failure task that
    # could take an infrastructure hiccup for a verdict on a model.
    for dag in dagbag.dags.values():
        for task in dag.tasks:
            assert task.trigger_rule in ("all_success", "none_failed_min_one_success"), (
                dag.dag_id,
                task.task_id,
                task.trigger_rule,
            )


def _gate_request(dag, monkeypatch) -> dict:
    """What train_and_deploy's gate returns for a passing version (the gate's own function,
    the registry's part stubbed)."""
    import ml.pipeline

    monkeypatch.setattr(ml.pipeline, "gate", lambda *a, **k: {"passed": True, "summary": "ok"})
    params = {name: dag.params[name] for name in dag.params} | {"deploy_target": "kubernetes"}
    return dag.get_task("gate").python_callable(
        {"version": "7"}, {"champion_version": "6"}, dag=dag, params=params, run_id="manual__'x'"
    )


def _deploy_model_request(dag) -> dict:
    """What deploy_model's request returns for a version given by hand (no registry call)."""
    params = {name: dag.params[name] for name in dag.params}
    params |= {"version": 7, "reason": "roll back 'now'", "deploy_target": "kubernetes"}
    return dag.get_task("request").python_callable(
        dag=dag, dag_run=None, params=params, run_id="manual__'x'"
    )


def test_the_rollout_pod_receives_the_request_the_deciding_task_returned(dagbag, monkeypatch):
    """rollout_kubernetes's ``--request`` is the XComArg of the deciding task's ``request``
    output; rendered as a run renders it, the pod's CLI gets exactly that JSON."""
    from airflow.sdk.definitions.xcom_arg import XComArg

    from serving.deploy.__main__ import build_parser
    from serving.deploy.rollout import Request

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    decided = {
        "train_and_deploy": ("gate", _gate_request(dagbag.dags["train_and_deploy"], monkeypatch)),
        "deploy_model": ("request", _deploy_model_request(dagbag.dags["deploy_model"])),
    }
    assert decided["train_and_deploy"][1]["route"] == "approval"
    assert decided["train_and_deploy"][1]["ask"]["route"] == "rollout_kubernetes"
    assert decided["deploy_model"][1]["route"] == "rollout_kubernetes"
    for dag_id, (source, returned) in decided.items():
        dag = dagbag.dags[dag_id]
        task = dag.get_task("rollout_kubernetes")
        (arg,) = [a for a in task.arguments if isinstance(a, XComArg)]
        assert (arg.operator.task_id, arg.key) == (source, "request")
        assert task.arguments[task.arguments.index(arg) - 1] == "--request"
        assert source in task.upstream_task_ids

        xcoms = {(source, key): value for key, value in returned.items()}
        run_params = {"rollout_strategy": "canary", "canary_steps": [10.0, 60.0], "judge_psi": 0.2}
        rendered, ti = render(task, dag, xcoms, params=run_params)
        assert (source, "request") in ti.pulled
        args = build_parser().parse_args(rendered.arguments)
        assert args.command == "rollout" and args.target == "kubernetes"
        assert args.request == returned["request"]  # the JSON text, unchanged
        request = Request.from_dict(args.request)
        assert request.version == "7" and request.run_id == "manual__'x'"
        env = {var.name: var.value for var in rendered.env_vars}
        assert env["PIPELINE_REGISTRY_MODEL_NAME"]  # the pod moves aliases: it needs them
        # The run's strategy and judge reach the pod's settings.
        for name in [n for n in os.environ if n.startswith("PIPELINE_DEPLOY_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("PIPELINE_DEPLOY_") and value is not None:
                monkeypatch.setenv(name, value)
        in_pod = DeploySettings()
        assert (in_pod.target, in_pod.rollout_strategy) == ("kubernetes", "canary")
        assert (in_pod.canary_steps, in_pod.judge_psi) == ([10.0, 60.0], 0.2)
    gate = Request.from_dict(decided["train_and_deploy"][1]["request"])
    assert (gate.kind, gate.champion_at_eval) == ("candidate", "6")
    by_hand = Request.from_dict(decided["deploy_model"][1]["request"])
    assert (by_hand.kind, by_hand.reason) == ("version", "roll back 'now'")


def test_the_rollout_pod_s_verdict_and_refusal_exit_codes_are_final(dagbag):
    """The rollout pod's operator fails the task without retries on exit 1 (a verdict) and 2
    (refused); the training pod is an ordinary KubernetesPodOperator."""
    from _pod_operators import RolloutPodOperator

    for dag_id in ("train_and_deploy", "deploy_model", "gate_new_version"):
        assert isinstance(dagbag.dags[dag_id].get_task("rollout_kubernetes"), RolloutPodOperator)


def test_trigger_form_params_are_typed_and_documented(dagbag):
    dag = dagbag.dags["train_and_deploy"]
    params = dag.params
    expected = {
        "data_window_days": "integer",
        "data_end_date": ["null", "string"],
        "epochs": "integer",
        "learning_rate": "number",
        "batch_size": "integer",
        "max_rmse": "number",
        "min_r2": "number",
        "max_regression": "number",
        "force_deploy": "boolean",
        "require_approval": "boolean",
        "force_retrain": "boolean",
        "deploy_target": "string",
        # how the version goes live (serving.deploy.progressive) and its judge
        "rollout_strategy": "string",
        "shadow_share": "number",
        "canary_steps": "array",
        "canary_bake_s": "number",
        "judge_min_requests": "integer",
        "judge_error_ratio": "number",
        "judge_p99_ratio": "number",
        "judge_p99_slack_s": "number",
        "judge_psi": "number",
        "judge_shadow_diff_p99": "number",
    }
    assert set(params.keys()) == set(expected)
    for name, type_ in expected.items():
        schema = params.get_param(name).schema
        assert schema["type"] == type_, name
        assert schema.get("title") and params.get_param(name).description, name
    assert params.get_param("deploy_target").schema["enum"] == ["local", "kubernetes"]
    assert params.get_param("rollout_strategy").schema["enum"] == ["direct", "shadow", "canary"]


def test_trigger_form_rejects_bad_values(dagbag):
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["train_and_deploy"]
    bad_values = [
        ("epochs", 0),
        ("deploy_target", "moon"),
        ("learning_rate", -1),
        ("data_end_date", "yesterday"),
        ("max_regression", 2),
    ]
    for name, value in bad_values:
        param = copy.deepcopy(dag.params.get_param(name))
        with pytest.raises(ParamValidationError):
            param.resolve(value)
    assert copy.deepcopy(dag.params.get_param("data_end_date")).resolve("2026-03-01")


def test_dag_parse_imports_nothing_heavy(dag_parse_report):
    """Parsing runs often in the DAG processor: no TensorFlow, MLflow or pandas at module level.

    One fresh interpreter parses every DAG file in turn and reports, after each, which heavy
    modules are loaded: once one appears, the file that pulled it in is the first one listed.
    """
    report = dag_parse_report["dag"]
    assert [path for path, _ in report] == [str(f) for f in DAG_FILES]
    assert [(path, loaded) for path, loaded in report if loaded] == []


def test_loading_the_plugins_imports_no_project_module(dag_parse_report):
    """The scheduler loads the plugins at start and forks the LocalExecutor's workers after:
    a project module it imported then is the copy every task inherits, however the code
    changed since (a running stack's nightly run after an update crashed on a TrainingSettings
    without the new field). Tasks must import ml/serving themselves, fresh."""
    assert dag_parse_report["plugins"] == [("plugins", [])]


def test_a_task_that_starts_no_pod_parses_without_the_kubernetes_clients(dag_parse_report):
    """Airflow 3 parses the DAG file again in every task's process: a registry-only task
    must not pay the kubernetes clients' imports (seconds per task) for a pod it never starts.
    """
    report = dag_parse_report["task"]
    assert [path for path, _ in report] == [str(f) for f in DAG_FILES]
    assert [(path, loaded) for path, loaded in report if loaded] == []


@pytest.mark.parametrize("runner", ["worker", "kubernetes"])
def test_a_task_s_own_parse_keeps_the_graph_and_the_pod_task_s_own_parse_has_the_pod(
    runner, monkeypatch
):
    """The stand-in for a pod task (in another task's process) keeps every task id, edge,
    trigger rule, pool and retry count; in its own process the pod task is the real one."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    if runner == "kubernetes":
        monkeypatch.setenv("PIPELINE_TRAIN_RUNNER", "kubernetes")
        monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')

    def parse(dag_id: str, task_id: str | None):
        if task_id is None:
            monkeypatch.delenv("_AIRFLOW_PARSING_CONTEXT_TASK_ID", raising=False)
            monkeypatch.delenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", raising=False)
        else:
            monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", dag_id)
            monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_TASK_ID", task_id)
        bag = DagBag(dag_folder=str(DAGS_DIR / f"{dag_id}.py"))
        assert bag.import_errors == {}
        return bag.dags[dag_id]

    def shape(dag):
        return {
            t.task_id: (sorted(t.downstream_task_ids), str(t.trigger_rule), t.pool, t.retries)
            for t in dag.tasks
        }

    pod_tasks = {"train_and_deploy": ["rollout_kubernetes"], "deploy_model": ["rollout_kubernetes"]}
    if runner == "kubernetes":
        pod_tasks["train_and_deploy"].append("train")
    for dag_id, other_task in (("train_and_deploy", "register"), ("deploy_model", "request")):
        processor = parse(dag_id, None)
        in_other_task = parse(dag_id, other_task)
        assert shape(in_other_task) == shape(processor)
        for pod_task in pod_tasks[dag_id]:
            assert isinstance(processor.get_task(pod_task), KubernetesPodOperator)
            assert not isinstance(in_other_task.get_task(pod_task), KubernetesPodOperator)
            in_own_task = parse(dag_id, pod_task)
            assert isinstance(in_own_task.get_task(pod_task), KubernetesPodOperator)
            assert shape(in_own_task) == shape(processor)


@pytest.fixture(scope="module")
def dagbag_training_in_pod():
    """The DAGs parsed with PIPELINE_TRAIN_RUNNER=kubernetes (read at parse time)."""
    from airflow.dag_processing.dagbag import DagBag

    mp = pytest.MonkeyPatch()
    mp.setenv("PIPELINE_TRAIN_RUNNER", "kubernetes")
    mp.setenv("PIPELINE_TRAIN_POD_CPU", "3")
    mp.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", '{"conn_type": "kubernetes"}')
    try:
        yield DagBag(dag_folder=str(DAGS_DIR))
    finally:
        mp.undo()


def test_training_in_a_pod_keeps_the_graph(dagbag, dagbag_training_in_pod):
    from _pod_operators import RolloutPodOperator
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    assert dagbag_training_in_pod.import_errors == {}
    in_worker = dagbag.dags["train_and_deploy"]
    in_pod = dagbag_training_in_pod.dags["train_and_deploy"]

    def edges(dag):
        return {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}

    assert edges(in_worker) == TRAIN_AND_DEPLOY_EDGES
    assert edges(in_pod) == TRAIN_IN_POD_EDGES
    train = in_pod.get_task("train")
    assert isinstance(train, KubernetesPodOperator)
    assert not isinstance(in_worker.get_task("train"), KubernetesPodOperator)
    assert not isinstance(train, RolloutPodOperator)  # its exit codes mean nothing special
    # No XCom sidecar: the result is read from the pod's MLflow run (training_result).
    assert train.do_xcom_push is False
    assert train.retries == 1
    assert train.container_resources.limits["cpu"] == "3"


def test_training_result_reads_the_pod_s_run_by_the_train_step_s_key(
    dagbag_training_in_pod, monkeypatch
):
    """training_result hands evaluate what the pod's run recorded, found by the key the pod's
    run is tagged with (the same key the `train` task's templates render)."""
    import ml.pipeline

    dag = dagbag_training_in_pod.dags["train_and_deploy"]
    asked = []

    def trained_by(run_key, registry, *, tracking_uri):
        asked.append((run_key, tracking_uri))
        return {"run_id": "abc", "model_uri": "runs:/abc/model"}

    monkeypatch.setattr(ml.pipeline, "trained_by", trained_by)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    result = dag.get_task("training_result").python_callable(dag=dag, run_id="manual__7")
    assert result == {"run_id": "abc", "model_uri": "runs:/abc/model"}
    assert asked == [("train_and_deploy/manual__7/train", "http://mlflow.example:5000")]


def test_training_pod_gets_window_params_and_run_through_templates(
    dagbag_training_in_pod, monkeypatch
):
    """Render the pod's templates the way a run does; the pod's CLI reads back the same refs."""
    from ml.__main__ import _parser, _read

    dag = dagbag_training_in_pod.dags["train_and_deploy"]
    window = {
        "start": "2026-03-01",
        "end": "2026-03-08",
        "digest": "abc",
        "path": "/data",
        "partitions": [{"day": "2026-03-01", "uri": "/data/date=2026-03-01/part-0.parquet"}],
        "note": "quotes ' \" and <tags> & ampersands survive",
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    task, ti = render(
        dag.get_task("train"),
        dag,
        {("load_window", "return_value"): window},
        params={"epochs": 7, "learning_rate": 0.02, "batch_size": 16},
    )
    assert ti.pulled == [("load_window", "return_value")]

    args = _parser().parse_args(task.arguments)
    assert args.step == "train"
    assert _read(args.window) == window
    assert (args.epochs, args.learning_rate, args.batch_size) == (7, 0.02, 16)
    assert args.tag == [
        "airflow_dag_id=train_and_deploy",
        "airflow_run_id=manual__7",
        # A retry's pod finds the run of an attempt that died by this key (ml.train), and
        # training_result finds the pod's result by it.
        "pipeline_run_key=train_and_deploy/manual__7/train",
    ]
    assert args.output is None  # no XCom file: the result is on the run (ml.pipeline.train)
    env = {var.name: var.value for var in task.env_vars}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_every_pod_of_every_dag_validates_for_three_kubernetes_minors(
    dagbag, dagbag_training_in_pod, monkeypatch
):
    """Each KubernetesPodOperator task of each DAG (both training variants), as the operator
    builds its pod, against the schemas of the three newest Kubernetes minors."""
    import kubernetes_validate
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    from tests.k8s_schemas import newest_minors

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    # What the pods' templates and XComArgs read: the window, the deciding task's request.
    request = '{"kind": "champion", "version": null, "reason": "x"}'
    xcoms = {
        ("load_window", "return_value"): {"start": "2026-03-01", "partitions": []},
        ("gate", "request"): request,
        ("request", "request"): request,
        ("decide", "request"): request,
    }
    pods = {}
    for bag in (dagbag, dagbag_training_in_pod):
        for dag in bag.dags.values():
            for task in dag.tasks:
                if isinstance(task, KubernetesPodOperator):
                    rendered, _ = render(task, dag, xcoms)
                    pod = rendered.build_pod_request_obj(dry_run=True)
                    pods[(dag.dag_id, task.task_id)] = ApiClient().sanitize_for_serialization(pod)
    assert {
        ("train_and_deploy", "train"),
        ("train_and_deploy", "rollout_kubernetes"),
        ("deploy_model", "rollout_kubernetes"),
        ("gate_new_version", "rollout_kubernetes"),
    } <= set(pods)
    for key, pod in pods.items():
        for version in newest_minors():
            try:
                kubernetes_validate.validate(pod, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{key} on Kubernetes {version}: {exc}") from exc
