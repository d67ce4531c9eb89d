"""Strict mode (``serving.server.strict``): what stock MLflow quietly accepts (an extra column is
dropped, a JSON boolean becomes 1.0 and a numeric string a number) is a 400 naming the column.
By default this server does the same as stock (the parity tests hold it to it). The check on
its own, then through the app: before either path runs.
"""

from __future__ import annotations

import json

import pytest

from tests.serving.server.asgi import FEATURES, GOOD_SPLIT, make_app, post, run, split

COLUMNS = {f: [1.0, 2.0] for f in FEATURES}
RECORDS = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 4, "b": 5, "c": 6}]


# (id, payload, the column the error must name)
STRICT_REJECTS = [
    ("split-extra-column", split([*FEATURES, "extra"], [[1.0, 2.0, 3.0, 4.0]]), "extra"),
    ("split-extra-text-column", split([*FEATURES, "note"], [[1.0, 2.0, 3.0, "hi"]]), "note"),
    ("split-boolean", split(data=[[1.0, True, 3.0]]), "b"),
    ("split-false", split(data=[[1.0, 2.0, 3.0], [False, 2.0, 3.0]]), "a"),
    ("split-numeric-string", split(data=[[1.0, 2.0, "3"]]), "c"),
    ("split-reordered-boolean", split(["c", "a", "b"], [[True, 1.0, 2.0]]), "c"),
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
    ("split", split()),
    ("split-reordered", split(["b", "c", "a"], [[2.0, 3.0, 1.0]])),
    ("split-integers", split(data=[[1, 2, 3]])),
    ("split-with-index", split(index=[7])),
    ("records", {"dataframe_records": RECORDS}),
    ("instances-records", {"instances": RECORDS}),
    ("instances-columns", {"instances": COLUMNS}),
    ("inputs-columns", {"inputs": COLUMNS}),
    ("inputs-scalars", {"inputs": {"a": 1.0, "b": 2, "c": 3.0}}),
    ("inputs-records", {"inputs": RECORDS}),
    ("params", {**split(), "params": {"anything": 1}}),
]


def _strict_inputs():
    from mlflow.types import ColSpec, Schema

    from serving.server.strict import StrictInputs

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

    from serving.server.strict import StrictInputs

    mixed = StrictInputs.from_schema(Schema([ColSpec("double", "x"), ColSpec("string", "s")]))
    assert mixed.payload_problem(split(["x", "s"], [[1.0, "text"], [2.0, True]])) is None
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
        app = make_app(strict=True, fast=fast)
        answer = await post(app, [(0, json.dumps(payload).encode())])
        return answer, app.model.fast.calls if fast else 0

    (status, _, error), fast_calls = run(scenario())
    assert status == 400
    assert error["error_code"] == "BAD_REQUEST"
    assert repr(column) in error["message"]
    assert fast_calls == 0


def test_strict_mode_checks_csv_on_the_reference_path():
    csv = b"a,b,c,extra\n1.0,2.0,3.0,4.0\n"

    async def scenario():
        return await post(make_app(strict=True), [(0, csv)], content_type=b"text/csv")

    status, _, error = run(scenario())
    assert status == 400
    assert "'extra'" in error["message"]


def test_without_strict_mode_booleans_become_numbers_like_stock_mlflow():
    payload = split(data=[[1.0, True, 3.0]])

    async def scenario():
        return await post(make_app(), [(0, json.dumps(payload).encode())])

    status, _, answer = run(scenario())
    assert status == 200
    assert answer == {"predictions": [{"prediction": 5.0}]}


def test_strict_mode_still_answers_good_requests_on_the_fast_path():
    async def scenario():
        return await post(make_app(strict=True), [(0, GOOD_SPLIT.encode())])

    status, _, answer = run(scenario())
    assert status == 200
    assert answer == {"predictions": [{"prediction": 6.0}]}
