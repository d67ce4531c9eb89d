"""
### deploy_model

Rolls one registered model version out through the same deploy and verify steps as
`train_and_deploy`, then points the deployment alias (`@champion`) at it.

`resolve → choose_target → (deploy_local | deploy_kubernetes) → rolled_out → verify → promote`;
`roll_back` runs only when a deploy or verify step failed.

* **Registry promotion**: moving `@champion` in the MLflow UI sends an MLflow webhook to the
  `registry_events` plugin, which records an event on the asset
  `mlflow://models/<model>/aliases/champion`; this DAG is scheduled on that asset.
* **Rollback / manual deploy**: *Trigger* with `version` = the version number to put back.
  Leave `version` empty to deploy what `alias` names now.
* **Which version**: `resolve` pins the version when the run starts: the `version` Param, else
  the alias's *current* target (not the version an event carried: a later promotion wins). One
  run at a time (`max_active_runs=1`); a promotion during a run queues the next run.
* **Verify** sends the version's logged input example to the live endpoint and compares the
  answers with the registered model's own predictions.
* **Promote** moves `@champion` only after verification, and only if nobody moved it meanwhile.
* **Roll back**: the version that was live when the run started is put back (a failed first
  rollout is withdrawn), `@champion` moves back to it, the failed version gets the tag
  `rollout.failed` with the reason, and the run fails.

The task pages link to the MLflow model version and its training run. Every task is one call
into `serving/`; see README.md.
"""

from __future__ import annotations

import pendulum
from _support import (
    IO_TASK_DEFAULTS,
    deploy_model_params,
    deploy_settings,
    failure_reason,
    failure_recorded,
    promotion_asset,
    promotion_registry_settings,
    tracking_uri,
    triggering_events,
)
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException
from registry_events.links import link_to_mlflow

from serving.deploy.pods import rollout_pod_kwargs
from serving.deploy.settings import DeploySettings

ROLLOUT_TASKS = ["deploy_local", "deploy_kubernetes", "verify"]


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
    @task
    def resolve(**context) -> dict:
        from serving.deploy.promotion import resolve

        params = context["params"]
        return resolve(
            promotion_registry_settings(params),
            deploy_settings(params),
            tracking_uri=tracking_uri(),
            version=params.get("version"),
            alias=params.get("alias"),
            events=triggering_events(context),
        )

    @task.branch
    def choose_target(**context) -> str:
        return f"deploy_{deploy_settings(context['params']).target}"

    @task(retries=1)
    def deploy_local(resolution: dict, **context) -> dict:
        from serving.deploy.steps import deploy_local

        with failure_recorded(context):
            return deploy_local(
                resolution, deploy_settings(context["params"]), tracking_uri=tracking_uri()
            )

    # Same pod as train_and_deploy's rollout; the pinned version comes from `resolve`.
    deploy_kubernetes = KubernetesPodOperator(
        task_id="deploy_kubernetes",
        **rollout_pod_kwargs(
            DeploySettings(),
            model_uri="{{ ti.xcom_pull(task_ids='resolve')['model_uri'] }}",
            version="{{ ti.xcom_pull(task_ids='resolve')['version'] }}",
            tracking_uri="{{ mlflow_tracking_uri() }}",
        ),
    )

    rolled_out = EmptyOperator(task_id="rolled_out", trigger_rule="none_failed_min_one_success")

    @task(retries=0)
    def verify(resolution: dict, **context) -> dict:
        from serving.deploy.steps import verify_on_input_example

        with failure_recorded(context):
            return verify_on_input_example(
                resolution, deploy_settings(context["params"]), tracking_uri=tracking_uri()
            )

    @task
    def promote(resolution: dict, verified: dict, **context) -> dict:
        from serving.deploy.promotion import promote

        return promote(
            resolution, promotion_registry_settings(context["params"]), tracking_uri=tracking_uri()
        )

    # Runs only if a deploy or verify step failed (skipped otherwise); the run still fails.
    @task(trigger_rule="one_failed")
    def roll_back(**context) -> dict:
        from serving.deploy.promotion import roll_back

        params = context["params"]
        resolution = context["ti"].xcom_pull(task_ids="resolve")
        if not resolution:
            raise AirflowSkipException("no version was resolved: nothing was rolled out")
        return roll_back(
            resolution,
            failure_reason(context, ROLLOUT_TASKS),
            deploy_settings(params),
            promotion_registry_settings(params),
            tracking_uri=tracking_uri(),
        )

    resolution = resolve()
    target = choose_target()
    local = deploy_local(resolution)
    resolution >> target >> [local, deploy_kubernetes]
    [local, deploy_kubernetes] >> rolled_out
    verified = verify(resolution)
    rolled_out >> verified
    promoted = promote(resolution, verified)
    [local, deploy_kubernetes, verified] >> roll_back()
    link_to_mlflow(resolution, local, deploy_kubernetes, verified, promoted)


deploy_model()
