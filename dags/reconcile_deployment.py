"""
### reconcile_deployment

Every 10 minutes: does the endpoint serve what the deployment alias (`@champion`) names, and
does it answer?

`check → trigger_deploy_model` (the trigger is skipped when nothing needs doing).

* **check** compares the alias's version with what is live and asks the endpoint whether it
  answers (local target: the front port; kubernetes: the endpoint's `/ping` and `/v1/model`).
  They differ when a webhook was missed, the alias was moved while Airflow was down, someone
  changed what is live by hand, or the endpoint is down (the local target restarts a crashed
  server by itself within seconds; this catches what that cannot, e.g. its proxy gone).
* Then **trigger_deploy_model** starts `deploy_model`, which decides again, inside the
  rollout slot, what to do: a check that raced a rollout in flight costs one quick run.
* A version whose verification failed (`rollout.failed` tag) is not retried every 10 minutes:
  promote it again, or trigger `deploy_model` with its version by hand.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from _params import deploy_settings
from _support import TASK_CREDENTIALS, local_queue, registry_settings, tracking_uri
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 1,
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(minutes=5),
    **TASK_CREDENTIALS,
}


@dag(
    dag_id="reconcile_deployment",
    schedule=timedelta(minutes=10),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=False,
    dagrun_timeout=timedelta(minutes=9),
    default_args=DEFAULT_ARGS,
    tags=["ml", "deployment", "mlflow", "reconcile"],
    doc_md=__doc__,
)
def reconcile_deployment():
    @task.short_circuit(queue=local_queue())  # it may look at the local target
    def check() -> dict | None:
        """deploy_model's conf when a rollout should run; None (skip the trigger) otherwise."""
        from serving.deploy.sync import reconcile_report

        report = reconcile_report(
            registry_settings(), deploy_settings({}), tracking_uri=tracking_uri()
        )
        if not report["converge"]:
            return None
        # deploy_model's `reason` Param takes at most 500 characters. Reconcile never
        # retries a version that failed before: that waits for a person.
        return {"reason": f"reconcile: {report['reason'][:400]}", "retry_failed": False}

    TriggerDagRunOperator(
        task_id="trigger_deploy_model",
        trigger_dag_id="deploy_model",
        conf=check(),
        wait_for_completion=False,
    )


reconcile_deployment()
