"""
### gate_new_version

Every version registered outside the pipeline goes through the same gate before it may go
live: a model logged from a notebook, a script, another team's job.

`versions → judge (one per version) → decide → deploy_or_not → approval →
(rollout_local | rollout_kubernetes)`, or `deploy_or_not → not_deployed`.

* **Trigger**: MLflow's `model_version.created` webhook reaches the `registry_events` plugin,
  which records an event on the asset `mlflow://models/<model>/versions` for a version that
  no Airflow run registered (`train_and_deploy`'s own versions are judged by its own gate).
  Or *Trigger* with `version` = a number, to gate that one.
* **judge**: each version is scored against `@champion` on the holdout of the current window
  (`data_window_days` ending at the run's date, or `data_end_date`), with the pipeline's own
  steps: the evaluation is logged on the version's run, its metrics and window tagged on the
  version, and the gate's decision too (`gate.passed`, `gate.reasons`, ...), exactly as for a
  trained version. A version that fails stays registered and never goes live (the rollout
  refuses any version without a passed gate).
* **decide**: of the versions that passed, the newest is rolled out; the same approval (the
  `require_approval` Param) and the same rollout tasks as `train_and_deploy`, in the
  `model_rollout` pool, with the same strategy and judge Params (`rollout_strategy`, ...). A
  promotion made meanwhile wins (the request is superseded).
"""

from __future__ import annotations

import pendulum
from _approval import approval_and_rollout
from _params import data_settings, gate_params, gate_settings, reject_unknown_conf, window_end
from _rollout import rollout_decision
from _support import (
    IO_TASK_DEFAULTS,
    log,
    new_version_asset,
    registry_settings,
    tracking_uri,
    triggering_events,
)
from airflow.sdk import dag, task


@dag(
    dag_id="gate_new_version",
    schedule=new_version_asset(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # A version registered from a notebook must be judged without someone unpausing this.
    is_paused_upon_creation=False,
    default_args=IO_TASK_DEFAULTS,
    params=gate_params(),
    tags=["ml", "gate", "deployment", "mlflow"],
    doc_md=__doc__,
    user_defined_macros={"mlflow_tracking_uri": tracking_uri},
)
def gate_new_version():
    @task
    def versions(**context) -> list[str]:
        reject_unknown_conf(context)
        given = context["params"].get("version")
        events = triggering_events(context)
        found = [str(given)] if given else sorted({str(e["version"]) for e in events}, key=int)
        log.info("Versions to gate: %s", ", ".join(f"v{v}" for v in found) or "none")
        return found

    @task
    def load_window(**context) -> dict:
        from ml.pipeline import load_window

        return load_window(data_settings(context["params"]), window_end(context))

    @task
    def judge(version: str, window: dict, **context) -> dict:
        from ml.governance import judge_version

        params = context["params"]
        return judge_version(
            version,
            window,
            data_settings(params),
            gate_settings(params),
            registry_settings(),
            tracking_uri=tracking_uri(),
        )

    @task(multiple_outputs=True)
    def decide(judged: list[dict], **context) -> dict:
        judged = sorted(judged, key=lambda j: int(j["version"]))
        summary = "; ".join(f"v{j['version']} {j['decision']['summary']}" for j in judged)
        passed = [j for j in judged if j["decision"]["passed"]]
        if not passed:
            return {"passed": False, "summary": summary, "route": "not_deployed",
                    "request": None, "ask": None}  # fmt: skip
        best = passed[-1]  # the newest
        decided = rollout_decision(best["version"], best["decision"], best["evaluation"], context)
        return {**decided, "summary": summary}

    @task.branch
    def deploy_or_not(route: str) -> str:
        return route

    @task
    def not_deployed(summary: str) -> str:
        log.info("Nothing deployed: %s", summary)
        return summary

    judged = judge.partial(window=load_window()).expand(version=versions())
    decision = decide(judged)
    deploy_or_not(decision["route"]) >> [
        not_deployed(decision["summary"]),
        approval_and_rollout(decision),
    ]


gate_new_version()
