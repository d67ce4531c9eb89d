"""The relay between MLflow and the registry-events plugin, for the promotion load tests.

MLflow's webhook URL points at it. It forwards each delivery unchanged (same body, same signed
headers) and passes the answer back, and it is how the tests see what no part reports: the
endpoint's latency per delivery, and the deliveries themselves, which it uses for two kinds of
duplicates:

* twins: every ``twin_every``-th delivery for the model is forwarded twice at the same moment
  (what an MLflow retry looks like when the first attempt's answer was slow), so the two
  copies race through the API server's workers before either is recorded;
* replays: ``Relay.replay`` sends a recorded delivery again, byte for byte.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Hit:
    """One POST the relay forwarded to the plugin, and its answer."""

    via: str  # "mlflow" (MLflow's own delivery), "twin" (its racing copy), "replay"
    delivery_id: str
    model: str | None
    version: str | None
    sent: float  # time.monotonic() when forwarded
    latency_s: float
    status: int
    answer: dict[str, Any] = field(default_factory=dict)


def _delivery_id(headers: dict[str, str]) -> str:
    return next(v for k, v in headers.items() if k.lower() == "x-mlflow-delivery-id")


class Relay:
    """Forwards MLflow's webhook deliveries to the plugin unchanged, timing each."""

    SKIP = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}

    def __init__(self, target: str, twin_every: int, model: str) -> None:
        self.target = target
        self.model = model
        self.twin_every = twin_every
        self.hits: list[Hit] = []
        self.captured: dict[str, tuple[dict[str, str], bytes]] = {}
        self._lock = threading.Lock()
        self._ours = 0
        self._client = httpx.Client(
            timeout=60, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32)
        )
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in relay.SKIP}
                hit = relay.deliver(headers, body)
                payload = json.dumps(hit.answer).encode()
                self.send_response(hit.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()

    def forward(self, headers: dict[str, str], body: bytes, via: str) -> Hit:
        try:
            data = json.loads(body).get("data", {})
        except ValueError:
            data = {}
        delivery_id = _delivery_id(headers)
        sent = time.monotonic()
        try:
            response = self._client.post(self.target, content=body, headers=headers)
            status, text = response.status_code, response.text
        except httpx.HTTPError as exc:
            status, text = 599, json.dumps({"error": f"relay: {exc!r}"})
        latency = time.monotonic() - sent
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {"error": text[:300]}
        hit = Hit(via, delivery_id, data.get("name"), data.get("version"), sent, latency, status)
        hit.answer = answer if isinstance(answer, dict) else {"answer": answer}
        with self._lock:
            self.hits.append(hit)
        return hit

    def deliver(self, headers: dict[str, str], body: bytes) -> Hit:
        """An MLflow delivery: forwarded, and every ``twin_every``-th of ours twice at once."""
        try:
            ours = json.loads(body).get("data", {}).get("name") == self.model
        except ValueError:
            ours = False
        with self._lock:
            delivery_id = _delivery_id(headers)
            self.captured.setdefault(delivery_id, (headers, body))
            if ours:
                self._ours += 1
            twin = ours and self._ours % self.twin_every == 0
        if not twin:
            return self.forward(headers, body, "mlflow")
        start = threading.Barrier(2)
        copy: list[Hit] = []

        def send_twin() -> None:
            start.wait()
            copy.append(self.forward(headers, body, "twin"))

        thread = threading.Thread(target=send_twin)
        thread.start()
        start.wait()
        hit = self.forward(headers, body, "mlflow")
        thread.join()
        return hit

    def replay(self, delivery_id: str) -> Hit:
        headers, body = self.captured[delivery_id]
        return self.forward(headers, body, "replay")

    def ours(self, since: float = 0.0) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.model == self.model and h.sent >= since]
