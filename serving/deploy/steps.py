"""Deploy and verify steps shared by every DAG that rolls a model version out.

``deploy_local`` rolls a version out to the local target; ``verify_live`` checks the live
endpoint against the registered model on given rows (``train_and_deploy``: the window's
holdout; ``deploy_model``: the model's own input example, from ``input_example_rows``).
``verify_or_roll_back`` is the nightly pipeline's verify: on failure it puts the previous
champion back before failing. ``restore_version`` is the rollback both DAGs share.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx

from ml.registry import use_mlflow
from ml.settings import DataSettings, RegistrySettings
from serving.deploy.settings import DeploySettings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Version tag written when a rollout of that version failed (value: the reason).
ROLLOUT_FAILED_TAG = "rollout.failed"


def deploy_local(
    version: Mapping[str, Any], settings: DeploySettings, *, tracking_uri: str
) -> dict[str, Any]:
    """Start the pinned version behind the local front port; the old one stays until healthy."""
    from serving.deploy.local import LocalTarget

    result = LocalTarget(settings, tracking_uri).deploy(version["model_uri"], version["version"])
    log.info("Local target now serves %s at %s", version["model_uri"], result.get("endpoint"))
    return result


def verify_or_roll_back(
    version: Mapping[str, Any],
    window: Mapping[str, Any],
    data_settings: DataSettings,
    deploy: DeploySettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """Smoke + parity check of the live endpoint; on failure roll back to ``@champion``."""
    from ml.pipeline import holdout_frame
    from ml.registry import Registry
    from serving.deploy.verify import VerificationError

    use_mlflow(tracking_uri)
    schema, holdout = holdout_frame(window, data_settings)
    try:
        return verify_live(
            version, holdout, schema.feature_names, deploy, tracking_uri=tracking_uri
        )
    except VerificationError as exc:
        reg = Registry(tracking_uri, registry)
        reg.tag_version(version["version"], {ROLLOUT_FAILED_TAG: str(exc)[:4000]})
        previous = reg.champion()
        if previous is None:
            log.error(
                "Verification failed and there is no @%s to roll back to", registry.champion_alias
            )
        else:
            log.error("Verification failed; rolling back to v%s", previous.version)
            restore_version(previous.to_dict(), deploy, tracking_uri=tracking_uri)
        reg.delete_alias(registry.challenger_alias)
        raise


# -- shared by deploy_model (registry promotions, manual rollbacks) -----------------------------


def input_example_rows(model_uri: str, *, tracking_uri: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows a version was logged with (its input example) and its feature columns.

    ``deploy_model`` has no data window, so it verifies on these; every version this pipeline
    registers carries an input example and a signature (``ml.train``).
    """
    import pandas as pd
    from mlflow.models import Model

    use_mlflow(tracking_uri)
    model = Model.load(model_uri)
    example = model.load_input_example()
    if example is None:
        raise ValueError(f"{model_uri} was logged without an input example: nothing to verify on")
    frame = example if isinstance(example, pd.DataFrame) else pd.DataFrame(example)
    if model.signature is not None and model.signature.inputs is not None:
        columns = [c for c in model.signature.inputs.input_names() if c in frame.columns]
    else:
        columns = []
    return frame, columns or [str(c) for c in frame.columns]


def verify_live(
    version: Mapping[str, Any],
    frame: pd.DataFrame,
    feature_columns: list[str],
    deploy: DeploySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """Smoke + parity check of the live endpoint on ``frame``; raises ``VerificationError``."""
    from serving.deploy.kubernetes import served_version
    from serving.deploy.verify import VerificationError, verify_endpoint

    use_mlflow(tracking_uri)
    endpoint = deploy.endpoint_url
    # Ask the endpoint which version it serves before trusting the deploy task's success: a
    # KubernetesPodOperator can report success for a pod that was killed (apache/airflow#73006).
    try:
        live = served_version(endpoint)
    except httpx.HTTPError as exc:
        raise VerificationError(f"{endpoint} does not answer: {exc}") from exc
    if live != str(version["version"]):
        raise VerificationError(
            f"{endpoint} serves version {live or 'unknown'}, expected {version['version']}"
        )
    report = verify_endpoint(endpoint, version["model_uri"], frame, feature_columns)
    log.info(
        "Endpoint %s serves version %s: %d rows match (max |diff| %.2g)",
        endpoint,
        version["version"],
        report["rows"],
        report["max_abs_diff"],
    )
    return {**report, "version": str(version["version"])}


def verify_on_input_example(
    version: Mapping[str, Any], deploy: DeploySettings, *, tracking_uri: str
) -> dict[str, Any]:
    """``verify_live`` on the version's own input example (``deploy_model``'s verify step)."""
    frame, columns = input_example_rows(version["model_uri"], tracking_uri=tracking_uri)
    return verify_live(version, frame, columns, deploy, tracking_uri=tracking_uri)


def withdraw(deploy: DeploySettings, *, tracking_uri: str) -> None:
    """Take the endpoint down after a failed first rollout (there is nothing to go back to)."""
    if deploy.target == "local":
        from serving.deploy.local import LocalTarget

        LocalTarget(deploy, tracking_uri).stop_all()
    else:
        log.error("kubernetes target: the rollout pod owns the Deployment; nothing withdrawn here")


def restore_version(
    previous: Mapping[str, Any], deploy: DeploySettings, *, tracking_uri: str
) -> dict[str, Any] | None:
    """Put ``previous`` (a version dict) back behind the endpoint after a failed rollout.

    Local target: redeployed here (a no-op if it is still the active slot: a deploy that
    never got healthy leaves the old one serving). Kubernetes: the rollout pod already rolled
    the Deployment back if *its* checks failed; a version that rolled out but then failed
    verification is rolled back by the next ``deploy_model`` run (the alias moves back, which
    triggers it), since Airflow workers hold no cluster credentials.
    """
    if deploy.target == "local":
        return deploy_local(previous, deploy, tracking_uri=tracking_uri)
    log.error(
        "kubernetes target: v%s is restored by the rollout pod (its own checks) or by the "
        "deploy_model run that the alias move triggers",
        previous["version"],
    )
    return None
