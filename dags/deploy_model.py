"""
### deploy_model

Puts a registered model version live through the one rollout path every trigger shares
(`serving.deploy.rollout`): deploy, verify the live endpoint, then point `@champion` at it;
on a failed verification, put the previous version back.

`request → rollout_or_not → (rollout_local | rollout_kubernetes | in_sync)`

* **Registry promotion**: moving `@champion` in the MLflow UI sends an MLflow webhook to the
  `registry_events` plugin, which records an event on the asset
  `mlflow://models/<model>/aliases/champion`; this DAG is scheduled on that asset. The
  rollout deploys what `@champion` names *when it runs*, not what the event carried: of
  several quick promotions, the last one ends live.
* **Rollback / manual deploy**: *Trigger* with `version` = the version number to put live
  (also one whose rollout failed before). `@champion` moves to it once verified.
* **Reconcile** (`reconcile_deployment`) triggers it when the endpoint does not serve
  `@champion` or does not answer; `make run` restores `@champion` the same way.
* **request** decides only the cheap case: `@champion` is already live and healthy (the
  webhook of the pipeline's own promotion, a reconcile race), then the run ends in
  `in_sync` in seconds. Everything else is decided again inside the rollout, which holds the
  one slot of the `model_rollout` pool: one rollout at a time across all DAGs.
* A verdict (wrong answers, or pods that never became ready) tags the version
  `rollout.failed` with the reason and is not retried, nor is a refusal; a fault (a task that
  could not start, an API or registry without an answer) is retried and marks nothing.
* A trigger conf key that names no Param fails the run at `request`, without retries,
  naming the Params it accepts (asset-triggered runs carry no conf).

The rollout task links to the MLflow model version and its training run.
"""

from __future__ import annotations

import pendulum
from _params import deploy_model_params, deploy_settings, reject_unknown_conf
from _rollout import rollout_tasks
from _support import (
    IO_TASK_DEFAULTS,
    local_queue,
    promotion_asset,
    registry_settings,
    tracking_uri,
    triggering_events,
)
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import dag, task


@dag(
    dag_id="deploy_model",
    schedule=promotion_asset(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # Promotions must deploy without someone unpausing the DAG first.
    is_paused_upon_creation=False,
    default_args=IO_TASK_DEFAULTS,
    params=deploy_model_params(),
    tags=["ml", "deployment", "mlflow", "rollback"],
    doc_md=__doc__,
    user_defined_macros={"mlflow_tracking_uri": tracking_uri},
)
def deploy_model():
    @task(multiple_outputs=True, queue=local_queue())  # it may look at the local target
    def request(**context) -> dict:
        reject_unknown_conf(context)  # asset-triggered runs have no conf: they pass
        from serving.deploy.sync import request_for_deploy_model

        params = context["params"]
        decided = request_for_deploy_model(
            version=params.get("version"),
            reason=params.get("reason") or "",
            retry_failed=bool(params.get("retry_failed", True)),
            events=triggering_events(context),
            run_id=context["run_id"],
            deploy=deploy_settings(params),
            registry=registry_settings(),
            tracking_uri=tracking_uri(),
        )
        target = deploy_settings(params).target
        route = "in_sync" if decided["request"] is None else f"rollout_{target}"
        return {**decided, "route": route}

    @task.branch
    def rollout_or_not(route: str) -> str:
        return route

    decided = request()
    in_sync = EmptyOperator(task_id="in_sync")
    rollout_or_not(decided["route"]) >> [in_sync, *rollout_tasks(decided["request"])]


deploy_model()
