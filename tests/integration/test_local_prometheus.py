"""The local stack's Prometheus, for real: it scrapes a model server and the registry exporter
and evaluates the project's alert rules.

A tiny pyfunc model is registered in a throwaway SQLite registry, with @champion on it;
``python -m serving.server`` serves it, and the registry_events plugin's FastAPI app is served
by uvicorn under its Airflow prefix (``/registry-events``), reading that registry. Then
``scripts/stack.py``'s own ``_prometheus_up()`` writes prometheus.yml for them (1 s intervals)
and starts ``prometheus`` as a stack service. Prometheus' HTTP API must then show both targets
up, the champion alias and the served version, equal, and every rule of the PrometheusRules
of docker/k8s/monitoring (whose groups the stack writes as its rule file: the alerts, and the
rollout judge's recording rules) evaluated without error and the alerts quiet (nothing is
wrong); an edit of one reaches the running Prometheus at the next `make run`. Last, the
stack's stop frees the port. About 20 s, most of it starting the two Python servers.

Needs Debian's prometheus package (`make prometheus-tools`); skipped with that reason without.
"""

from __future__ import annotations

import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable

import httpx
import pytest
import yaml

from ml.evaluate import DRIFT_PROFILE_ARTIFACT
from ml.gate import PASSED_TAG
from tests.conftest import free_port
from tests.integration.test_server_protocol import (
    REPO,
    Registry,
    ServerProcess,
    child_env,
    our_server_cmd,
    sqlite_registry,
)

pytestmark = pytest.mark.integration

MODEL_NAME = "prometheus-local"
PROMETHEUS_RULE = REPO / "docker" / "k8s" / "monitoring" / "prometheus-rule.yaml"


def _groups() -> list[dict]:
    """Every group of every PrometheusRule of the monitoring base: what the stack loads."""
    sources = sorted(PROMETHEUS_RULE.parent.glob("*rule.yaml"))
    return [g for p in sources for g in yaml.safe_load(p.read_text())["spec"]["groups"]]


WAIT_S = 60.0

# A model from code: the server process imports this file, never the test module.
MODEL_CODE = """
import mlflow
import pandas as pd


class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, model_input: pd.DataFrame, params=None):
        return pd.DataFrame({"doubled": model_input["x"].to_numpy() * 2.0})


mlflow.models.set_model(Doubler())
"""

# The plugin's app mounted where Airflow mounts it (url_prefix), so the stack's metrics_path
# is the one scraped here too.
EXPORTER = """
import sys

import uvicorn
from fastapi import FastAPI

sys.path.insert(0, sys.argv[2])
from registry_events.app import URL_PREFIX, app

outer = FastAPI()
outer.mount(URL_PREFIX, app)
uvicorn.run(outer, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _profile() -> dict:
    import numpy as np
    import pandas as pd

    from ml import drift

    x = np.random.default_rng(7).normal(10.0, 2.0, size=2000)
    frame = pd.DataFrame({"x": x, drift.PREDICTION_KEY: 2.0 * x})
    return drift.profile_frame(frame, ["x", drift.PREDICTION_KEY])


PROFILE = _profile()


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "prometheus not installed: `make prometheus-tools` (scripts/install_prometheus.sh, "
            "Debian's prometheus package) installs it"
        )
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory, prometheus_bin):
    """A tiny pyfunc (no TensorFlow: quick to log and to serve), registered, @champion on it."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("prometheus-local")
    code = root / "model.py"
    code.write_text(MODEL_CODE)
    example = pd.DataFrame({"x": [1.0, 2.5]})
    with sqlite_registry(root) as uri:
        experiment = mlflow.create_experiment(
            f"{MODEL_NAME}-experiment", artifact_location=(root / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            # The profile the pipeline logs at evaluation: the server takes its histogram
            # buckets from it, and monitor_drift scores served rows against it.
            mlflow.log_dict(PROFILE, DRIFT_PROFILE_ARTIFACT)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                signature=infer_signature(example, pd.DataFrame({"doubled": [2.0, 5.0]})),
                input_example=example,
                pip_requirements=["mlflow", "pandas"],  # no inference (a subprocess: seconds)
                registered_model_name=MODEL_NAME,
            )
        version = str(info.registered_model_version)
        # As the pipeline leaves it: gated and passed, then @champion (the rule of production,
        # ml.gate.uncleared; otherwise ModelChampionNotCleared is rightly pending).
        MlflowClient().set_model_version_tag(MODEL_NAME, version, PASSED_TAG, "true")
        MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", version)
    return Registry(uri, f"models:/{MODEL_NAME}/{version}", version, root)


@pytest.fixture(scope="module")
def servers(registry):
    """The model server and the exporter, started together (each imports MLflow: seconds)."""
    server_port, exporter_port = free_port(), free_port()
    env = child_env(registry.tracking_uri)
    model_server = ServerProcess.start(
        "model-server", our_server_cmd(registry.model_uri, server_port), server_port, env,
        registry.root,
    )  # fmt: skip
    # The registry_events app on a free port, at /registry-events, reading the registry.
    exporter = ServerProcess.start(
        "exporter",
        [sys.executable, "-c", EXPORTER, str(exporter_port), str(REPO / "plugins")],
        exporter_port,
        {**env, "PIPELINE_REGISTRY_MODEL_NAME": MODEL_NAME},
        registry.root,
    )
    try:
        model_server.wait_ready()
        url = f"{exporter.url}/registry-events/metrics"
        _wait(
            lambda: _get_ok(url) and f'model="{MODEL_NAME}"' in httpx.get(url).text,
            f"the exporter at {url}",
            exporter.log_tail,
        )
        yield model_server, exporter
    finally:
        model_server.stop()
        exporter.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, servers):
    """The stack's Prometheus (``_prometheus_up``) with its state in a temp folder, scraping
    the model server as the front port and the exporter as the Airflow API server."""
    from scripts import stack

    model_server, exporter = servers
    state = tmp_path_factory.mktemp("stack-state")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "STATE": state,
            "PIDS": state / "pids",
            "LOGS": state / "logs",
            "PROMETHEUS_ROOT": state / "prometheus",
            "PROMETHEUS_PORT": port,
            "PROMETHEUS_URL": f"http://127.0.0.1:{port}",
            "PROMETHEUS_INTERVAL_S": 1,
            "AIRFLOW_PORT": exporter.port,
            "AIRFLOW_URL": exporter.url,
        }.items():
            mp.setattr(stack, name, value)
        mp.setenv("PIPELINE_DEPLOY_LOCAL_PORT", str(model_server.port))
        mp.setenv("PIPELINE_DEPLOY_LOCAL_HOST", "127.0.0.1")
        mp.delenv("PROMETHEUS_BIN", raising=False)
        started = time.monotonic()
        try:
            assert stack._prometheus_up() is True, (state / "logs" / "prometheus.log").read_text()
            yield {
                "stack": stack,
                "url": stack.PROMETHEUS_URL,
                "port": port,
                "state": state,
                "ready_s": time.monotonic() - started,
            }
        finally:
            stack._stop("prometheus")


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(predicate: Callable[[], object], what: str, detail: Callable[[], str] = str) -> object:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S:.0f}s\n{detail()}")
        time.sleep(0.5)


def _query(url: str, promql: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def _targets(url: str) -> str:
    return httpx.get(f"{url}/api/v1/targets", timeout=5).text[:3000]


def test_the_stack_starts_prometheus_as_a_private_service(prometheus):
    state = prometheus["state"]
    config = yaml.safe_load((state / "prometheus" / "prometheus.yml").read_text())
    rules = state / "prometheus" / "rules.yml"
    assert config["rule_files"] == [str(rules)]
    assert yaml.safe_load(rules.read_text()) == {"groups": _groups()}
    for path, mode in (
        (state / "prometheus" / "prometheus.yml", 0o600),
        (rules, 0o600),
        (state / "prometheus", 0o700),
        (state / "prometheus" / "data", 0o700),
        (state / "logs" / "prometheus.log", 0o600),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert prometheus["stack"]._of("prometheus") != []
    assert prometheus["ready_s"] < 30


def test_both_targets_are_scraped_and_up(prometheus):
    url = prometheus["url"]
    for job in ("model-server", "registry"):
        _wait(
            lambda job=job: _query(url, f'up{{job="{job}"}} == 1'),
            f"up{{job={job!r}}} == 1",
            lambda: _targets(url),
        )


def test_the_champion_and_the_served_version_show_and_agree(prometheus, registry):
    url = prometheus["url"]
    version = float(registry.version)
    champion = _wait(
        lambda: _query(url, 'mlflow_registry_alias_version{alias="champion"}'),
        "mlflow_registry_alias_version{alias='champion'}",
        lambda: _targets(url),
    )
    assert [(s["metric"]["model"], float(s["value"][1])) for s in champion] == [
        (MODEL_NAME, version)
    ]
    assert champion[0]["metric"]["job"] == "registry"

    served = _wait(
        lambda: _query(url, 'model_server_model_version{job="model-server"}'),
        "model_server_model_version",
        lambda: _targets(url),
    )
    assert [float(s["value"][1]) for s in served] == [version]
    info = _query(url, 'model_server_model_info{job="model-server"}')
    assert [(s["metric"]["name"], s["metric"]["version"]) for s in info] == [
        (MODEL_NAME, registry.version)
    ]
    # The join ModelServedVersionNotChampion makes, with == instead of !=: the series of the
    # two jobs line up on the model's name.
    agreeing = _query(
        url,
        'max by (model) (label_replace(model_server_model_version{job="model-server"}'
        " * on (instance, job) group_left (name) max by (instance, job, name)"
        ' (model_server_model_info{job="model-server"}), "model", "$1", "name", "(.+)"))'
        ' == on (model) max by (model) (mlflow_registry_alias_version{alias="champion"})',
    )
    assert [(s["metric"]["model"], float(s["value"][1])) for s in agreeing] == [
        (MODEL_NAME, version)
    ]


def test_monitor_drift_scores_what_the_server_answered_from_its_histograms(prometheus, servers):
    """Rows like the training data's, sent to the real server, read back through Prometheus:
    served:x and served:__prediction__ are scored against the profile, and score low."""
    import numpy as np

    from ml.pipeline import _served_scores
    from ml.settings import DriftSettings

    url, model_server = prometheus["url"], servers[0]
    rng = np.random.default_rng(8)

    def send(rows: int) -> None:
        x = rng.normal(10.0, 2.0, size=rows).round(4).tolist()
        body = {"dataframe_split": {"columns": ["x"], "data": [[v] for v in x]}}
        assert httpx.post(f"{model_server.url}/invocations", json=body).status_code == 200

    def scraped() -> float:
        result = _query(url, 'sum(model_server_feature_value_count{job="model-server"})')
        return float(result[0]["value"][1]) if result else 0.0

    send(20)  # the series exist before the rows that count: increase() needs a first sample
    _wait(lambda: scraped() >= 20, "the first rows scraped", lambda: _targets(url))
    for _ in range(6):
        send(100)
    _wait(lambda: scraped() >= 620, "all rows scraped", lambda: _targets(url))
    time.sleep(2.5)  # two more scrapes at 1 s: increase() sees the last value twice

    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    settings = DriftSettings(prometheus_url=url, served_min_rows=300)
    scores = _served_scores(PROFILE, {"start": today, "end": tomorrow}, settings)
    assert set(scores) == {"served:x", "served:__prediction__"}
    assert all(s.issue is None and s.psi < 0.1 for s in scores.values()), scores

    unreachable = DriftSettings(prometheus_url=f"http://127.0.0.1:{free_port()}")
    assert _served_scores(PROFILE, {"start": today, "end": tomorrow}, unreachable) == {}


def test_the_project_alert_rules_are_evaluated_and_quiet(prometheus):
    """Every group and alert of the rule file is loaded; once both targets were scraped, every
    rule evaluates without error, and none is pending or firing (the server is up and serves
    @champion; no drift check ran)."""
    url = prometheus["url"]
    expected = _groups()
    rules_file = prometheus["state"] / "prometheus" / "rules.yml"
    _wait(lambda: _query(url, 'up{job="model-server"} == 1'), "model-server up")
    _wait(lambda: _query(url, 'mlflow_registry_alias_version{alias="champion"}'), "champion")
    time.sleep(2.5)  # two evaluations with both scrapes in

    def rules() -> list[dict]:
        response = httpx.get(f"{url}/api/v1/rules", timeout=5)
        response.raise_for_status()
        return response.json()["data"]["groups"]

    def settled() -> list[dict] | None:
        groups = rules()
        states = [r for g in groups for r in g["rules"]]
        ok = all(
            r["health"] == "ok"
            and r.get("state", "inactive") == "inactive"  # recording rules have none
            and not r["lastEvaluation"].startswith("0001")  # the zero time: not yet
            for r in states
        )
        return groups if ok else None

    groups = _wait(settled, "every rule evaluated, healthy and inactive", lambda: str(rules()))
    # The API lists the groups of a file by name (Prometheus sorts them), not in file order.
    assert [g["file"] for g in groups] == [str(rules_file)] * len(expected)
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == {
        g["name"]: [r.get("alert") or r["record"] for r in g["rules"]] for g in expected
    }
    # The rollout judge's recording rules come from the same file and evaluate too (no
    # rollout: no series, no error).
    judge = {r["name"] for g in groups for r in g["rules"] if r["type"] == "recording"}
    assert "rollout:prediction_psi:1m" in judge


def test_make_run_again_reuses_it_and_reloads_a_changed_config(prometheus, capsys, tmp_path):
    stack, url = prometheus["stack"], prometheus["url"]
    pid = stack._of("prometheus")[0].pid
    capsys.readouterr()
    assert stack._prometheus_up() is True
    assert "prometheus already running\n" in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stack, "PROMETHEUS_INTERVAL_S", 2)
        assert stack._prometheus_up() is True
    assert "configuration or rules changed, reloaded" in capsys.readouterr().out
    assert stack._of("prometheus")[0].pid == pid

    def loaded() -> bool:
        config = httpx.get(f"{url}/api/v1/status/config", timeout=5).json()["data"]["yaml"]
        return yaml.safe_load(config)["global"]["scrape_interval"] == "2s"

    _wait(loaded, "the reloaded config")

    # An edit of the alert rules' source (here: a copy of it) reaches the running Prometheus.
    edited = tmp_path / "prometheus-rule.yaml"
    edited.write_text(PROMETHEUS_RULE.read_text().replace("for: 10m", "for: 17m"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stack, "PROMETHEUS_INTERVAL_S", 2)
        mp.setattr(stack.prom, "rule_sources", lambda: [edited])
        assert stack._prometheus_up() is True
    assert "configuration or rules changed, reloaded" in capsys.readouterr().out

    def durations() -> set[float]:
        groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        return {r["duration"] for g in groups for r in g["rules"]}

    _wait(lambda: 17 * 60 in durations() and 600 not in durations(), "the reloaded rules")

    # And back: the project's own config and rules, for the tests after this one.
    assert stack._prometheus_up() is True
    assert "configuration or rules changed, reloaded" in capsys.readouterr().out
    _wait(lambda: _loaded_rules(url) == _expected_rules(), "the project's rules again")


def _expected_rules() -> set[str]:
    """The name of every rule of the monitoring base: alerts, and the judge's recordings."""
    return {r.get("alert") or r["record"] for g in _groups() for r in g["rules"]}


def _loaded_rules(url: str) -> set[str]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    return {r["name"] for g in groups for r in g["rules"]}


def test_the_urls_make_run_prints_for_it_answer_200(prometheus):
    """The summary's Prometheus line names the pages this Prometheus serves (Debian's 2.42:
    under /classic/), and each of them answers 200 and shows what it is for: the targets page
    lists both jobs, the alerts page the project's alert rules."""
    import re

    from scripts.stacklib.prometheus import prometheus_pages

    stack, url = prometheus["stack"], prometheus["url"]
    line = stack.prometheus_line(prometheus_pages(url), url)
    printed = re.findall(r"http://\S+?(?=[,)\s]|$)", line)
    assert len(printed) == 3, line  # the UI, its targets page, its alerts page
    answers = {link: httpx.get(link, timeout=5) for link in printed}
    assert {link: r.status_code for link, r in answers.items()} == dict.fromkeys(printed, 200)
    targets = next(r.text for link, r in answers.items() if link.endswith("/targets"))
    alerts = next(r.text for link, r in answers.items() if link.endswith("/alerts"))
    assert "model-server" in targets and "registry" in targets
    rules = _groups()
    names = [r["alert"] for g in rules for r in g["rules"] if "alert" in r]
    assert names and [name for name in names if name not in alerts] == []


def test_the_stack_stop_frees_the_port(prometheus):
    """Last in the module: the fixture's teardown would do the same."""
    stack = prometheus["stack"]
    stack._stop("prometheus")
    assert stack._of("prometheus") == []
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", prometheus["port"])) != 0
