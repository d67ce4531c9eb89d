"""The model server's hardening, over real sockets against real processes.

- slow bodies: a client that declares more body than it sends (or drips it) gets 408 and a
  closed connection after ``--body-timeout-s``, while other connections are served meanwhile;
- strict mode (``--strict``): what stock MLflow quietly accepts (an extra column dropped, a
  JSON ``true`` turned into 1.0) is a 400 naming the column, on the fast path and on the
  reference path (``--no-fast-path``) alike; good requests still get their predictions.

Without these flags the server behaves like stock MLflow: test_server_protocol holds it to that.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.test_server_protocol import (
    FEATURES,
    ServerProcess,
    child_env,
    our_server_cmd,
    sqlite_registry,
    train_and_register,
)

pytestmark = pytest.mark.integration

MODEL_NAME = "serving-hardening"
BODY_TIMEOUT_S = 1.0
# How late an answer may come after the timeout on a busy 2-core machine.
SLACK_S = 2.0
ROWS = [[0.5, -1.25, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]]
JSON = "application/json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-hardening")
    with sqlite_registry(root):
        yield train_and_register(root, MODEL_NAME)


@pytest.fixture(scope="module", params=["fast-path", "reference-path"])
def server(request, registry):
    """Strict, 1 s body timeout; with the Keras fast path, or everything through the pyfunc."""
    port = free_port()
    extra = ["--strict", "--body-timeout-s", str(BODY_TIMEOUT_S)]
    if request.param == "reference-path":
        extra.append("--no-fast-path")
    proc = ServerProcess.start(
        f"hardening-{request.param}",
        our_server_cmd(registry.model_uri, port, *extra),
        port,
        child_env(registry.tracking_uri),
        registry.root,
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# -- slow bodies ---------------------------------------------------------------------------------


def _open_slow(port: int, sent: bytes, declared: int = 100) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + SLACK_S + 5)
    sock.sendall(
        b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (declared, sent)
    )
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail("the server neither answered nor closed the connection")
        except ConnectionResetError:
            # A byte the client still sent after the server's answer and close makes the
            # kernel reset the connection: closed too (what was answered is in ``chunks``).
            return b"".join(chunks), time.monotonic()
        if not chunk:
            return b"".join(chunks), time.monotonic()
        chunks.append(chunk)


def _read_response(sock: socket.socket) -> bytes:
    """One response on a connection the server keeps open (its body by Content-Length)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {raw!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def test_bodies_that_never_arrive_get_408_and_a_closed_connection(server):
    started = time.monotonic()
    # Half send a byte of the 100 they declare, half nothing after the headers.
    socks = [_open_slow(server.port, b"{" if i % 2 else b"") for i in range(20)]
    try:
        # Meanwhile, a normal request on another connection is answered at once.
        with httpx.Client(base_url=server.url, timeout=BODY_TIMEOUT_S) as client:
            resp = client.post(
                "/invocations", json={"dataframe_split": {"columns": FEATURES, "data": ROWS}}
            )
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["predictions"]) == len(ROWS)
        assert time.monotonic() - started < BODY_TIMEOUT_S

        for sock in socks:
            raw, closed_at = _read_until_closed(sock)
            status, headers, error = _parse(raw)
            assert status == 408
            assert headers["connection"] == "close"
            assert error["error_code"] == "BAD_REQUEST"
            assert "did not arrive" in error["message"]
            assert BODY_TIMEOUT_S <= closed_at - started < BODY_TIMEOUT_S + SLACK_S
    finally:
        for sock in socks:
            sock.close()


def test_a_body_dripped_slower_than_the_timeout_gets_408(server):
    sock = _open_slow(server.port, b"{")
    started = time.monotonic()
    stop = threading.Event()

    def drip() -> None:  # one byte every 0.2 s: each gap is short, the whole is too long
        with contextlib.suppress(OSError):  # the server closed the connection
            while not stop.wait(0.2):
                sock.sendall(b" ")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        raw, closed_at = _read_until_closed(sock)
    finally:
        stop.set()
        dripper.join()
        sock.close()
    assert _parse(raw)[0] == 408
    assert BODY_TIMEOUT_S <= closed_at - started < BODY_TIMEOUT_S + SLACK_S


def test_a_slow_body_that_arrives_in_time_is_answered(server):
    body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": ROWS}}).encode()
    sock = _open_slow(server.port, body[:10], declared=len(body))
    try:
        time.sleep(BODY_TIMEOUT_S / 3)
        sock.sendall(body[10:30])
        time.sleep(BODY_TIMEOUT_S / 3)
        sock.sendall(body[30:])
        raw = _read_response(sock)
    finally:
        sock.close()
    status, _, answer = _parse(raw)
    assert status == 200, answer
    assert len(answer["predictions"]) == len(ROWS)


# -- strict mode ---------------------------------------------------------------------------------


def split(columns=FEATURES, data=ROWS) -> dict:
    return {"dataframe_split": {"columns": columns, "data": data}}


def records(rows=ROWS) -> list[dict]:
    return [dict(zip(FEATURES, row, strict=True)) for row in rows]


# (id, JSON payload, the column the error names): stock MLflow answers 200 to each.
STRICT_REJECTS = [
    ("split-extra-column", split([*FEATURES, "extra"], [[*r, 1.0] for r in ROWS]), "extra"),
    ("split-extra-text-column", split([*FEATURES, "note"], [[*r, "hi"] for r in ROWS]), "note"),
    ("split-booleans", split(data=[[True, False, 1.5, 2.0]]), "x0"),
    ("split-numeric-strings", split(data=[["0.5", "1", "2", "3"]]), "x0"),
    ("records-extra-key", {"dataframe_records": [{**r, "z": "x"} for r in records()]}, "z"),
    ("records-boolean", {"dataframe_records": [{**records()[0], "x2": True}]}, "x2"),
    ("instances-boolean", {"instances": [{**records()[0], "x3": False}]}, "x3"),
    (
        "inputs-columns-boolean",
        {"inputs": {c: [r[i] for r in ROWS] for i, c in enumerate(FEATURES)} | {"x1": [True, 1]}},
        "x1",
    ),
]


@pytest.mark.parametrize(("payload", "column"), [p[1:] for p in STRICT_REJECTS],
                         ids=[p[0] for p in STRICT_REJECTS])  # fmt: skip
def test_strict_mode_rejects_what_stock_quietly_coerces_or_drops(server, payload, column):
    resp = httpx.post(f"{server.url}/invocations", json=payload, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()
    assert error["error_code"] == "BAD_REQUEST"
    assert repr(column) in error["message"]


def test_strict_mode_rejects_an_extra_csv_column(server):
    csv = (
        ",".join([*FEATURES, "extra"])
        + "\n"
        + "\n".join(",".join(str(v) for v in [*row, 1.0]) for row in ROWS)
    )
    resp = httpx.post(
        f"{server.url}/invocations",
        content=csv.encode(),
        headers={"Content-Type": "text/csv"},
        timeout=30,
    )
    assert resp.status_code == 400, resp.text
    assert "'extra'" in resp.json()["message"]


@pytest.mark.parametrize(
    "payload",
    [split(), split(FEATURES[::-1], [r[::-1] for r in ROWS]), {"dataframe_records": records()},
     {"inputs": {c: [r[i] for r in ROWS] for i, c in enumerate(FEATURES)}}],
    ids=["split", "split-reordered", "records", "inputs-columns"],
)  # fmt: skip
def test_strict_mode_answers_good_requests(server, payload):
    resp = httpx.post(f"{server.url}/invocations", json=payload, timeout=30)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["predictions"]) == len(ROWS)
