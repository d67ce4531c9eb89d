"""MLflow's tracking server on PostgreSQL: the registry under concurrent writers, and webhooks.

A real ``mlflow server`` (two worker processes) on a throwaway PostgreSQL server; clients
talk to it over HTTP like the pipeline's tasks do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.integration]

WRITERS = 6
VERSIONS_PER_WRITER = 5
ALIAS = "champion"


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


@pytest.fixture(scope="module")
def run(pg_mlflow):
    """A run whose artifact folder holds every version's (notional) model files."""
    client = _client(pg_mlflow)
    run = client.create_run(client.create_experiment(f"pg-tier-{uuid.uuid4().hex[:8]}"))
    return run.info


def _source(run, writer: int, n: int) -> str:
    return f"{run.artifact_uri}/writer-{writer}/model-{n}"


def _last_set_won(calls: list[tuple[float, float, int]], live: int) -> None:
    """``live`` came from a set that no other set began after: a set that started once
    another had been answered must win over it (no older write overwrote a newer one)."""
    (winner,) = [call for call in calls if call[2] == live]
    later = [call for call in calls if call[0] > winner[1]]
    assert later == [], f"v{live}'s alias set was answered before these began: {later}"


def test_concurrent_writers_lose_no_version_and_the_last_alias_set_wins(pg_mlflow, run):
    name = f"pg-concurrency-{uuid.uuid4().hex[:8]}"
    client = _client(pg_mlflow)
    client.create_registered_model(name)
    # The alias exists before the race: every concurrent set moves it (see the next test for
    # its first creation).
    first = client.create_model_version(name, _source(run, -1, 0), run_id=run.run_id).version
    client.set_registered_model_alias(name, ALIAS, first)
    start = threading.Barrier(WRITERS)
    alias_calls: list[tuple[float, float, int]] = []  # (sent, answered, version)
    lock = threading.Lock()

    def writer(index: int) -> list[tuple[int, str]]:
        client = _client(pg_mlflow)
        made = []
        start.wait()
        for n in range(VERSIONS_PER_WRITER):
            source = _source(run, index, n)
            version = client.create_model_version(
                name, source, run_id=run.run_id, tags={"writer": str(index), "n": str(n)}
            ).version
            made.append((int(version), source))
            sent = time.monotonic()
            client.set_registered_model_alias(name, ALIAS, version)
            answered = time.monotonic()
            with lock:
                alias_calls.append((sent, answered, int(version)))
        return made

    with ThreadPoolExecutor(WRITERS) as pool:
        made = [item for result in pool.map(writer, range(WRITERS)) for item in result]

    total = WRITERS * VERSIONS_PER_WRITER
    numbers = sorted(version for version, _ in made)
    # Every create got its own number, none was lost or handed out twice: 2..total+1.
    assert numbers == list(range(2, total + 2))
    stored = {
        int(mv.version): mv
        for mv in client.search_model_versions(f"name = '{name}'", max_results=1000)
    }
    assert sorted(stored) == [1, *numbers]
    for version, source in made:  # each number names the version its writer created
        assert stored[version].source == source
        tags = stored[version].tags
        assert _source(run, int(tags["writer"]), int(tags["n"])) == source

    live = int(client.get_model_version_by_alias(name, ALIAS).version)
    assert client.get_registered_model(name).aliases == {ALIAS: str(live)}
    _last_set_won(alias_calls, live)
    # And a set after all of them wins.
    client.set_registered_model_alias(name, ALIAS, "1")
    assert client.get_model_version_by_alias(name, ALIAS).version == "1"
    assert client.get_registered_model(name).aliases == {ALIAS: "1"}


def _race_to_set(url: str, name: str, alias: str, versions: list[str]):
    """Every version's writer sets ``alias`` at once; (answered sets, failed sets)."""
    from mlflow.exceptions import MlflowException

    start = threading.Barrier(len(versions))
    calls: list[tuple[float, float, int]] = []
    failed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def setter(version: str) -> None:
        client = _client(url)
        start.wait()
        sent = time.monotonic()
        try:
            client.set_registered_model_alias(name, alias, version)
        except MlflowException as exc:
            with lock:
                failed.append((version, str(exc)))
            return
        with lock:
            calls.append((sent, time.monotonic(), int(version)))

    with ThreadPoolExecutor(len(versions)) as pool:
        list(pool.map(setter, versions))
    return calls, failed


def test_racing_first_sets_of_a_new_alias_fail_loudly_never_silently(pg_mlflow, run):
    """MLflow creates an alias by select-then-insert: when several writers create the same new
    alias at once on PostgreSQL, one insert wins and the others may get an error (400, the
    primary key's unique violation). A writer always learns its set did not happen; the alias
    ends on a version whose set succeeded; the set succeeds when tried again."""
    name = f"pg-alias-race-{uuid.uuid4().hex[:8]}"
    client = _client(pg_mlflow)
    client.create_registered_model(name)
    versions = [
        client.create_model_version(name, _source(run, i, 0), run_id=run.run_id).version
        for i in range(WRITERS)
    ]
    for round_ in range(3):
        alias = f"new-{round_}"
        calls, failed = _race_to_set(pg_mlflow, name, alias, versions)
        assert calls, f"no set of @{alias} succeeded: {failed}"
        for _, message in failed:
            assert "registered_model_alias_pk" in message, message
        live = int(client.get_model_version_by_alias(name, alias).version)
        _last_set_won(calls, live)
        for version, _ in failed:  # tried again, each lands
            client.set_registered_model_alias(name, alias, version)
            assert client.get_model_version_by_alias(name, alias).version == version


class _Receiver(BaseHTTPRequestHandler):
    deliveries: queue.Queue

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.deliveries.put(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    """A tiny HTTP server on loopback that records every POST: (lower-cased headers, body)."""
    deliveries: queue.Queue = queue.Queue()
    handler = type("Receiver", (_Receiver,), {"deliveries": deliveries})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", deliveries
    finally:
        server.shutdown()
        server.server_close()


def _expected_signature(secret: str, headers: dict[str, str], body: bytes) -> str:
    """MLflow's webhook signature, computed here independently of the plugin."""
    content = f"{headers['x-mlflow-delivery-id']}.{headers['x-mlflow-timestamp']}.".encode() + body
    return (
        "v1,"
        + base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha256).digest()).decode()
    )


def test_an_alias_change_delivers_a_signed_webhook(pg_mlflow, run, receiver):
    url, deliveries = receiver
    secret = uuid.uuid4().hex
    name = f"pg-webhook-{uuid.uuid4().hex[:8]}"
    client = _client(pg_mlflow)
    hook = client.create_webhook(
        name=f"pg-tier-{uuid.uuid4().hex[:8]}",
        url=url,
        events=["model_version_alias.created"],
        secret=secret,
    )
    try:
        # Stored in PostgreSQL (webhooks need a SQL backend): the server lists it back.
        assert hook.webhook_id in {h.webhook_id for h in client.list_webhooks(max_results=100)}
        client.create_registered_model(name)
        version = client.create_model_version(name, _source(run, 0, 0), run_id=run.run_id).version
        time.sleep(1.5)  # MLFLOW_WEBHOOK_CACHE_TTL=1: the workers see the new webhook
        client.set_registered_model_alias(name, ALIAS, version)

        deadline = time.monotonic() + 60
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no webhook delivery for the alias change in 60 s"
            headers, body = deliveries.get(timeout=remaining)
            payload = json.loads(body)
            if payload.get("data", {}).get("name") == name:
                break
        assert (payload["entity"], payload["action"]) == ("model_version_alias", "created")
        assert payload["data"]["alias"] == ALIAS
        assert str(payload["data"]["version"]) == version
        assert abs(time.time() - int(headers["x-mlflow-timestamp"])) < 120
        assert headers["x-mlflow-signature"] == _expected_signature(secret, headers, body)
        # A wrong secret would not have produced it.
        assert headers["x-mlflow-signature"] != _expected_signature("not-" + secret, headers, body)
    finally:
        client.delete_webhook(hook.webhook_id)
