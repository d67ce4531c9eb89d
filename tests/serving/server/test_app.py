"""Pieces of the model server's hot path and metrics, without servers.

- the pure-Python check of small ``dataframe_split`` requests gives the model exactly the
  float32 values of the numpy path, and leaves everything doubtful to that path;
- finished requests recorded as tuples count like direct observations (the metrics
  themselves, several workers included: test_metrics.py).
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from serving.server.app import (
    _ROUTES,
    NonFiniteInput,
    _split_matrix,
    fast_rows,
    format_predictions,
    tensor_rows,
)
from serving.server.metrics import ServerMetrics

FEATURES = ("a", "b", "c")


def _numpy_path(data: list, features=FEATURES) -> np.ndarray:
    arr = _split_matrix({"columns": list(features), "data": data}, features)
    return arr.astype(np.float64).astype(np.float32)


@pytest.mark.parametrize(
    "data",
    [
        [[1.5, -2.25, 3.0]],
        [[0.1, 1e-40, -3.4028234e38], [7, -8, 9]],  # subnormal, near FLT_MAX, ints
        [[3.40282356e38, 1.0000000596046448, 2**24]],  # rounds to FLT_MAX; a tie; exact int
        [[float(x) for x in np.random.default_rng(1).normal(scale=1e3, size=3)]] * 5,
    ],
)
def test_plain_rows_convert_to_the_same_float32_as_the_matrix_path(data):
    rows = fast_rows({"dataframe_split": {"columns": list(FEATURES), "data": data}}, FEATURES, True)
    assert type(rows) is list  # the pure-Python path took it
    got = np.ascontiguousarray(rows, dtype=np.float32)  # what the model does with it
    assert np.array_equal(got, _numpy_path(data))
    batched = np.array([r for r in rows]).astype(np.float32)  # what a shared batch does
    assert np.array_equal(batched, _numpy_path(data))


@pytest.mark.parametrize(
    "data",
    [
        [[True, 1.0, 2.0]],  # bools: numpy's decision
        [[2**24 + 1, 1.0, 2.0]],  # an int not exact in float32
        [[1.0, 2.0]],  # short row
        [["1", 2.0, 3.0]],
        [[1.0, 2.0, 3.0]] * 17,  # many rows: numpy is faster
    ],
)
def test_doubtful_requests_take_the_matrix_path(data):
    payload = {"dataframe_split": {"columns": list(FEATURES), "data": data}}
    rows = fast_rows(payload, FEATURES, True)
    assert rows is None or isinstance(rows, np.ndarray)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_values_that_overflow_float32_are_rejected():
    payload = {"dataframe_split": {"columns": list(FEATURES), "data": [[3.5e38, 1.0, 2.0]]}}
    with pytest.raises(NonFiniteInput):
        fast_rows(payload, FEATURES, True)
    reordered = {"dataframe_split": {"columns": ["b", "a", "c"], "data": [[1.0, 2.0, 3.0]]}}
    assert np.array_equal(fast_rows(reordered, FEATURES, True), [[2.0, 1.0, 3.0]])


ROWS = [[0.5, -1.25, 2.0], [1, 2, 3]]


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": ROWS},
        {"instances": ROWS},
        {"dataframe_split": {"data": ROWS}},
        {"dataframe_split": {"columns": ["z", "y", "x"], "data": ROWS}},  # names: by position
        {"inputs": ROWS, "params": {"anything": 1}},
        {"inputs": ROWS * 20},  # the numpy path
    ],
)
def test_a_tensor_model_takes_rows_by_position(payload):
    rows = tensor_rows(payload, 3, True)
    expected = np.asarray(ROWS * (20 if len(rows) > 2 else 1), dtype=np.float32)
    assert np.array_equal(np.asarray(rows, dtype=np.float32), expected)


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": ROWS[0]},  # one row, not a list of rows: MLflow's error
        {"inputs": [[1.0, 2.0]]},  # too short
        {"inputs": [["1", 2.0, 3.0]]},  # MLflow converts strings: let it
        {"inputs": [[None, 2.0, 3.0]]},  # null: MLflow decides (the reference path checks)
        {"inputs": {"x": ROWS}},
        {"inputs": []},
        {"dataframe_records": [{"a": 1.0, "b": 2.0, "c": 3.0}]},
        {"dataframe_split": {"columns": ["a", "a", "b"], "data": ROWS}},
        {"dataframe_split": {"data": ROWS, "index": [4, 5]}},
        {"inputs": ROWS, "instances": ROWS},
        {"inputs": ROWS, "client": "x"},
    ],
)
def test_a_tensor_model_leaves_doubtful_requests_to_mlflow(payload):
    assert tensor_rows(payload, 3, True) is None


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_a_tensor_model_rejects_values_that_overflow_float32():
    with pytest.raises(NonFiniteInput):
        tensor_rows({"inputs": [[3.5e38, 1.0, 2.0]] * 20}, 3, True)


def test_answers_are_laid_out_like_the_scoring_server():
    values = np.asarray([1.5, -2.0])
    assert json.loads(format_predictions(values, "records", "p")) == {
        "predictions": [{"p": 1.5}, {"p": -2.0}]
    }
    assert json.loads(format_predictions(values, "nested", "p")) == {"predictions": [[1.5], [-2.0]]}
    assert json.loads(format_predictions(values, "flat", "p")) == {"predictions": [1.5, -2.0]}


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


# -- the ASGI app, driven directly: slow bodies and strict mode ----------------------------------


class _FakeFast:
    """Stands in for the Keras fast path: the prediction is the row sum."""

    feature_columns = list(FEATURES)
    output_name = "prediction"
    output_layout = "records"
    tensor_input = False

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, rows) -> np.ndarray:
        self.calls += 1
        return np.asarray(rows, dtype=np.float32).sum(axis=1)


class _RefusingPyfunc:
    """The reference path's model: strict mode must answer before it is ever called."""

    def predict(self, data, params=None):
        raise AssertionError("the model ran on input that strict mode rejects")


def _fake_model(fast: bool = True):
    from types import SimpleNamespace

    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("double", name) for name in FEATURES])
    identity = SimpleNamespace(name="m", version="1", uri="models:/m/1")
    return SimpleNamespace(
        identity=identity,
        flavor="python_function",
        fast=_FakeFast() if fast else None,
        fast_path_note="test",
        load_seconds=0.0,
        input_schema=schema,
        has_params_schema=False,
        pyfunc=_RefusingPyfunc(),
        describe=lambda: {"name": "m", "version": "1"},
    )


def _app(*, ready: bool = True, fast: bool = True, **config):
    from serving.server.app import ScoringApp, ServerConfig

    app = ScoringApp(ServerConfig(model_uri="models:/m/1", access_log=False, **config))
    if ready:
        app._set_ready(_fake_model(fast))
    return app


async def _post(app, parts, *, content_type=b"application/json", complete=True):
    """POST /invocations; ``parts`` are (delay_s, bytes) body messages. ``complete=False``:
    the client declared more than it sends, and the rest never comes."""
    declared = sum(len(chunk) for _, chunk in parts) + (0 if complete else 100)
    headers = [(b"content-length", b"%d" % declared)]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": headers,
        "client": ("127.0.0.1", 1),
    }
    pending = list(parts)

    async def receive():
        if pending:
            delay, chunk = pending.pop(0)
            if delay:
                await asyncio.sleep(delay)
            return {
                "type": "http.request",
                "body": chunk,
                "more_body": bool(pending) or not complete,
            }
        await asyncio.Event().wait()  # the rest of the body never arrives

    sent = []

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    start, body = sent
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def _run(coro):
    return asyncio.run(coro)


GOOD_SPLIT = json.dumps({"dataframe_split": {"columns": list(FEATURES), "data": [[1, 2, 3]]}})


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
        app = _app(body_timeout_s=0.3)
        started = time.monotonic()
        status, headers, error = await _post(app, parts, complete=False)
        return status, headers, error, time.monotonic() - started

    status, headers, error, seconds = _run(scenario())
    assert status == 408
    assert headers[b"connection"] == b"close"
    assert error["error_code"] == "BAD_REQUEST"
    assert "0.3" in error["message"]
    assert 0.3 <= seconds < 1.5


def test_the_body_deadline_is_for_the_whole_body_not_each_part():
    drip = [(0, b"{")] + [(0.1, b" ")] * 20  # 2 s of one byte every 0.1 s

    async def scenario():
        return await _post(_app(body_timeout_s=0.5), drip, complete=False)

    status, _, _ = _run(scenario())
    assert status == 408


def test_a_slow_body_that_arrives_in_time_is_answered():
    body = GOOD_SPLIT.encode()
    parts = [(0, body[:10]), (0.1, body[10:20]), (0.1, body[20:])]

    async def scenario():
        return await _post(_app(body_timeout_s=1.0), parts)

    status, _, answer = _run(scenario())
    assert status == 200
    assert answer == {"predictions": [{"prediction": 6.0}]}


def test_a_body_that_came_whole_sets_no_timer(monkeypatch):
    def no_timer(*args, **kwargs):
        raise AssertionError("a timer was set for a body that had arrived")

    monkeypatch.setattr(asyncio, "timeout", no_timer)
    monkeypatch.setattr(asyncio, "timeout_at", no_timer)
    monkeypatch.setattr(asyncio, "wait_for", no_timer)

    async def scenario():
        app = _app(body_timeout_s=0.3)
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

    assert _run(scenario()) == 200


def test_body_timeout_comes_from_the_command_line_or_the_environment(monkeypatch):
    from serving.server import app
    from serving.server.__main__ import DEFAULT_BODY_TIMEOUT_S, build_parser

    assert (
        DEFAULT_BODY_TIMEOUT_S == app.DEFAULT_BODY_TIMEOUT_S == app.ServerConfig("m").body_timeout_s
    )
    monkeypatch.delenv("SERVING_BODY_TIMEOUT_S", raising=False)
    monkeypatch.delenv("SERVING_STRICT", raising=False)
    args = build_parser().parse_args([])
    assert args.body_timeout_s == 10.0
    assert args.strict is False
    assert build_parser().parse_args(["--body-timeout-s", "2.5"]).body_timeout_s == 2.5
    assert build_parser().parse_args(["--strict"]).strict is True
    monkeypatch.setenv("SERVING_BODY_TIMEOUT_S", "4")
    monkeypatch.setenv("SERVING_STRICT", "1")
    args = build_parser().parse_args([])
    assert (args.body_timeout_s, args.strict) == (4.0, True)
    assert build_parser().parse_args(["--no-strict"]).strict is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--body-timeout-s", "0"])


# Strict mode. What stock MLflow quietly accepts: an extra column is dropped, a JSON boolean
# becomes 1.0 and a numeric string a number. By default this server does the same (the
# parity tests hold it to it); with --strict those requests are a 400 naming the column.

COLUMNS = {f: [1.0, 2.0] for f in FEATURES}
RECORDS = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 4, "b": 5, "c": 6}]


def _split(columns=FEATURES, data=((1.0, 2.0, 3.0),), **extra) -> dict:
    return {"dataframe_split": {"columns": list(columns), "data": [list(r) for r in data], **extra}}


# (id, payload, the column the error must name)
STRICT_REJECTS = [
    ("split-extra-column", _split([*FEATURES, "extra"], [[1.0, 2.0, 3.0, 4.0]]), "extra"),
    ("split-extra-text-column", _split([*FEATURES, "note"], [[1.0, 2.0, 3.0, "hi"]]), "note"),
    ("split-boolean", _split(data=[[1.0, True, 3.0]]), "b"),
    ("split-false", _split(data=[[1.0, 2.0, 3.0], [False, 2.0, 3.0]]), "a"),
    ("split-numeric-string", _split(data=[[1.0, 2.0, "3"]]), "c"),
    ("split-reordered-boolean", _split(["c", "a", "b"], [[True, 1.0, 2.0]]), "c"),
    ("records-extra-key", {"dataframe_records": [{**RECORDS[0], "z": "x"}]}, "z"),
    ("records-boolean", {"dataframe_records": [RECORDS[0], {**RECORDS[1], "b": True}]}, "b"),
    ("instances-records-extra", {"instances": [{**RECORDS[0], "zz": 1.0}]}, "zz"),
    ("instances-records-boolean", {"instances": [{**RECORDS[0], "a": False}]}, "a"),
    ("instances-columns-boolean", {"instances": {**COLUMNS, "c": [1.0, True]}}, "c"),
    ("instances-columns-extra", {"instances": {**COLUMNS, "d": [1.0, 2.0]}}, "d"),
    ("inputs-columns-boolean", {"inputs": {**COLUMNS, "a": [True, 2.0]}}, "a"),
    ("inputs-columns-extra", {"inputs": {**COLUMNS, "x9": [1.0, 2.0]}}, "x9"),
    ("inputs-scalars-boolean", {"inputs": {"a": 1.0, "b": True, "c": 3.0}}, "b"),
    ("inputs-scalars-string", {"inputs": {"a": 1.0, "b": 2.0, "c": "3.5"}}, "c"),
    ("inputs-records-boolean", {"inputs": [{**RECORDS[0], "c": True}]}, "c"),
    ("inputs-records-extra", {"inputs": [{**RECORDS[0], "extra": 0}]}, "extra"),
]
STRICT_ACCEPTS = [
    ("split", _split()),
    ("split-reordered", _split(["b", "c", "a"], [[2.0, 3.0, 1.0]])),
    ("split-integers", _split(data=[[1, 2, 3]])),
    ("split-with-index", _split(index=[7])),
    ("records", {"dataframe_records": RECORDS}),
    ("instances-records", {"instances": RECORDS}),
    ("instances-columns", {"instances": COLUMNS}),
    ("inputs-columns", {"inputs": COLUMNS}),
    ("inputs-scalars", {"inputs": {"a": 1.0, "b": 2, "c": 3.0}}),
    ("inputs-records", {"inputs": RECORDS}),
    ("params", {**_split(), "params": {"anything": 1}}),
]


def _strict_inputs():
    from mlflow.types import ColSpec, Schema

    from serving.server.app import StrictInputs

    schema = Schema([ColSpec("double", "a"), ColSpec("long", "b"), ColSpec("float", "c")])
    return StrictInputs.from_schema(schema)


@pytest.mark.parametrize(("payload", "column"), [p[1:] for p in STRICT_REJECTS],
                         ids=[p[0] for p in STRICT_REJECTS])  # fmt: skip
def test_strict_check_names_the_offending_column(payload, column):
    problem = _strict_inputs().payload_problem(payload)
    assert problem is not None
    assert repr(column) in problem


@pytest.mark.parametrize(
    "payload", [p[1] for p in STRICT_ACCEPTS], ids=[p[0] for p in STRICT_ACCEPTS]
)
def test_strict_check_passes_plain_numbers_in_the_schema_columns(payload):
    assert _strict_inputs().payload_problem(payload) is None


def test_strict_check_leaves_non_numeric_schema_columns_and_malformed_shapes_to_mlflow():
    from mlflow.types import ColSpec, Schema

    from serving.server.app import StrictInputs

    mixed = StrictInputs.from_schema(Schema([ColSpec("double", "x"), ColSpec("string", "s")]))
    assert mixed.payload_problem(_split(["x", "s"], [[1.0, "text"], [2.0, True]])) is None
    assert mixed.payload_problem({"dataframe_records": [{"x": None, "s": None}]}) is None
    for malformed in (
        [1, 2],
        {"no_input_key": 1},
        {"dataframe_split": [[1.0, 2.0]]},
        {"dataframe_split": {"data": [[True, 2.0]]}},
        {"instances": [[True, 2.0]]},
    ):
        assert mixed.payload_problem(malformed) is None
    # A schema without column names (a tensor spec) or no schema: nothing to check against.
    assert StrictInputs.from_schema(None) is None


def test_strict_check_of_csv_and_parquet_frames():
    import pandas as pd

    check = _strict_inputs()
    assert check.frame_problem(pd.DataFrame({"a": [1.0], "b": [2], "c": [3.0]})) is None
    extra = check.frame_problem(pd.DataFrame({"a": [1.0], "b": [2], "c": [3.0], "z": [0]}))
    assert extra is not None and "'z'" in extra
    booleans = check.frame_problem(pd.DataFrame({"a": [True], "b": [2], "c": [3.0]}))
    assert booleans is not None and "'a'" in booleans


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "reference-path"])
@pytest.mark.parametrize(("payload", "column"), [p[1:] for p in STRICT_REJECTS[:6]],
                         ids=[p[0] for p in STRICT_REJECTS[:6]])  # fmt: skip
def test_strict_mode_answers_400_before_either_path_runs(payload, column, fast):
    async def scenario():
        app = _app(strict=True, fast=fast)
        answer = await _post(app, [(0, json.dumps(payload).encode())])
        return answer, app.model.fast.calls if fast else 0

    (status, _, error), fast_calls = _run(scenario())
    assert status == 400
    assert error["error_code"] == "BAD_REQUEST"
    assert repr(column) in error["message"]
    assert fast_calls == 0


def test_strict_mode_checks_csv_on_the_reference_path():
    csv = b"a,b,c,extra\n1.0,2.0,3.0,4.0\n"

    async def scenario():
        return await _post(_app(strict=True), [(0, csv)], content_type=b"text/csv")

    status, _, error = _run(scenario())
    assert status == 400
    assert "'extra'" in error["message"]


def test_without_strict_mode_booleans_become_numbers_like_stock_mlflow():
    payload = _split(data=[[1.0, True, 3.0]])

    async def scenario():
        return await _post(_app(), [(0, json.dumps(payload).encode())])

    status, _, answer = _run(scenario())
    assert status == 200
    assert answer == {"predictions": [{"prediction": 5.0}]}


def test_strict_mode_still_answers_good_requests_on_the_fast_path():
    async def scenario():
        return await _post(_app(strict=True), [(0, GOOD_SPLIT.encode())])

    status, _, answer = _run(scenario())
    assert status == 200
    assert answer == {"predictions": [{"prediction": 6.0}]}


# -- distributions: the rows the fast path answered, recorded by reference -------------------------


def test_answered_rows_reach_the_feature_and_prediction_histograms():
    from prometheus_client.parser import text_string_to_metric_families

    many = _split(data=[[float(i), 2.0, -1.0] for i in range(20)])  # the numpy path (> 16 rows)
    bodies = [
        GOOD_SPLIT.encode(),  # [[1, 2, 3]]: the plain-list path
        json.dumps(many).encode(),
        b'{"dataframe_split": {"columns": ["a", "b", "c"], "data": [[NaN, 1, 2]]}}',  # 400
    ]

    async def scenario():
        app = _app()
        statuses = [(await _post(app, [(0, body)]))[0] for body in bodies]
        app.flush_records()
        return statuses, app.metrics.render().decode()

    statuses, text = _run(scenario())
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


def test_max_feature_histograms_comes_from_the_command_line_or_the_environment(monkeypatch):
    from serving.server import app, metrics
    from serving.server.__main__ import DEFAULT_MAX_FEATURE_HISTOGRAMS, build_parser

    assert (
        DEFAULT_MAX_FEATURE_HISTOGRAMS
        == metrics.DEFAULT_MAX_FEATURE_HISTOGRAMS
        == app.ServerConfig("m").max_feature_histograms
        == 32
    )
    monkeypatch.delenv("SERVING_MAX_FEATURE_HISTOGRAMS", raising=False)
    assert build_parser().parse_args([]).max_feature_histograms == 32
    assert build_parser().parse_args(["--max-feature-histograms", "0"]).max_feature_histograms == 0
    monkeypatch.setenv("SERVING_MAX_FEATURE_HISTOGRAMS", "8")
    assert build_parser().parse_args([]).max_feature_histograms == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-feature-histograms", "-1"])


def test_the_reference_path_records_the_columns_it_parsed_and_one_prediction_per_row():
    import pandas as pd

    from serving.server.app import _observed

    frame = pd.DataFrame({"a": [1.0, None], "c": ["x", "y"], "b": [3, 4]})
    matrix, predictions = _observed(frame, pd.DataFrame({"p": [0.5, 1.5]}), ("a", "b", "c", "d"))
    # a: a missing value; c: not numbers; d: absent. NaN is not counted.
    assert np.array_equal(
        matrix, [[1.0, 3.0, np.nan, np.nan], [np.nan, 4.0, np.nan, np.nan]], equal_nan=True
    )
    assert predictions.tolist() == [0.5, 1.5]
    _, predictions = _observed(frame, pd.DataFrame({"p": [1, 2], "q": [3, 4]}), ("a",))
    assert predictions is None  # not one number per row
    _, predictions = _observed(frame, np.array([[1.0], [2.0]]), ("a",))
    assert predictions.tolist() == [1.0, 2.0]
    assert _observed({"tensor": [1, 2]}, ["text", "more"], ("a",)) is None


def test_a_parquet_body_where_no_parquet_reader_is_installed_is_415_and_says_what_to_send(
    monkeypatch, request
):
    """The slim serving image has no pyarrow: a Parquet request is not the client's bad data."""
    import io
    import sys

    import pandas as pd

    from serving.server import app as app_module

    body = io.BytesIO()
    pd.DataFrame({name: [1.0] for name in FEATURES}).to_parquet(body)
    for module in ("pyarrow", "pyarrow.parquet", "fastparquet"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    app_module._can_read_parquet.cache_clear()  # ask again, here and after the test
    request.addfinalizer(app_module._can_read_parquet.cache_clear)

    async def scenario():
        return await _post(
            _app(fast=False), [(0, body.getvalue())], content_type=b"application/vnd.apache.parquet"
        )

    status, _, answer = _run(scenario())
    assert status == 415
    text = answer if isinstance(answer, str) else json.dumps(answer)
    assert "Parquet" in text and "pyarrow" in text and "JSON or CSV" in text
