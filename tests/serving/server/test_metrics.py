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

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

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
    return (0.0, seconds, method, path, status, 10, 20, ("127.0.0.1", 1), rows, None)


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
rec = (0.0, 0.001, "POST", "/invocations", 200, 10, 20, None, spec["rows"], None)
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
