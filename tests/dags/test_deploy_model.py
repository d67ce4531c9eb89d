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
    dag = dags["deploy_model"]
    assert _edges(dag) == {
        ("request", "in_sync"),
        ("request", "rollout_local"),
        ("request", "rollout_kubernetes"),
    }
    for task_id in ("request", "rollout_local"):
        task = dag.get_task(task_id)
        assert task.retries >= 1 and task.retry_delay >= timedelta(seconds=10), task_id


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
    expected = {"version": ["null", "integer"], "deploy_target": "string", "reason": "string"}
    assert set(params.keys()) == set(expected)
    for name, type_ in expected.items():
        schema = params.get_param(name).schema
        assert schema["type"] == type_, name
        assert schema.get("title") and params.get_param(name).description, name
    # An asset-triggered run gets the defaults: no version, so what @champion names.
    assert params["version"] is None


@pytest.mark.parametrize(
    ("name", "value"), [("version", 0), ("version", "three"), ("deploy_target", "moon")]
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

    dag = dags["reconcile_deployment"]
    assert _edges(dag) == {("check", "trigger_deploy_model")}
    assert dag.schedule == timedelta(minutes=10)
    assert dag.max_active_runs == 1 and dag.catchup is False
    trigger = dag.get_task("trigger_deploy_model")
    assert isinstance(trigger, TriggerDagRunOperator)
    assert trigger.trigger_dag_id == "deploy_model"
    assert trigger.wait_for_completion is False  # never holds a slot while deploy_model runs
    # A check must end well before the next one is due.
    assert dag.dagrun_timeout < dag.schedule
