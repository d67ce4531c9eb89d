"""The slim serving image (no TensorFlow), built here with podman and run against a real MLflow.

`scripts/build_images.sh serving-slim` builds it offline like the full image. The test
registers a small Keras model trained by ml.train (which logs its LiteRT artifact) in a real
`mlflow server`, runs the image like a pod (read-only root, non-root, no capabilities, host
network to reach the loopback MLflow), and checks that the model is served through the slim
path and that its predictions over HTTP are the Keras model's within the slim tolerance.
It prints the image size, the server's RSS and the start-to-ready time (numbers, not asserts:
scripts/bench_slim_image.py measures them for docs/benchmarks.md).
"""

from __future__ import annotations

import io
import os
import time

import httpx
import numpy as np
import pytest

from serving.server.contract import SLIM_ATOL, SLIM_RTOL
from tests.conftest import free_port
from tests.container.conftest import build_image, podman, run_server_like_a_pod
from tests.container.test_serving_image import (
    FEATURES,
    _logs,
    _wait_ready,
    registered_model,  # noqa: F401 - a fixture, used by name
)

pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.timeout(1800)]

IMAGE = os.environ.get("SERVING_SLIM_IMAGE", "train-and-deploy/serving-slim:latest")


@pytest.fixture(scope="session")
def slim_image(container_base) -> str:
    return build_image("serving-slim", IMAGE)


def test_serving_slim_image(slim_image, mlflow_server, registered_model):  # noqa: F811
    _check_no_tensorflow(slim_image)
    port = free_port()
    name = f"tad-serving-slim-test-{os.getpid()}"
    endpoint = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    run = run_server_like_a_pod(slim_image, name, port, registered_model["uri"], mlflow_server)
    assert run.returncode == 0, f"podman run failed: {run.stderr}"
    try:
        _wait_ready(name, endpoint)
        ready_s = time.monotonic() - started
        described = httpx.get(f"{endpoint}/v1/model", timeout=5).json()
        assert described["fast_path"] is True, described
        assert described["fast_path_note"].startswith("litert runtime"), described
        assert "through the slim path" in _logs(name)

        rows = registered_model["rows"]
        payload = {"dataframe_split": {"columns": FEATURES, "data": rows.to_numpy().tolist()}}
        response = httpx.post(f"{endpoint}/invocations", json=payload, timeout=30)
        assert response.status_code == 200, response.text
        got = np.asarray([p["prediction"] for p in response.json()["predictions"]], np.float64)
        # The registered model's own local predictions: Keras, in this (TensorFlow) process.
        expected = registered_model["expected"]
        diff = np.abs(got - expected)
        print(f"max |slim container - keras| = {diff.max():.3g}")
        assert np.all(diff <= SLIM_ATOL + SLIM_RTOL * np.abs(expected))
        # No pyarrow in this image: a Parquet body is refused as such, not blamed on the data.
        parquet = io.BytesIO()
        rows.head(2).to_parquet(parquet)
        refused = httpx.post(
            f"{endpoint}/invocations",
            content=parquet.getvalue(),
            headers={"Content-Type": "application/vnd.apache.parquet"},
            timeout=30,
        )
        assert refused.status_code == 415, refused.text
        assert "JSON or CSV" in refused.json()["message"]

        rss = podman("exec", name, "grep", "VmRSS", "/proc/1/status").stdout.split()[1]
        size = podman("image", "inspect", "--format", "{{.Size}}", slim_image).stdout.strip()
        print(
            f"slim image {int(size) / 1e6:.0f} MB; server RSS {int(rss) / 1024:.0f} MB; "
            f"podman run -> /ping 200 in {ready_s:.1f} s"
        )
        health = podman("healthcheck", "run", name)
        assert health.returncode == 0, f"healthcheck: {health.stdout}{health.stderr}"
        stop = podman("stop", "--time", "30", name, timeout=60)
        assert stop.returncode == 0, stop.stderr
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name)
        assert state.stdout.strip() == "0", f"exit code {state.stdout.strip()}\n{_logs(name)}"
    except BaseException:
        print(f"container logs:\n{_logs(name)}")
        raise
    finally:
        podman("rm", "--force", "--ignore", "--time", "5", name, timeout=60)


def _check_no_tensorflow(image: str) -> None:
    """Non-root, and neither TensorFlow, Keras nor the tracking server stack is installed."""
    info = podman("image", "inspect", "--format", "{{.Config.User}}", image)
    assert info.stdout.strip() == "10001:10001"
    present = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python",
        image,
        "-c",
        "import importlib.util as u, sys; "
        "sys.stdout.write(','.join(m for m in ('tensorflow', 'keras', 'pyarrow', 'airflow', "
        "'flask', 'sqlalchemy', 'sklearn', 'ai_edge_litert') if u.find_spec(m)))",
    )
    assert present.returncode == 0, present.stderr
    assert present.stdout == "ai_edge_litert", f"packages in the slim image: {present.stdout}"
