"""The model server at runtime, over real HTTP against real processes.

- metrics move after requests (``/metrics``, Prometheus text), access logs are JSON lines;
- readiness: ``/ping`` is 503 until the model is loaded and a warm-up prediction succeeded;
- SIGTERM during a slow in-flight request lets that request finish, then the process exits 0;
- micro-batching isolation: concurrent good and bad requests, good ones get their own right
  predictions, bad ones their 400, whatever batch they shared;
- every series the Grafana dashboard and the alert rules select is one this server exports.

Two servers per module: the project's Keras model (fast path, micro-batching with a 2 ms wait
so that concurrent requests really share batches), and a generic pyfunc that loads slowly and
sleeps on request (``params``), for readiness and shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import textwrap
import threading
import time

import httpx
import pandas as pd
import pytest

from tests.conftest import free_port
from tests.integration.test_server_protocol import (
    FEATURES,
    ServerProcess,
    child_env,
    our_server_cmd,
    sqlite_registry,
    synthetic_frame,
    train_and_register,
)
from tests.serving.deploy import monitoring
from tests.serving.deploy.promql import selected_labels, series_names

pytestmark = pytest.mark.integration

KERAS_MODEL = "serving-runtime"
SLOW_MODEL = "serving-slow"
LOAD_DELAY_S = 3.0
REQUEST_DELAY_S = 3.0

# Models from code: the server process imports this file, never the test module.
SLOW_MODEL_CODE = """
import time

import mlflow
import pandas as pd


class Slow(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        time.sleep(float((context.model_config or {}).get("load_delay_s", 0)))

    def predict(self, model_input: pd.DataFrame, params=None):
        time.sleep(float((params or {}).get("delay_s", 0)))
        return pd.DataFrame({"doubled": model_input["x"].to_numpy() * 2.0})


mlflow.models.set_model(Slow())
"""


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series == name and not labels:
            return float(value)
        if series.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', series[len(name) :]))
            if found == labels:
                return float(value)
    return 0.0


def split_payload(rows) -> dict:
    return {"dataframe_split": {"columns": FEATURES, "data": rows}}


def _drift_profile() -> dict:
    from ml import drift

    frame = synthetic_frame(500, seed=11)
    frame[drift.PREDICTION_KEY] = frame["target"]
    return drift.profile_frame(frame, [*FEATURES, drift.PREDICTION_KEY])


def histogram_series(text: str, name: str, **labels: str) -> tuple[list[float], float]:
    """(the ``le`` bounds in order, ``_count``) of one histogram series in Prometheus text."""
    bounds = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.rpartition(" ")[0]))
            le = found.pop("le")
            if found == labels:
                bounds.append(float(le))
    return bounds, metric(text, name + "_count", **labels)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    import mlflow
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("serving-runtime")
    with sqlite_registry(root):
        keras = train_and_register(root, KERAS_MODEL)
        # The drift profile the pipeline logs with a training run (ml.evaluate.drift_profile):
        # the server's feature and prediction histograms take their buckets from it.
        profile = _drift_profile()
        run_id = mlflow.MlflowClient().get_model_version(KERAS_MODEL, keras.version).run_id
        mlflow.MlflowClient().log_dict(run_id, profile, "drift/profile.json")
        code = root / "slow_model.py"
        code.write_text(textwrap.dedent(SLOW_MODEL_CODE))
        example = pd.DataFrame({"x": [1.0, 2.5]})
        mlflow.set_experiment(f"{KERAS_MODEL}-experiment")
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                model_config={"load_delay_s": LOAD_DELAY_S},
                signature=infer_signature(
                    example, pd.DataFrame({"doubled": [2.0, 5.0]}), params={"delay_s": 0.0}
                ),
                input_example=example,
                pip_requirements=["mlflow", "pandas"],  # no inference (a child interpreter)
                registered_model_name=SLOW_MODEL,
            )
        yield {
            "keras": keras,
            "profile": profile,
            "slow_uri": f"models:/{SLOW_MODEL}/{info.registered_model_version}",
        }


@pytest.fixture(scope="module")
def keras_server(registry):
    keras = registry["keras"]
    port = free_port()
    server = ServerProcess.start(
        "runtime-keras",
        our_server_cmd(keras.model_uri, port, "--batch-wait-ms", "2"),
        port,
        child_env(keras.tracking_uri),
        keras.root,
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slow_server(registry):
    """The slow-loading pyfunc; started here, its startup answers recorded for the tests."""
    keras = registry["keras"]
    port = free_port()
    server = ServerProcess.start(
        "runtime-slow",
        our_server_cmd(registry["slow_uri"], port, "--graceful-timeout", "20"),
        port,
        child_env(keras.tracking_uri),
        keras.root,
    )
    probes: dict[str, int] = {}
    try:
        # As soon as it listens (long before the model is loaded), probe the other routes once.
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while "ping" not in probes:
                try:
                    probes["ping"] = client.get("/ping").status_code
                except httpx.TransportError:
                    if server.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(server.log_tail()) from None
                    time.sleep(0.05)
            probes["invocations"] = client.post(
                "/invocations", json={"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}
            ).status_code
            probes["model"] = client.get("/v1/model").status_code
            probes["ready_metric"] = int(metric(client.get("/metrics").text, "model_server_ready"))
        server.wait_ready()
        server.probes = probes  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def expected_predictions(registry):
    """The registered model's own answers (in-process pyfunc) for a fixed set of rows."""
    import mlflow

    rows = synthetic_frame(24, seed=3)[FEATURES].round(6)
    model = mlflow.pyfunc.load_model(registry["keras"].model_uri)
    predicted = model.predict(rows.astype("float64"))["prediction"].to_numpy()
    return rows.to_numpy().tolist(), predicted


# -- metrics and logs ----------------------------------------------------------------------------


def test_metrics_count_requests_predictions_and_name_the_model(keras_server, registry):
    version = registry["keras"].version
    with httpx.Client(base_url=keras_server.url, timeout=30) as client:
        before = client.get("/metrics")
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain; version=0.0.4")
        for n_rows in (1, 2, 3):
            rows = synthetic_frame(n_rows, seed=n_rows)[FEATURES].to_numpy().tolist()
            assert client.post("/invocations", json=split_payload(rows)).status_code == 200
        bad = {"dataframe_split": {"columns": FEATURES[:2], "data": [[1.0, 2.0]]}}
        assert client.post("/invocations", json=bad).status_code == 400
        assert client.get("/no-such-route").status_code == 404
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before.text, name, **labels)

    ok = {"route": "/invocations", "method": "POST", "status": "200"}
    assert delta("model_server_requests_total", **ok) == 3
    assert delta("model_server_requests_total", **{**ok, "status": "400"}) == 1
    assert delta("model_server_requests_total", route="other", method="GET", status="404") == 1
    assert delta("model_server_predictions_total") == 6
    assert delta("model_server_request_duration_seconds_count", route="/invocations") == 4
    assert (
        delta("model_server_request_duration_seconds_bucket", route="/invocations", le="+Inf") == 4
    )
    assert delta("model_server_model_calls_total", path="fast") >= 1
    # The /metrics request itself is in flight while it renders.
    assert metric(after, "model_server_requests_in_flight") == 1
    assert metric(after, "model_server_ready") == 1
    info = re.search(r"^model_server_model_info\{(.*)\} 1\.0$", after, re.M)
    assert info, after
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert labels["name"] == KERAS_MODEL
    assert labels["version"] == version
    assert labels["fast_path"] == "true"


def test_metrics_show_the_distributions_of_the_rows_answered(keras_server, registry):
    """Every answered row, fast path (plain lists and a numpy matrix) and reference path (CSV),
    lands once in each feature's histogram and the prediction histogram, whose buckets are
    the training run's drift profile edges; the served version is a number."""
    profile = registry["profile"]["columns"]
    sent = 0
    with httpx.Client(base_url=keras_server.url, timeout=30) as client:
        before = client.get("/metrics").text
        for n_rows in (1, 5, 40):
            rows = synthetic_frame(n_rows, seed=20 + n_rows)[FEATURES].to_numpy().tolist()
            assert client.post("/invocations", json=split_payload(rows)).status_code == 200
            sent += n_rows
        csv = synthetic_frame(4, seed=99)[FEATURES].to_csv(index=False)
        answer = client.post("/invocations", content=csv, headers={"content-type": "text/csv"})
        assert answer.status_code == 200, answer.text
        sent += 4
        bad = {"dataframe_split": {"columns": FEATURES[:2], "data": [[1.0, 2.0]]}}
        assert client.post("/invocations", json=bad).status_code == 400
        after = client.get("/metrics").text

    for feature in FEATURES:
        bounds, count = histogram_series(after, "model_server_feature_value", feature=feature)
        assert bounds == [*profile[feature]["edges"], float("inf")], feature
        _, count_before = histogram_series(before, "model_server_feature_value", feature=feature)
        assert count - count_before == sent, feature
    bounds, count = histogram_series(after, "model_server_prediction_value")
    assert bounds == [*profile["__prediction__"]["edges"], float("inf")]
    assert count - histogram_series(before, "model_server_prediction_value")[1] == sent
    assert metric(after, "model_server_model_version") == float(registry["keras"].version)


def test_access_log_is_one_json_object_per_request(keras_server):
    marker = f"/access-log-probe-{time.monotonic_ns()}"
    assert httpx.get(f"{keras_server.url}{marker}", timeout=10).status_code == 404
    deadline = time.monotonic() + 10  # the log is flushed at least every 0.25 s
    while True:
        entries = [
            json.loads(line)
            for line in keras_server.out_path.read_text().splitlines()
            if line.startswith("{")
        ]
        mine = [e for e in entries if e.get("path") == marker]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(mine) == 1, entries[-5:]
    entry = mine[0]
    assert entry["method"] == "GET"
    assert entry["status"] == 404
    assert entry["client"] == "127.0.0.1"
    assert isinstance(entry["duration_ms"], float)
    assert entry["ts"].endswith("+00:00")
    assert any(e.get("path") == "/invocations" and e.get("rows") for e in entries)


# -- micro-batching ------------------------------------------------------------------------------

BAD_REQUESTS = [
    (b'{"dataframe_split": {"columns": ["x0", "x1"], "data": [[1.0, 2.0]]}}', "INVALID_PARAMETER_VALUE"),  # noqa: E501
    (b'{"dataframe_split": {"columns": ["x0", "x1", "x2", "x3"], "data": [["a", 1, 2, 3]]}}', "BAD_REQUEST"),  # noqa: E501
    (b'{"dataframe_split": {"columns": ["x0", "x1", "x2", "x3"], "data": [[NaN, 1, 2, 3]]}}', "BAD_REQUEST"),  # noqa: E501
    (b'{"dataframe_split": {"columns": ["x0", "x1", "x2", "x3"], "data": [[1e39, 1, 2, 3]]}}', "BAD_REQUEST"),  # noqa: E501
    (b'{"dataframe_split": ', "BAD_REQUEST"),
]  # fmt: skip


async def _fire(url: str, rows: list, bad: list) -> tuple[list, list]:
    """All requests at once on separate connections; returns (good responses, bad responses)."""
    limits = httpx.Limits(max_connections=len(rows) + len(bad))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        headers = {"Content-Type": "application/json"}
        good_calls = [
            client.post("/invocations", json=split_payload([row])) if i % 3 else
            client.post("/invocations", json={"dataframe_records": [dict(zip(FEATURES, row, strict=True))]})  # noqa: E501
            for i, row in enumerate(rows)
        ]  # fmt: skip
        bad_calls = [client.post("/invocations", content=b, headers=headers) for b, _ in bad]
        responses = await asyncio.gather(*good_calls, *bad_calls)
    return responses[: len(rows)], responses[len(rows) :]


def test_concurrent_bad_requests_never_fail_their_batch_neighbours(
    keras_server, expected_predictions
):
    rows, expected = expected_predictions
    batched = 0.0
    for round_ in range(4):
        before = httpx.get(f"{keras_server.url}/metrics", timeout=10).text
        bad = BAD_REQUESTS * 2
        good, rejected = asyncio.run(_fire(keras_server.url, rows, bad))
        for response, want in zip(good, expected, strict=True):
            assert response.status_code == 200, response.text
            values = [p["prediction"] for p in response.json()["predictions"]]
            assert len(values) == 1
            assert values[0] == pytest.approx(want, abs=1e-5)
        for response, (_, code) in zip(rejected, bad, strict=True):
            assert response.status_code == 400, response.text
            assert response.json()["error_code"] == code
        after = httpx.get(f"{keras_server.url}/metrics", timeout=10).text
        calls = metric(after, "model_server_batch_requests_count") - metric(
            before, "model_server_batch_requests_count"
        )
        served = metric(after, "model_server_batch_requests_sum") - metric(
            before, "model_server_batch_requests_sum"
        )
        assert served == len(rows), "every good request went through the batcher"
        batched = max(batched, served / calls)
        if batched > 1 and round_ >= 1:
            break
    # Concurrent requests really shared model calls (else this test proved nothing).
    assert batched > 1


# -- readiness and shutdown (the slow generic pyfunc) ---------------------------------------------


def test_not_ready_until_the_model_is_loaded_and_warmed_up(slow_server):
    probes = slow_server.probes
    assert probes["ping"] == 503
    assert probes["invocations"] == 503
    assert probes["model"] == 503
    assert probes["ready_metric"] == 0
    statuses = slow_server.startup_statuses
    assert statuses[-1] == 200
    assert 503 in statuses
    assert statuses.index(200) == len(statuses) - 1  # never ready, then not, then ready
    resp = httpx.get(f"{slow_server.url}/health", timeout=5)
    assert resp.status_code == 200
    info = httpx.get(f"{slow_server.url}/v1/model", timeout=5).json()
    assert info["fast_path"] is False
    assert info["name"] == SLOW_MODEL


def test_generic_pyfunc_serves_through_its_predict_with_params(slow_server):
    payload = {
        "dataframe_split": {"columns": ["x"], "data": [[1.5], [-2.0]]},
        "params": {"delay_s": 0.0},
    }
    resp = httpx.post(f"{slow_server.url}/invocations", json=payload, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"predictions": [{"doubled": 3.0}, {"doubled": -4.0}]}


def test_sigterm_lets_the_in_flight_request_finish(slow_server):
    url = slow_server.url
    result: dict[str, object] = {}

    def slow_call() -> None:
        payload = {
            "dataframe_split": {"columns": ["x"], "data": [[21.0]]},
            "params": {"delay_s": REQUEST_DELAY_S},
        }
        try:
            result["response"] = httpx.post(f"{url}/invocations", json=payload, timeout=60)
        except httpx.HTTPError as exc:
            result["error"] = exc

    caller = threading.Thread(target=slow_call)
    caller.start()
    # Wait until the slow request is being processed (the /metrics call is the other one).
    deadline = time.monotonic() + 20
    while (
        metric(httpx.get(f"{url}/metrics", timeout=5).text, "model_server_requests_in_flight") < 2
    ):
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.05)
    os.kill(slow_server.proc.pid, signal.SIGTERM)

    # New connections are refused while the old request is still running.
    refused = False
    deadline = time.monotonic() + REQUEST_DELAY_S
    while caller.is_alive() and time.monotonic() < deadline and not refused:
        try:
            httpx.get(f"{url}/ping", timeout=1)
            time.sleep(0.05)
        except httpx.TransportError:
            refused = True
    caller.join(timeout=60)
    assert not caller.is_alive()
    assert "error" not in result, result
    response = result["response"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [{"doubled": 42.0}]}
    assert refused
    assert slow_server.proc.wait(timeout=30) == 0


# -- the dashboard and the alert rules against this server's /metrics ----------------------------
# Every series a dashboard panel or an alert rule selects must be one the server exports, with
# the labels the queries match on, unless Prometheus, kube-state-metrics or the Airflow plugin
# exports it (tests/serving/deploy/monitoring.py; test_dashboard.py checks the plugin's).

# Labels Prometheus adds at scrape time (job, instance) or the Prometheus Operator (namespace).
SCRAPE_LABELS = {"job", "instance", "namespace"}


@pytest.fixture(scope="module")
def metrics_text(keras_server) -> str:
    """The Keras server's /metrics after a few predictions (every labelled series sampled)."""
    with httpx.Client(base_url=keras_server.url, timeout=30) as client:
        for n_rows in (1, 3):
            rows = synthetic_frame(n_rows, seed=n_rows)[FEATURES].to_numpy().tolist()
            body = {"dataframe_split": {"columns": FEATURES, "data": rows}}
            assert client.post("/invocations", json=body).status_code == 200
        return client.get("/metrics").text


@pytest.fixture(scope="module")
def scraped(metrics_text) -> dict[str, set[str]]:
    """``{sample name: label names}`` of the scrape."""
    samples = monitoring.exposition_series(metrics_text)
    assert "model_server_requests_total" in samples, metrics_text[:2000]
    return samples


def test_every_series_of_the_dashboard_and_the_alerts_is_exported(scraped):
    missing: dict[str, list[str]] = {}
    wrong_labels = []
    plugin = monitoring.exposition_series(monitoring.plugin_exposition())
    for where, expr in monitoring.queries():
        labels = selected_labels(expr)
        for name in sorted(series_names(expr)):
            if monitoring.exported_elsewhere(name, plugin):
                continue
            if name not in scraped:
                missing.setdefault(name, []).append(where)
                continue
            unknown = labels.get(name, set()) - SCRAPE_LABELS - scraped[name]
            if unknown:
                wrong_labels.append(f"{where}: {name} has no label {sorted(unknown)}")
    assert not wrong_labels, wrong_labels
    assert not missing, missing


def test_feature_histograms_are_labelled_with_the_models_input_columns(scraped, metrics_text):
    """The dashboard's feature variable lists the ``feature`` label's values: the model's
    input columns."""
    assert "model_server_feature_value_bucket" in scraped
    values = set(
        re.findall(
            r'^model_server_feature_value_bucket\{[^}]*feature="([^"]*)"', metrics_text, re.M
        )
    )
    assert values >= set(FEATURES), values
