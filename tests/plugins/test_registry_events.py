"""The registry-events plugin: MLflow webhook in, asset event out (real Airflow metadata DB).

The FastAPI app runs in-process (Starlette TestClient); requests are signed exactly as MLflow
signs them (``mlflow.webhooks.delivery._generate_hmac_signature`` is the reference). Every
rejection is checked to leave the asset's events unchanged.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.conftest import free_port
from tests.plugins.conftest import asset_events, clear_queue, queued_for, sync_dags_to_db

# Starlette's TestClient warns that it will move to httpx2; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

SECRET = "test-webhook-secret-" + uuid.uuid4().hex
MODEL = "regression-model"
ASSET_URI = f"mlflow://models/{MODEL}/aliases/champion"
VERSIONS_URI = f"mlflow://models/{MODEL}/versions"


@pytest.fixture(scope="module")
def synced(airflow_db):
    mp = pytest.MonkeyPatch()
    mp.setenv("PIPELINE_REGISTRY_MODEL_NAME", MODEL)
    mp.delenv("PIPELINE_REGISTRY_CHAMPION_ALIAS", raising=False)
    sync_dags_to_db()
    yield
    mp.undo()


@pytest.fixture
def client(synced, monkeypatch):
    from fastapi.testclient import TestClient
    from registry_events.app import app

    monkeypatch.setenv("PIPELINE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", MODEL)
    clear_queue()
    with TestClient(app) as test_client:
        yield test_client


def payload(version="3", alias="champion", name=MODEL, entity="model_version_alias") -> bytes:
    # The exact shape mlflow.webhooks.delivery sends.
    return json.dumps(
        {
            "entity": entity,
            "action": "created",
            "timestamp": "2026-03-10T12:00:00+00:00",
            "data": {"name": name, "alias": alias, "version": version},
        }
    ).encode()


def signed_headers(body: bytes, *, secret=SECRET, delivery_id=None, timestamp=None) -> dict:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, ts, body.decode()),
    }


def post(client, body: bytes, headers: dict):
    return client.post("/mlflow-webhook", content=body, headers=headers)


def test_our_signature_is_mlflows():
    from mlflow.webhooks.delivery import _generate_hmac_signature
    from registry_events.app import sign

    body = payload()
    assert sign("s", "d", "1", body) == _generate_hmac_signature("s", "d", "1", body.decode())


def test_plugin_is_loaded_by_airflow_and_mounts_the_app(synced):
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    assert errors == {}
    names = {p.name for p in plugins}
    assert "registry_events" in names
    apps = plugins_manager.get_fastapi_plugins()[0]
    assert [a["url_prefix"] for a in apps if a["name"] == "MLflow registry events"] == [
        "/registry-events"
    ]


def test_valid_delivery_records_an_asset_event_that_queues_deploy_model(client):
    before = len(asset_events(ASSET_URI))
    body = payload(version="7")
    headers = signed_headers(body)
    response = post(client, body, headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "recorded"
    events = asset_events(ASSET_URI)
    assert len(events) == before + 1
    assert events[-1] == {
        "model": MODEL,
        "version": "7",
        "alias": "champion",
        "delivery_id": headers["X-MLflow-Delivery-Id"],
        "webhook_timestamp": int(headers["X-MLflow-Timestamp"]),
        "source": "mlflow-webhook",
    }
    assert queued_for(ASSET_URI) == ["deploy_model"]

    # The same delivery again (a replay, or MLflow retrying): acknowledged, not recorded.
    again = post(client, body, headers)
    assert again.status_code == 200
    assert again.json()["status"] == "ignored" and "already recorded" in again.json()["reason"]
    assert len(asset_events(ASSET_URI)) == before + 1


def test_several_signatures_one_valid_is_accepted(client):
    body = payload(version="8")
    headers = signed_headers(body)
    headers["X-MLflow-Signature"] = "v1,AAAA " + headers["X-MLflow-Signature"]
    assert post(client, body, headers).json()["status"] == "recorded"


def _forged(body):
    return body, signed_headers(body, secret="not-the-secret")


def _tampered(body):
    headers = signed_headers(body)
    return body.replace(b'"version": "3"', b'"version": "4"'), headers


def _expired(body):
    return body, signed_headers(body, timestamp=int(time.time()) - 301 - 5)


def _future(body):
    return body, signed_headers(body, timestamp=int(time.time()) + 600)


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (_forged, 401, "does not match"),
        (_tampered, 401, "does not match"),
        (_expired, 401, "old"),
        (_future, 401, "in the future"),
    ],
    ids=["forged-signature", "tampered-body", "expired-timestamp", "future-timestamp"],
)
def test_unauthentic_deliveries_are_rejected_and_record_nothing(client, make, status, message):
    before = asset_events(ASSET_URI)
    body, headers = make(payload())
    response = post(client, body, headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert asset_events(ASSET_URI) == before
    assert queued_for(ASSET_URI) == []


def _signed(body: bytes):
    return body, signed_headers(body)


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{not json", None, 400, "not JSON"),
        (b'{"entity": "model_version_alias"}', None, 400, "no 'data' object"),
        (
            json.dumps(
                {"entity": "model_version_alias", "action": "created", "data": {"name": MODEL}}
            ).encode(),
            None,
            400,
            "lacks data field",
        ),
        (payload(version="latest"), None, 400, "version number"),
        (payload(), {"X-MLflow-Timestamp": "yesterday"}, 400, "unix seconds"),
        (payload(), {"X-MLflow-Signature": ""}, 400, "missing header"),
        (b"x" * (64 * 1024 + 1), None, 413, "larger than"),
    ],
    ids=[
        "not-json",
        "no-data",
        "missing-fields",
        "non-numeric-version",
        "bad-timestamp",
        "unsigned",
        "too-large",
    ],
)
def test_malformed_requests_get_400_and_record_nothing(client, body, headers, status, message):
    before = asset_events(ASSET_URI)
    signed = signed_headers(body)
    if headers:
        signed.update(headers)
        signed = {k: v for k, v in signed.items() if v}
    response = post(client, body, signed)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert asset_events(ASSET_URI) == before


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (payload(alias="challenger"), "not watched"),
        (payload(name="someone-elses-model"), "not watched"),
        (payload(entity="registered_model"), "registered_model.created is not watched"),
    ],
    ids=["other-alias", "other-model", "other-event"],
)
def test_unwatched_events_are_acknowledged_but_ignored(client, body, reason):
    before = asset_events(ASSET_URI)
    response = post(client, body, signed_headers(body))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ignored"
    assert reason in response.json()["reason"]
    assert asset_events(ASSET_URI) == before
    assert queued_for(ASSET_URI) == []


def test_without_a_secret_nothing_is_accepted(client, monkeypatch):
    monkeypatch.delenv("PIPELINE_WEBHOOK_SECRET")
    before = asset_events(ASSET_URI)
    body = payload()
    response = post(client, body, signed_headers(body))
    assert response.status_code == 503
    assert "PIPELINE_WEBHOOK_SECRET" in response.json()["error"]
    assert asset_events(ASSET_URI) == before


def test_unknown_asset_is_a_retryable_error(client, monkeypatch):
    # The watched model has no DAG scheduled on its asset (e.g. deploy_model not parsed yet).
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", "not-parsed-model")
    body = payload(name="not-parsed-model")
    response = post(client, body, signed_headers(body))
    assert response.status_code == 503
    assert "unknown to Airflow" in response.json()["error"]


def test_describe_names_what_is_watched_and_no_secret(client):
    body = client.get("/").json()
    assert body["watching"] == {"model": MODEL, "alias": "champion"}
    assert body["asset"]["uri"] == ASSET_URI
    assert body["secret_configured"] is True
    assert SECRET not in json.dumps(body)


# -- body size: decided by the declared length, or while streaming, never after reading it all --

CHUNK = 16 * 1024
TEN_MB = 10 * 1024 * 1024


class CountingBody:
    """A request body sent in chunks that records how much of it the server consumed."""

    def __init__(self, data: bytes = b"", *, size: int = 0) -> None:
        self.data = data or b"x" * size
        self.consumed = 0

    async def __aiter__(self):
        for start in range(0, len(self.data), CHUNK):
            chunk = self.data[start : start + CHUNK]
            self.consumed += len(chunk)
            yield chunk


@pytest.fixture
def asgi_post(monkeypatch):
    """POST to the app in-process over httpx's ASGI transport, which hands the app the body
    only as fast as the app asks for it (``receive``): what the app reads is what it consumed."""
    import asyncio

    import httpx
    from registry_events.app import app

    monkeypatch.setenv("PIPELINE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("PIPELINE_REGISTRY_MODEL_NAME", MODEL)

    def post_(body: CountingBody, headers: dict) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://airflow") as c:
                return await c.post("/mlflow-webhook", content=body, headers=headers)

        return asyncio.run(go())

    return post_


def test_a_body_declared_too_large_is_refused_before_any_of_it_is_read(asgi_post):
    from registry_events.app import MAX_BODY_BYTES

    body = CountingBody(size=TEN_MB)
    headers = {**signed_headers(b"{}"), "Content-Length": str(TEN_MB)}
    response = asgi_post(body, headers)
    assert response.status_code == 413, response.text
    assert body.consumed == 0
    assert response.json()["error"] == (
        f"body is larger than {MAX_BODY_BYTES} bytes (Content-Length: {TEN_MB})"
    )


def test_a_chunked_body_is_read_only_until_it_passes_the_limit(asgi_post):
    from registry_events.app import MAX_BODY_BYTES

    body = CountingBody(size=TEN_MB)
    headers = signed_headers(b"{}")  # no Content-Length: httpx sends it chunked
    response = asgi_post(body, headers)
    assert response.status_code == 413, response.text
    assert MAX_BODY_BYTES < body.consumed <= MAX_BODY_BYTES + CHUNK
    assert response.json()["error"] == (
        f"body is larger than {MAX_BODY_BYTES} bytes (read while streaming, no Content-Length)"
    )


def test_a_chunked_body_within_the_limit_is_read_whole_and_authenticated(asgi_post):
    data = payload(alias="challenger") + b" " * (3 * CHUNK)  # several chunks, still JSON
    body = CountingBody(data)
    response = asgi_post(body, signed_headers(data))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ignored" and "not watched" in response.json()["reason"]
    assert body.consumed == len(data)


@pytest.mark.parametrize("declared", ["lots", "-1", "1e9"])
def test_a_garbled_content_length_is_refused_unread(asgi_post, declared):
    data = payload(alias="challenger")  # even unfixed, nothing would be recorded
    body = CountingBody(data)
    response = asgi_post(body, {**signed_headers(data), "Content-Length": declared})
    assert response.status_code == 400, response.text
    assert "Content-Length" in response.json()["error"]
    assert body.consumed == 0


# -- versions registered outside the pipeline; approvals answered with a tag -------------------


def version_created(version="12", tags=None, name=MODEL) -> bytes:
    # The shape of mlflow.webhooks.types.ModelVersionCreatedPayload.
    data = {"name": name, "version": version, "source": "models:/m-1", "run_id": "r1",
            "tags": tags or {}, "description": None}  # fmt: skip
    return json.dumps({"entity": "model_version", "action": "created", "data": data}).encode()


def tag_set(key, value, version="12") -> bytes:
    data = {"name": MODEL, "version": version, "key": key, "value": value}
    return json.dumps({"entity": "model_version_tag", "action": "set", "data": data}).encode()


def test_a_version_registered_outside_the_pipeline_queues_gate_new_version(client):
    before, promotions = len(asset_events(VERSIONS_URI)), asset_events(ASSET_URI)
    body = version_created(tags={"airflow_run_id": "not-a-run-of-this-airflow"})
    response = post(client, body, signed_headers(body))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "recorded"
    events = asset_events(VERSIONS_URI)
    assert len(events) == before + 1 and events[-1]["version"] == "12"
    assert queued_for(VERSIONS_URI) == ["gate_new_version"]
    assert asset_events(ASSET_URI) == promotions  # no promotion recorded


def test_a_version_an_airflow_run_registered_is_left_to_that_run(client):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType

    with create_session() as session:
        session.add(
            DagRun(dag_id="train_and_deploy", run_id="it__registers", run_type=DagRunType.MANUAL)
        )
    before = asset_events(VERSIONS_URI)
    tags = {"airflow_dag_id": "train_and_deploy", "airflow_run_id": "it__registers"}
    body = version_created(tags=tags)
    response = post(client, body, signed_headers(body))
    assert response.json()["status"] == "ignored"
    assert "registered by train_and_deploy run it__registers" in response.json()["reason"]
    assert asset_events(VERSIONS_URI) == before and queued_for(VERSIONS_URI) == []
    other = version_created(name="someone-elses-model")
    assert post(client, other, signed_headers(other)).json()["status"] == "ignored"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("gate.passed", "true", "answers no approval"),
        ("approval", "maybe", "answer approved or rejected"),
    ],
)
def test_tags_that_answer_nothing_are_ignored_without_asking_mlflow(client, key, value, reason):
    body = tag_set(key, value)
    response = post(client, body, signed_headers(body))
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert reason in response.json()["reason"]


def test_an_approval_tag_while_mlflow_is_down_is_retried_by_mlflow(client, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    body = tag_set("approval", "approved")
    response = post(client, body, signed_headers(body))
    assert response.status_code == 503, response.text  # MLflow delivers it again
    assert "cannot read v12" in response.json()["error"]
