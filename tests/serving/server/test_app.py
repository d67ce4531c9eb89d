"""Pieces of the model server's hot path and metrics, without servers.

- the pure-Python check of small ``dataframe_split`` requests gives the model exactly the
  float32 values of the numpy path, and leaves everything doubtful to that path;
- finished requests recorded as tuples count like direct observations;
- with several workers, counters add up over every worker's file (dead ones included) and
  gauges over the live ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from serving.server.app import _ROUTES, NonFiniteInput, _split_matrix, fast_rows
from serving.server.metrics import ServerMetrics, WorkerFiles

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
        observed.predictions += r[8] if r[4] == 200 else 0
    assert recorded.render() == observed.render()
    assert recorded.predictions == 3


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_workers_add_up_counters_of_all_and_gauges_of_the_live(tmp_path):
    own = ServerMetrics(routes=_ROUTES, multiprocess_dir=str(tmp_path))
    own.observe_records([_record("/invocations", 200, 0.001, rows=1)] * 3)
    own.set_model({"name": "m", "version": "3"}, 1.5)
    own.ready = 1
    own.in_flight = 1
    own.persist()
    assert isinstance(own.store, WorkerFiles) and own.store.path.exists()

    # A worker that ran and died: its counters stay in the totals, its gauges do not.
    other = ServerMetrics(routes=_ROUTES)
    other.observe_records([_record("/invocations", 200, 0.001, rows=2)] * 4)
    other.observe_batch(8, 4)
    other.set_model({"name": "m", "version": "3"}, 9.0)
    other.in_flight, other.ready = 5, 0
    state = {**other.snapshot(), "pid": _dead_pid(), "pstart": None}
    (tmp_path / "worker-dead.json").write_text(json.dumps(state))
    (tmp_path / "worker-broken.json").write_text("{not json")

    text = own.render().decode()
    lines = set(text.splitlines())
    assert 'model_server_requests_total{route="/invocations",method="POST",status="200"} 7' in (
        lines
    )
    assert "model_server_predictions_total 11" in lines
    assert 'model_server_request_duration_seconds_count{route="/invocations"} 7' in lines
    assert "model_server_batch_requests_sum 4" in lines
    assert "model_server_requests_in_flight 1" in lines  # the dead worker's 5 do not count
    assert "model_server_ready 1" in lines
    assert "model_server_workers 1" in lines
    assert "model_server_model_load_seconds 1.5" in lines
    assert sum(line.startswith("model_server_model_info{") for line in lines) == 1
    assert text.count("# TYPE model_server_requests_total") == 1
