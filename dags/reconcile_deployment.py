"""
### reconcile_deployment

Every 10 minutes: does the endpoint serve what the deployment alias (`@champion`) names?

`check → trigger_deploy_model` (the trigger is skipped when nothing needs doing).

* **check** compares the alias's version with what is live (local target: the front proxy's
  active version; kubernetes: the serving image's `/version`). They differ when a webhook was
  missed, the alias was moved while Airflow was down, or someone changed what is live by hand.
* When they differ, and no `deploy_model` or `train_and_deploy` run is queued or running (a
  rollout under way: the next check looks again), **trigger_deploy_model** starts `deploy_model`,
  which resolves the alias itself when it starts. `deploy_model` runs one at a time.
* A version whose rollout already failed (`rollout.failed` tag) is not retried every 10 minutes:
  promote it again, or trigger `deploy_model` by hand.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from _support import active_runs, deploy_settings, registry_settings, tracking_uri
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

log = logging.getLogger(__name__)

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 1,
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(minutes=5),
}
DEPLOYING_DAGS = ("deploy_model", "train_and_deploy")


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
    @task.short_circuit
    def check(**context) -> bool:
        from serving.deploy.promotion import drift

        report = drift(registry_settings(), deploy_settings({}), tracking_uri=tracking_uri())
        context["ti"].xcom_push(key="report", value=report)
        if not report["converge"]:
            return False
        busy = active_runs(context, *DEPLOYING_DAGS)
        if busy:
            log.info("A rollout may be under way (%s): the next check looks again", busy)
            return False
        return True

    trigger_deploy_model = TriggerDagRunOperator(
        task_id="trigger_deploy_model",
        trigger_dag_id="deploy_model",
        wait_for_completion=False,
    )
    check() >> trigger_deploy_model


reconcile_deployment()
