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
        body = self.rfile.read(length) if length else b""
        server = self.server
        headers = {k.lower(): v for k, v in self.headers.items()}
        server.seen.append((self.command, self.path, headers, body))  # type: ignore[attr-defined]
        time.sleep(server.delay_s)  # type: ignore[attr-defined]
        table = json.loads(body).get("dataframe_split") if body.startswith(b"{") else None
        if table:  # a model: the first column of each row is its prediction
            answer = json.dumps({"predictions": [row[0] for row in table["data"]]}).encode()
        else:
            answer = json.dumps({"upstream": server.name}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

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
        server.name, server.seen, server.delay_s = name, [], 0.0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield servers
    for s in servers.values():
        s.shutdown()
        s.server_close()


def port_of(server) -> int:
    return server.server_address[1]


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


def activate(state: Path, port: int, version: str, candidate: dict | None = None) -> None:
    """What the deployer does: write a temp file, then atomically replace active.json."""
    record = {"version": version, "model_uri": f"models:/m/{version}", "port": port, "pid": 0}
    if candidate is not None:
        record["candidate"] = {"version": "9", **candidate}
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


def test_a_switch_moves_every_next_request(proxy, upstreams):
    state, port = proxy["state"], proxy["port"]
    blue, green = port_of(upstreams["blue"]), port_of(upstreams["green"])
    activate(state, blue, "1")
    assert get(port) == (200, {"upstream": "blue"})
    assert get(port, "POST", b"{}") == (200, {"upstream": "blue"})

    # A keep-alive connection opened before the switch ...
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    kept.request("GET", "/ping")
    assert json.loads(kept.getresponse().read()) == {"upstream": "blue"}

    activate(state, green, "2")
    for _ in range(5):
        assert get(port) == (200, {"upstream": "green"})

    # ... goes on on the new upstream (the old one is stopped after a short drain).
    kept.request("GET", "/ping")
    assert json.loads(kept.getresponse().read()) == {"upstream": "green"}
    kept.close()

    # Back again (a rollback), and to nothing.
    activate(state, blue, "1")
    assert get(port) == (200, {"upstream": "blue"})
    (state / "active.json").unlink()
    assert get(port)[0] == 503


def test_a_canary_weight_splits_the_predictions_of_one_connection(proxy, upstreams):
    blue, green = port_of(upstreams["blue"]), port_of(upstreams["green"])
    activate(proxy["state"], blue, "1", {"port": green, "weight": 0.5})
    conn = http.client.HTTPConnection("127.0.0.1", proxy["port"], timeout=5)
    answered = {"blue": 0, "green": 0}
    for _ in range(200):
        conn.request("POST", "/invocations", body=b"{}")
        answered[json.loads(conn.getresponse().read())["upstream"]] += 1
    for path in ("/ping", "/metrics", "/v1/model"):  # only predictions are split
        conn.request("GET", path)
        assert json.loads(conn.getresponse().read()) == {"upstream": "blue"}, path
    conn.close()
    assert 60 <= answered["green"] <= 140, answered  # binomial(200, 0.5): 6 sigma

    activate(proxy["state"], blue, "1", {"port": green, "weight": 0.0})
    assert {get(proxy["port"], "POST", b"{}")[1]["upstream"] for _ in range(20)} == {"blue"}


def test_a_dead_candidate_gets_nothing(proxy, upstreams, free_ports):
    (dead,) = free_ports(1)
    blue = port_of(upstreams["blue"])
    activate(proxy["state"], blue, "1", {"port": dead, "weight": 1.0, "mirror": 1.0})
    for _ in range(10):
        assert get(proxy["port"], "POST", b"{}") == (200, {"upstream": "blue"})


def test_a_mirror_gets_the_live_answer_after_the_caller(proxy, upstreams):
    blue, green = upstreams["blue"], upstreams["green"]
    green.delay_s = 1.0  # a slow shadow
    activate(proxy["state"], port_of(blue), "1", {"port": port_of(green), "mirror": 1.0})
    started = time.monotonic()
    for i in range(5):
        body = json.dumps({"row": i}).encode()
        assert get(proxy["port"], "POST", body) == (200, {"upstream": "blue"})
    assert time.monotonic() - started < 0.5, "callers waited for the shadow"
    deadline = time.monotonic() + 10
    while len(green.seen) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(json.loads(body)["row"] for *_, body in green.seen) == list(range(5))
    for method, path, headers, _ in green.seen:
        assert (method, path) == ("POST", "/invocations")
        assert json.loads(headers["x-live-answer"]) == {"upstream": "blue"}
    assert [path for _, path, *_ in blue.seen].count("/invocations") == 5


def test_mirrored_tables_that_wait_are_merged_row_for_row(proxy, upstreams):
    blue, green = upstreams["blue"], upstreams["green"]
    green.delay_s = 0.2  # a busy shadow: what is mirrored meanwhile waits, and is merged
    activate(proxy["state"], port_of(blue), "1", {"port": port_of(green), "mirror": 1.0})
    sent = []
    for i in range(60):
        columns = ["x", "z"] if i % 7 == 3 else ["x", "y"]  # another table shape now and then
        row = [i, 1000 + i] if columns[1] == "z" else [i, -i]
        body = json.dumps({"dataframe_split": {"columns": columns, "data": [row]}}).encode()
        assert get(proxy["port"], "POST", body) == (200, {"predictions": [i]})
        sent.append((tuple(columns), tuple(row)))
    deadline = time.monotonic() + 20
    mirrored: list = []
    while len(mirrored) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
        tables = [(h, json.loads(b)["dataframe_split"]) for *_, h, b in list(green.seen)]
        mirrored = [(tuple(t["columns"]), tuple(r)) for _, t in tables for r in t["data"]]
    assert sorted(mirrored) == sorted(sent), "every row mirrored once, under its own columns"
    assert len(tables) < len(sent) / 2, f"{len(tables)} requests: waiting ones were not merged"
    for headers, table in tables:  # each row beside the live prediction for it
        live = json.loads(headers["x-live-answer"])["predictions"]
        assert live == [row[0] for row in table["data"]]
        if len(table["data"]) > 1:  # merged (one that waited alone goes as it came)
            assert headers["content-type"] == "application/json"
    # The candidate counts each merged request as the requests it carries: all 60 are counted.
    assert sum(int(h.get("x-mirrored-requests", 1)) for h, _ in tables) == len(sent)


def test_dead_upstream_answers_502(proxy, free_ports):
    (dead,) = free_ports(1)
    activate(proxy["state"], dead, "3")
    status, body = get(proxy["port"])
    assert status == 502
    assert body["error_code"] == "UPSTREAM_UNAVAILABLE"


def test_sigterm_stops_cleanly_and_logs_switches(proxy, upstreams):
    activate(proxy["state"], port_of(upstreams["blue"]), "1")
    assert get(proxy["port"])[0] == 200
    activate(proxy["state"], port_of(upstreams["green"]), "2")
    assert get(proxy["port"])[0] == 200
    proc = proxy["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not (proxy["state"] / "proxy.pid").exists()
    log = proxy["log"].read_text()
    assert "switch: nothing -> version 1" in log
    assert "switch: version 1" in log and "-> version 2" in log
