"""Who decides what goes live, besides the gate: a person's approval, and the gate for versions
registered outside the pipeline. Steps the DAGs call (no Airflow import, like ``ml.pipeline``).

The approval lives in the version's tags (the model card shows them):

=====================  ===========================================================
``approval.pending``   while an approval task waits: which one (JSON: dag_id, run_id,
                       task_id); the registry_events plugin answers it when a person
                       sets ``approval`` on the version in MLflow
``approval``           ``approved`` or ``rejected`` (a person may set it in MLflow to
                       answer; the task writes the decision however it was given)
``approval.reason``    the reason given (form field, REST ``params_input``, or the tag)
``approval.by``        who answered (Airflow user; the ``approval.by`` tag a person set
                       in MLflow; ``timeout``)
``approval.via``       ``airflow`` (UI or REST API), ``mlflow`` (the tag) or ``timeout``
``approval.at``        when (UTC)
=====================  ===========================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ml.settings import DataSettings, DriftSettings, GateSettings, RegistrySettings

log = logging.getLogger(__name__)

APPROVAL_TAG = "approval"
PENDING_TAG = "approval.pending"
REASON_TAG = "approval.reason"
BY_TAG = "approval.by"
VIA_TAG = "approval.via"
AT_TAG = "approval.at"
APPROVED, REJECTED = "approved", "rejected"
# The options of the approval form, by decision (the plugin answers with the same ones), and
# the Airflow user id the plugin answers as when the decision came as a tag in MLflow.
OPTIONS = {APPROVED: "Approve", REJECTED: "Reject"}
MLFLOW_RESPONDER = "mlflow-approval-tag"


def judge_version(
    version: str,
    window: Mapping[str, Any],
    data: DataSettings,
    gate_settings: GateSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """A version registered outside the pipeline, through the pipeline's own steps: evaluated
    against ``@champion`` on the holdout of ``window`` (logged on the version's run, like a
    trained one's), tagged with the window and the metrics, then gated (``ml.pipeline.gate``:
    the decision is tagged on the version, ``@challenger`` when it passes)."""
    from ml import pipeline
    from ml.registry import Registry

    reg = Registry(tracking_uri, registry)
    info = reg.get(str(version))
    if not info.run_id:
        raise ValueError(f"v{info.version} has no run: nowhere to log its evaluation")
    trained = {"model_uri": info.model_uri, "run_id": info.run_id}
    evaluation = pipeline.evaluate(window, trained, data, registry, tracking_uri=tracking_uri)
    reg.tag_version(info.version, pipeline.evaluation_tags(window, evaluation))
    decision = pipeline.gate(
        info.to_dict(), evaluation, gate_settings, registry, tracking_uri=tracking_uri
    )
    return {"version": info.version, "evaluation": evaluation, "decision": decision}


def evidence(
    version: str,
    evaluation: Mapping[str, Any],
    decision: Mapping[str, Any],
    gate_settings: GateSettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> str:
    """The approval form's body (:func:`ml.card.evidence`): the gate's numbers, the newest
    drift check and links to the version, its run and its evaluation plots in MLflow."""
    from mlflow import MlflowClient

    from ml import card, drift
    from ml.evaluate import PREDICTIONS_PLOT, RESIDUALS_PLOT
    from ml.registry import Registry
    from serving.deploy.assets import mlflow_ui_links

    client = MlflowClient(tracking_uri)
    info = Registry(tracking_uri, registry).get(version)
    run = client.get_run(info.run_id) if info.run_id else None
    experiment = run.info.experiment_id if run else None
    links: dict[str, Any] = mlflow_ui_links(
        tracking_uri, registry.model_name, info.version, run_id=info.run_id,
        experiment_id=experiment,
    )  # fmt: skip
    if run and links:
        base = tracking_uri.rstrip("/")
        links["plots"] = [
            (title, f"{base}/get-artifact?path={path}&run_uuid={info.run_id}")
            for title, path in (("predictions vs truth", PREDICTIONS_PLOT),
                                ("residuals", RESIDUALS_PLOT))
        ]  # fmt: skip
    checks = None
    drift_experiment = client.get_experiment_by_name(f"{registry.experiment_name}-drift")
    if drift_experiment is not None:
        runs = client.search_runs(
            [drift_experiment.experiment_id],
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            scores = {
                k.removeprefix("psi."): v
                for k, v in runs[0].data.metrics.items()
                if k.startswith("psi.")
            }
            settings = DriftSettings()
            checks = {
                "scores": scores,
                "thresholds": {c: drift.threshold_for(c, settings) for c in scores},
                "when": datetime.fromtimestamp(runs[0].info.start_time / 1000, UTC).strftime(
                    "%Y-%m-%d %H:%M UTC"
                ),
            }
    return card.evidence(
        name=registry.model_name,
        version=info.version,
        evaluation=evaluation,
        decision=decision,
        bars=gate_settings.model_dump(),
        drift=checks,
        links=links,
    )


def record_pending(
    version: str, waiting: Mapping[str, str], registry: RegistrySettings, *, tracking_uri: str
) -> None:
    """Tag the version with the approval task that waits for it (``waiting``: dag_id, run_id,
    task_id): where the plugin sends an answer given as a tag in MLflow."""
    from ml.registry import Registry

    reg = Registry(tracking_uri, registry)
    reg.tag_version(version, {PENDING_TAG: json.dumps(dict(waiting), sort_keys=True)})
    reg.update_card(version)


def record_decision(
    version: str,
    *,
    approved: bool,
    by: str,
    via: str,
    reason: str,
    registry: RegistrySettings,
    tracking_uri: str,
) -> dict[str, str]:
    """Write the decision on the version (the tags above) and its model card; returns the tags.

    ``approval.pending`` goes first, so that the webhook of the ``approval`` tag written here
    finds nothing waiting and is ignored."""
    from ml.registry import Registry

    reg = Registry(tracking_uri, registry)
    try:
        reg.client.delete_model_version_tag(reg.name, str(version), PENDING_TAG)
    except Exception as exc:  # not there (a retry): nothing to clear
        log.info("approval.pending of v%s not deleted: %s", version, exc)
    tags = {
        APPROVAL_TAG: APPROVED if approved else REJECTED,
        BY_TAG: by[:200],
        VIA_TAG: via,
        REASON_TAG: reason[:1000],
        AT_TAG: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    reg.tag_version(version, tags)
    reg.update_card(version)
    log.info("v%s %s by %s via %s: %s", version, tags[APPROVAL_TAG], by, via, reason or "-")
    return tags
