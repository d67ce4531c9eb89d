"""The local target end to end: real MLflow registry, real `mlflow models serve`, real proxy."""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from serving.deploy.local import DeployError, LocalTarget
from serving.deploy.settings import DeploySettings
from serving.deploy.supervisor import _alive
from serving.deploy.verify import VerificationFailed, verify_endpoint

pytestmark = pytest.mark.integration

MODEL_NAME = "row-sum"
FEATURES = ["a", "b", "c"]
EXAMPLE = pd.DataFrame({"a": [1.0, 2.0], "b": [0.5, -1.0], "c": [10.0, 0.25]})
FRAME = pd.DataFrame(
    {"a": [0.1, -3.0, 7.25, 1e3], "b": [2.0, 0.0, -0.5, 1e-3], "c": [1.0, 4.5, 0.0, -2.0]}
)

# Models from code: the model server imports this file, never the test module.
MODEL_CODE = """
import mlflow
import numpy as np
import pandas as pd


class RowSum(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None):
        return (model_input[["a", "b", "c"]].sum(axis=1) * {factor}).to_numpy(dtype=np.float64)


mlflow.models.set_model(RowSum())
"""


def register(tmp_path: Path, factor: float) -> str:
    """Log + register a row-sum model scaled by ``factor``; returns its pinned URI."""
    import mlflow

    code = tmp_path / f"row_sum_x{factor:g}.py"
    code.write_text(textwrap.dedent(MODEL_CODE.format(factor=factor)))
    mlflow.set_experiment("serving-tests")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            input_example=EXAMPLE,
            pip_requirements=["mlflow"],  # no inference (a child interpreter: seconds)
            registered_model_name=MODEL_NAME,
        )
    return f"models:/{MODEL_NAME}/{info.registered_model_version}"


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def predict(endpoint: str, frame: pd.DataFrame) -> list[float]:
    payload = {"dataframe_split": frame.to_dict(orient="split", index=False)}
    resp = httpx.post(f"{endpoint}/invocations", json=payload, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"]


class Traffic:
    """Requests on fresh connections in a loop: every one must be answered, by v1 or v2."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.errors: list[str] = []
        self.answers: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        expected = {tuple(EXAMPLE.sum(axis=1)): "1", tuple(EXAMPLE.sum(axis=1) * 2): "2"}
        while not self._stop.is_set():
            try:
                got = tuple(predict(self.endpoint, EXAMPLE))
                self.answers.add(expected.get(got, f"unexpected {got}"))
            except Exception as exc:  # collected, asserted on in the test
                self.errors.append(repr(exc))
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)  # a few requests after the switch too
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def target(mlflow_store, tmp_path, free_ports):
    port, *slots = free_ports(3)
    settings = DeploySettings(
        local_port=port,
        local_slot_ports=slots,
        local_state_dir=str(tmp_path / "serving"),
        health_timeout_s=120,
    )
    target = LocalTarget(settings, mlflow_store, drain_s=0.5)
    yield target
    stopped = target.stop_all(forget=True)
    assert not accepting(port)
    for pid in stopped.values():
        assert not _alive(pid)


def test_deploy_switch_redeploy_fail_and_verify(target, tmp_path):
    v1 = register(tmp_path, 1)
    v2 = register(tmp_path, 2)
    endpoint = target.endpoint
    assert target.status() is None and target.active_version() is None

    # -- first deploy ------------------------------------------------------------------------
    started = time.monotonic()
    first = target.deploy(v1, "1")
    print(f"first deploy (proxy + server) took {time.monotonic() - started:.1f}s: {first}")
    assert first["unchanged"] is False and first["previous_version"] is None
    assert first["endpoint"] == endpoint
    assert predict(endpoint, FRAME) == pytest.approx(FRAME.sum(axis=1).tolist())
    status = target.status()
    assert status["healthy"] and status["proxy_running"] and status["version"] == "1"

    # -- second version: blue/green switch under traffic, old server stopped ---------------
    with Traffic(endpoint) as traffic:
        second = target.deploy(v2, "2")
    assert traffic.errors == [], traffic.errors[:3]
    assert traffic.answers == {"1", "2"}, traffic.answers
    print(f"second deploy: ready in {second['ready_s']}s")
    assert second["previous_version"] == "1"
    assert second["port"] != first["port"]
    assert target.active_version() == "2"
    assert predict(endpoint, FRAME) == pytest.approx((FRAME.sum(axis=1) * 2).tolist())
    assert not _alive(first["pid"])
    assert not accepting(first["port"])

    # -- same version again: no-op ------------------------------------------------------------
    again = target.deploy(v2, "2")
    assert again["unchanged"] is True
    assert again["pid"] == second["pid"] and again["port"] == second["port"]

    # -- broken versions: DeployError, v2 keeps serving --------------------------------------
    with pytest.raises(DeployError, match="cannot read model metadata"):
        target.deploy(f"models:/{MODEL_NAME}/99", "99")
    with pytest.raises(DeployError, match=r"did not become healthy[\s\S]*last lines") as err:
        # With an explicit example the metadata read is skipped: the server itself fails.
        target.deploy(f"models:/{MODEL_NAME}/98", "98", input_example=EXAMPLE)
    print(f"DeployError excerpt: {str(err.value)[:400]}")
    assert target.active_version() == "2"
    assert target.status()["healthy"]
    assert predict(endpoint, FRAME) == pytest.approx((FRAME.sum(axis=1) * 2).tolist())
    assert not accepting(first["port"]), "the failed server must not be left running"

    # -- verification: passes for what is live, fails for anything else ---------------------
    report = verify_endpoint(endpoint, v2, FRAME, FEATURES)
    assert report["rows"] == len(FRAME) and report["max_abs_diff"] <= 1e-9
    with pytest.raises(VerificationFailed, match="max abs diff") as err:
        verify_endpoint(endpoint, v1, FRAME, FEATURES)
    assert "first mismatch at row 0" in str(err.value)

    # -- a killed server answers again, without anyone deploying (the proxy restarts it) ------
    killed = target.read_active()["pid"]
    os.kill(killed, signal.SIGKILL)
    started = time.monotonic()
    while time.monotonic() - started < 60:
        try:
            if predict(endpoint, FRAME) == pytest.approx((FRAME.sum(axis=1) * 2).tolist()):
                break
        except AssertionError:
            pass  # 502 while it starts again
        except httpx.TransportError:
            # Accepted by the server as it died: the byte proxy can only close the connection
            # (what a client of any TCP proxy sees then); the next request gets a 502 or v2.
            pass
        time.sleep(0.2)
    healed_s = time.monotonic() - started
    print(f"killed model server answered again after {healed_s:.1f}s")
    restarted = target.read_active()
    assert restarted["pid"] != killed and restarted["restarts"] == 1
    assert restarted["version"] == "2" and target.live().healthy
    assert "started it again" in (target.state_dir / "proxy.log").read_text()

    # -- stop, then resume: the same version serves again (make stop; make run) -------------
    target.stop_all()
    assert not accepting(target.settings.local_port)
    assert not _alive(restarted["pid"])
    assert target.active_version() == "2", "the desired state survives a stop"
    live = target.resume(wait_s=60)
    assert (live.version, live.healthy) == ("2", True), live
    assert predict(endpoint, FRAME) == pytest.approx((FRAME.sum(axis=1) * 2).tolist())

    # -- stop_all(forget=True): nothing left ---------------------------------------------------
    target.stop_all(forget=True)
    assert target.status() is None
    assert not accepting(second["port"])
    assert not accepting(target.settings.local_port)
    assert not _alive(second["pid"])


def test_a_pidfile_counts_only_for_a_process_with_our_arguments(tmp_path):
    """Pid reuse guard: the proxy (`python -m serving.deploy proxy`) never passes for a slot server
    (`... serving serve`), though `serve` is a substring of `serving`."""
    import subprocess
    import sys

    from serving.deploy.supervisor import _live_pid

    proxy_like = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "serving", "proxy"]
    )
    try:
        pidfile = tmp_path / "proc.pid"
        pidfile.write_text(f"{proxy_like.pid}\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _live_pid(pidfile, "serving", "proxy") is None:
            time.sleep(0.05)  # /proc/<pid>/cmdline is filled in once exec has happened
        assert _live_pid(pidfile, "serving", "proxy") == proxy_like.pid
        assert _live_pid(pidfile, "serving", "serve") is None
    finally:
        proxy_like.kill()
        proxy_like.wait()
    assert _live_pid(pidfile, "serving", "proxy") is None, "a dead pid never counts"
