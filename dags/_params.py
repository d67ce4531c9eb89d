"""The trigger forms' Params, generated from the settings fields, and a run's Params read back
into typed settings.

``KNOBS`` maps each per-run knob (a Param) to its settings field: the Param's type, bounds,
title and description are the field's (``ml.knobs.field_schema``), its default the
deployment's setting (env vars); :func:`run_settings` applies a run's Params back onto the
deployment's settings. Kept out of DAG parsing by ``.airflowignore``; imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any, TypeVar

from airflow.sdk import Param
from pydantic_settings import BaseSettings

from ml.knobs import field_schema
from ml.settings import (
    BatchSettings,
    DataSettings,
    GateSettings,
    RegistrySettings,
    TrainingSettings,
    with_overrides,
)
from serving.deploy.settings import DeploySettings

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


def window_end(context: dict[str, Any]) -> date:
    """The Param if set, else the run's data interval end (a manual run: its run_after)."""
    explicit = context["params"].get("data_end_date")
    if explicit:
        return date.fromisoformat(explicit)
    dag_run = context["dag_run"]
    end = context.get("data_interval_end") or dag_run.run_after
    return end.date()
