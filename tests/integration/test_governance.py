"""Who decides what goes live: versions registered outside the pipeline go through the gate,
and a person approves (or not) before any traffic moves.

Real here (``registry_stack``): an ``mlflow server`` that posts its registry webhooks to an
``airflow api-server`` loading the registry_events plugin, on the test's Airflow metadata DB;
``gate_new_version`` runs through ``dag.test()`` in this process against that DB, the local
deploy target serves real model-server processes. No scheduler runs: a run is started as the
scheduler would start it, and where the scheduler would act (the approval timeout's sweep), the
test calls its code. While an approval waits, ``dag.test()`` waits too (it polls the DB); a
helper thread answers as a person would: REST API, or tags in MLflow.

The versions are "notebook" versions of :class:`governance_models.Oracle` (the synthetic
load without its noise, plus a bias), scored on the pipeline's own holdout, in order:

====  ======  ===================================================================
v1    +0.5    first version, no @champion: absolute bars only; deployed
v2    +2.5    worse than @champion v1: refused by the gate, never deployed
v3    0       better: deployed
v4    +0.05   approval over REST; meanwhile a rollback to v1 runs: v4 superseded
v5    0       approved with the `approval` tag in MLflow: deployed
v6    +0.05   rejected over REST: nothing deployed
v7    +0.05   nobody answers: the timeout rejects it
====  ======  ===================================================================
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import date

import httpx
import pytest

from tests.dags.conftest import load_dag, task_states
from tests.integration.conftest import xcom as _xcom
from tests.integration.registry_stack import REPO, airflow_api, registry_stack
from tests.plugins.conftest import asset_events, clear_queue, queued_for

pytestmark = pytest.mark.integration

MODEL = "it-gov-model"
VERSIONS_URI = f"mlflow://models/{MODEL}/versions"
SECRET = uuid.uuid4().hex
END = date(2026, 3, 10)
RUN = {"data_window_days": 3, "data_end_date": END.isoformat()}
APPROVE = {**RUN, "require_approval": True}


@pytest.fixture(scope="module")
def stack(airflow_db, tmp_path_factory):
    from airflow.models.pool import Pool

    from serving.deploy.settings import DeploySettings

    root = tmp_path_factory.mktemp("governance")
    env = {
        "PIPELINE_DATA_PATH": str(root / "data"),
        "PIPELINE_DATA_SYNTHETIC_ROWS_PER_DAY": "300",
        "PIPELINE_REGISTRY_EXPERIMENT_NAME": "it-governance",
    }
    Pool.create_or_update_pool(DeploySettings().rollout_pool, 1, "one rollout", False)
    with registry_stack(root, MODEL, SECRET, env=env) as stack:
        import mlflow

        mlflow.set_experiment("notebooks")
        yield stack


def _register(stack, bias: float) -> str:
    """A version registered by a script, and its webhook's event on the versions asset."""
    from tests.integration.governance_models import log_oracle

    before = len(asset_events(VERSIONS_URI))
    version = log_oracle(bias, MODEL)
    _until(lambda: any(e["version"] == version for e in asset_events(VERSIONS_URI)[before:]))
    assert queued_for(VERSIONS_URI) == ["gate_new_version"]
    clear_queue()
    return version


def _until(done: Callable[[], object], timeout_s: float = 120, what: str = "") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := done():
            return result
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s}s: {what or done}")


def _gate(version: str, conf: dict | None = None):
    """The run the scheduler starts for the version's event (its number given as the Param)."""
    return load_dag("gate_new_version").test(run_conf={**(conf or RUN), "version": int(version)})


def _tags(stack, version: str) -> dict:
    return stack["client"].get_model_version(MODEL, version).tags


def _champion(stack) -> str | None:
    try:
        return stack["client"].get_model_version_by_alias(MODEL, "champion").version
    except Exception:
        return None


def _served(stack) -> str | None:
    return httpx.get(f"{stack['endpoint']}/v1/model", timeout=10).json().get("version")


class Person(threading.Thread):
    """Answers the approval of ``version`` once it waits, as a person would: ``act(waiting)``
    with the pending task (dag_id, run_id, task_id), then waits until the task took the
    answer. A failure is kept for the test to raise, after a fallback *Reject* over REST: an
    answer that never arrives must fail the test, not leave ``dag.test()`` waiting forever."""

    def __init__(self, stack, version: str, act: Callable[[dict], None]) -> None:
        super().__init__(daemon=True)
        self.stack, self.version, self.act = stack, version, act
        self.error: BaseException | None = None
        self.seen: dict = {}

    def run(self) -> None:
        waiting = None
        try:
            raw = _until(lambda: _tags(self.stack, self.version).get("approval.pending"))
            waiting = json.loads(raw)
            self.act(waiting)
            _until(lambda: _task(self.stack, waiting)["state"] != "awaiting_input", 90, "answer")
        except BaseException as exc:  # raised in the test thread by done()
            self.error = exc
            if waiting is not None:
                with contextlib.suppress(Exception):
                    _answer_over_rest(self.stack, waiting, "Reject", "the test failed")

    def done(self) -> None:
        self.join(timeout=300)
        if self.error is not None:
            raise self.error


def _task(stack, waiting: dict) -> dict:
    with airflow_api(stack["airflow"]) as api:
        path = f"/dags/{waiting['dag_id']}/dagRuns/{waiting['run_id']}/taskInstances/approval"
        return api.get(path).raise_for_status().json()


def _answer_over_rest(stack, waiting: dict, option: str, reason: str) -> dict:
    with airflow_api(stack["airflow"]) as api:
        path = (
            f"/dags/{waiting['dag_id']}/dagRuns/{waiting['run_id']}"
            "/taskInstances/approval/-1/hitlDetails"
        )
        body = {"chosen_options": [option], "params_input": {"reason": reason}}
        return api.patch(path, json=body).raise_for_status().json()


# -- every version goes through the gate ---------------------------------------------------------


def test_a_first_version_from_a_notebook_is_gated_and_deployed(stack):
    version = _register(stack, 0.5)
    assert version == "1"
    dag_run = _gate(version)
    states = task_states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["approval"] == "success" and states["rollout_local"] == "success"
    assert states["not_deployed"] == "skipped" and states["rollout_kubernetes"] == "skipped"
    tags = _tags(stack, "1")
    assert tags["gate.passed"] == "true" and tags["gate.has_champion"] == "false"
    assert tags["data_window_end"] == END.isoformat() and len(tags["data_digest"]) == 64
    assert "approval" not in tags  # not required: nobody was asked
    assert _champion(stack) == "1" and _served(stack) == "1"
    # The evaluation went to the notebook's run, like a trained version's.
    run = stack["client"].get_run(stack["client"].get_model_version(MODEL, "1").run_id)
    assert run.data.metrics["holdout_rmse"] == pytest.approx(float(tags["holdout_rmse"]), rel=1e-5)


def test_a_worse_version_is_refused_by_the_gate_and_never_deployed(stack):
    version = _register(stack, 2.5)
    dag_run = _gate(version)
    states = task_states(dag_run)
    assert str(dag_run.state) == "success", states  # a rejection is an outcome
    assert states["not_deployed"] == "success" and states["approval"] == "skipped"
    assert states["rollout_local"] == "skipped"
    tags = _tags(stack, version)
    assert tags["gate.passed"] == "false" and "worse than the champion" in tags["gate.reasons"]
    assert tags["champion_version_at_eval"] == "1"
    assert _champion(stack) == "1" and _served(stack) == "1"
    assert f"v{version} rejected" in _xcom(dag_run, "not_deployed")


def test_a_better_version_is_gated_and_deployed(stack):
    version = _register(stack, 0.0)
    dag_run = _gate(version)
    assert str(dag_run.state) == "success", task_states(dag_run)
    tags = _tags(stack, version)
    assert tags["gate.passed"] == "true" and tags["gate.has_champion"] == "true"
    assert float(tags["holdout_rmse"]) < float(tags["champion_holdout_rmse"])
    assert _champion(stack) == "3" and _served(stack) == "3"
    outcome = _xcom(dag_run, "rollout_local")
    assert outcome["status"] == "rolled_out" and outcome["champion"] == "3"
    # The model cards (the versions' descriptions) say so, written by the rollout path.
    card = stack["client"].get_model_version(MODEL, "3").description
    assert "outside the Airflow pipeline" in card and "**Gate**: passed" in card
    assert f"| live | on local: gate_new_version run {dag_run.run_id} |" in card
    replaced = stack["client"].get_model_version(MODEL, "1").description
    assert "| stopped serving | replaced by v3 |" in replaced


# -- a person in the loop --------------------------------------------------------------------------


def test_approval_over_rest_while_a_second_rollout_runs(stack):
    """v4 waits for a decision. Meanwhile a rollback to v1 runs: the approval holds no worker
    slot and no rollout slot, so it goes through at once. Then v4 is approved over the REST
    API; its rollout finds @champion moved since v4 was evaluated and skips it (superseded):
    the newer decision wins."""
    from airflow.models.pool import Pool

    from serving.deploy.settings import DeploySettings

    version = _register(stack, 0.05)

    def act(waiting: dict) -> None:
        task = _task(stack, waiting)
        assert task["state"] == "awaiting_input", task
        assert task["pool"] != DeploySettings().rollout_pool
        person.seen["occupied"] = Pool.get_pool(DeploySettings().rollout_pool).occupied_slots()
        rollback = subprocess.run(
            [sys.executable, "-m", "serving.deploy", "rollout", "--target", "local",
             "--request", json.dumps({"kind": "version", "version": "1", "reason": "rollback"})],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        person.seen["rollback"] = rollback
        person.seen["answer"] = _answer_over_rest(stack, waiting, "Approve", "numbers are fine")

    person = Person(stack, version, act)
    person.start()
    dag_run = _gate(version, APPROVE)
    person.done()
    assert person.seen["occupied"] == 0
    assert person.seen["rollback"].returncode == 0, person.seen["rollback"].stdout
    assert person.seen["answer"]["responded_by"]["name"] == "approver"
    states = task_states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["approval"] == "success" and states["rollout_local"] == "success"
    outcome = _xcom(dag_run, "rollout_local")
    assert outcome["status"] == "skipped" and "superseded" in outcome["reason"]
    assert _champion(stack) == "1" and _served(stack) == "1"
    tags = _tags(stack, version)
    assert (tags["approval"], tags["approval.by"], tags["approval.via"]) == (
        "approved",
        "approver",
        "airflow",
    )
    assert tags["approval.reason"] == "numbers are fine" and tags["approval.at"]
    assert "approval.pending" not in tags and "rollout.verified" not in tags


def test_approval_with_the_mlflow_tag_deploys_it(stack):
    version = _register(stack, 0.0)

    def act(waiting: dict) -> None:
        client = stack["client"]
        client.set_model_version_tag(MODEL, version, "approval.by", "dana@example.com")
        client.set_model_version_tag(MODEL, version, "approval.reason", "reviewed the plots")
        client.set_model_version_tag(MODEL, version, "approval", "approved")

    person = Person(stack, version, act)
    person.start()
    dag_run = _gate(version, APPROVE)
    person.done()
    assert str(dag_run.state) == "success", task_states(dag_run)
    assert _champion(stack) == version and _served(stack) == version
    tags = _tags(stack, version)
    assert (tags["approval"], tags["approval.by"], tags["approval.via"]) == (
        "approved",
        "dana@example.com",
        "mlflow",
    )
    assert tags["approval.reason"] == "reviewed the plots" and "approval.pending" not in tags
    card = stack["client"].get_model_version(MODEL, version).description
    assert "approved by dana@example.com via mlflow" in card and "| live |" in card


def test_a_rejection_deploys_nothing(stack):
    version, champion = _register(stack, 0.05), _champion(stack)
    assert champion == "5"
    person = Person(
        stack, version, lambda w: _answer_over_rest(stack, w, "Reject", "wait for Monday")
    )
    person.start()
    dag_run = _gate(version, APPROVE)
    person.done()
    states = task_states(dag_run)
    assert str(dag_run.state) == "success", states  # a decision, not a failure
    assert states["approval"] == "success"
    assert states["rollout_local"] == "skipped" and states["rollout_kubernetes"] == "skipped"
    tags = _tags(stack, version)
    assert (tags["approval"], tags["approval.reason"]) == ("rejected", "wait for Monday")
    assert _champion(stack) == champion and _served(stack) == champion


def test_no_answer_within_the_timeout_is_a_rejection(stack, monkeypatch):
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    monkeypatch.setenv("PIPELINE_GATE_APPROVAL_TIMEOUT_S", "3")
    version = _register(stack, 0.05)
    scheduler = SchedulerJobRunner(job=Job(), executors=[])

    def nobody_answers(waiting: dict) -> None:
        # What the scheduler does every 15 s: resolve approvals past their deadline.
        _until(lambda: _task(stack, waiting)["state"] == "awaiting_input")
        _until(
            lambda: (
                scheduler.check_awaiting_input_timeouts()
                or _task(stack, waiting)["state"] != "awaiting_input"
            ),
            timeout_s=60,
        )

    person = Person(stack, version, nobody_answers)
    person.start()
    dag_run = _gate(version, APPROVE)
    person.done()
    states = task_states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["rollout_local"] == "skipped"
    tags = _tags(stack, version)
    assert (tags["approval"], tags["approval.by"], tags["approval.via"]) == (
        "rejected",
        "timeout",
        "timeout",
    )
    assert "no decision within 3s" in tags["approval.reason"]
    assert _champion(stack) == "5"


def test_a_version_the_pipeline_registers_is_left_to_its_own_gate(stack):
    """A version whose tags name an Airflow run that exists: no event, no second gate."""
    import mlflow
    from airflow.models.dagrun import DagRun

    dag_run = DagRun.find(dag_id="gate_new_version")[-1]  # any run this Airflow has
    before = len(asset_events(VERSIONS_URI))
    tags = {"airflow_dag_id": dag_run.dag_id, "airflow_run_id": dag_run.run_id}
    source = stack["client"].get_model_version(MODEL, "3").source
    registered = mlflow.register_model(source, MODEL, tags=tags).version
    time.sleep(3)  # the webhook's delivery: it must record nothing
    assert [e["version"] for e in asset_events(VERSIONS_URI)[before:]] == []
    assert "gate.passed" not in _tags(stack, str(registered))
