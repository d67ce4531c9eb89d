"""Glue between Airflow's run context and the plain settings objects of ``ml`` / ``serving``.

Config tiers: env vars give deployment defaults (read by the settings classes), the run's
Params override per-run knobs, and endpoints/secrets come from Airflow Connections.
Kept out of DAG parsing by ``.airflowignore``; imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import date, timedelta
from typing import Any, TypeVar

from airflow.sdk import Connection, Param
from pydantic_settings import BaseSettings

from ml.knobs import field_schema
from ml.settings import (
    BatchSettings,
    DataSettings,
    DriftSettings,
    GateSettings,
    QualitySettings,
    RegistrySettings,
    TrainingSettings,
    connection_tracking_uri,
    with_overrides,
)
from serving.deploy.settings import DeploySettings

# Every task of the deploy DAGs talks to MLflow, storage or a model server: retry with backoff.
IO_TASK_DEFAULTS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=1),
}

# The task logger: what tasks log here lands in the Airflow task log.
log = logging.getLogger("airflow.task")

MLFLOW_CONN_ID = os.environ.get("PIPELINE_MLFLOW_CONN_ID", "mlflow_default")
# The object store of the data (PIPELINE_DATA_PATH=s3://...): type aws, login = access key id,
# password = secret key, extra {"endpoint_url": ..., "region_name": ...} (S3-compatible stores).
OBJECT_STORE_CONN_ID = os.environ.get("PIPELINE_OBJECT_STORE_CONN_ID", "aws_default")

S = TypeVar("S", bound=BaseSettings)


def window_end_param() -> Param:
    """The ``data_end_date`` Param (read by :func:`window_end`)."""
    return Param(
        None,
        type=["null", "string"],
        format="date",
        title="Window end (exclusive)",
        description="Leave empty to use the run's data interval end (nightly: today).",
    )


# The per-run knobs of the trigger forms: Param name -> (settings class, field). Everything
# else about a knob (type, bounds, enum, title, description) comes from the field
# (ml.knobs.field_schema), its default from the deployment's settings (env vars); the
# Param -> settings override of each run (run_settings) comes from this mapping too.
KNOBS: dict[str, tuple[type[BaseSettings], str]] = {
    "data_window_days": (DataSettings, "window_days"),
    "epochs": (TrainingSettings, "epochs"),
    "learning_rate": (TrainingSettings, "learning_rate"),
    "batch_size": (TrainingSettings, "batch_size"),
    "max_rmse": (GateSettings, "max_rmse"),
    "min_r2": (GateSettings, "min_r2"),
    "max_regression": (GateSettings, "max_regression"),
    "force_deploy": (GateSettings, "force_deploy"),
    "require_approval": (GateSettings, "require_approval"),
    "deploy_target": (DeploySettings, "target"),
    "batch_window_days": (BatchSettings, "window_days"),
}
# How a version goes live (serving.deploy.progressive) and what its judge allows: the fields
# of the same name, on the forms of every DAG that rolls out (train_and_deploy, deploy_model,
# gate_new_version).
ROLLOUT_KNOBS = (
    "rollout_strategy", "shadow_share", "canary_steps", "canary_bake_s", "judge_min_requests",
    "judge_error_ratio", "judge_p99_ratio", "judge_p99_slack_s", "judge_psi",
    "judge_shadow_diff_p99",
)  # fmt: skip
KNOBS |= {name: (DeploySettings, name) for name in ROLLOUT_KNOBS}

# Text a trigger form shows that its settings field does not say yet. DeploySettings.target
# has no title or description (serving/deploy/settings.py): move these there, then delete this.
_FORM_TEXT: dict[str, dict[str, str]] = {
    "deploy_target": {
        "title": "Deploy target",
        "description": "local: model server process on this machine. kubernetes: "
        "KubernetesPodOperator rollout to the cluster of the kubernetes_default Connection.",
    },
}


def knob_params(*names: str) -> dict[str, Param]:
    """The Params ``names`` (keys of :data:`KNOBS`), generated from their settings fields."""
    params = {}
    for name in names:
        cls, field = KNOBS[name]
        schema = field_schema(cls(), field) | _FORM_TEXT.get(name, {})
        params[name] = Param(schema.pop("default"), **schema)
    return params


def pipeline_params() -> dict[str, Param]:
    """The trigger form of ``train_and_deploy``: the knobs of the run, its window end and
    ``force_retrain`` (DAG-only)."""
    return {
        **knob_params("data_window_days"),
        "data_end_date": window_end_param(),
        **knob_params(
            "epochs",
            "learning_rate",
            "batch_size",
            "max_rmse",
            "min_r2",
            "max_regression",
            "force_deploy",
            "require_approval",
        ),
        "force_retrain": Param(
            False,
            type="boolean",
            title="Force retrain",
            description="Train even when @champion was trained on the same data digest, code "
            "version and parameters (otherwise the run ends at `unchanged`).",
        ),
        **knob_params("deploy_target", *ROLLOUT_KNOBS),
    }


def run_settings(cls: type[S], params: Mapping[str, Any]) -> S:
    """``cls()`` (the deployment's settings) with this run's Params of its knobs applied."""
    overrides = {field: params.get(name) for name, (c, field) in KNOBS.items() if c is cls}
    return with_overrides(cls(), **overrides)


def param_templates(cls: type[BaseSettings]) -> dict[str, str]:
    """``{field: "{{ params.<name> }}"}`` for the knobs of ``cls``: the run's Params as the
    templates a pod's arguments take."""
    return {field: f"{{{{ params.{name} }}}}" for name, (c, field) in KNOBS.items() if c is cls}


def unknown_conf_keys(conf: Mapping[str, Any] | None, accepted: Iterable[str]) -> list[str]:
    """The keys of a trigger conf that name no Param, sorted (none for an empty conf)."""
    return sorted(set(conf or {}) - set(accepted))


def reject_unknown_conf(context: Mapping[str, Any]) -> None:
    """Fail the run (no retries) when its conf has keys the DAG has no Param for.

    Airflow validates the values of known keys when the run is created, but keeps an unknown
    key as an extra Param: a typo (``epoch``) would silently run with the default. Called
    first by each DAG's first task; a run without conf (scheduled, asset-triggered) passes.
    """
    from airflow.sdk.exceptions import AirflowFailException

    dag = context["dag"]
    accepted = sorted(dag.params.keys())
    unknown = unknown_conf_keys(getattr(context["dag_run"], "conf", None), accepted)
    if unknown:
        raise AirflowFailException(
            f"unknown key(s) in the run's conf: {', '.join(map(repr, unknown))}; "
            f"{dag.dag_id} accepts: {', '.join(accepted)}"
        )


def data_settings(params: Mapping[str, Any]) -> DataSettings:
    """The run's data settings; refused (no retries) when the data is a local folder and the
    tasks run on other machines (any executor but the LocalExecutor): each worker would
    read, or write, a folder of its own."""
    settings = run_settings(DataSettings, params)
    path = settings.path
    if ("://" not in path or path.startswith("file://")) and not _single_machine():
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"PIPELINE_DATA_PATH={path} is a folder of this worker only, and tasks run on other "
            "workers: use a URL every worker can read (s3://bucket/prefix)"
        )
    return settings


def _single_machine() -> bool:
    from airflow.configuration import conf

    return conf.get("core", "executor").replace(" ", "") == "LocalExecutor"


def training_settings(params: Mapping[str, Any]) -> TrainingSettings:
    return run_settings(TrainingSettings, params)


def gate_settings(params: Mapping[str, Any]) -> GateSettings:
    return run_settings(GateSettings, params)


def deploy_settings(params: Mapping[str, Any]) -> DeploySettings:
    return run_settings(DeploySettings, params)


def registry_settings() -> RegistrySettings:
    return RegistrySettings()


def window_end(context: dict[str, Any]) -> date:
    """The Param if set, else the run's data interval end (a manual run: its run_after)."""
    explicit = context["params"].get("data_end_date")
    if explicit:
        return date.fromisoformat(explicit)
    dag_run = context["dag_run"]
    end = context.get("data_interval_end") or dag_run.run_after
    return end.date()


def _mlflow_connection() -> Any:
    try:
        return Connection.get(MLFLOW_CONN_ID)
    except Exception:  # not defined: fall back to the environment, like the mlflow CLI does
        return None


def tracking_uri() -> str:
    """MLflow endpoint from the ``mlflow_default`` Connection, else ``MLFLOW_TRACKING_URI``."""
    conn = _mlflow_connection()
    if conn is None or not conn.host:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise RuntimeError(
                f"No MLflow endpoint: define the Airflow Connection '{MLFLOW_CONN_ID}' "
                "(e.g. AIRFLOW_CONN_MLFLOW_DEFAULT='http://mlflow:5000') or MLFLOW_TRACKING_URI"
            )
        return uri
    return connection_tracking_uri(conn.host, conn.port, conn.conn_type)


def mlflow_credentials() -> dict[str, str]:
    """The ``mlflow_default`` Connection's login/password as MLflow's own credential variables
    (the only way MLflow's client takes them); empty without a login."""
    conn = _mlflow_connection()
    if conn is None or not conn.login:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password or ""}


def object_store_credentials() -> dict[str, str]:
    """The ``aws_default`` Connection as the variables every S3 client reads (s3fs for the
    data, boto3); empty without one."""
    try:
        conn = Connection.get(OBJECT_STORE_CONN_ID)
    except Exception:  # not defined: the data is a local folder, or the environment has them
        return {}
    extra = conn.extra_dejson
    env = {
        "AWS_ACCESS_KEY_ID": conn.login,
        "AWS_SECRET_ACCESS_KEY": conn.password,
        "AWS_ENDPOINT_URL": extra.get("endpoint_url"),
        "AWS_DEFAULT_REGION": extra.get("region_name"),
    }
    return {key: value for key, value in env.items() if value}


_saved_env: dict[str, str | None] = {}


def _credentials_on(context: Any) -> None:
    """``pre_execute`` of every task: MLflow's and the object store's credentials for the
    task's own execution only, and for what it starts (a local model server loads its model
    with them)."""
    for key, value in (mlflow_credentials() | object_store_credentials()).items():
        _saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _credentials_off(context: Any, result: Any = None) -> None:
    """``post_execute``: the process environment as it was before the task."""
    while _saved_env:
        key, value = _saved_env.popitem()
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# The Connections' credentials exist in the environment only while a task runs.
TASK_CREDENTIALS = {"pre_execute": _credentials_on, "post_execute": _credentials_off}
IO_TASK_DEFAULTS |= TASK_CREDENTIALS


def run_tags(context: dict[str, Any]) -> dict[str, str]:
    """Tags that tie an MLflow run / model version back to the Airflow run that made it."""
    return {
        "airflow_dag_id": context["dag"].dag_id,
        "airflow_run_id": context["run_id"],
    }


def run_tag_templates() -> dict[str, str]:
    """:func:`run_tags` as Jinja templates, for operators that run outside the task (pods)."""
    return {"airflow_dag_id": "{{ dag.dag_id }}", "airflow_run_id": "{{ run_id }}"}


# ml.train.RUN_KEY_TAG (not imported: ml.train loads MLflow, too heavy for parsing).
TRAINING_RUN_KEY_TAG = "pipeline_run_key"


def training_run_key(dag_id: str, run_id: str, task_id: str) -> str:
    """The key naming the pipeline step a training run is an attempt of."""
    return f"{dag_id}/{run_id}/{task_id}"


def training_run_tags(context: dict[str, Any]) -> dict[str, str]:
    """:func:`run_tags` plus the key naming the step a training run is an attempt of.

    A retry of the task tags its run with the same key, so it finds the run of an attempt
    that died without ending it and marks it FAILED (``ml.train.fail_dead_attempts``); the
    task after a training pod finds the pod's result by it (``ml.pipeline.trained_by``).
    """
    key = training_run_key(context["dag"].dag_id, context["run_id"], context["task"].task_id)
    return {**run_tags(context), TRAINING_RUN_KEY_TAG: key}


def training_run_tag_templates() -> dict[str, str]:
    """:func:`training_run_tags` as Jinja templates, for the training pod."""
    key = training_run_key("{{ dag.dag_id }}", "{{ run_id }}", "{{ task.task_id }}")
    return {**run_tag_templates(), TRAINING_RUN_KEY_TAG: key}


# -- the one rollout path, as tasks both deploying DAGs build --------------------------------------


def rollout_decision(
    version: str, decision: Mapping[str, Any], evaluation: Mapping[str, Any], context: Any
) -> dict[str, Any]:
    """What a gating task returns: the gate's ``decision`` plus ``route`` (``approval`` or
    ``not_deployed``), the rollout ``request`` (JSON) and what the approval task asks
    (``ask``; its form's evidence only when this run requires an approval).

    The request deploys ``version`` only while ``@champion`` still names the version the gate
    compared it with: a promotion in between wins (decided when the rollout runs).
    """
    from serving.deploy.rollout import Request

    if not decision["passed"]:
        return {**decision, "route": "not_deployed", "request": None, "ask": None}
    params, run_id = context["params"], context["run_id"]
    gate = gate_settings(params)
    request = Request(
        "candidate",
        str(version),
        champion_at_eval=evaluation.get("champion_version"),
        reason=f"{context['dag'].dag_id} run {run_id}",
        run_id=run_id,
    )
    ask = {
        "required": gate.require_approval,
        "route": f"rollout_{deploy_settings(params).target}",
        "version": str(version),
        "timeout_s": gate.approval_timeout_s,
    }
    if gate.require_approval:
        from ml.governance import evidence

        ask["subject"] = f"Deploy {registry_settings().model_name} v{version} to production?"
        ask["body"] = evidence(
            str(version), evaluation, decision, gate, registry_settings(),
            tracking_uri=tracking_uri(),
        )  # fmt: skip
    return {**decision, "route": "approval", "request": request.to_json(), "ask": ask}


def rollout_tasks(request: Any) -> tuple[Any, Any]:
    """``rollout_local`` and ``rollout_kubernetes``: the rollout path, per deploy target.

    ``request`` is the XComArg of the rollout request (JSON) the deciding task returned. Both
    run in the one-slot rollout pool (one rollout at a time across all DAGs) and do the whole
    plan, deploy, verify, promote or restore (``serving.deploy.rollout.run``): the local one
    in the worker, the Kubernetes one in a pod. A verdict (a check on the version ran and
    failed) or a refusal fails the task without retries; a fault is retried and marks nothing.
    """
    from airflow.sdk import task

    deploy = DeploySettings()

    @task(task_id="rollout_local", pool=deploy.rollout_pool, queue=deploy.local_queue)
    def rollout_local(request: str, **context) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from serving.deploy.assets import LINKS_KEY
        from serving.deploy.rollout import run_request
        from serving.deploy.target import RequestRejected, TargetRejected, Verdict

        uri = tracking_uri()
        try:
            outcome = run_request(
                request, deploy_settings(context["params"]), registry_settings(), tracking_uri=uri
            )
        except Verdict as exc:
            raise AirflowFailException(f"verdict (not retried): {exc}") from exc
        except (RequestRejected, TargetRejected) as exc:  # retrying cannot change it
            raise AirflowFailException(f"refused (not retried): {exc}") from exc
        for line in outcome["steps"]:
            log.info("%s", line)
        return {**outcome, LINKS_KEY: _links(uri, outcome.get("version"))}

    def rollout_pod() -> dict[str, Any]:
        from serving.deploy.pods import rollout_pod_kwargs

        prefix = DeploySettings.model_config["env_prefix"]
        return rollout_pod_kwargs(
            deploy,
            registry=RegistrySettings(),
            request=request,
            tracking_uri="{{ mlflow_tracking_uri() }}",
            # The run's strategy and judge: its Params, rendered into the pod's env.
            env={
                f"{prefix}{field.upper()}": template
                for field, template in param_templates(DeploySettings).items()
                if field != "target"
            },
        )

    rollout_kubernetes = pod_task(
        "rollout_kubernetes", rollout_pod, final_exit_codes=True, pool=deploy.rollout_pool
    )
    rollout_kubernetes.set_upstream(request.operator)
    return rollout_local(request), rollout_kubernetes


def pod_task(
    task_id: str,
    pod_kwargs: Callable[[], dict[str, Any]],
    *,
    final_exit_codes: bool = False,
    **task_kwargs: Any,
) -> Any:
    """A KubernetesPodOperator task ``task_id`` (``pod_kwargs()`` gives the pod's arguments);
    with ``final_exit_codes``, the rollout pod's verdict and refusal exit codes fail the task
    without retries (``_pod_operators.RolloutPodOperator``).

    Airflow 3 parses the DAG file again in every task's own process. When that process runs
    another task of the DAG (its parsing context names a different task), this returns an
    ``EmptyOperator`` stand-in with the same id and task arguments instead: the graph the
    running task sees (ids, edges, what a branch skips) is the same, but the kubernetes
    clients (sync and asyncio, most of the provider's import time) are only imported where a
    pod is started and where the DAG processor parses the file.
    """
    from airflow.sdk import get_parsing_context

    running = get_parsing_context().task_id
    if running is not None and running != task_id:
        from airflow.providers.standard.operators.empty import EmptyOperator

        return EmptyOperator(task_id=task_id, **task_kwargs)
    from _pod_operators import KubernetesPodOperator, RolloutPodOperator

    operator = RolloutPodOperator if final_exit_codes else KubernetesPodOperator
    return operator(task_id=task_id, **task_kwargs, **pod_kwargs())


def local_queue() -> str:
    """The queue of the tasks that read or change the local target: they run on the host that
    runs its model servers (the serving host; any worker with the LocalExecutor)."""
    return DeploySettings().local_queue


def _links(uri: str, version: str | None) -> dict[str, str]:
    from ml.registry import Registry
    from serving.deploy.assets import mlflow_ui_links

    if not version:
        return {}
    try:
        info = Registry(uri, registry_settings()).get(version)
        run = info.run_id
        experiment = Registry(uri, registry_settings()).client.get_run(run).info.experiment_id
    except Exception:  # only links
        return mlflow_ui_links(uri, registry_settings().model_name, version)
    return mlflow_ui_links(
        uri, registry_settings().model_name, version, run_id=run, experiment_id=experiment
    )


# -- deploy_model / reconcile_deployment (registry promotions, rollbacks, reconcile) ------------


def deploy_model_params() -> dict[str, Param]:
    """The trigger form of ``deploy_model``; an asset-triggered run uses these defaults."""
    registry = RegistrySettings()
    return {
        "version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Version (rollback / manual deploy)",
            description="Deploy exactly this version number, then point @"
            f"{registry.champion_alias} at it: the rollback path (also for a version whose "
            f"rollout failed before). Empty: deploy what @{registry.champion_alias} names now.",
        ),
        **knob_params("deploy_target", *ROLLOUT_KNOBS),
        "reason": Param(
            "",
            type="string",
            maxLength=500,
            title="Reason",
            description="Why this run was started, in words (reconcile fills it in); shows "
            "in the rollout log and the version's tags.",
        ),
        "retry_failed": Param(
            True,
            type="boolean",
            title="Deploy a version that failed before",
            description=f"Deploy @{registry.champion_alias} even when its rollout failed "
            "before (a person asking again). Reconcile sets it false: it never retries a "
            "verdict on its own.",
        ),
    }


def gate_params() -> dict[str, Param]:
    """The trigger form of ``gate_new_version``; an asset-triggered run uses these defaults."""
    return {
        "version": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Version",
            description="Gate exactly this version number (and roll it out if it passes). "
            "Empty: the versions of the events that started the run.",
        ),
        **knob_params("data_window_days"),
        "data_end_date": window_end_param(),
        **knob_params("max_rmse", "min_r2", "max_regression", "require_approval", "deploy_target"),
        # the same rollout tasks as the other deploying DAGs: the same strategy and judge
        **knob_params(*ROLLOUT_KNOBS),
    }


def new_version_asset():
    """The asset the registry-events plugin records versions registered outside the pipeline
    on (``gate_new_version``'s schedule)."""
    from airflow.sdk import Asset

    from serving.deploy.assets import version_asset

    return Asset(**version_asset(RegistrySettings().model_name))


def promotion_asset():
    """The asset the registry-events plugin records alias moves on (deploy_model's schedule)."""
    from airflow.sdk import Asset

    from serving.deploy.assets import alias_asset

    settings = RegistrySettings()
    return Asset(**alias_asset(settings.model_name, settings.champion_alias))


def triggering_events(context: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``extra`` of the asset events that triggered this run (empty for a manual run)."""
    events = context.get("triggering_asset_events") or {}
    return [dict(event.extra or {}) for per_asset in events.values() for event in per_asset]


def active_runs(context: dict[str, Any], *dag_ids: str) -> dict[str, int]:
    """Queued or running runs of ``dag_ids`` (a rollout may be under way in any of them)."""
    ti = context["ti"]
    counts = {
        dag_id: ti.get_dr_count(dag_id=dag_id, states=["queued", "running"]) for dag_id in dag_ids
    }
    return {dag_id: n for dag_id, n in counts.items() if n}


def drift_asset():
    """The asset ``monitor_drift`` emits on when the data moved enough to retrain
    (``train_and_deploy`` is scheduled on it as well as on its cron)."""
    from airflow.sdk import Asset

    model = RegistrySettings().model_name
    return Asset(name=f"data-drift/{model}", uri=f"pipeline://drift/{model}")


def drift_settings() -> DriftSettings:
    return DriftSettings()


def live_error_asset():
    """The asset ``monitor_quality`` emits on when @champion's live error stayed above the
    gate's bar (``train_and_deploy`` is scheduled on it too)."""
    from airflow.sdk import Asset

    model = RegistrySettings().model_name
    return Asset(name=f"live-error/{model}", uri=f"pipeline://live-error/{model}")


def quality_settings() -> QualitySettings:
    return QualitySettings()


def data_asset():
    """The asset "new partitions landed": ``score_batch`` is scheduled on it. The pipeline's
    ``load_window`` emits it for the synthetic source; whatever lands real partitions emits it
    (an upstream DAG's outlet, or ``POST /api/v2/assets/events``)."""
    from airflow.sdk import Asset

    model = RegistrySettings().model_name
    return Asset(name=f"data/{model}", uri=f"pipeline://data/{model}")


def predictions_asset():
    """The asset ``score_batch`` emits when it wrote a window's predictions."""
    from airflow.sdk import Asset

    model = RegistrySettings().model_name
    return Asset(name=f"predictions/{model}", uri=f"pipeline://predictions/{model}")


def trigger_reason(context: dict[str, Any]) -> str:
    """Why this run started, in words: the drift or quality report that asked for it, else
    the schedule or a person. Recorded on the training run and on the version it produces."""
    for extra in triggering_events(context):
        if extra.get("reason"):
            return str(extra["reason"])[:500]
    run_type = str(getattr(context["dag_run"], "run_type", "") or "")
    return {"scheduled": "schedule", "manual": "manual trigger"}.get(
        run_type.split(".")[-1].lower(), run_type or "unknown"
    )
