"""Registry promotions end to end: MLflow alias -> webhook -> asset event -> deploy_model.

What is real here:

* an ``mlflow server`` process (SQLite registry) with webhooks enabled for loopback delivery,
  exactly as ``make run`` starts it; aliases are set through its REST API (``MlflowClient``);
* the MLflow webhook itself: MLflow signs and POSTs it to a real ``airflow api-server``
  process, which loads ``plugins/registry_events`` through Airflow's plugin manager; the
  plugin records the asset event in the test Airflow metadata DB, where the scheduler would
  pick it up (the asset-triggered run queue is checked);
* ``deploy_model`` and ``reconcile_deployment`` run through Airflow's ``dag.test()`` in this
  process, against the same DB: no scheduler runs here, so the test starts the run the
  scheduler would start (default Params, like an asset-triggered run);
* the local deploy target: real ``mlflow models serve`` processes behind the front proxy, and
  real HTTP predictions.

The models are tiny pyfunc models (``promotion_models``), so each rollout takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest

from tests.integration.conftest import xcom as _xcom
from tests.integration.registry_stack import registry_stack
from tests.plugins.conftest import asset_events, clear_queue, queued_for

pytestmark = pytest.mark.integration

MODEL = "it-promo-model"
ASSET_URI = f"mlflow://models/{MODEL}/aliases/champion"
SECRET = uuid.uuid4().hex
WEIGHTS = {
    "1": [1.0, 2.0, 3.0],
    "2": [-1.0, 0.5, 2.0],
    "3": [0.25, 0.25, 4.0],
    "5": [2.0, -1.0, 0.5],  # registered by hand, never gated
}


@pytest.fixture(scope="module")
def stack(airflow_db, tmp_path_factory):
    from scripts.stack import WEBHOOK_PATH, register_mlflow_webhook

    root = tmp_path_factory.mktemp("promotion")
    with registry_stack(root, MODEL, SECRET, prepare=_register_versions) as stack:
        # Idempotent: registering again (every `make run`) updates the same webhook.
        hook_url = f"{stack['airflow']}{WEBHOOK_PATH}"
        assert register_mlflow_webhook(stack["mlflow"], hook_url, SECRET)["test_ok"]
        assert len(stack["client"].list_webhooks()) == 1
        yield stack


def _register_versions(mlflow_url: str) -> None:
    import mlflow

    from tests.integration.promotion_models import Linear, Noisy, log_version

    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_experiment("it-promotion")
    models = [Linear(WEIGHTS["1"]), Linear(WEIGHTS["2"]), Linear(WEIGHTS["3"]), Noisy()]
    for number, model in enumerate(models, start=1):
        assert log_version(model, MODEL) == str(number)
    assert log_version(Linear(WEIGHTS["5"]), MODEL, gated=False) == "5"


# -- helpers ---------------------------------------------------------------------------------


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.test_dag_integrity import DAGS_DIR

    bag = DagBag(dag_folder=str(DAGS_DIR / f"{dag_id}.py"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def _wait_for_event(version: str, after: int, timeout_s: float = 30) -> dict:
    """The first event on the asset past index ``after`` naming ``version`` (webhooks are async)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in asset_events(ASSET_URI)[after:]:
            if event.get("version") == version:
                return event
        time.sleep(0.3)
    raise AssertionError(
        f"no webhook event for v{version} within {timeout_s}s: {asset_events(ASSET_URI)[after:]}"
    )


def _live() -> str | None:
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    return LocalTarget(DeploySettings(), os.environ["MLFLOW_TRACKING_URI"]).active_version()


def _champion(stack) -> str | None:
    try:
        return stack["client"].get_model_version_by_alias(MODEL, "champion").version
    except Exception:
        return None


def _served_predictions_match(stack, version: str) -> None:
    from tests.integration.promotion_models import example

    frame = example()
    response = httpx.post(
        f"{stack['endpoint']}/invocations",
        json={"dataframe_split": frame.to_dict(orient="split", index=False)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["predictions"], dtype=float).ravel()
    np.testing.assert_allclose(got, frame.to_numpy() @ np.asarray(WEIGHTS[version]), atol=1e-9)


# -- scenarios (in order, on one registry and one endpoint) ------------------------------------


def _active_record() -> dict:
    """The local target's record of what it serves (a new one per deployed server)."""
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    return LocalTarget(DeploySettings(), os.environ["MLFLOW_TRACKING_URI"]).read_active()


def _link(dag_run, task_id: str, link_cls):
    from airflow.models.taskinstancekey import TaskInstanceKey

    key = TaskInstanceKey(dag_run.dag_id, task_id, dag_run.run_id, 1, -1)
    return link_cls().get_link(None, ti_key=key)


def test_setting_the_alias_in_mlflow_deploys_that_version(stack):
    from serving.deploy.rollout import Request

    before = len(asset_events(ASSET_URI))
    stack["client"].set_registered_model_alias(MODEL, "champion", "1")

    event = _wait_for_event("1", before)
    assert event["model"] == MODEL and event["alias"] == "champion"
    assert event["source"] == "mlflow-webhook" and event["delivery_id"]
    assert queued_for(ASSET_URI) == ["deploy_model"]  # the scheduler's queue for the asset

    dag_run = _dag("deploy_model").test()  # default Params: what an asset-triggered run gets
    states = _states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["rollout_or_not"] == "success"
    assert states["rollout_local"] == "success" and states["rollout_kubernetes"] == "skipped"
    assert states["in_sync"] == "skipped"
    assert _xcom(dag_run, "request", key="route") == "rollout_local"
    # The request as the rollout got it (the helper reads JSON text back as a dict).
    request = Request.from_dict(_xcom(dag_run, "request", key="request"))
    assert (request.kind, request.retry_failed) == ("champion", True)  # a person promoted it
    outcome = _xcom(dag_run, "rollout_local")
    assert outcome["status"] == "rolled_out" and outcome["version"] == "1"
    assert _live() == "1"
    _served_predictions_match(stack, "1")
    assert _champion(stack) == "1"
    # The alias already named v1: nothing was written, so no new webhook (no feedback loop).
    time.sleep(1.5)
    assert [e["version"] for e in asset_events(ASSET_URI)[before:]] == ["1"]

    # The task page links to MLflow (what the API server computes for the UI).
    from registry_events.links import MlflowModelVersionLink, MlflowRunLink

    assert _link(dag_run, "rollout_local", MlflowModelVersionLink) == (
        f"{stack['mlflow']}/#/models/{MODEL}/versions/1"
    )
    assert "/runs/" in _link(dag_run, "rollout_local", MlflowRunLink)
    assert _link(dag_run, "request", MlflowRunLink) == ""  # no links there: no button
    clear_queue()


def test_the_echo_of_a_promotion_ends_in_seconds_without_a_rollout(stack):
    """What the scheduler starts for the pipeline's own alias write: nothing to do."""
    serving = _active_record()
    started = time.monotonic()
    dag_run = _dag("deploy_model").test()
    states = _states(dag_run)
    assert str(dag_run.state) == "success", states
    assert states["in_sync"] == "success" and states["rollout_local"] == "skipped"
    assert _xcom(dag_run, "request", key="why") == "in sync"
    assert _xcom(dag_run, "request", key="request") is None
    assert _active_record() == serving, "the same server, untouched"
    print(f"in-sync deploy_model run took {time.monotonic() - started:.1f}s")


def test_two_quick_promotions_end_with_the_last_one_live(stack):
    before = len(asset_events(ASSET_URI))
    stack["client"].set_registered_model_alias(MODEL, "champion", "2")
    stack["client"].set_registered_model_alias(MODEL, "champion", "3")
    _wait_for_event("2", before)
    _wait_for_event("3", before)
    # Both events wait in one queue entry: the scheduler starts one run for them...
    assert queued_for(ASSET_URI) == ["deploy_model"]
    dag = _dag("deploy_model")
    assert dag.max_active_runs == 1

    # ...which deploys what the alias names when its rollout runs: v3.
    first = dag.test()
    assert str(first.state) == "success", _states(first)
    assert _xcom(first, "rollout_local")["version"] == "3"
    assert _live() == "3"
    _served_predictions_match(stack, "3")
    # Had the scheduler started a second run, it finds v3 live and changes nothing.
    second = dag.test()
    assert _states(second)["in_sync"] == "success"
    assert _live() == "3" and _champion(stack) == "3"
    clear_queue()


def test_a_task_that_crashes_leaves_the_version_and_the_alias_alone(stack, monkeypatch, tmp_path):
    """Fault: the rollout task dies before it verified anything (here its state folder is
    unusable, as on a worker that cannot start it). Nothing is marked bad, the promotion
    stands, the old version keeps serving; the next run (retry, reconcile) completes it."""
    before = len(asset_events(ASSET_URI))
    stack["client"].set_registered_model_alias(MODEL, "champion", "2")
    _wait_for_event("2", before)

    dag = _dag("deploy_model")
    dag.get_task("rollout_local").retries = 0  # the retries themselves: test_dag_integrity
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("PIPELINE_DEPLOY_LOCAL_STATE_DIR", str(blocker / "serving"))
    crashed = dag.test()
    assert str(crashed.state) == "failed", _states(crashed)
    assert _states(crashed)["rollout_local"] == "failed"
    monkeypatch.undo()

    version = stack["client"].get_model_version(MODEL, "2")
    assert "rollout.failed" not in version.tags
    assert _champion(stack) == "2", "a crash must not undo the user's promotion"
    assert _live() == "3"
    _served_predictions_match(stack, "3")

    healed = _dag("deploy_model").test()
    assert str(healed.state) == "success", _states(healed)
    assert _live() == "2" and _champion(stack) == "2"
    _served_predictions_match(stack, "2")
    clear_queue()


def test_a_failed_verification_returns_production_and_the_alias_to_the_previous_version(stack):
    before = len(asset_events(ASSET_URI))
    stack["client"].set_registered_model_alias(MODEL, "champion", "4")  # serves, but wrong
    _wait_for_event("4", before)

    dag_run = _dag("deploy_model").test()
    states = _states(dag_run)
    assert str(dag_run.state) == "failed", states
    assert states["rollout_local"] == "failed"

    assert _live() == "2"
    _served_predictions_match(stack, "2")
    assert _champion(stack) == "2"
    failed = stack["client"].get_model_version(MODEL, "4")
    reason = failed.tags["rollout.failed"]
    assert "differ from version 4" in reason and "first mismatch at row" in reason, reason
    assert failed.tags["rollout.failed_by"] == dag_run.run_id
    # Moving the alias back is a promotion too: its run finds v2 live and does nothing.
    _wait_for_event("2", before + 1)
    assert _states(_dag("deploy_model").test())["in_sync"] == "success"
    clear_queue()


def test_manual_trigger_with_a_version_is_the_rollback(stack):
    dag_run = _dag("deploy_model").test(run_conf={"version": 1})
    assert str(dag_run.state) == "success", _states(dag_run)
    assert _live() == "1"
    _served_predictions_match(stack, "1")
    assert _xcom(dag_run, "rollout_local")["champion"] == "1"
    assert _champion(stack) == "1"
    clear_queue()


def test_reconcile_converges_after_a_change_behind_the_pipelines_back(stack):
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    # Someone deploys v3 by hand; @champion still names v1.
    LocalTarget(DeploySettings(), stack["mlflow"]).deploy(f"models:/{MODEL}/3", "3")
    assert _live() == "3" and _champion(stack) == "1"

    reconcile = _dag("reconcile_deployment")
    check_run = reconcile.test()
    states = _states(check_run)
    assert str(check_run.state) == "success", states
    assert states["trigger_deploy_model"] == "success"
    # check returns deploy_model's conf; the trigger passes it on. Reconcile never retries a
    # version that failed before.
    conf = {"reason": "reconcile: @champion names v1; live: v3 (healthy)", "retry_failed": False}
    assert _xcom(check_run, "check") == conf
    triggered = _xcom(check_run, "trigger_deploy_model", key="trigger_run_id")
    assert _run_state("deploy_model", triggered) == "queued"
    assert _run_conf("deploy_model", triggered) == conf

    # That queued run, executed: the alias's version is live again.
    dag_run = _dag("deploy_model").test(run_conf=conf)
    assert str(dag_run.state) == "success", _states(dag_run)
    assert _live() == "1"
    _served_predictions_match(stack, "1")

    # In sync now: the next check triggers nothing.
    again = reconcile.test()
    assert _states(again)["trigger_deploy_model"] == "skipped"
    assert _xcom(again, "check") is None  # nothing to trigger: short-circuited
    assert _reconcile_report(stack)["reason"] == "in sync"


def test_reconcile_sees_a_dead_endpoint_and_redeploys(stack):
    """The health half of reconcile: the proxy itself is gone (the supervisor with it)."""
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    LocalTarget(DeploySettings(), stack["mlflow"]).stop_all()
    report = _reconcile_report(stack)
    assert report["converge"] is True and report["healthy"] is False, report
    report_run = _dag("reconcile_deployment").test()
    assert _states(report_run)["trigger_deploy_model"] == "success"
    conf = _xcom(report_run, "check")
    assert conf == {"reason": f"reconcile: {report['reason']}", "retry_failed": False}
    dag_run = _dag("deploy_model").test(run_conf=conf)
    assert str(dag_run.state) == "success", _states(dag_run)
    _served_predictions_match(stack, "1")


def test_a_promotion_and_a_nightly_rollout_at_once_leave_champion_equal_to_live(stack):
    """Fault: two triggers at once. A nightly candidate (v3, evaluated against @champion v1)
    and a promotion of v2 made while it waits: two real rollout processes racing for the
    slot. Whichever gets it first, @champion names what is served afterwards."""
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    def rollout(request: dict) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "serving.deploy", "rollout", "--target", "local",
             "--request", json.dumps(request)],
            env={**os.environ},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    target = LocalTarget(DeploySettings(), stack["mlflow"])
    stack["client"].set_registered_model_alias(MODEL, "champion", "1")
    target.deploy(f"models:/{MODEL}/1", "1")
    candidate = {"kind": "candidate", "version": "3", "champion_at_eval": "1",
                 "reason": "nightly", "run_id": "nightly-1"}  # fmt: skip
    promotion = {"kind": "champion", "retry_failed": True, "reason": "promotion of v2"}
    with target.lock("the test, holding the slot so both queue up"):
        procs = [rollout(candidate)]
        time.sleep(1.0)
        stack["client"].set_registered_model_alias(MODEL, "champion", "2")
        procs.append(rollout(promotion))
        time.sleep(1.0)  # both are waiting for the slot now
    # Which one gets the slot first is up to the lock: the assertions hold for both orders.
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), logs
    # The promotion happened after the candidate's evaluation: it wins.
    assert _champion(stack) == "2", logs
    assert _live() == "2", logs
    assert _served_version(stack) == "2"
    _served_predictions_match(stack, "2")
    assert "superseded" in logs[0], logs
    clear_queue()


def _served_version(stack) -> str | None:
    return httpx.get(f"{stack['endpoint']}/v1/model", timeout=10).json().get("version")


def _reconcile_report(stack) -> dict:
    """What reconcile's check sees (its report: logged, not returned)."""
    from ml.settings import RegistrySettings
    from serving.deploy.settings import DeploySettings
    from serving.deploy.sync import reconcile_report

    return reconcile_report(RegistrySettings(), DeploySettings(), tracking_uri=stack["mlflow"])


def _run_conf(dag_id: str, run_id: str) -> dict | None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(
            select(DagRun.conf).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
        )


def _run_state(dag_id: str, run_id: str) -> str | None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(
            select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
        )
    return str(state) if state is not None else None


# -- the rule of production: a passed gate, or a person's `force` reason -------------------------


def test_a_hand_promotion_of_an_ungated_version_is_refused_and_the_alias_put_back(stack):
    assert _live() == "2" and _champion(stack) == "2"
    before = len(asset_events(ASSET_URI))
    stack["client"].set_registered_model_alias(MODEL, "champion", "5")
    _wait_for_event("5", before)
    report = _reconcile_report(stack)
    assert report["uncleared"] == "it was never gated (no gate.passed tag)", report
    assert report["converge"] is True  # its rollout refuses v5 and puts the alias back

    dag_run = _dag("deploy_model").test()
    states = _states(dag_run)
    assert str(dag_run.state) == "failed", states
    assert states["rollout_local"] == "failed"  # refused: final, not retried
    assert _live() == "2" and _champion(stack) == "2"
    _served_predictions_match(stack, "2")
    refused = stack["client"].get_model_version(MODEL, "5").tags
    assert "never gated" in refused["rollout.refused"] and "`force`" in refused["rollout.refused"]
    assert "rollout.verified" not in refused
    # Putting the alias back is a promotion too: its run finds v2 live and does nothing.
    _wait_for_event("2", before + 1)
    assert _states(_dag("deploy_model").test())["in_sync"] == "success"

    # A deploy by version number is refused the same way; nothing moves.
    by_hand = _dag("deploy_model").test(run_conf={"version": 5})
    assert _states(by_hand)["rollout_local"] == "failed"
    assert _live() == "2" and _champion(stack) == "2"
    clear_queue()


def test_with_a_force_reason_it_goes_live_and_the_reason_is_recorded(stack):
    reason = "INC-7: v2 misprices winter load; v5 hand-checked by the on-call"
    stack["client"].set_model_version_tag(MODEL, "5", "force", reason)
    before = len(asset_events(ASSET_URI))
    stack["client"].set_registered_model_alias(MODEL, "champion", "5")
    _wait_for_event("5", before)

    dag_run = _dag("deploy_model").test()
    assert str(dag_run.state) == "success", _states(dag_run)
    assert _live() == "5" and _champion(stack) == "5"
    _served_predictions_match(stack, "5")
    tags = stack["client"].get_model_version(MODEL, "5").tags
    assert tags["rollout.forced"] == reason and tags["rollout.verified"]
    assert "rollout.refused" not in tags  # cleared once it went live
    assert reason in _xcom(dag_run, "rollout_local")["reason"]
    assert _reconcile_report(stack)["uncleared"] is None
    clear_queue()
