"""What the DAG files share besides their Params (``_params``) and the rollout tasks
(``_rollout``): task defaults and the task logger, endpoints and secrets from Airflow
Connections, the deployment's settings that no run overrides, the tags that tie MLflow back
to a run, pod tasks, and the assets the DAGs are scheduled on and emit.

Config tiers: env vars give deployment defaults (read by the settings classes), the run's
Params override per-run knobs (``_params``), and endpoints/secrets come from Airflow
Connections. Kept out of DAG parsing by ``.airflowignore``; imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import Connection

from ml.settings import (
    DriftSettings,
    QualitySettings,
    RegistrySettings,
    connection_tracking_uri,
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


def registry_settings() -> RegistrySettings:
    return RegistrySettings()


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


# -- pod tasks, and the queue of the local target's tasks ----------------------------------------


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


# -- the assets the DAGs are scheduled on and emit, and what started a run ---------------------


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
