"""Registry promotions: an MLflow webhook -> the Airflow registry_events plugin -> deploy_model.

MLflow delivers the registry's events to the Airflow API server; both sides share an HMAC
secret (``webhook_secret``), and the MLflow server needs the environment that lets it deliver
to this machine (``mlflow_webhook_env``).
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

from scripts.stacklib.processes import say, secret_file

WEBHOOK_NAME, WEBHOOK_PATH = "airflow-registry-events", "/registry-events/mlflow-webhook"
# Promotions (deploy_model), versions from outside the pipeline (gate_new_version), and the
# `approval` tag (an approval answered in MLflow): registry_events.app.
WEBHOOK_EVENTS = ["model_version_alias.created", "model_version.created", "model_version_tag.set"]


def webhook_secret(state: Path) -> str:
    """The HMAC secret MLflow signs webhooks with and the plugin checks them with."""
    return secret_file(state / "webhook-secret", lambda: secrets.token_urlsafe(32))


def mlflow_webhook_env(state: Path) -> dict[str, str]:
    """Environment of an MLflow server that may deliver webhooks to this machine: MLflow
    refuses http:// and private addresses unless told otherwise, and encrypts stored webhook
    secrets with a key that must survive restarts (a Fernet key under ``state``)."""
    key = secret_file(
        state / "mlflow" / "webhook-encryption.key",
        lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    )
    return {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key,
    }


def register_mlflow_webhook(
    mlflow_url: str, url: str, secret: str, events: list[str] = WEBHOOK_EVENTS
) -> dict[str, Any]:
    """Create or update (by name) the MLflow webhook that feeds deploy_model, then let MLflow
    send its signed test event (the plugin answers "ignored"): a wrong URL or secret shows now,
    not at the first promotion."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    existing = [hook for hook in client.list_webhooks(max_results=100) if hook.name == WEBHOOK_NAME]
    fields = {"url": url, "events": events, "secret": secret}
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, status="ACTIVE", **fields)
        for duplicate in existing[1:]:
            client.delete_webhook(duplicate.webhook_id)
    else:
        description = "Alias moves -> Airflow registry_events plugin -> deploy_model"
        hook = client.create_webhook(name=WEBHOOK_NAME, description=description, **fields)
    test = client.test_webhook(hook.webhook_id)
    body = (test.response_body or test.error_message or "")[:300]
    return {"webhook_id": hook.webhook_id, "url": url, "test_ok": bool(test.success)} | {
        "test_status": test.response_status,
        "test_body": body,
    }


def enable_promotions(mlflow_url: str, airflow_url: str, secret: str) -> None:
    """Register the webhook of the MLflow server at ``mlflow_url`` for the Airflow API server
    at ``airflow_url``; says how that went (the stack goes on either way)."""
    url = f"{airflow_url}{WEBHOOK_PATH}"
    try:
        result = register_mlflow_webhook(mlflow_url, url, secret)
    except Exception as exc:  # e.g. an MLflow server started earlier without the webhook env
        say(f"could not register the MLflow webhook ({exc.__class__.__name__}: {exc}); promotions")
        return say("in the MLflow UI will not deploy until `make stop && make run`")
    if result["test_ok"]:
        return say(f"MLflow webhook -> {url} (test delivery answered {result['test_status']})")
    say(f"MLflow webhook -> {url} registered, but its test delivery failed")
    say(f"({result['test_status']}: {result['test_body']})")
