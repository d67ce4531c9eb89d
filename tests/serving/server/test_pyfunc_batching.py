"""Micro-batching for pyfuncs served without the fast path: where it applies (checked at
load on the input example), and that concurrent requests share one predict call with the
answers a call of their own gives. Real models saved with MLflow (scikit-learn, plain Python
pyfuncs), the ASGI app driven directly."""

from __future__ import annotations

import asyncio
import json
import textwrap

import numpy as np
import pandas as pd
import pytest

from serving.server.app import ScoringApp
from serving.server.config import ServerConfig
from serving.server.loader import load_model
from serving.server.protocol import column_rows
from serving.server.pyfunc_batching import batching_problem
from serving.server.warmup import warm_up

COLUMNS = ["x0", "x1", "x2"]

TOTAL_MODEL = """
import mlflow
import pandas as pd


class Total(mlflow.pyfunc.PythonModel):
    # One answer per call, whatever the rows: must never be batched.
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"total": [float(model_input.to_numpy().sum())]})


mlflow.models.set_model(Total())
"""


PICKY_MODEL = """
import mlflow


class Picky(mlflow.pyfunc.PythonModel):
    # Row-wise, but refuses a negative x0: a request that parses and then fails in predict.
    def predict(self, context, model_input, params=None):
        if (model_input["x0"] < 0).any():
            raise ValueError("x0 must not be negative")
        return (model_input["x0"] * 2).to_numpy()


mlflow.models.set_model(Picky())
"""


@pytest.fixture(scope="module")
def picky_model(tmp_path_factory) -> str:
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("picky")
    (root / "picky.py").write_text(textwrap.dedent(PICKY_MODEL))
    example = pd.DataFrame([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], columns=COLUMNS)
    mlflow.pyfunc.save_model(
        root / "model",
        python_model=str(root / "picky.py"),
        input_example=example,
        pip_requirements=["mlflow"],  # declared: inferring them starts a Python process
        signature=infer_signature(example, example["x0"].to_numpy()),
    )
    return str(root / "model")


@pytest.fixture(scope="module")
def sklearn_model(tmp_path_factory) -> str:
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(120, 3)), columns=COLUMNS)
    labels = (frame["x0"] - frame["x1"] > 0).astype(int)
    model = LogisticRegression().fit(frame, labels)
    path = tmp_path_factory.mktemp("sklearn") / "model"
    mlflow.sklearn.save_model(
        model,
        path,
        signature=infer_signature(frame, model.predict(frame)),
        input_example=frame.head(3),
        pyfunc_predict_fn="predict_proba",  # two numbers per row: the layout must survive
        pip_requirements=["mlflow", "scikit-learn"],
    )
    return str(path)


@pytest.fixture(scope="module")
def total_model(tmp_path_factory) -> str:
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("total")
    (root / "total.py").write_text(textwrap.dedent(TOTAL_MODEL))
    example = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    mlflow.pyfunc.save_model(
        root / "model",
        python_model=str(root / "total.py"),
        input_example=example,
        pip_requirements=["mlflow"],
    )
    return str(root / "model")


def _example(loaded) -> str:
    example = loaded.serving_input_example()
    assert example is not None
    return example


def test_a_row_wise_sklearn_model_is_batched_and_one_per_call_model_is_not(
    sklearn_model, total_model
):
    loaded = load_model(sklearn_model)
    key, note = batching_problem(loaded, _example(loaded))
    assert key == (tuple(COLUMNS), ("float64",) * 3), note
    assert note == "rows of 3 columns share a predict call"
    assert loaded.predict_seconds is not None

    total = load_model(total_model)
    key, note = batching_problem(total, _example(total))
    assert key is None
    assert note == "the model does not answer one row per input row"


def test_column_rows_takes_only_what_mlflow_parses_into_the_same_float64_frame():
    columns = tuple(COLUMNS)
    split = {"columns": COLUMNS, "data": [[1, 2.5, -3.0]]}
    assert column_rows({"dataframe_split": split}, columns) == [[1, 2.5, -3.0]]
    for payload in (
        {"dataframe_split": {**split, "columns": COLUMNS[::-1]}},
        {"dataframe_split": {**split, "data": [[True, 2.0, 3.0]]}},
        {"dataframe_split": {**split, "data": [[2**60, 2.0, 3.0]]}},
        {"dataframe_split": {**split, "data": [["1", 2.0, 3.0]]}},
        {"dataframe_split": {**split, "data": [[None, 2.0, 3.0]]}},
        {"dataframe_split": split, "params": {"a": 1}},
        {"dataframe_records": [{"x0": 1.0, "x1": 2.0, "x2": 3.0}]},
    ):
        assert column_rows(payload, columns) is None, payload


async def _post(app, payload: dict) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 1),
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    start, reply = sent
    return start["status"], json.loads(reply["body"])


def _serve(path: str, payloads: list[dict], **config) -> tuple[list, ScoringApp, list[int]]:
    """Warm up and serve the model at ``path``; send ``payloads`` concurrently. Returns the
    answers, the app, and the row count of every predict call."""
    loaded = load_model(path)
    calls: list[int] = []
    predict = loaded.pyfunc.predict

    def counting(data, *args, **kwargs):
        calls.append(len(data))
        return predict(data, *args, **kwargs)

    async def scenario():
        app = ScoringApp(ServerConfig(model_uri=path, access_log=False, **config))
        app._loop = asyncio.get_running_loop()
        batch_key = warm_up(loaded, pyfunc_batching=app.config.pyfunc_batching)
        loaded.pyfunc.predict = counting  # after the load-time checks
        app._set_ready(loaded, None, batch_key)
        calls.clear()
        answers = await asyncio.gather(*(_post(app, p) for p in payloads))
        if app.pyfunc_batching is not None:
            await app.pyfunc_batching.batcher.close()
        return answers, app

    answers, app = asyncio.run(scenario())
    return answers, app, calls


def _split(rows) -> dict:
    return {"dataframe_split": {"columns": COLUMNS, "data": rows}}


ROWS = [[0.5, -1.0, 2.0], [1.0, 2.0, 3.0], [-2.0, 0.25, 1.0], [3.0, -3.0, 0.0]]


def test_concurrent_requests_share_one_predict_and_get_what_a_call_of_their_own_gives(
    sklearn_model,
):
    payloads = [_split([r]) for r in ROWS] + [_split(ROWS[:2])]
    answers, app, calls = _serve(sklearn_model, payloads)
    assert app.model.serving_path == "pyfunc-batched"
    assert len(calls) < len(payloads)  # shared calls
    alone, _, alone_calls = _serve(sklearn_model, payloads, pyfunc_batching=False)
    assert sorted(alone_calls) == [1, 1, 1, 1, 2]
    assert answers == alone  # same statuses, same layout, same numbers
    assert all(status == 200 for status, _ in answers)
    assert len(answers[-1][1]["predictions"]) == 2
    assert len(answers[0][1]["predictions"][0]) == 2  # predict_proba: two numbers per row


def test_one_bad_request_never_fails_its_neighbours(sklearn_model):
    bad = _split([[1.0, 2.0, "not a number"]])  # MLflow's parsing: a 400 of its own
    payloads = [_split([ROWS[0]]), bad, _split([ROWS[1]]), _split([[1.0, 2.0]])]
    answers, _, _ = _serve(sklearn_model, payloads)
    alone, _, _ = _serve(sklearn_model, payloads, pyfunc_batching=False)
    assert [status for status, _ in answers] == [200, 400, 200, 400]
    assert answers == alone


def test_a_request_that_fails_in_a_shared_predict_fails_alone(picky_model):
    payloads = [_split([ROWS[1]]), _split([ROWS[2]]), _split([ROWS[3], ROWS[1]])]
    answers, app, calls = _serve(picky_model, payloads)
    assert app.model.serving_path == "pyfunc-batched"
    assert calls[0] == 4  # the shared call, which failed; then each request on its own
    alone, _, _ = _serve(picky_model, payloads, pyfunc_batching=False)
    assert [status for status, _ in answers] == [200, 400, 200]
    assert answers == alone
    assert answers[0][1] == {"predictions": [2.0]}


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory) -> str:
    """A scikit-learn regression on a ``long`` column and two ``double`` ones."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(2)
    frame = pd.DataFrame(
        {"hour": rng.integers(0, 24, 80), "x1": rng.normal(size=80), "x2": rng.normal(size=80)}
    )
    model = Ridge().fit(frame, frame["hour"] * 0.5 + frame["x1"])
    path = tmp_path_factory.mktemp("mixed") / "model"
    mlflow.sklearn.save_model(
        model,
        path,
        signature=infer_signature(frame, model.predict(frame)),
        input_example=frame.head(3),
        pip_requirements=["mlflow", "scikit-learn"],
    )
    return str(path)


def test_rows_of_mixed_numeric_columns_are_cast_as_mlflow_casts_them(mixed_model):
    columns = ["hour", "x1", "x2"]
    payloads = [
        {"dataframe_split": {"columns": columns, "data": rows}}
        for rows in (
            [[13, 0.5, -1.0]],
            [[13.0, 0.5, -1.0], [2, 1, 2]],  # an integral float in the long column
            [[13.5, 0.5, -1.0]],  # not an integer: MLflow's error, for this request only
            [[7, 2.25, 3.0]],
        )
    ]
    answers, app, calls = _serve(mixed_model, payloads)
    assert calls[0] == 5  # one shared call first (it fails on 13.5: then one by one)
    assert app.pyfunc_batching is not None and app.pyfunc_batching.columns == tuple(columns)
    alone, _, _ = _serve(mixed_model, payloads, pyfunc_batching=False)
    assert answers == alone
    assert [status for status, _ in answers][:2] == [200, 200] and answers[3][0] == 200
