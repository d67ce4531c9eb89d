"""Pieces of the model server's hot path and metrics, without servers.

- the pure-Python check of small ``dataframe_split`` requests gives the model exactly the
  float32 values of the numpy path, and leaves everything doubtful to that path;
- finished requests recorded as tuples count like direct observations (the metrics
  themselves, several workers included: test_metrics.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.server.app import _ROUTES, NonFiniteInput, _split_matrix, fast_rows
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
