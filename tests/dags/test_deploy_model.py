"""deploy_model and reconcile_deployment: shape, schedules, Params and links (no servers).

Production settings shared by every DAG (tags, retries, docs, max_active_runs, catchup,
timeouts, light parsing) are checked for these too by ``test_dag_integrity.py``.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest

from tests.dags.test_dag_integrity import DAGS_DIR


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    assert bag.import_errors == {}
    return bag.dags


def _edges(dag) -> set[tuple[str, str]]:
    return {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}


def test_deploy_model_graph(dags):
    from airflow.sdk.bases.branch import BranchMixIn

    dag = dags["deploy_model"]
    assert _edges(dag) == {
        # request returns the request, why and the route; rollout_or_not routes on it.
        ("request", "rollout_or_not"),
        ("request", "rollout_local"),  # the request, as a TaskFlow value
        ("request", "rollout_kubernetes"),  # the request, as the pod's --request argument
        ("rollout_or_not", "in_sync"),
        ("rollout_or_not", "rollout_local"),
        ("rollout_or_not", "rollout_kubernetes"),
    }
    assert dag.get_task("request").multiple_outputs is True
    assert not isinstance(dag.get_task("request"), BranchMixIn)
    assert isinstance(dag.get_task("rollout_or_not"), BranchMixIn)
    for task_id in ("request", "rollout_local"):
        task = dag.get_task(task_id)
        assert task.retries >= 1 and task.retry_delay >= timedelta(seconds=10), task_id


class _Registry:
    """``ml.registry.Registry`` with a fixed @champion (what request_for_deploy_model reads)."""

    champion_version: str | None = "5"

    def __init__(self, *args, **kwargs):
        pass

    def champion(self):
        from types import SimpleNamespace

        version = type(self).champion_version
        return SimpleNamespace(version=version, tags={}) if version else None


def _request(dag, monkeypatch, live, **params):
    """deploy_model's ``request`` task, run as its function with a stubbed registry and
    endpoint: what it returns (request JSON or None, why, route)."""
    import ml.registry
    import serving.deploy.sync as sync

    monkeypatch.setattr(ml.registry, "Registry", _Registry)
    monkeypatch.setattr(sync, "observe_live", lambda deploy, *, tracking_uri: live)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    values = {name: dag.params[name] for name in dag.params} | params
    return dag.get_task("request").python_callable(
        dag=dag, dag_run=None, params=values, run_id="manual__1"
    )


def test_request_routes_to_in_sync_or_the_target_s_rollout_with_the_request(dags, monkeypatch):
    from serving.deploy.rollout import Request
    from serving.deploy.target import Live

    dag = dags["deploy_model"]
    in_sync = _request(dag, monkeypatch, Live("5", True), deploy_target="local")
    assert in_sync == {"request": None, "why": "in sync", "route": "in_sync"}

    stale = _request(dag, monkeypatch, Live("4", True), deploy_target="kubernetes")
    assert stale["route"] == "rollout_kubernetes" and stale["why"] == "out of sync"
    request = Request.from_dict(stale["request"])
    assert (request.kind, request.champion_at_request, request.run_id) == (
        "champion",
        "5",
        "manual__1",
    )
    # A person triggering by hand (the Param's default) asks again for a version that failed.
    assert request.retry_failed is True
    kept = _request(dag, monkeypatch, Live("4", True), deploy_target="local", retry_failed=False)
    assert kept["route"] == "rollout_local"
    assert Request.from_dict(kept["request"]).retry_failed is False

    # A version by hand is always rolled out, even when @champion is live and healthy.
    by_hand = _request(dag, monkeypatch, Live("5", True), deploy_target="local", version=3)
    assert by_hand["route"] == "rollout_local"
    assert Request.from_dict(by_hand["request"]).version == "3"


def test_rollout_or_not_follows_the_route(dags):
    task = dags["deploy_model"].get_task("rollout_or_not")
    for route in ("in_sync", "rollout_local", "rollout_kubernetes"):
        assert task.python_callable(route) == route


def test_deploy_model_is_scheduled_on_the_promotion_asset_and_runs_one_at_a_time(dags):
    from airflow.sdk import Asset

    from serving.deploy.assets import alias_asset

    dag = dags["deploy_model"]
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    # Promotions must work without someone unpausing the DAG first.
    assert dag.is_paused_upon_creation is False
    expected = alias_asset("regression-model", "champion")
    assert dag.schedule == Asset(**expected)
    assert expected["uri"] == "mlflow://models/regression-model/aliases/champion"


def test_the_plugin_and_the_dag_agree_on_the_asset(dags, monkeypatch):
    """The webhook plugin records on the asset the DAG is scheduled on, for any settings."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import Asset

    from serving.deploy.assets import alias_asset

    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", "sales forecast/v2")
    monkeypatch.setenv("PIPELINE_REGISTRY_CHAMPION_ALIAS", "prod")
    dag = DagBag(dag_folder=str(DAGS_DIR / "deploy_model.py")).dags["deploy_model"]
    ident = alias_asset("sales forecast/v2", "prod")
    assert dag.schedule == Asset(**ident)
    assert ident["uri"] == "mlflow://models/sales%20forecast%2Fv2/aliases/prod"


def test_deploy_model_params_are_typed_and_documented(dags):
    params = dags["deploy_model"].params
    expected = {
        "version": ["null", "integer"],
        "deploy_target": "string",
        "reason": "string",
        "retry_failed": "boolean",
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
    # An asset-triggered run gets the defaults: no version, so what @champion names; a
    # promotion is a person asking again, so a version that failed before is retried.
    assert params["version"] is None
    assert params["retry_failed"] is True


@pytest.mark.parametrize(
    ("name", "value"),
    [("version", 0), ("version", "three"), ("deploy_target", "moon"), ("retry_failed", "no")],
)
def test_deploy_model_form_rejects_bad_values(dags, name, value):
    from airflow.sdk.exceptions import ParamValidationError

    param = copy.deepcopy(dags["deploy_model"].params.get_param(name))
    with pytest.raises(ParamValidationError):
        param.resolve(value)


def test_deploy_model_form_accepts_a_rollback_version(dags):
    params = dags["deploy_model"].params
    assert copy.deepcopy(params.get_param("version")).resolve(3) == 3


def test_mlflow_links_are_global_so_no_dag_imports_the_plugin():
    """The plugin adds its MLflow links to every operator; the DAG files never import it."""
    import importlib

    importlib.import_module("tests.plugins.conftest")  # puts the plugins folder on sys.path
    plugin = importlib.import_module("registry_events.registry_events_plugin")
    RegistryEventsPlugin = plugin.RegistryEventsPlugin

    names = {link.name for link in RegistryEventsPlugin.global_operator_extra_links}
    assert names == {"MLflow model version", "MLflow training run"}
    for path in DAGS_DIR.glob("*.py"):
        assert "registry_events" not in path.read_text().replace("`registry_events`", ""), path


def test_reconcile_graph_and_schedule(dags):
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
    from airflow.sdk.definitions.xcom_arg import XComArg

    dag = dags["reconcile_deployment"]
    assert _edges(dag) == {("check", "trigger_deploy_model")}
    assert dag.schedule == timedelta(minutes=10)
    assert dag.max_active_runs == 1 and dag.catchup is False
    trigger = dag.get_task("trigger_deploy_model")
    assert isinstance(trigger, TriggerDagRunOperator)
    assert trigger.trigger_dag_id == "deploy_model"
    assert trigger.wait_for_completion is False  # never holds a slot while deploy_model runs
    # deploy_model's conf is check's return value (a TaskFlow value, no string-keyed XCom).
    assert isinstance(trigger.conf, XComArg)
    assert (trigger.conf.operator.task_id, trigger.conf.key) == ("check", "return_value")
    # A check must end well before the next one is due.
    assert dag.dagrun_timeout < dag.schedule


@pytest.mark.parametrize(
    ("report", "conf"),
    [
        ({"converge": False, "reason": "in sync"}, None),
        (
            {"converge": True, "reason": "@champion names v5; live: v4 (healthy)"},
            {"reason": "reconcile: @champion names v5; live: v4 (healthy)", "retry_failed": False},
        ),
        (
            {"converge": True, "reason": "x" * 1000},
            {"reason": "reconcile: " + "x" * 400, "retry_failed": False},
        ),
    ],
)
def test_reconcile_check_returns_deploy_model_s_conf_or_none(dags, monkeypatch, report, conf):
    """None skips the trigger (short circuit); otherwise deploy_model's conf, which its own
    Params accept: reconcile never retries a verdict (retry_failed false)."""
    import serving.deploy.sync as sync

    monkeypatch.setattr(sync, "reconcile_report", lambda *a, **k: report)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    check = dags["reconcile_deployment"].get_task("check")
    returned = check.python_callable()
    assert returned == conf
    if conf is not None:
        params = dags["deploy_model"].params
        assert set(conf) <= set(params.keys())
        for name, value in conf.items():
            assert copy.deepcopy(params.get_param(name)).resolve(value) == value
