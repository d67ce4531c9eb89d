"""Deploy and verify steps shared by every DAG that rolls a model version out.

``deploy_local`` rolls a version out to the local target; ``verify_or_roll_back`` checks the
live endpoint against the registered model on the holdout rows and, when the endpoint does not
serve what it should, puts the previous champion back before failing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ml.settings import DataSettings, DeploySettings, RegistrySettings

log = logging.getLogger(__name__)


def deploy_local(
    version: Mapping[str, Any], settings: DeploySettings, *, tracking_uri: str
) -> dict[str, Any]:
    """Start the pinned version behind the local front port; the old one stays until healthy."""
    from serving.local import LocalTarget

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
    import mlflow

    from ml.pipeline import holdout_frame
    from ml.registry import Registry
    from serving.verify import VerificationError, verify_endpoint

    mlflow.set_tracking_uri(tracking_uri)
    schema, holdout = holdout_frame(window, data_settings)
    endpoint = deploy.endpoint_url
    try:
        report = verify_endpoint(endpoint, version["model_uri"], holdout, schema.feature_names)
    except VerificationError as exc:
        reg = Registry(tracking_uri, registry)
        reg.tag_version(version["version"], {"rollout.failed": str(exc)[:4000]})
        previous = reg.champion()
        if previous is None:
            log.error(
                "Verification failed and there is no @%s to roll back to", registry.champion_alias
            )
        elif deploy.target == "local":
            log.error("Verification failed; rolling back to v%s", previous.version)
            deploy_local(previous.to_dict(), deploy, tracking_uri=tracking_uri)
        else:
            log.error("Verification failed; the Kubernetes rollout rolls back by itself")
        reg.delete_alias(registry.challenger_alias)
        raise
    log.info(
        "Endpoint %s serves version %s: %d holdout rows match (max |diff| %.2g)",
        endpoint,
        version["version"],
        report["rows"],
        report["max_abs_diff"],
    )
    return report
