"""Shadow and canary on the local target, end to end and fast: real model servers behind the
real front proxy, a real Prometheus (1 s scrapes) loading the judge's recording rules (derived,
as the local stack does, from docker/k8s/monitoring/rollout-judge-rule.yaml), the real rollout
path, callers sending requests all along.

A good candidate goes through a shadow step (its paired differences measured from mirrored
requests) and a 50% canary step and is promoted; a candidate whose predictions are 10% higher
is caught at its first canary step by the prediction check, and every request is back on the
live version at once. No caller ever gets an error. Bake times of 4 s and a 10 s judging
window (docs/benchmarks.md has the load figures, with the default settings).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from ml.drift import PREDICTION_KEY, profile_frame
from ml.settings import RegistrySettings
from serving.deploy.local import TARGETS_FILE, LocalTarget
from serving.deploy.rollout import Request, run
from serving.deploy.settings import DeploySettings
from serving.deploy.target import Verdict
from tests.integration.promotion_models import FEATURES, Linear, log_version

pytestmark = pytest.mark.integration

MODEL = "progressive-model"


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(10.0, 1.0, size=(n, len(FEATURES)))


def _register(weight: float) -> str:
    """A linear model; its run's drift profile from its own predictions (as training logs)."""
    model = Linear([weight] * len(FEATURES))
    predictions = _rows(2000, 1) @ np.full(len(FEATURES), weight)
    profile = profile_frame(pd.DataFrame({PREDICTION_KEY: predictions}), [PREDICTION_KEY])
    return log_version(model, MODEL, profile)


class Callers:
    """Requests through the front port all along; every answer's version, and every error."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint, self.errors, self.answers = endpoint, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rows = _rows(500, 2)
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                body = {"dataframe_split": {"columns": FEATURES, "data": [rows[i % 500].tolist()]}}
                i += 1
                try:
                    answer = client.post(f"{self.endpoint}/invocations", json=body)
                    if answer.status_code != 200:
                        self.errors.append(f"{answer.status_code} {answer.text[:200]}")
                    self.answers.append((time.monotonic(), answer.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def versions_since(self, t: float, until: float = float("inf")) -> set[str]:
        return {version for at, version in list(self.answers) if t <= at < until}

    def __enter__(self) -> Callers:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def prometheus(tmp_path, free_ports, monkeypatch):
    """Prometheus scraping the slots' file_sd targets every second, with the judge's rules
    over 10 s instead of a minute (the fast variant; promtool tests the file as shipped)."""
    from scripts.stacklib import prometheus as prom
    from serving.deploy import judge

    binary = prom.prometheus_binary()
    if binary is None:
        pytest.skip("no prometheus binary (scripts/install_prometheus.sh)")
    port, front, *slots = free_ports(4)
    state = tmp_path / "serving"
    state.mkdir()
    rules = tmp_path / "rollout-judge.yml"
    rules.write_text(prom.rules_yaml(prom.JUDGE_RULE).replace("[1m]", "[10s]"))
    monkeypatch.setattr(judge, "WINDOW_S", 10)
    config = prom.prometheus_config(
        f"127.0.0.1:{front}",
        "127.0.0.1:1",
        (rules,),
        scrape_interval_s=1,
        tracks_file=state / TARGETS_FILE,
    )
    (tmp_path / "prometheus.yml").write_text(prom.prometheus_yaml(config))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed at teardown
    argv = prom.prometheus_argv(binary, tmp_path / "prometheus.yml", tmp_path / "data", port)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _ready(url):
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "prometheus.log"
        ).read_text()[-2000:]
        time.sleep(0.2)
    yield {"url": url, "front": front, "slots": slots, "state": state}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_good_version_earns_its_traffic_and_a_shifted_one_is_caught(mlflow_store, prometheus):
    from mlflow import MlflowClient

    live, good, shifted = _register(1.0), _register(1.0), _register(1.1)
    settings = DeploySettings(
        local_port=prometheus["front"],
        local_slot_ports=prometheus["slots"],
        local_state_dir=str(prometheus["state"]),
        health_timeout_s=120,
        prometheus_url=prometheus["url"],
        rollout_strategy="canary",
        shadow_share=0.5,
        canary_steps=[50],
        canary_bake_s=4,
        judge_min_requests=20,
        judge_shadow_diff_p99=1.0,
    )
    registry = RegistrySettings(model_name=MODEL)
    target = LocalTarget(settings, mlflow_store, drain_s=0.5)
    try:
        first = run(Request("version", live), target, registry, tracking_uri=mlflow_store,
                    settings=settings)  # fmt: skip
        assert first.status == "rolled_out" and "canary needs a healthy version" in first.reason
        with Callers(target.endpoint) as callers:
            time.sleep(2)
            promoted = run(Request("version", good), target, registry,
                           tracking_uri=mlflow_store, settings=settings)  # fmt: skip
            assert promoted.status == "rolled_out" and promoted.champion == good
            assert callers.versions_since(0) == {live, good}
            tags = MlflowClient().get_model_version(MODEL, good).tags
            assert tags["rollout.step.1"].startswith("shadow: passed")
            assert "paired |diff| p99 not judged" not in tags["rollout.step.1"]
            assert tags["rollout.step.2"].startswith("canary 50%: passed")
            run_id, report = tags["rollout.report"][len("runs:/") :].split("/", 1)
            assert [a.path for a in MlflowClient().list_artifacts(run_id, "rollout")] == [report]

            with pytest.raises(Verdict, match=r"canary step 1 \(canary 50%\) failed on predict"):
                run(Request("version", shifted), target, registry, tracking_uri=mlflow_store,
                    settings=settings.model_copy(update={"shadow_share": 0.0}))  # fmt: skip
            caught = time.monotonic()
            time.sleep(2)
            assert shifted not in callers.versions_since(caught + 0.5), "traffic stayed on it"

            # A rollout killed outright (SIGKILL) leaves its candidate taking traffic: the next
            # rollout, whatever it is, puts every request back on the live version first.
            target.start_candidate(f"models:/{MODEL}/{shifted}", shifted,
                                   live_uri=f"models:/{MODEL}/{good}")  # fmt: skip
            target.route(0.5, 0.0)
            time.sleep(1)
            assert shifted in callers.versions_since(time.monotonic() - 1)
            again = run(Request("version", good), target, registry, tracking_uri=mlflow_store,
                        settings=settings)  # fmt: skip
            assert again.status == "unchanged"
            cleaned = time.monotonic()
            time.sleep(1)
            assert shifted not in callers.versions_since(cleaned)
        assert callers.errors == [], callers.errors[:5]
        assert target.live().version == good
        version = MlflowClient().get_model_version(MODEL, shifted)
        assert "canary step 1 (canary 50%) failed on prediction" in version.tags["rollout.failed"]
        assert str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version) == good
        steps = Path(settings.local_state_dir, "active.json").read_text()
        assert "candidate" not in steps
    finally:
        target.stop_all(forget=True)
