"""
### train_and_deploy

Nightly retraining of the regression model, tracked in MLflow, gated, rolled out.

`load_window → unchanged_check → train_or_not → validate_data → train → evaluate → register →
gate → deploy_or_not → approval → (rollout_local | rollout_kubernetes)`, or
`deploy_or_not → not_deployed`, or `train_or_not → unchanged`.

* **Schedule**: nightly at 02:00 UTC, and on every event of the `data-drift/<model>` asset
  (`monitor_drift` emits one when the data moved enough to retrain) or of the
  `live-error/<model>` asset (`monitor_quality` emits one when `@champion`'s live RMSE against
  the labels that came back stayed above the gate's `max_rmse` for days). Why a run started (the
  drift report, the schedule, a person) is tagged `trigger_reason` on its training run and on
  the version it registers.
* **Window**: `data_window_days` days of partitions ending (exclusive) at the run's data
  interval end, or at the `data_end_date` Param.
* **Nothing to do**: when `@champion` was trained on the window's data digest, this code
  version and the same training parameters (its version's `data_digest`, `code_version` and
  `training_fingerprint` tags), training again would redo it: the run ends, successfully, at
  `unchanged` (the log says which version). The `force_retrain` Param trains anyway; a
  champion without these tags (older versions) or no champion at all means train.
* **Gate**: absolute bars (`max_rmse`, `min_r2`) and at most `max_regression` relative RMSE
  increase over `@champion` on the same holdout. A rejected version is tagged with the reasons,
  no alias moves and the run ends through `not_deployed`.
* **Approval** (the `require_approval` Param, off by default): the `approval` task waits for a
  person, with the gate's evidence in its form (Browse → Required Actions), before any
  traffic moves; answered there, over the REST API, or with the `approval` tag on the version
  in MLflow. Waiting holds no worker slot and no rollout slot. A rejection, or no answer
  within `approval_timeout_s`, ends the run without a rollout; the decision is on the
  version. Off: the task passes straight on to the rollout.
* **Train**: inside the Airflow task, or (`PIPELINE_TRAIN_RUNNER=kubernetes`, read when the
  file is parsed) in a KubernetesPodOperator pod running the same `python -m ml train` with
  requested resources; its MLflow run is tagged `pipeline_run_key` = `<dag>/<run>/train`. In
  the worker its result reaches `evaluate` as the task's value; from the pod (no XCom
  sidecar), `training_result` reads it from the run by that key. A retry marks the run of an
  attempt that died without ending it (MLflow down, worker or pod killed) FAILED.
* **Rollout**: the one rollout path every trigger shares (`serving.deploy.rollout`), in the
  one-slot `model_rollout` pool: it deploys the approved version unless `@champion` moved
  since it was evaluated, verifies the live endpoint on the fixed rows logged at evaluation,
  and only then moves `@champion`. A verdict (the endpoint answered wrongly, or the pods
  never became ready) puts the previous version back, tags the version `rollout.failed` and
  fails the run without retries, as does a refusal (a version or target that cannot be
  used); a fault (an API or registry without an answer) is retried and marks nothing.
  `deploy_target` picks where it runs (worker: local target; pod: Kubernetes).
* **Conf**: a trigger conf key that names no Param (a typo such as `epoch`) fails the run
  at `load_window`, without retries, naming the Params it accepts.

Every task is one call into `ml/` or `serving/`; see README.md for configuration.
"""

from __future__ import annotations

import pendulum
from _approval import approval_and_rollout
from _params import (
    data_settings,
    gate_settings,
    param_templates,
    pipeline_params,
    reject_unknown_conf,
    training_settings,
    window_end,
)
from _rollout import rollout_decision
from _support import (
    IO_TASK_DEFAULTS,
    data_asset,
    drift_asset,
    live_error_asset,
    log,
    pod_task,
    registry_settings,
    run_tags,
    tracking_uri,
    training_run_key,
    training_run_tag_templates,
    training_run_tags,
    trigger_reason,
)
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from airflow.sdk.exceptions import AirflowFailException

from ml.settings import DataSettings, TrainingSettings
from serving.deploy.settings import DeploySettings

DATA = data_asset()


@dag(
    dag_id="train_and_deploy",
    # Nightly, and whenever monitor_drift finds the data moved enough to retrain, or
    # monitor_quality finds @champion's live error above the gate's bar for days.
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
        assets=drift_asset() | live_error_asset(),
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=IO_TASK_DEFAULTS,
    params=pipeline_params(),
    tags=["ml", "training", "deployment", "mlflow"],
    doc_md=__doc__,
    user_defined_macros={"mlflow_tracking_uri": tracking_uri},
)
def train_and_deploy():
    @task(outlets=[DATA])
    def load_window(**context) -> dict:
        reject_unknown_conf(context)  # a mistyped Param must not run with the default
        from ml.pipeline import load_window

        window = load_window(data_settings(context["params"]), window_end(context))
        # "partitions landed" for score_batch: the synthetic source writes them here
        context["outlet_events"][DATA].extra = {"end": window["end"], "digest": window["digest"]}
        # Why this run trains: tagged on the training run and on the version (ml.pipeline).
        window["trigger_reason"] = trigger_reason(context)
        log.info("Run started by: %s", window["trigger_reason"])
        return window

    # Cheap (reads @champion's tags, no TensorFlow): same data, code and parameters as the
    # live version means nothing to train.
    @task
    def unchanged_check(window: dict, **context) -> dict:
        from ml.pipeline import unchanged_check

        params = context["params"]
        decision = unchanged_check(
            window,
            data_settings(params),
            training_settings(params),
            registry_settings(),
            tracking_uri=tracking_uri(),
            force=bool(params.get("force_retrain")),
        )
        log.info("%s", decision["reason"])
        return decision

    @task.branch
    def train_or_not(decision: dict) -> str:
        return "unchanged" if decision["unchanged"] else "validate_data"

    @task
    def unchanged(decision: dict) -> str:
        log.info("Nothing trained: %s", decision["reason"])
        return decision["reason"]

    # Bad data is not transient: fail at once, no retries, nothing trained.
    @task(retries=0)
    def validate_data(window: dict, **context) -> dict:
        from ml.data import DataValidationError
        from ml.pipeline import validate_window

        try:
            return validate_window(window, data_settings(context["params"]))
        except DataValidationError as exc:
            raise AirflowFailException(str(exc)) from exc

    @task(task_id="train", retries=1)
    def train_in_worker(window: dict, **context) -> dict:
        from ml.pipeline import train

        params = context["params"]
        return train(
            window,
            data_settings(params),
            training_settings(params),
            registry_settings(),
            tracking_uri=tracking_uri(),
            tags=training_run_tags(context),
        )

    # The training pod's result, from its MLflow run (found by the step's run key).
    @task
    def training_result(**context) -> dict:
        from ml.pipeline import trained_by

        key = training_run_key(context["dag"].dag_id, context["run_id"], "train")
        return trained_by(key, registry_settings(), tracking_uri=tracking_uri())

    @task
    def evaluate(window: dict, trained: dict, **context) -> dict:
        from ml.pipeline import evaluate

        return evaluate(
            window,
            trained,
            data_settings(context["params"]),
            registry_settings(),
            tracking_uri=tracking_uri(),
        )

    @task
    def register(window: dict, trained: dict, evaluation: dict, **context) -> dict:
        from ml.pipeline import register

        return register(
            window,
            trained,
            evaluation,
            registry_settings(),
            tracking_uri=tracking_uri(),
            tags=run_tags(context),
        )

    @task(multiple_outputs=True)
    def gate(version: dict, evaluation: dict, **context) -> dict:
        from ml.pipeline import gate

        decision = gate(
            version,
            evaluation,
            gate_settings(context["params"]),
            registry_settings(),
            tracking_uri=tracking_uri(),
        )
        return rollout_decision(version["version"], decision, evaluation, context)

    @task.branch
    def deploy_or_not(route: str) -> str:
        return route

    @task
    def not_deployed(version: dict, summary: str) -> str:
        message = f"Version {version['version']} not deployed: {summary}"
        log.info("%s", message)
        return message

    window = load_window()
    decided = unchanged_check(window)
    checked = validate_data(window)
    train_or_not(decided) >> [unchanged(decided), checked]
    # Parse-time settings pick where training runs. Both variants end in the same reference
    # dict; Params reach the pod as templates.
    training = TrainingSettings()
    if training.runner == "kubernetes":

        def training_pod() -> dict:
            from serving.deploy.pods import training_pod_kwargs

            return training_pod_kwargs(
                training,
                DataSettings(),
                DeploySettings(),
                # A pod argument is text: the window as JSON (load_window's return value).
                window="{{ ti.xcom_pull(task_ids='load_window') | tojson }}",
                tracking_uri="{{ mlflow_tracking_uri() }}",
                **param_templates(TrainingSettings),
                tags=training_run_tag_templates(),
                execution_timeout_s=int(IO_TASK_DEFAULTS["execution_timeout"].total_seconds()),
            )

        # Same task_id "train" in both variants.
        train_in_pod = pod_task("train", training_pod, retries=1)
        [window, checked] >> train_in_pod
        trained = training_result()
        train_in_pod >> trained
    else:
        trained = train_in_worker(window)
        checked >> trained
    evaluation = evaluate(window, trained)
    version = register(window, trained, evaluation)
    decision = gate(version, evaluation)
    deploy_or_not(decision["route"]) >> [
        not_deployed(version, decision["summary"]),
        approval_and_rollout(decision),
    ]


train_and_deploy()
