"""The local front proxy: a real `python -m serving.deploy proxy` in front of two tiny HTTP
servers."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a connection can outlive a switch
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"upstream": self.server.name}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def upstreams():
    servers = {}
    for name in ("blue", "green"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.name = name
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield {name: s.server_address[1] for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture
def proxy(tmp_path, free_ports):
    port, *slots = free_ports(3)
    state = tmp_path / "state"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        PIPELINE_DEPLOY_LOCAL_PORT=str(port),
        PIPELINE_DEPLOY_LOCAL_SLOT_PORTS=",".join(map(str, slots)),
        PIPELINE_DEPLOY_LOCAL_STATE_DIR=str(state),
    )
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.deploy", "proxy"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while not (state / "proxy.pid").exists():
        assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
        assert time.monotonic() < deadline, "proxy did not start"
        time.sleep(0.05)
    info = {"port": port, "state": state, "proc": proc, "log": tmp_path / "proxy.log"}
    yield info
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    log.close()


def activate(state: Path, port: int, version: str) -> None:
    """What the deployer does: write a temp file, then atomically replace active.json."""
    record = {"version": version, "model_uri": f"models:/m/{version}", "port": port, "pid": 0}
    tmp = state / ".active.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, state / "active.json")


def get(port: int, method: str = "GET", body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, "/invocations" if body else "/ping", body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_no_active_model_answers_503(proxy):
    status, body = get(proxy["port"])
    assert status == 503
    assert body["error_code"] == "NO_MODEL_DEPLOYED"
    status, body = get(proxy["port"], "POST", b'{"dataframe_split": {"columns": [], "data": []}}')
    assert status == 503


def test_switch_routes_new_connections(proxy, upstreams):
    state, port = proxy["state"], proxy["port"]
    activate(state, upstreams["blue"], "1")
    assert get(port) == (200, {"upstream": "blue"})
    assert get(port, "POST", b"{}") == (200, {"upstream": "blue"})

    # A keep-alive connection opened before the switch ...
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    kept.request("GET", "/ping")
    assert json.loads(kept.getresponse().read()) == {"upstream": "blue"}

    activate(state, upstreams["green"], "2")
    for _ in range(5):
        assert get(port) == (200, {"upstream": "green"})

    # ... finishes on the old upstream.
    kept.request("GET", "/ping")
    assert json.loads(kept.getresponse().read()) == {"upstream": "blue"}
    kept.close()

    # Back again (a rollback), and to nothing.
    activate(state, upstreams["blue"], "1")
    assert get(port) == (200, {"upstream": "blue"})
    (state / "active.json").unlink()
    assert get(port)[0] == 503


def test_dead_upstream_answers_502(proxy, free_ports):
    (dead,) = free_ports(1)
    activate(proxy["state"], dead, "3")
    status, body = get(proxy["port"])
    assert status == 502
    assert body["error_code"] == "UPSTREAM_UNAVAILABLE"


def test_sigterm_stops_cleanly_and_logs_switches(proxy, upstreams):
    activate(proxy["state"], upstreams["blue"], "1")
    assert get(proxy["port"])[0] == 200
    activate(proxy["state"], upstreams["green"], "2")
    assert get(proxy["port"])[0] == 200
    proc = proxy["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not (proxy["state"] / "proxy.pid").exists()
    log = proxy["log"].read_text()
    assert "switch: nothing -> version 1" in log
    assert "switch: version 1" in log and "-> version 2" in log
