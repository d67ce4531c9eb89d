"""Reading the common JSON shapes straight into rows (``serving.server.protocol``).

- the pure-Python check of small ``dataframe_split`` requests gives the model exactly the
  float32 values of the numpy path, and leaves everything doubtful to that path;
- a tensor model takes rows by position, and leaves the doubtful to MLflow;
- answers are laid out as the scoring server lays them out.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.server.protocol import fast_rows, format_predictions, split_matrix, tensor_rows
from serving.server.replies import NonFiniteInput

FEATURES = ("a", "b", "c")


def _numpy_path(data: list, features=FEATURES) -> np.ndarray:
    arr = split_matrix({"columns": list(features), "data": data}, features)
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
