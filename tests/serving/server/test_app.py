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
from serving.server.contract import LIVE_ANSWER_HEADER, MIRRORED_REQUESTS_HEADER
from serving.server.metrics import ServerMetrics
from tests.serving.server.asgi import (
    GOOD_SPLIT,
    SummingPyfunc,
    fake_model,
    make_app,
    post,
    run,
    split,
)


def _record(path: str, status: int, seconds: float, rows: int = 0, method: str = "POST"):
    return (0.0, seconds, method, path, status, 10, 20, ("127.0.0.1", 1), rows, None, 1)


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


def test_a_mirrored_request_records_its_paired_differences():
    """A request carrying the live answer (a shadow's mirror) adds |own - live| per row to
    model_server_shadow_abs_diff; one whose answers do not line up counts as unpaired; an
    ordinary request, or one answered with an error, records nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    two_rows = json.dumps(split(data=[[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])).encode()  # 6, 1
    live = b'{"predictions": [{"prediction": 6.5}, {"prediction": 1.0}]}'
    header = LIVE_ANSWER_HEADER.lower().encode()

    async def scenario():
        app = make_app()
        statuses = [
            (await post(app, [(0, two_rows)], headers=[(header, live)]))[0],
            (await post(app, [(0, two_rows)], headers=[(header, b'{"predictions": [1]}')]))[0],
            (await post(app, [(0, two_rows)]))[0],
            (await post(app, [(0, b"{")], headers=[(header, live)]))[0],
        ]
        app.recorder.flush()
        return statuses, app.metrics.render().decode()

    statuses, text = run(scenario())
    assert statuses == [200, 200, 200, 400]
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("model_server_shadow")
    }
    assert samples[("model_server_shadow_abs_diff_count", None)] == 2
    assert samples[("model_server_shadow_abs_diff_sum", None)] == 0.5
    assert samples[("model_server_shadow_abs_diff_bucket", "1e-06")] == 1  # the 0
    assert samples[("model_server_shadow_abs_diff_bucket", "0.25")] == 1
    assert samples[("model_server_shadow_abs_diff_bucket", "0.5")] == 2
    assert samples[("model_server_shadow_unpaired_total", None)] == 1


def test_a_merged_mirror_request_counts_as_the_requests_it_merged():
    """The front proxy merges waiting mirrored requests (serving.deploy.mirror). The judge
    counts the candidate's requests (judge_min_requests) and their 5xx share per request, so a
    merged one counts as the requests it carries, answered or not: merging changes what the
    shadow costs, not what the judge sees. Only a mirror's count is taken (the live answer
    beside it), and only a number that makes sense."""
    from prometheus_client.parser import text_string_to_metric_families

    three_rows = json.dumps(split(data=[[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    live = (LIVE_ANSWER_HEADER.lower().encode(), b'{"predictions": [6.0, 1.0, 3.0]}')
    merged = MIRRORED_REQUESTS_HEADER.lower().encode()

    async def scenario():
        app = make_app()
        statuses = [
            (await post(app, [(0, three_rows.encode())], headers=[live, (merged, b"3")]))[0],
            (await post(app, [(0, b"{")], headers=[live, (merged, b"2")]))[0],  # 400: counts 2
            (await post(app, [(0, three_rows.encode())], headers=[(merged, b"3")]))[0],
            (await post(app, [(0, three_rows.encode())], headers=[live, (merged, b"x")]))[0],
            (await post(app, [(0, three_rows.encode())], headers=[live, (merged, b"0")]))[0],
            (await post(app, [(0, three_rows.encode())], headers=[live, (merged, b"99999")]))[0],
        ]
        app.recorder.flush()
        return statuses, app.metrics.render().decode()

    statuses, text = run(scenario())
    assert statuses == [200, 400, 200, 200, 200, 200]
    samples = {
        (s.name, s.labels.get("status")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("route") in ("/invocations", None)
    }
    # 3 (merged) + 1 (no live answer: not a mirror) + 1 + 1 + 1 (counts that make no sense)
    assert samples[("model_server_requests_total", "200")] == 7
    assert samples[("model_server_requests_total", "400")] == 2
    assert samples[("model_server_request_duration_seconds_count", None)] == 9
    # Rows are rows: each of the five answered requests predicted its three.
    assert samples[("model_server_predictions_total", None)] == 15
    assert samples[("model_server_shadow_abs_diff_count", None)] == 12


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"predictions": [{"prediction": 1.5}, {"prediction": 2}]}, [1.5, 2.0]),
        ({"predictions": [[1.0], [2.0]]}, [1.0, 2.0]),
        ({"predictions": [3.0]}, [3.0]),
        ({"predictions": {"a": [1.0], "b": [2.0]}}, [1.0, 2.0]),
        ({"predictions": ["cat", True]}, []),
    ],
)
def test_the_numbers_of_an_answer(answer, expected):
    from serving.server.shadow import numbers

    assert numbers(answer) == expected


# -- one decode per body ---------------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch):
    """Every decode of a request body: the app's own (fast) decoder's results, and every
    ``json.loads`` of a body; and what MLflow's parser was given."""
    from serving.server import app as app_module
    from serving.server import reference

    seen = {"fast": [], "json": [], "parsed": []}
    fast_loads, json_loads, parse = app_module.loads, json.loads, reference.parse_json_data

    def counting_fast(body):
        seen["fast"].append(decoded := fast_loads(body))
        return decoded

    def counting_json(text, *args, **kwargs):
        if isinstance(text, bytes) and text.startswith(b'{"dataframe_split"'):
            seen["json"].append(text)
        return json_loads(text, *args, **kwargs)

    def recording_parse(decoded, *args):
        seen["parsed"].append(decoded)
        return parse(decoded, *args)

    monkeypatch.setattr(app_module, "loads", counting_fast)
    monkeypatch.setattr(json, "loads", counting_json)
    monkeypatch.setattr(reference, "parse_json_data", recording_parse)
    return seen


DECLINED = [
    # a numeric string: MLflow converts it, the fast paths leave it to MLflow
    ("fast-path", False, split(data=[[1.0, "2", 3.0]])),
    # more rows than the shared call takes straight, one a string
    ("pyfunc-batched", True, split(data=[[1.0, 2.0, 3.0]] * 70 + [[1.0, "2", 3.0]])),
]


@pytest.mark.parametrize(("batched", "payload"), [d[1:] for d in DECLINED],
                         ids=[d[0] for d in DECLINED])  # fmt: skip
def test_a_body_the_fast_path_declines_is_decoded_once(decodes, batched, payload):
    body = json.dumps(payload).encode()

    async def scenario():
        app = make_app(fast=not batched, pyfunc=SummingPyfunc(), batched=batched)
        answer = await post(app, [(0, body)])
        if batched:
            assert app.pyfunc_batching is not None
            await app.pyfunc_batching.batcher.close()
        return answer

    status, _, answer = run(scenario())
    assert status == 200
    assert [p["prediction"] for p in answer["predictions"]][-1] == 6.0
    assert len(decodes["fast"]) == 1, "the app decodes the body once"
    assert decodes["json"] == [], "the reference path decoded the body again"
    assert len(decodes["parsed"]) == 1
    assert decodes["parsed"][0] is decodes["fast"][0]  # MLflow parses what the app decoded


def test_a_body_json_reads_differently_is_decoded_again_as_mlflow_reads_it(decodes):
    """orjson reads an integer beyond 64 bits as a float; json, MLflow's decoder, keeps it."""
    big = 2**70 + 1
    body = json.dumps(split(data=[[1.0, "2", big]])).encode()

    async def scenario():
        return await post(make_app(pyfunc=SummingPyfunc()), [(0, body)])

    run(scenario())
    assert type(decodes["fast"][0]["dataframe_split"]["data"][0][2]) is float
    assert len(decodes["json"]) == 1
    assert decodes["parsed"][0]["dataframe_split"]["data"][0][2] == big  # exact, as json read it


@pytest.mark.parametrize("profile_from", [None, "models:/m/7"])
def test_the_histogram_buckets_come_from_the_profile_the_config_names(monkeypatch, profile_from):
    """A canary is started with the live version's model URI (--profile-from): its
    prediction histogram then has the live version's buckets, bucket for bucket."""
    import serving.server.app as app_module
    from serving.server.__main__ import build_parser
    from serving.server.config import ServerConfig

    args = ["--profile-from", profile_from] if profile_from else []
    assert build_parser().parse_args(args).profile_from == profile_from
    config = ServerConfig(model_uri="models:/m/8", profile_from=profile_from)
    model = fake_model()
    read = []
    monkeypatch.setattr(app_module, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(app_module, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(app_module, "resolve_identity", lambda uri: f"identity of {uri}")
    monkeypatch.setattr(app_module, "load_drift_profile", lambda identity: read.append(identity))

    async def scenario():
        app = app_module.ScoringApp(config)
        app._loop = asyncio.get_running_loop()
        app._load_and_warm()
        await asyncio.sleep(0)

    run(scenario())
    assert read == [f"identity of {profile_from}" if profile_from else model.identity]
