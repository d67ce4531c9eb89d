"""The serving image, built here with podman and run against a real MLflow server.

`scripts/build_images.sh serving` builds it offline (locally made base, host wheelhouse); the
test registers a small Keras model in a real `mlflow server` on 127.0.0.1, starts the image
like a Kubernetes pod would (read-only root, non-root, all capabilities dropped; host network
so it reaches the loopback MLflow), and checks that its predictions over HTTP equal the
registered model's own, then stops it with SIGTERM and expects a clean exit.

Where this machine cannot run containers at all (podman missing, no base image can be made,
`podman run` fails), every test here is skipped with one reason, shown by `pytest -ra` as one
SKIPPED line. A failing image build is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port
from tests.container.conftest import build_image, podman, run_server_like_a_pod, tail

pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.timeout(1800)]

IMAGE = os.environ.get("SERVING_IMAGE", "train-and-deploy/serving:latest")
MODEL = "container-test-model"
FEATURES = ["x0", "x1", "x2"]
TARGET = "target"
READY_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def serving_image(container_base) -> str:
    """The serving image, freshly built (after the base: skips where containers cannot run)."""
    return build_image("serving", IMAGE)


@pytest.fixture(scope="module")
def registered_model(mlflow_server):
    """A small Keras model trained by ml.train and registered in the real MLflow server."""
    import mlflow

    from ml.settings import TrainingSettings
    from ml.train import train_model

    rng = np.random.default_rng(7)
    x = rng.normal(size=(240, len(FEATURES)))
    frame = pd.DataFrame(x, columns=FEATURES)
    frame[TARGET] = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + 10

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        result = train_model(
            frame,
            FEATURES,
            TARGET,
            TrainingSettings(epochs=3, batch_size=32, hidden_units=[8]),
            experiment_name="container-test",
        )
        version = mlflow.register_model(result.model_uri, MODEL).version
        uri = f"models:/{MODEL}/{version}"
        rows = frame[FEATURES].head(16)
        expected = mlflow.pyfunc.load_model(uri).predict(rows)["prediction"]
        yield {"uri": uri, "rows": rows, "expected": expected.to_numpy(dtype=np.float64)}
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


def test_serving_image(serving_image, mlflow_server, registered_model):
    """One test, so that a machine without containers shows exactly one SKIPPED line."""
    _check_image_config(serving_image)
    port = free_port()
    name = f"tad-serving-test-{os.getpid()}"
    endpoint = f"http://127.0.0.1:{port}"
    run = run_server_like_a_pod(serving_image, name, port, registered_model["uri"], mlflow_server)
    assert run.returncode == 0, f"podman run failed: {run.stderr}"
    try:
        _wait_ready(name, endpoint)
        rows = registered_model["rows"]
        payload = {"dataframe_split": {"columns": FEATURES, "data": rows.to_numpy().tolist()}}
        response = httpx.post(f"{endpoint}/invocations", json=payload, timeout=30)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        got = np.asarray(
            [p["prediction"] if isinstance(p, dict) else p for p in predictions], dtype=np.float64
        )
        expected = registered_model["expected"]
        print(f"max |container - local| = {np.max(np.abs(got - expected)):.3g}")
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

        version = httpx.get(f"{endpoint}/version", timeout=5)
        assert version.status_code == 200 and version.text.strip().strip('"') == "3.17.2"
        # The image's HEALTHCHECK (run on demand: no systemd timers here) finds the server's
        # port from its command line and passes once it is ready.
        health = podman("healthcheck", "run", name)
        assert health.returncode == 0, f"healthcheck: {health.stdout}{health.stderr}"

        # SIGTERM (what Kubernetes sends) stops it cleanly: the server is PID 1 and handles it.
        stop = podman("stop", "--time", "30", name, timeout=60)
        assert stop.returncode == 0, stop.stderr
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name)
        assert state.stdout.strip() == "0", f"exit code {state.stdout.strip()}\n{_logs(name)}"
    except BaseException:
        print(f"container logs:\n{_logs(name)}")
        raise
    finally:
        podman("rm", "--force", "--ignore", "--time", "5", name, timeout=60)


def _check_image_config(serving_image: str) -> None:
    """Non-root, health check, entry point, HOME/TMP in /tmp, nothing serving does not need."""
    info = podman("image", "inspect", serving_image)
    assert info.returncode == 0, info.stderr
    image = json.loads(info.stdout)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][:3] == ["python", "-m", "serving.server"]
    assert "8080/tcp" in config.get("ExposedPorts", {})
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp"
    healthcheck = image.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "/ping" in " ".join(healthcheck.get("Test", [])), healthcheck
    # Only what serving needs: no Airflow, no MLflow tracking server stack, no training plots.
    absent = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python",
        serving_image,
        "-c",
        "import importlib.util as u, sys; "
        "sys.stdout.write(','.join(m for m in ('airflow', 'flask', 'sqlalchemy', 'sklearn', "
        "'matplotlib', 'pytest') if u.find_spec(m)))",
    )
    assert absent.returncode == 0, absent.stderr
    assert absent.stdout == "", f"unexpected packages in the serving image: {absent.stdout}"
    print(f"serving image size: {image['Size'] / 1e6:.0f} MB")


def _logs(name: str) -> str:
    logs = podman("logs", name)
    return tail(logs.stdout + logs.stderr, 60)


def _wait_ready(name: str, endpoint: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{endpoint}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        running = podman("inspect", "--format", "{{.State.Running}}", name)
        if running.stdout.strip() != "true":
            pytest.fail(f"the serving container exited before it was ready:\n{_logs(name)}")
        time.sleep(1)
    pytest.fail(f"the serving container was not ready within {READY_TIMEOUT_S}s:\n{_logs(name)}")
