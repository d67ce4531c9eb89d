"""The pipeline's own KubernetesPodOperator tasks, through Airflow's ``dag.test()``, against
the tier's control plane.

``train_and_deploy`` with ``PIPELINE_TRAIN_RUNNER=kubernetes`` and ``deploy_target=kubernetes``:
the operator creates the training pod and the rollout pod in the restricted namespace; their
commands run as real processes (tests/k8s/runtime.py: ``python -m ml train``, ``python -m
serving.deploy rollout`` with the rollout ServiceAccount's token); KWOK ends each pod with the
process's exit code, and the Airflow task follows: success, or a verdict that fails the task
without a retry.
"""

from __future__ import annotations

from datetime import date

import pytest

from serving.server.contract import MODEL_URI_ENV
from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import mlflow_server  # noqa: F401 - a fixture
from tests.integration.promotion_models import Noisy, log_version
from tests.k8s.conftest import Serving, render_cli, wait

MODEL = "k8s-pipeline-model"
NAMESPACE = "pipeline"
END = date(2026, 3, 10)
FAST = {"epochs": 5, "data_window_days": 3, "data_end_date": END.isoformat()}


@pytest.fixture(scope="module")
def pipeline(plane, mlflow_server, airflow_db, tmp_path_factory):  # noqa: F811
    """v1 trained in-process and serving in a namespace bootstrapped the documented way; the
    env a deployment of the pipeline would set; pods run by the tier's runtime."""
    import json

    from ml import pipeline as steps
    from ml.registry import Registry
    from ml.settings import DataSettings, GateSettings, RegistrySettings, TrainingSettings
    from serving.deploy.kube_objects import rollout_state
    from serving.deploy.settings import DeploySettings
    from tests.k8s.runtime import ModelServers, PodRunner, ServiceProxy

    root = tmp_path_factory.mktemp("pipeline-pods")
    env = {
        "AIRFLOW_CONN_MLFLOW_DEFAULT": mlflow_server,
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": str(plane.admin_kubeconfig)}}
        ),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_REGISTRY_URI": mlflow_server,
        "PIPELINE_DATA_PATH": str(root / "data"),
        "PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY": "300",
        "PIPELINE_REGISTRY_MODEL_NAME": MODEL,
        "PIPELINE_REGISTRY_EXPERIMENT_NAME": "k8s-pipeline",
        "PIPELINE_TRAIN_RUNNER": "kubernetes",
        "PIPELINE_TRAIN_POD_CPU": "1",
        "PIPELINE_DEPLOY_TARGET": "kubernetes",
        "PIPELINE_DEPLOY_NAMESPACE": NAMESPACE,
        "PIPELINE_DEPLOY_SERVING_IMAGE": "train-and-deploy/serving:test",
        "PIPELINE_DEPLOY_PROGRESS_DEADLINE_S": "30",
        "PIPELINE_DEPLOY_MIN_READY_S": "1",
        "PIPELINE_DEPLOY_MIN_REPLICAS": "2",
    }
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    data, registry = DataSettings(), RegistrySettings()
    window = steps.load_window(data, END)
    trained = steps.train(window, data, TrainingSettings(epochs=3), registry,
                          tracking_uri=mlflow_server)  # fmt: skip
    evaluation = steps.evaluate(window, trained, data, registry, tracking_uri=mlflow_server)
    version = steps.register(window, trained, evaluation, registry, tracking_uri=mlflow_server)
    steps.gate(version, evaluation, GateSettings(max_rmse=1e6, min_r2=-1e6), registry,
               tracking_uri=mlflow_server)  # fmt: skip
    Registry(mlflow_server, registry).set_alias(registry.champion_alias, version["version"])

    settings = DeploySettings()
    manifests = render_cli(settings, version["version"], mlflow_server, model=MODEL)
    plane.kubectl("apply", "--server-side", "-f", "-", input=manifests)
    servers = ModelServers(mlflow_server, root / "servers")
    proxy = ServiceProxy(plane.api_client(), NAMESPACE, settings.deployment_name, servers)
    runner = PodRunner(
        plane,
        root / "pods",
        selector="app.kubernetes.io/managed-by=airflow",
        # In-cluster DNS does not exist here: the rollout pod reaches the Service this way.
        env={"PIPELINE_DEPLOY_SERVICE_URL": proxy.url},
    )
    serving = Serving(plane, settings, proxy, mlflow_server, root / "unused")
    wait(lambda: rollout_state(serving.deployment())[0] == "complete", 60, "v1 available")
    yield serving, runner
    runner.close()
    proxy.close()
    servers.stop()
    mp.undo()


def _served_uri(serving: Serving) -> str:
    spec = serving.deployment()["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in spec["env"]}[MODEL_URI_ENV]


def _champion(tracking_uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


def test_train_and_deploy_runs_its_pods_and_rolls_out(pipeline):
    serving, runner = pipeline
    dag = load_dag("train_and_deploy")
    assert type(dag.get_task("train")).__name__ == "KubernetesPodOperator"
    run = dag.test(run_conf={**FAST, "force_retrain": True, "deploy_target": "kubernetes"})
    states = task_states(run)
    assert str(run.state) == "success", states
    assert states["train"] == states["training_result"] == "success"
    assert states["rollout_kubernetes"] == "success" and states["rollout_local"] == "skipped"
    exits = {key.split("/")[1].rsplit("-", 1)[0]: code for key, code in runner.exit_codes.items()}
    assert exits == {"model-training": 0, "model-rollout": 0}, runner.exit_codes
    assert _champion(serving.tracking_uri) == "2"
    assert _served_uri(serving) == f"models:/{MODEL}/2"
    assert serving.proxy.ready_model_uris() == [f"models:/{MODEL}/2"] * 2


def test_a_verdict_in_the_rollout_pod_fails_the_task_without_a_retry(pipeline, tmp_path):
    """deploy_model with a version that answers noise: the pod's verification fails, it exits
    1, the task fails on its first try (IO_TASK_DEFAULTS would retry it twice otherwise)."""
    import mlflow

    serving, runner = pipeline
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        mlflow.set_experiment("k8s-pipeline-noise")
        noisy = log_version(Noisy(), MODEL)
    champion = _champion(serving.tracking_uri)
    run = load_dag("deploy_model").test(
        run_conf={"version": int(noisy), "deploy_target": "kubernetes", "reason": "test"}
    )
    states = task_states(run)
    assert states["rollout_kubernetes"] == "failed", states
    (ti,) = [t for t in run.get_task_instances() if t.task_id == "rollout_kubernetes"]
    assert ti.try_number == 1, "a verdict must not be retried"
    rollout_pods = [k for k in runner.exit_codes if "model-rollout" in k]
    assert runner.exit_codes[rollout_pods[-1]] == 1
    from mlflow import MlflowClient

    tags = (
        MlflowClient(serving.tracking_uri, serving.tracking_uri)
        .get_model_version(MODEL, noisy)
        .tags
    )
    assert "rollout.failed" in tags
    assert _champion(serving.tracking_uri) == champion
    assert _served_uri(serving) == f"models:/{MODEL}/{champion}"
