"""MLflow registry webhooks -> Airflow (mounted on the Airflow API server).

``POST /registry-events/mlflow-webhook`` receives MLflow 3 webhooks. MLflow signs each delivery
(``mlflow/webhooks/delivery.py``, Standard-Webhooks style)::

    X-MLflow-Delivery-Id: <uuid4>          X-MLflow-Timestamp: <unix seconds>
    X-MLflow-Signature:   v1,<base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}"))>
    body: {"entity": "model_version_alias", "action": "created", "timestamp": "...",
           "data": {"name": "<model>", "alias": "<alias>", "version": "<n>"}}

What this endpoint does with a request, in order:

1. no secret configured (``PIPELINE_WEBHOOK_SECRET``)      -> 503, nothing recorded
2. body too large, garbled Content-Length, missing headers  -> 413 / 400
   (a declared Content-Length over the limit is refused unread; a chunked body is read
   only until it passes the limit)
3. timestamp more than 5 minutes off                         -> 401 (a replay of an old delivery)
4. signature does not match                                  -> 401
5. body not JSON / not an MLflow webhook payload             -> 400
6. another event, model or alias than the ones watched       -> 200 ``ignored``
7. delivery id already recorded (a replay or MLflow retry)   -> 200 ``ignored``
8. otherwise, by event:

   - ``model_version_alias.created`` of ``@champion``: an asset event on
     ``mlflow://models/<model>/aliases/<alias>`` with extra ``{model, version, alias,
     delivery_id, ...}``; ``deploy_model`` is scheduled on that asset -> 200 ``recorded``
   - ``model_version.created`` of a version no Airflow run registered (its tags name no
     ``airflow_dag_id``/``airflow_run_id`` of a run in this Airflow): an asset event on
     ``mlflow://models/<model>/versions``; ``gate_new_version`` is scheduled on it, and
     gates it                                               -> 200 ``recorded``
   - ``model_version_tag.set`` of ``approval`` = ``approved``/``rejected`` on a version an
     approval task waits for (``approval.pending``): that task is answered, as the REST API
     would (``registry_events.approvals``)                  -> 200 ``answered``

Delivery ids are remembered in the Airflow metadata database itself: they are part of the
recorded asset events, and a delivery is only accepted within the 5 minute window, so looking
at this asset's events of the last 15 minutes catches every replay, survives restarts and works
with several API server replicas. The check and the insert run in one transaction.

The watched model and alias are the deployment's ``RegistrySettings`` (``PIPELINE_REGISTRY_*``);
the endpoint is not behind Airflow's login (MLflow cannot log in): the signature is the
authentication, so without a secret it accepts nothing.

``GET /registry-events/metrics`` exports the registry's aliases and the newest drift check for
Prometheus (``registry_events.exporter``); it holds nothing secret and is not behind the login
either, like any ``/metrics``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from registry_events.exporter import CachedExposition

if TYPE_CHECKING:
    from ml.settings import RegistrySettings

log = logging.getLogger(__name__)

URL_PREFIX = "/registry-events"
WEBHOOK_PATH = "/mlflow-webhook"
METRICS_PATH = "/metrics"
SECRET_ENV = "PIPELINE_WEBHOOK_SECRET"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
TOLERANCE_S = 300
MAX_BODY_BYTES = 64 * 1024
ALIAS_CREATED = ("model_version_alias", "created")
VERSION_CREATED = ("model_version", "created")
TAG_SET = ("model_version_tag", "set")
# The events handled, and the data fields each must carry.
WATCHED = {
    ALIAS_CREATED: ("name", "alias", "version"),
    VERSION_CREATED: ("name", "version"),
    TAG_SET: ("name", "version", "key", "value"),
}
# A replay is only accepted inside the tolerance window, so events older than this cannot match.
_REPLAY_LOOKBACK = timedelta(seconds=3 * TOLERANCE_S)
# One writer at a time in this process (SQLite has no row locks; PostgreSQL gets FOR UPDATE).
_record_lock = threading.Lock()

_exposition = CachedExposition()

app = FastAPI(
    title="Registry events",
    description="Receives MLflow model-registry webhooks: records the Airflow asset events "
    "that schedule deploy_model and gate_new_version, and answers approvals given as tags.",
)


class Rejected(Exception):
    """A request this endpoint refuses; ``status`` and ``message`` become the response."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery: ``v1,<base64 HMAC-SHA256>``."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def authenticate(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float | None = None
) -> tuple[str, int]:
    """Check headers, age and signature; returns ``(delivery_id, timestamp)`` or raises."""
    delivery_id = (headers.get(DELIVERY_ID_HEADER) or "").strip()
    raw_ts = (headers.get(TIMESTAMP_HEADER) or "").strip()
    signature = (headers.get(SIGNATURE_HEADER) or "").strip()
    missing = [
        name
        for name, value in (
            (DELIVERY_ID_HEADER, delivery_id),
            (TIMESTAMP_HEADER, raw_ts),
            (SIGNATURE_HEADER, signature),
        )
        if not value
    ]
    if missing:
        raise Rejected(400, f"missing header(s) {', '.join(missing)}: not a signed MLflow webhook")
    if len(delivery_id) > 200:
        raise Rejected(400, f"{DELIVERY_ID_HEADER} is longer than 200 characters")
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise Rejected(
            400, f"{TIMESTAMP_HEADER} must be unix seconds, got {raw_ts[:40]!r}"
        ) from None
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > TOLERANCE_S:
        raise Rejected(
            401,
            f"{TIMESTAMP_HEADER} is {abs(age):.0f}s {'old' if age > 0 else 'in the future'}; "
            f"deliveries are accepted within {TOLERANCE_S}s",
        )
    expected = sign(secret, delivery_id, raw_ts, body)
    # Several space-separated signatures are allowed (secret rotation).
    if not any(hmac.compare_digest(expected, candidate) for candidate in signature.split()):
        raise Rejected(401, f"{SIGNATURE_HEADER} does not match: wrong secret or altered body")
    return delivery_id, timestamp


def parse(body: bytes) -> dict[str, Any]:
    """The webhook payload, checked for shape; raises ``Rejected(400)``."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected(400, f"body is not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Rejected(400, "body is not an MLflow webhook payload (no 'data' object)")
    for key in ("entity", "action"):
        if not isinstance(payload.get(key), str):
            raise Rejected(400, f"body lacks the string field {key!r}")
    event = (payload["entity"], payload["action"])
    if event in WATCHED:
        data = payload["data"]
        bad = [k for k in WATCHED[event] if not isinstance(data.get(k), str | int)]
        if bad:
            raise Rejected(400, f"{'.'.join(event)} payload lacks data field(s) {bad}")
        if not str(data["version"]).isdigit():
            raise Rejected(400, f"data.version must be a version number, got {data['version']!r}")
    return payload


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is known to exceed ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a body
    without one (chunked) is read only until it passes the limit. Raises ``Rejected``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Rejected(400, f"Content-Length must be a byte count, got {declared[:40]!r}")
        if int(declared) > limit:
            raise Rejected(
                413, f"body is larger than {limit} bytes (Content-Length: {int(declared)})"
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            how = "more than declared" if declared is not None else "no Content-Length"
            raise Rejected(413, f"body is larger than {limit} bytes (read while streaming, {how})")
        chunks.append(chunk)
    return b"".join(chunks)


def _ignored(reason: str, **extra: Any) -> JSONResponse:
    log.info("Webhook ignored: %s", reason)
    return JSONResponse({"status": "ignored", "reason": reason, **extra}, status_code=200)


def registry_settings() -> RegistrySettings:
    """The deployment's registry settings, read per request.

    The project's modules are imported here, not when the plugin loads: every Airflow
    component loads the plugins at start, the scheduler too, and the LocalExecutor's task
    processes are forked from the scheduler; a module it had imported would be the (possibly
    outdated) copy every task inherits.
    """
    from ml.settings import RegistrySettings

    return RegistrySettings()


@app.get("/")
def describe() -> dict[str, Any]:
    """What this endpoint watches (no secrets)."""
    from serving.deploy.assets import alias_asset, version_asset

    settings = registry_settings()
    return {
        "webhook": f"{URL_PREFIX}{WEBHOOK_PATH}",
        "events": [".".join(event) for event in WATCHED],
        "watching": {"model": settings.model_name, "alias": settings.champion_alias},
        "asset": alias_asset(settings.model_name, settings.champion_alias),
        "version_asset": version_asset(settings.model_name),
        "secret_configured": bool(os.environ.get(SECRET_ENV)),
    }


@app.get(METRICS_PATH)
async def metrics() -> Response:
    """Registry aliases and the newest drift check, for Prometheus (see ``exporter``)."""
    body = await run_in_threadpool(_exposition.get)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@app.post(WEBHOOK_PATH)
async def mlflow_webhook(request: Request) -> JSONResponse:
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        return JSONResponse(
            {"error": f"no webhook secret configured ({SECRET_ENV}): refusing all deliveries"},
            status_code=503,
        )
    try:
        body = await read_body(request, MAX_BODY_BYTES)
        delivery_id, timestamp = authenticate(request.headers, body, secret)
        payload = parse(body)
    except Rejected as exc:
        log.warning("Webhook rejected (%s): %s", exc.status, exc.message)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    event = (payload["entity"], payload["action"])
    if event not in WATCHED:
        return _ignored(f"event {'.'.join(event)} is not watched", delivery_id=delivery_id)
    try:
        return await _handle(event, payload["data"], delivery_id, timestamp)
    except Rejected as exc:
        log.warning("Webhook not recorded (%s): %s", exc.status, exc.message)
        return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _handle(
    event: tuple[str, str], data: dict[str, Any], delivery_id: str, timestamp: int
) -> JSONResponse:
    from serving.deploy.assets import alias_asset, version_asset

    settings = registry_settings()
    model, version = str(data["name"]), str(data["version"])
    if model != settings.model_name:
        return _ignored(
            f"model {model!r} is not watched (watching {settings.model_name!r})",
            delivery_id=delivery_id,
        )
    if event == TAG_SET:
        from registry_events.approvals import answer

        result = await run_in_threadpool(answer, model, version, str(data["key"]), data["value"])
        if result["status"] == "retry":
            raise Rejected(503, result["reason"])
        if result["status"] == "ignored":
            return _ignored(result["reason"], delivery_id=delivery_id)
        return JSONResponse(result | {"delivery_id": delivery_id}, status_code=200)
    extra = {
        "model": model,
        "version": version,
        "delivery_id": delivery_id,
        "webhook_timestamp": timestamp,
        "source": "mlflow-webhook",
    }
    if event == ALIAS_CREATED:
        alias = str(data["alias"])
        if alias != settings.champion_alias:
            return _ignored(
                f"@{alias} of {model!r} is not watched (watching @{settings.champion_alias})",
                delivery_id=delivery_id,
            )
        extra["alias"] = alias
        ident = alias_asset(model, alias)
    else:
        tags = data.get("tags") if isinstance(data.get("tags"), dict) else {}
        registered_by = await run_in_threadpool(airflow_run_of, tags)
        if registered_by:
            return _ignored(
                f"v{version} was registered by {registered_by}: that run's gate judges it",
                delivery_id=delivery_id,
            )
        ident = version_asset(model)
    result = await run_in_threadpool(record_event, ident, extra)
    if result.get("duplicate"):
        return _ignored(
            f"delivery {delivery_id} was already recorded (replay or retry)",
            delivery_id=delivery_id,
            asset_event_id=result["asset_event_id"],
        )
    log.info("Recorded %s of %s v%s (delivery %s)", ".".join(event), model, version, delivery_id)
    return JSONResponse({"status": "recorded", **result, **extra}, status_code=200)


def airflow_run_of(tags: dict[str, Any]) -> str | None:
    """``"<dag> run <run id>"`` when the version's tags name a run this Airflow has (the
    pipeline registered it), else None. Tags are the registrant's word: copying a real run's
    id skips this gate, but never clears the version to go live (``ml.gate.uncleared``)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    dag_id, run_id = tags.get("airflow_dag_id"), tags.get("airflow_run_id")
    if not dag_id or not run_id:
        return None
    with create_session() as session:
        found = session.scalar(
            select(DagRun.id).where(DagRun.dag_id == str(dag_id), DagRun.run_id == str(run_id))
        )
    return f"{dag_id} run {run_id}" if found is not None else None


def record_event(ident: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
    """Record an event on the asset ``ident`` (once per delivery id) in the metadata DB."""
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with _record_lock, create_session() as session:
        asset = session.scalar(
            select(AssetModel)
            .where(AssetModel.name == ident["name"], AssetModel.uri == ident["uri"])
            .with_for_update()
        )
        if asset is None:
            # 5xx: MLflow retries with backoff; the DAG may simply not be parsed yet.
            raise Rejected(
                503,
                f"asset {ident['uri']} is unknown to Airflow: is the DAG scheduled on it "
                "(deploy_model, gate_new_version) parsed, with the same PIPELINE_REGISTRY_* "
                "settings?",
            )
        since = datetime.now(UTC) - _REPLAY_LOOKBACK
        recent = session.execute(
            select(AssetEvent.id, AssetEvent.extra).where(
                AssetEvent.asset_id == asset.id, AssetEvent.timestamp >= since
            )
        )
        for event_id, event_extra in recent:
            if (
                isinstance(event_extra, dict)
                and event_extra.get("delivery_id") == extra["delivery_id"]
            ):
                return {"duplicate": True, "asset_event_id": event_id}
        event = asset_manager.register_asset_change(
            asset=asset,
            extra=extra,
            source_is_api=True,
            api_user_teams=set(),
            session=session,
        )
        if event is None:
            raise Rejected(503, f"Airflow did not record an event for {ident['uri']}")
        session.flush()
        return {"asset_event_id": event.id, "asset": ident["uri"]}
