"""The ASGI app (``serving.server.app``), driven directly with a stand-in model: requests
recorded as tuples count like direct observations (the metrics themselves, several workers
included: test_metrics.py), slow and unfinished bodies, and the rows answered reaching the
feature and prediction histograms. Strict mode through the app: test_strict.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serving.server.app import _ROUTES
from serving.server.metrics import ServerMetrics
from tests.serving.server.asgi import GOOD_SPLIT, make_app, post, run, split


def _record(path: str, status: int, seconds: float, rows: int = 0, method: str = "POST"):
    return (0.0, seconds, method, path, status, 10, 20, ("127.0.0.1", 1), rows, None)


def test_recorded_requests_count_like_observed_ones():
    recorded, observed = ServerMetrics(routes=_ROUTES), ServerMetrics(routes=_ROUTES)
    records = [
        _record("/invocations", 200, 0.0004, rows=2),
        _record("/invocations", 400, 0.002),
        _record("/nowhere", 404, 0.0001, method="GET"),
        _record("/invocations", 200, 0.03, rows=1),
    ]
    recorded.observe_records(records)
    for r in records:
        observed.observe_request(_ROUTES.get(r[3], "other"), r[2], r[4], r[1])

    def without_predictions(metrics: ServerMetrics) -> list[str]:
        # start_time_seconds is each instance's own creation time, not a request count.
        return [
            line
            for line in metrics.render().decode().splitlines()
            if "predictions" not in line and "start_time_seconds" not in line
        ]

    assert without_predictions(recorded) == without_predictions(observed)
    assert "model_server_predictions_total 3.0" in recorded.render().decode().splitlines()


# -- bodies that arrive slowly, or never -----------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        [],  # the headers came, no byte of the body
        [(0, b'{"dataframe_split": ')],  # part of it, then nothing
        [(0, b"{"), (0.05, b'"dataframe_split"')],  # two parts, then nothing
    ],
    ids=["nothing", "first-part", "two-parts"],
)
def test_a_body_that_stops_arriving_is_408_and_the_connection_closes(parts):
    async def scenario():
        app = make_app(body_timeout_s=0.3)
        started = time.monotonic()
        status, headers, error = await post(app, parts, complete=False)
        return status, headers, error, time.monotonic() - started

    status, headers, error, seconds = run(scenario())
    assert status == 408
    assert headers[b"connection"] == b"close"
    assert error["error_code"] == "BAD_REQUEST"
    assert "0.3" in error["message"]
    assert 0.3 <= seconds < 1.5


def test_the_body_deadline_is_for_the_whole_body_not_each_part():
    drip = [(0, b"{")] + [(0.1, b" ")] * 20  # 2 s of one byte every 0.1 s

    async def scenario():
        return await post(make_app(body_timeout_s=0.5), drip, complete=False)

    status, _, _ = run(scenario())
    assert status == 408


def test_a_slow_body_that_arrives_in_time_is_answered():
    body = GOOD_SPLIT.encode()
    parts = [(0, body[:10]), (0.1, body[10:20]), (0.1, body[20:])]

    async def scenario():
        return await post(make_app(body_timeout_s=1.0), parts)

    status, _, answer = run(scenario())
    assert status == 200
    assert answer == {"predictions": [{"prediction": 6.0}]}


def test_a_body_that_came_whole_sets_no_timer(monkeypatch):
    def no_timer(*args, **kwargs):
        raise AssertionError("a timer was set for a body that had arrived")

    monkeypatch.setattr(asyncio, "timeout", no_timer)
    monkeypatch.setattr(asyncio, "timeout_at", no_timer)
    monkeypatch.setattr(asyncio, "wait_for", no_timer)

    async def scenario():
        app = make_app(body_timeout_s=0.3)
        sent = []

        async def receive():
            return {"type": "http.request", "body": GOOD_SPLIT.encode(), "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-type", b"application/json")],
            "client": None,
        }
        await app(scope, receive, send)
        return sent[0]["status"]

    assert run(scenario()) == 200


# -- distributions: the rows the fast path answered, recorded by reference -------------------------


def test_answered_rows_reach_the_feature_and_prediction_histograms():
    from prometheus_client.parser import text_string_to_metric_families

    many = split(data=[[float(i), 2.0, -1.0] for i in range(20)])  # the numpy path (> 16 rows)
    bodies = [
        GOOD_SPLIT.encode(),  # [[1, 2, 3]]: the plain-list path
        json.dumps(many).encode(),
        b'{"dataframe_split": {"columns": ["a", "b", "c"], "data": [[NaN, 1, 2]]}}',  # 400
    ]

    async def scenario():
        app = make_app()
        statuses = [(await post(app, [(0, body)]))[0] for body in bodies]
        app.recorder.flush()
        return statuses, app.metrics.render().decode()

    statuses, text = run(scenario())
    assert statuses == [200, 200, 400]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("model_server_feature_value_count", (("feature", "a"),))] == 21
    assert samples[("model_server_feature_value_sum", (("feature", "a"),))] == 1 + sum(range(20))
    assert samples[("model_server_feature_value_sum", (("feature", "c"),))] == 3 - 20
    assert samples[("model_server_prediction_value_count", ())] == 21
    assert samples[("model_server_prediction_value_sum", ())] == 6 + sum(range(1, 21))
    assert samples[("model_server_model_version", ())] == 1.0
