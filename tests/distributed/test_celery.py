"""The pipeline on the distributed shape (``PIPELINE_EXECUTOR=celery``): a nightly run end to
end, then a run that loses the worker it trains on and, during evaluation, the object store.

One stack for the module (``celery_stack``: PostgreSQL, Redis, MinIO, MLflow on S3, Airflow's
scheduler, DAG processor and API server, and two Celery workers each in its own network and
mount namespace, as its own user).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import psutil
import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

DAG = "train_and_deploy"
MODEL, EXPERIMENT = "regression-model", "train_and_deploy"


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def _service(stack, name: str) -> list[psutil.Process]:
    """The processes the stack started as ``name`` (and what they started)."""
    mark = {"PIPELINE_STACK_STATE": str(stack.state), "PIPELINE_STACK_SERVICE": name}
    return [
        proc
        for proc in psutil.process_iter(["environ"], ad_value=None)
        if mark.items() <= (proc.info["environ"] or {}).items()
    ]


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)


def _mlflow(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def _served_version(stack) -> str | None:
    from serving.deploy.verify import Endpoint

    serving = stack.hosts["b"]
    with Endpoint(f"http://{serving.address}:{stack.env['PIPELINE_DEPLOY_LOCAL_PORT']}") as live:
        return live.served_version()


def test_a_nightly_run_trains_on_any_worker_and_rolls_out_on_the_serving_host(celery_stack):
    stack = celery_stack
    addresses = {host.address: name for name, host in stack.hosts.items()}

    # The workers: each its own user and network namespace; the scheduler's state unseen.
    for name, host in stack.hosts.items():
        worker = _service(stack, f"worker-{name}")
        assert worker, f"worker-{name} is not running"
        assert {p.username() for p in worker} == {host.user}
        assert _netns("self") not in {_netns(p.pid) for p in worker}
        pids = {p.pid for p in worker}
        main = next(p for p in worker if p.ppid() not in pids)  # the worker, not a task
        secrets = [k for k in main.environ() if k.startswith(("AWS_", "AIRFLOW_CONN"))]
        assert not secrets and "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in main.environ()
        looked = subprocess.run(
            host.argv(["ls", str(stack.state / "airflow")]), capture_output=True, text=True
        )
        assert looked.returncode != 0, looked.stdout
        assert "No such file" in looked.stderr

    # Unpaused, the DAG's nightly schedule runs once (catchup off): that run is the test.
    stack.api.patch(f"/dags/{DAG}", json={"is_paused": False}).raise_for_status()

    def scheduled() -> str | None:
        runs = stack.get(f"/dags/{DAG}/dagRuns")["dag_runs"]
        return next((r["dag_run_id"] for r in runs if r["run_type"] == "scheduled"), None)

    run_id = _wait(scheduled, 120, "the nightly run")
    state = stack.wait_run(DAG, run_id)
    tasks = stack.tasks(DAG, run_id)
    assert state == "success", {t: ti["state"] for t, ti in tasks.items()}
    ran = {t: ti for t, ti in tasks.items() if ti["state"] == "success"}
    assert {"train", "evaluate", "register", "gate", "rollout_local"} <= set(ran)
    assert {ti["hostname"] for ti in ran.values()} <= set(addresses)
    assert ran["rollout_local"]["queue"] == "serving"
    assert addresses[ran["rollout_local"]["hostname"]] == "b"

    # What travelled between the tasks: URIs every worker opens (the object store).
    window = stack.get(
        f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/load_window/xcomEntries/return_value"
    )["value"]
    assert window["partitions"]
    assert all(p["uri"].startswith("s3://pipeline/data/date=") for p in window["partitions"])

    # Registered, gated, rolled out: @champion is live on the serving host, its model in S3.
    client = _mlflow(stack)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["airflow_run_id"] == run_id
    assert _served_version(stack) == champion.version
    objects = stack.shape.store.client().list_objects_v2(Bucket="pipeline", Prefix="mlflow/")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    assert any(champion.run_id in key for key in keys), keys[:20]


def test_a_worker_killed_mid_training_and_the_object_store_down_during_evaluation(celery_stack):
    """The worker that trains dies (SIGKILL of its every process): the step is retried on the
    other worker, and the dead attempt's MLflow run is marked FAILED, never registered. Then
    the object store is stopped for 30 s while the model is evaluated: the run still ends
    with the version verified live, and nothing it wrote before is lost."""
    from ml.train import RUN_KEY_TAG, SUPERSEDED_BY_TAG

    stack = celery_stack
    addresses = {host.address: name for name, host in stack.hosts.items()}
    conf = {"force_retrain": True, "force_deploy": True, "epochs": 30}
    run_id = (
        stack.api.post(f"/dags/{DAG}/dagRuns", json={"logical_date": None, "conf": conf})
        .raise_for_status()
        .json()["dag_run_id"]
    )
    key = f"{DAG}/{run_id}/train"
    client = _mlflow(stack)
    experiment = client.get_experiment_by_name(EXPERIMENT)

    def training() -> list:
        return client.search_runs(
            [experiment.experiment_id], f"tags.{RUN_KEY_TAG} = '{key}' and status = 'RUNNING'"
        )

    first = _wait(training, 300, "the first training attempt", 0.3)[0]
    victim = addresses[stack.tasks(DAG, run_id)["train"]["hostname"]]
    _kill(_service(stack, f"worker-{victim}"))

    def retried() -> dict | None:
        # Running (or done): until the retry starts, try 2 still carries the hostname of try 1
        # (Airflow sets it when a worker starts the try), so a read before then names the victim.
        tries = stack.tries(DAG, run_id, "train")
        started = ("running", "success", "failed")
        return next((t for t in tries if t["try_number"] == 2 and t["state"] in started), None)

    second = _wait(retried, 180, "the retry of train", 2)
    assert addresses[second["hostname"]] != victim
    stack.stack("up")  # the lost host comes back (`make up` starts what is not running)

    _wait(lambda: stack.tasks(DAG, run_id)["evaluate"]["state"] == "running", 600, "evaluate")
    _kill(_service(stack, "objectstore"))
    time.sleep(30)
    stack.stack("up")  # the store comes back on its data

    state = stack.wait_run(DAG, run_id, timeout_s=900)
    tasks = stack.tasks(DAG, run_id)
    assert state == "success", {t: ti["state"] for t, ti in tasks.items()}

    runs = client.search_runs([experiment.experiment_id], f"tags.{RUN_KEY_TAG} = '{key}'")
    by_status = {r.info.status: r for r in runs}
    assert sorted(by_status) == ["FAILED", "FINISHED"] and len(runs) == 2
    assert by_status["FAILED"].info.run_id == first.info.run_id
    assert by_status["FAILED"].data.tags[SUPERSEDED_BY_TAG] == by_status["FINISHED"].info.run_id
    versions = client.search_model_versions(f"name = '{MODEL}'")
    ours = [v for v in versions if v.tags.get("airflow_run_id") == run_id]
    assert [v.run_id for v in ours] == [by_status["FINISHED"].info.run_id]
    assert not [v for v in versions if v.run_id == first.info.run_id]
    # Verified live on the serving host: its artifacts and verification rows came through.
    assert client.get_model_version_by_alias(MODEL, "champion").version == ours[0].version
    assert _served_version(stack) == ours[0].version
    print(f"evaluate: {len(stack.tries(DAG, run_id, 'evaluate'))} attempt(s) across the outage")


def _netns(pid) -> str:
    import os

    return os.readlink(f"/proc/{pid}/ns/net")
