"""The model server with ``--workers 2``, over real HTTP: ``/metrics`` answers for the server.

Each worker process keeps its own numbers; any worker's ``/metrics`` must add up all of them
(``serving.server.metrics``: ``prometheus_client``'s multiprocess mode). The requests and the
scrapes each use a new connection, so the kernel hands them to either worker; the
``X-Worker-Pid`` header of each scrape and the per-worker value files in
``PROMETHEUS_MULTIPROC_DIR`` show that both workers took part.
A worker killed with SIGKILL (uvicorn starts a new one) must not take its counts with it.
"""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from serving.server.metrics import MULTIPROCESS_DIR_ENV
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
from tests.integration.test_server_runtime import metric

pytestmark = pytest.mark.integration

MODEL_NAME = "serving-workers"
N_REQUESTS = 60
WORKERS = 2
INVOCATIONS_OK = {"route": "/invocations", "method": "POST", "status": "200"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-workers")
    with sqlite_registry(root):
        yield train_and_register(root, MODEL_NAME)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("worker-metrics")
    # A previous run's leftover (pid 1 counted 5 /invocations requests): removed at start.
    leftover = MmapedDict(str(metrics_dir / "counter_1.db"))
    labels = ("method", "route", "status")
    key = mmap_key(
        "model_server_requests",
        "model_server_requests_total",
        labels,
        ("POST", "/invocations", "200"),
        "HTTP requests by route, method and status code.",
    )
    leftover.write_value(key, 5.0, 0.0)
    leftover.close()
    port = free_port()
    env = {**child_env(registry.tracking_uri), MULTIPROCESS_DIR_ENV: str(metrics_dir)}
    proc = ServerProcess.start(
        "workers",
        our_server_cmd(registry.model_uri, port, "--workers", str(WORKERS)),
        port,
        env,
        registry.root,
    )
    proc.metrics_dir = metrics_dir  # type: ignore[attr-defined]
    try:
        proc.wait_ready()
        # /ping answered by one worker; wait until every worker is up and ready.
        wait_for(proc.url, lambda text: metric(text, "model_server_workers") == WORKERS)
        wait_for(proc.url, lambda text: metric(text, "model_server_ready") == 1)
        yield proc
    finally:
        proc.stop()


def scrape(url: str) -> httpx.Response:
    """GET /metrics on a new connection (so any worker may answer)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return response


def wait_for(url: str, condition, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(url).text
        if condition(text):
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.1)


def worker_states(metrics_dir) -> dict[int, list]:
    """Each worker's counters, from its own value file (``counter_<pid>.db``)."""
    states = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        states[pid] = list(MultiProcessCollector.merge([str(path)]))
    return states


def invocations_in(state: list) -> int:
    return int(
        sum(
            sample.value
            for family in state
            for sample in family.samples
            if sample.name == "model_server_requests_total"
            and sample.labels["route"] == "/invocations"
        )
    )


def check_totals(text: str, n_requests: int, n_rows: int) -> None:
    assert metric(text, "model_server_requests_total", **INVOCATIONS_OK) == n_requests, text
    assert metric(text, "model_server_predictions_total") == n_rows, text
    assert (
        metric(text, "model_server_request_duration_seconds_count", route="/invocations")
        == n_requests
    )
    infos = re.findall(r"^model_server_model_info\{.*\} 1\.0$", text, re.M)
    assert len(infos) == 1, infos
    assert f'name="{MODEL_NAME}"' in infos[0]
    assert text.count("# TYPE model_server_requests_total counter") == 1
    # every answered row once in each feature's histogram and the predictions' (all workers)
    for feature in FEATURES:
        assert metric(text, "model_server_feature_value_count", feature=feature) == n_rows
    assert metric(text, "model_server_prediction_value_count") == n_rows
    assert metric(text, "model_server_model_version") == 1.0  # the model's first version


def totals_are(text: str, n_requests: int, n_rows: int) -> bool:
    try:
        check_totals(text, n_requests, n_rows)
    except AssertionError:
        return False
    return True


def test_metrics_add_up_over_all_workers(server):
    url = server.url
    assert not (server.metrics_dir / "counter_1.db").exists()
    assert metric(scrape(url).text, "model_server_requests_total", **INVOCATIONS_OK) == 0
    n_rows = 0
    for i in range(N_REQUESTS):
        rows = synthetic_frame(1 + i % 3, seed=i)[FEATURES].to_numpy().tolist()
        n_rows += len(rows)
        payload = {"dataframe_split": {"columns": FEATURES, "data": rows}}
        response = httpx.post(f"{url}/invocations", json=payload, timeout=30)  # new connection
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == len(rows)

    # Another worker's numbers reach /metrics within its flush interval (0.25 s).
    wait_for(url, lambda t: totals_are(t, N_REQUESTS, n_rows), timeout_s=10)
    answered_by = set()
    for _ in range(60):
        response = scrape(url)
        answered_by.add(response.headers["x-worker-pid"])
        check_totals(response.text, N_REQUESTS, n_rows)
        assert metric(response.text, "model_server_workers") == WORKERS
        # the scrape itself is the only request in flight, in whichever worker answered it
        assert metric(response.text, "model_server_requests_in_flight") == 1
        if len(answered_by) == WORKERS and _ >= 10:
            break
    assert len(answered_by) == WORKERS, "every scrape went to the same worker"

    # Both workers really served some of the predictions (once their files are up to date).
    deadline = time.monotonic() + 10
    while True:
        states = worker_states(server.metrics_dir)
        per_worker = {pid: invocations_in(s) for pid, s in states.items()}
        if sum(per_worker.values()) == N_REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(states) == WORKERS
    assert sum(per_worker.values()) == N_REQUESTS, per_worker
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert {str(pid) for pid in states} == answered_by

    # A worker that dies keeps its counts in the total; uvicorn starts a replacement.
    victim = max(per_worker, key=per_worker.get)
    os.kill(victim, signal.SIGKILL)
    seen_replacement = False
    deadline = time.monotonic() + 180
    while not seen_replacement:
        assert time.monotonic() < deadline, "no replacement worker"
        text = scrape(url).text
        check_totals(text, N_REQUESTS, n_rows)  # never less, at any moment
        live = metric(text, "model_server_workers")
        assert live in (WORKERS - 1, WORKERS)
        pids = set(worker_states(server.metrics_dir)) - set(per_worker)
        seen_replacement = bool(pids) and live == WORKERS
        time.sleep(0.2)
    wait_for(url, lambda t: metric(t, "model_server_ready") == 1)
    response = httpx.post(
        f"{url}/invocations",
        json={"dataframe_split": {"columns": FEATURES, "data": [[0.1, 0.2, 0.3, 0.4]]}},
        timeout=30,
    )
    assert response.status_code == 200
    # The answering worker's flush updates the families one after another (requests, latency,
    # histograms): a scrape in between sees some already counted. Wait until all agree.
    text = wait_for(url, lambda t: totals_are(t, N_REQUESTS + 1, n_rows + 1), timeout_s=10)
    check_totals(text, N_REQUESTS + 1, n_rows + 1)
