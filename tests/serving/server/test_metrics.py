"""The model server's metrics (``serving.server.metrics``), without servers.

- observations summed up in batches reach ``prometheus_client`` exactly as one ``observe``
  call each would (the batch path writes into the histogram's value slots directly);
- the exposition is text format 0.0.4 with every series the alerts and dashboards use, and
  without ``_created`` series;
- with several workers (``prometheus_client``'s multiprocess mode, real processes here),
  counters add up over every worker that ever ran (dead ones included) and gauges over the
  live ones; a worker killed without stopping is forgotten by the next scrape, one that stops
  forgets itself, and a later scrape by another worker never shows smaller counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serving.server.distributions import (
    DEFAULT_MAX_FEATURE_HISTOGRAMS,
    GENERIC_VALUE_BUCKETS,
    MAX_HISTOGRAM_BUCKETS,
)
from serving.server.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    MULTIPROCESS_DIR_ENV,
    ServerMetrics,
    _Tally,
)

REPO = Path(__file__).resolve().parents[3]
ROUTES = {"/invocations": "/invocations", "/metrics": "/metrics"}


def _record(path: str, status: int, seconds: float, rows: int = 0, method: str = "POST"):
    return (0.0, seconds, method, path, status, 10, 20, ("127.0.0.1", 1), rows, None, 1)


def test_a_batch_of_observations_equals_one_observe_each():
    # binary fractions: sums are exact whatever the order; bounds themselves test le (<=)
    values = [i / 1024 for i in range(0, 12000, 7)] + [*LATENCY_BUCKETS, 0.0005, 11.0, 1e9]
    registry_a, registry_b = CollectorRegistry(), CollectorRegistry()
    one_by_one = Histogram("h", "doc", ("route",), registry=registry_a, buckets=LATENCY_BUCKETS)
    batched = Histogram("h", "doc", ("route",), registry=registry_b, buckets=LATENCY_BUCKETS)
    for value in values:
        one_by_one.labels("r").observe(value)
    for chunk in (values[:100], values[100:]):  # two batches into the same child
        tally = _Tally(LATENCY_BUCKETS)
        for value in chunk:
            tally.observe(value)
        tally.apply(batched.labels("r"))
    assert generate_latest(registry_a) == generate_latest(registry_b)


def test_exposition_names_every_series_without_created_ones():
    metrics = ServerMetrics(routes=ROUTES)
    metrics.observe_records([_record("/invocations", 200, 0.001, rows=2)])
    metrics.observe_batches([(2, 1, False)])
    text = metrics.render().decode()
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    for series in (
        "requests_total",
        "request_duration_seconds",
        "requests_in_flight",
        "predictions_total",
        "model_calls_total",
        "batch_rows",
        "batch_requests",
        "batch_fallbacks_total",
        "ready",
        "workers",
        "start_time_seconds",
    ):
        assert text.count(f"# TYPE model_server_{series} ") == 1, series
    # exposed once the model is known
    assert not any(line.startswith("model_server_model_info") for line in text.splitlines())
    assert "model_server_model_load_seconds" not in text
    metrics.set_model({"name": "m", "version": "3", "fast_path": "true"}, 1.23456)
    text = metrics.render().decode()
    assert "model_server_model_load_seconds 1.235" in text.splitlines()
    assert (
        'model_server_model_info{fast_path="true",flavor="",name="m",uri="",version="3"} 1.0'
        in text.splitlines()
    )
    assert "_created" not in text
    assert 'model_server_model_calls_total{path="pyfunc"} 0.0' in text.splitlines()


def test_multiprocess_mode_needs_prometheus_client_in_that_mode(tmp_path):
    assert MULTIPROCESS_DIR_ENV not in os.environ  # this interpreter imported it without
    with pytest.raises(RuntimeError, match=MULTIPROCESS_DIR_ENV):
        ServerMetrics(routes=ROUTES, multiprocess_dir=str(tmp_path))


# One worker process: builds its metrics in the directory, applies what the test asks, and
# either renders (like a /metrics answer) or not; then stops gracefully or dies like SIGKILL.
WORKER = """
import json, os, sys
from serving.server.metrics import ServerMetrics

spec = json.loads(sys.argv[1])
m = ServerMetrics(routes={"/invocations": "/invocations"},
                  multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])
rec = (0.0, 0.001, "POST", "/invocations", 200, 10, 20, None, spec["rows"], None, 1)
m.observe_records([rec] * spec["requests"])
m.observe_batches([tuple(b) for b in spec["batches"]])
if spec["model_load_seconds"] is not None:
    m.set_model({"name": "m", "version": "3"}, spec["model_load_seconds"])
m.ready = spec["ready"]
m.in_flight = spec["in_flight"]
m.publish()
print(json.dumps({"pid": os.getpid(), "text": m.render().decode() if spec["render"] else ""}))
sys.stdout.flush()
if spec["stop"]:
    m.close()
os._exit(0)  # without stopping unless asked: like a SIGKILLed worker
"""


def _worker(directory: Path, **spec) -> tuple[int, set[str]]:
    spec = {
        "requests": 0,
        "rows": 0,
        "batches": [],
        "model_load_seconds": None,
        "ready": 0,
        "in_flight": 0,
        "render": False,
        "stop": False,
        **spec,
    }
    env = {**os.environ, MULTIPROCESS_DIR_ENV: str(directory), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
    )
    answer = json.loads(out.stdout)
    return answer["pid"], set(answer["text"].splitlines())


def test_workers_add_up_counters_of_all_and_gauges_of_the_live(tmp_path):
    # A worker that ran and died without stopping: its counters stay, its gauges do not.
    dead, _ = _worker(
        tmp_path,
        requests=4,
        rows=2,
        batches=[(8, 4, False)],
        model_load_seconds=9.0,
        ready=0,
        in_flight=5,
    )
    assert list(tmp_path.glob(f"gauge_live*_{dead}.db"))

    own, lines = _worker(
        tmp_path, requests=3, rows=1, model_load_seconds=1.5, ready=1, in_flight=1, render=True
    )
    assert (
        'model_server_requests_total{method="POST",route="/invocations",status="200"} 7.0' in lines
    )
    assert "model_server_predictions_total 11.0" in lines
    assert 'model_server_request_duration_seconds_count{route="/invocations"} 7.0' in lines
    assert "model_server_batch_requests_sum 4.0" in lines
    assert 'model_server_model_calls_total{path="fast"} 1.0' in lines
    assert "model_server_requests_in_flight 1.0" in lines  # the dead worker's 5 do not count
    assert "model_server_ready 1.0" in lines
    assert "model_server_workers 1.0" in lines
    assert "model_server_model_load_seconds 1.5" in lines
    assert sum(line.startswith("model_server_model_info{") for line in lines) == 1
    assert sum(line == "# TYPE model_server_requests_total counter" for line in lines) == 1
    assert not list(tmp_path.glob(f"gauge_live*_{dead}.db"))  # forgotten by that scrape
    assert len(list(tmp_path.glob("counter_*.db"))) == 2

    # A later scrape answered by another worker: the same totals (never less), and the
    # worker that answered before and then died is no longer live; a worker that stops
    # forgets itself.
    later, lines = _worker(tmp_path, render=True, stop=True)
    assert (
        'model_server_requests_total{method="POST",route="/invocations",status="200"} 7.0' in lines
    )
    assert "model_server_predictions_total 11.0" in lines
    assert "model_server_workers 1.0" in lines
    assert "model_server_ready 0.0" in lines
    assert "model_server_requests_in_flight 0.0" in lines  # own's scrape had ended
    assert not any(line.startswith("model_server_model_load_seconds ") for line in lines)
    assert not list(tmp_path.glob(f"gauge_live*_{own}.db"))
    assert not list(tmp_path.glob(f"gauge_live*_{later}.db"))
    assert len(list(tmp_path.glob("counter_*.db"))) == 3


# -- the served version as a number, and the input and prediction distributions -----------------


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` of an exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _histogram(
    samples: dict, name: str, **labels: str
) -> tuple[list[tuple[str, float]], float, float]:
    """(cumulative ``(le, count)`` in order, count, sum) of one histogram series."""
    want = set(labels.items())
    buckets = [
        (dict(k[1])["le"], v)
        for k, v in samples.items()
        if k[0] == f"{name}_bucket" and set(k[1]) - {("le", dict(k[1])["le"])} == want
    ]
    buckets.sort(key=lambda b: float(b[0]))
    return (
        buckets,
        samples[(f"{name}_count", frozenset(want))],
        samples[(f"{name}_sum", frozenset(want))],
    )


def test_model_version_is_a_gauge_when_the_model_came_from_the_registry():
    metrics = ServerMetrics(routes=ROUTES)
    assert "model_server_model_version" not in metrics.render().decode()
    metrics.set_model({"name": "m", "version": "12", "uri": "models:/m/12"}, 1.0)
    lines = metrics.render().decode().splitlines()
    assert "model_server_model_version 12.0" in lines
    assert "# TYPE model_server_model_version gauge" in lines
    for labels in ({"uri": "runs:/abc/model"}, {"name": "m", "version": "not-a-number"}):
        other = ServerMetrics(routes=ROUTES)
        other.set_model(labels, 1.0)
        text = other.render().decode()
        assert "model_server_model_version" not in text
        assert "model_server_model_info{" in text


PROFILE = {
    "version": 1,
    "columns": {
        "a": {"edges": [-1.0, 0.0, 0.5, 2.0], "shares": [0.2] * 5},
        "b": {"edges": [1.0, 1.0, float("nan"), 0.25, float("inf")]},  # tidied: 0.25, 1.0
        "__target__": {"edges": [5.0]},
        "__prediction__": {"edges": [8.0, 10.0, 12.0]},
    },
}


def test_histogram_buckets_are_the_drift_profiles_edges():
    from serving.server.contract import DRIFT_PROFILE_PREDICTION

    assert DRIFT_PROFILE_PREDICTION == "__prediction__"
    metrics = ServerMetrics(routes=ROUTES)
    assert metrics.set_distributions(["a", "b", "c"], PROFILE) == ("a", "b", "c")
    samples = _samples(metrics.render().decode())
    a, count, total = _histogram(samples, "model_server_feature_value", feature="a")
    assert [le for le, _ in a] == ["-1.0", "0.0", "0.5", "2.0", "+Inf"]
    assert (count, total) == (0.0, 0.0)
    b, _, _ = _histogram(samples, "model_server_feature_value", feature="b")
    assert [le for le, _ in b] == ["0.25", "1.0", "+Inf"]
    c, _, _ = _histogram(samples, "model_server_feature_value", feature="c")  # not profiled
    assert [float(le) for le, _ in c] == [*GENERIC_VALUE_BUCKETS, float("inf")]
    p, _, _ = _histogram(samples, "model_server_prediction_value")
    assert [le for le, _ in p] == ["8.0", "10.0", "12.0", "+Inf"]
    assert not any("__target__" in str(key) for key in samples)


def test_without_a_profile_every_histogram_has_the_generic_buckets():
    metrics = ServerMetrics(routes=ROUTES)
    metrics.set_distributions(["x0", "x1"], None)
    samples = _samples(metrics.render().decode())
    for labels in ({"feature": "x0"}, {"feature": "x1"}):
        buckets, _, _ = _histogram(samples, "model_server_feature_value", **labels)
        assert [float(le) for le, _ in buckets] == [*GENERIC_VALUE_BUCKETS, float("inf")]
    buckets, _, _ = _histogram(samples, "model_server_prediction_value")
    assert [float(le) for le, _ in buckets] == [*GENERIC_VALUE_BUCKETS, float("inf")]
    assert list(GENERIC_VALUE_BUCKETS) == sorted(set(GENERIC_VALUE_BUCKETS))


def test_a_profile_with_many_edges_is_thinned_to_a_bounded_bucket_count():
    edges = [i / 10 for i in range(1000)]
    metrics = ServerMetrics(routes=ROUTES)
    metrics.set_distributions(["a"], {"columns": {"a": {"edges": edges}}})
    buckets, _, _ = _histogram(
        _samples(metrics.render().decode()), "model_server_feature_value", feature="a"
    )
    assert len(buckets) <= MAX_HISTOGRAM_BUCKETS + 1
    assert buckets[0][0] == "0.0" and buckets[-2][0] == "99.9"


def test_rows_recorded_in_batches_count_like_one_observe_per_value():
    """The vectorized path against prometheus_client's own Histogram.observe, value by value
    (binary fractions: sums are exact in any order; some values sit exactly on an edge)."""
    rng = np.random.default_rng(7)
    features = ["a", "b", "c"]
    matrix = (np.round(rng.normal(scale=2.0, size=(300, 3)) * 64) / 64).astype(np.float32)
    matrix[:4, 0] = [-1.0, 0.0, 0.5, 2.0]
    as_lists = [[float(v) for v in row] for row in matrix[:7]]
    predictions = np.round(rng.normal(loc=10.0, scale=3.0, size=307) * 64) / 64
    metrics = ServerMetrics(routes=ROUTES)
    metrics.set_distributions(features, PROFILE)
    metrics.observe_rows([(matrix[:100], predictions[:100])])
    metrics.observe_rows(
        [(matrix[100:], predictions[100:300]), (as_lists, predictions[300:]), (None, None)]
    )
    got = _samples(metrics.render().decode())

    bounds = {"a": [-1.0, 0.0, 0.5, 2.0], "b": [0.25, 1.0], "c": list(GENERIC_VALUE_BUCKETS)}
    values = np.concatenate([matrix, np.asarray(as_lists, dtype=np.float32)])
    for j, feature in enumerate(features):
        registry = CollectorRegistry()
        one = Histogram(
            "model_server_feature_value", "doc", ("feature",), registry=registry,
            buckets=bounds[feature],
        )  # fmt: skip
        for value in values[:, j]:
            one.labels(feature).observe(float(value))
        for key, value in _samples(generate_latest(registry).decode()).items():
            if key[0].endswith(("_bucket", "_count", "_sum")):
                assert got[key] == value, key
    expected_registry = CollectorRegistry()
    prediction = Histogram(
        "model_server_prediction_value",
        "doc",
        registry=expected_registry,
        buckets=[8.0, 10.0, 12.0],
    )
    for value in predictions:
        prediction.observe(float(value))
    for key, value in _samples(generate_latest(expected_registry).decode()).items():
        if key[0].endswith(("_bucket", "_count", "_sum")):
            assert got[key] == value, key
    _, count, _ = _histogram(got, "model_server_feature_value", feature="a")
    assert count == 307


def test_values_that_are_not_finite_are_left_out():
    """The reference path of a generic model may carry NaN (missing) values: not counted."""
    metrics = ServerMetrics(routes=ROUTES)
    metrics.set_distributions(["a", "b"], None)
    rows = np.array([[1.0, np.nan], [np.inf, 2.0], [3.0, 4.0]])
    metrics.observe_rows([(rows, np.array([1.0, np.nan, 2.0]))])
    samples = _samples(metrics.render().decode())
    _, count_a, sum_a = _histogram(samples, "model_server_feature_value", feature="a")
    _, count_b, sum_b = _histogram(samples, "model_server_feature_value", feature="b")
    _, count_p, sum_p = _histogram(samples, "model_server_prediction_value")
    assert (count_a, sum_a, count_b, sum_b, count_p, sum_p) == (2, 4.0, 2, 6.0, 2, 3.0)


def test_feature_histograms_are_capped_and_the_cap_logged_once(caplog):
    features = [f"f{i:02d}" for i in range(40)]
    metrics = ServerMetrics(routes=ROUTES)
    with caplog.at_level("WARNING"):
        kept = metrics.set_distributions(
            features, None, max_features=DEFAULT_MAX_FEATURE_HISTOGRAMS
        )
    assert DEFAULT_MAX_FEATURE_HISTOGRAMS == 32
    assert kept == tuple(features[:32])
    warnings = [r for r in caplog.records if "f32" in r.getMessage() or "40" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    metrics.observe_rows([(np.ones((5, 40), dtype=np.float32), np.ones(5))])
    samples = _samples(metrics.render().decode())
    labelled = {
        dict(k[1])["feature"] for k in samples if k[0] == "model_server_feature_value_count"
    }
    assert labelled == set(features[:32])
    _, count, _ = _histogram(samples, "model_server_feature_value", feature="f31")
    assert count == 5
    assert ServerMetrics(routes=ROUTES).set_distributions(features, None, max_features=0) == ()


def test_the_profile_names_agree_with_the_pipelines():
    from ml.drift import PREDICTION_KEY
    from ml.evaluate import DRIFT_PROFILE_ARTIFACT
    from serving.server import contract

    assert contract.DRIFT_PROFILE_ARTIFACT == DRIFT_PROFILE_ARTIFACT
    assert contract.DRIFT_PROFILE_PREDICTION == PREDICTION_KEY


# Two workers record rows into the multiprocess directory; the later one renders for both.
DIST_WORKER = """
import json, os, sys
import numpy as np
from serving.server.metrics import ServerMetrics

spec = json.loads(sys.argv[1])
m = ServerMetrics(multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])
m.set_model({"name": "m", "version": "7"}, 1.0)
m.set_distributions(spec["features"], spec["profile"])
m.observe_rows([(np.asarray(spec["rows"], dtype=np.float32), np.asarray(spec["predictions"]))])
if spec["publish"]:
    m.publish()  # what the server does every 0.25 s with several workers
print(json.dumps({"text": m.render().decode() if spec["render"] else ""}))
sys.stdout.flush()
os._exit(0)
"""


def test_workers_add_up_feature_and_prediction_histograms(tmp_path):
    env = {**os.environ, MULTIPROCESS_DIR_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    profile = {"columns": {"a": {"edges": [0.0, 1.0]}, "__prediction__": {"edges": [5.0]}}}

    def worker(rows, predictions, render, publish=True):
        spec = {"features": ["a", "b"], "profile": profile, "rows": rows,
                "predictions": predictions, "render": render, "publish": publish}  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", DIST_WORKER, json.dumps(spec)],
            capture_output=True, text=True, check=True, env=env, cwd=REPO,
        )  # fmt: skip
        return json.loads(out.stdout)["text"]

    worker([[-1.0, 3.0], [0.5, 4.0], [2.0, 0.5]], [1.0, 6.0, 7.0], render=False)
    # killed before its next publish: what it observed since the last one is lost
    worker([[9.0, 9.0]], [9.0], render=False, publish=False)
    # the answering worker writes its own rows before reading the files
    text = worker([[1.0, -3.0], [0.0, 0.0]], [5.0, 4.0], render=True, publish=False)
    samples = _samples(text)
    a, count, total = _histogram(samples, "model_server_feature_value", feature="a")
    assert a == [("0.0", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert (count, total) == (5.0, 2.5)
    b, count, total = _histogram(samples, "model_server_feature_value", feature="b")
    assert [float(le) for le, _ in b] == [*GENERIC_VALUE_BUCKETS, float("inf")]
    assert (count, total) == (5.0, 4.5)
    p, count, total = _histogram(samples, "model_server_prediction_value")
    assert p == [("5.0", 3.0), ("+Inf", 5.0)]
    assert (count, total) == (5.0, 23.0)
    assert samples[("model_server_model_version", frozenset())] == 7.0
    assert text.count("# TYPE model_server_feature_value histogram") == 1
