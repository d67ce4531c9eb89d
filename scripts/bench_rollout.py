"""Progressive delivery under load (issue 22): the local target, one run, all on 127.0.0.1.

    .venv/bin/python scripts/bench_rollout.py                  # ~15 minutes; prints the figures
    .venv/bin/python scripts/bench_rollout.py --only cost --rounds 1 --duration 5  # a quick look
        [--workdir /tmp/bench-rollout]   # keep (and reuse) the trained models there

1. Trains the project's regressor on two weeks of synthetic data (a few epochs) into a
   throwaway SQLite MLflow store, evaluated as the pipeline does (verification rows, drift
   profile): ``stable`` and ``good``. Plants three bad versions: ``shifted`` (trained on the
   target x 1.1: fast, well-formed, 10% high), ``errors`` (the stable model behind a pyfunc
   that fails with an internal error, a 500, one second in five once warm) and ``slow`` (the
   stable model behind a pyfunc, 150 ms more per call).
2. Starts a Prometheus (5 s scrapes, the judge's recording rules derived from
   docker/k8s/monitoring/rollout-judge-rule.yaml) and puts ``stable`` live through the local
   target (front proxy, model server).
3. ``cost``: wrk, 8 connections, rows of the synthetic data: straight to the model server
   against through the front proxy (per-request routing), and through a plain HAProxy hop if
   ``haproxy`` is installed (what a native proxy costs here); then through the proxy with
   ``good`` beside the live server, mirrored 100% against 0%; in interleaved rounds.
4. ``canary``: 64 connections for the whole rollout, a full canary of ``good`` (shadow, 5%,
   25%, 50%, promotion) and a rollback (``shifted``, caught): non-2xx, socket errors, p99
   against 64 connections steady.
5. ``planted``: each bad version rolled out as a canary under 8 connections: where it was
   caught and by which check; and ``errors`` once more without the shadow step (callers see
   its 500s at 5% until the first judgement puts every request back on the live version).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.benchlib.wrk import WRK_DONE  # noqa: E402

NAME = "bench-rollout"
PLANTED = """
import time

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR


class Planted(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model = mlflow.pyfunc.load_model(context.model_config["of"])
        self.kind = context.model_config["kind"]
        self.calls = 0

    def predict(self, context, model_input, params=None):
        self.calls += 1
        if self.kind == "slow":
            time.sleep(0.15)
        elif self.calls > 200 and int(time.monotonic()) % 5 == 0:  # a retry fails as well
            raise MlflowException("planted: down 1 s in 5", error_code=INTERNAL_ERROR)
        return self.model.predict(model_input)


mlflow.models.set_model(Planted())
"""
LUA = (
    """
local bodies = {{ {bodies} }}
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/invocations", {{["Content-Type"] = "application/json"}}, bodies[i])
end"""
    + WRK_DONE
)


def prepare(workdir: Path, epochs: int) -> dict[str, Any]:
    """Train, evaluate and register the versions; returns their numbers and request rows."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import pandas as pd

    from ml.evaluate import (
        VERIFICATION_ROWS_ARTIFACT,
        log_evaluation,
        predict,
        regression_metrics,
    )
    from ml.schema import SYNTHETIC_FEATURES
    from ml.settings import DataSettings, TrainingSettings
    from ml.synthetic import synthetic_partition
    from ml.train import train_model
    from serving.server.contract import DRIFT_PROFILE_ARTIFACT

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.chdir(workdir)  # a SQLite store keeps artifacts under ./mlruns
    data = DataSettings()
    features, target = list(SYNTHETIC_FEATURES), data.target_column

    def days(start: date, n: int) -> pd.DataFrame:
        return pd.concat(
            [synthetic_partition(start + timedelta(days=i), data) for i in range(n)],
            ignore_index=True,
        )

    def trained(window: pd.DataFrame, holdout: pd.DataFrame, scale: float = 1.0) -> str:
        window, holdout = window.copy(), holdout.copy()
        window[target] *= scale
        holdout[target] *= scale
        result = train_model(window, features, target, TrainingSettings(epochs=epochs),
                             experiment_name=NAME, run_name=NAME)  # fmt: skip
        predictions = predict(result.model_uri, holdout, features)
        metrics = regression_metrics(holdout[target], predictions)
        log_evaluation(result.run_id, holdout, target, predictions, metrics, None, None,
                       feature_columns=features)  # fmt: skip
        return str(mlflow.register_model(result.model_uri, NAME).version)

    holdout = days(date(2024, 3, 15), 2)
    versions = {
        "stable": trained(days(date(2024, 3, 1), 7), holdout),
        "good": trained(days(date(2024, 3, 8), 7), holdout),
        "shifted": trained(days(date(2024, 3, 8), 7), holdout, scale=1.1),
    }
    client = mlflow.MlflowClient()
    stable_run = client.get_model_version(NAME, versions["stable"]).run_id
    code = workdir / "planted.py"
    code.write_text(PLANTED)
    example = holdout[features].head(5)
    for kind in ("errors", "slow"):
        with mlflow.start_run(run_name=f"planted-{kind}") as run:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                model_config={"of": f"models:/{NAME}/{versions['stable']}", "kind": kind},
                input_example=example,
                pip_requirements=["mlflow"],
            )
            for artifact in (VERIFICATION_ROWS_ARTIFACT, DRIFT_PROFILE_ARTIFACT):
                copied = mlflow.artifacts.load_dict(f"runs:/{stable_run}/{artifact}")
                client.log_dict(run.info.run_id, copied, artifact)
        versions[kind] = str(mlflow.register_model(info.model_uri, NAME).version)
    rows = days(date(2024, 3, 20), 3)[features].sample(n=1000, random_state=3)
    return {"tracking_uri": uri, "versions": versions, "features": features,
            "rows": rows.to_numpy("float64").tolist()}  # fmt: skip


def gate_all(versions: dict[str, str]) -> None:
    """Every version as if the gate had passed it (a rollout refuses an ungated version): the
    planted ones get past the offline gate here on purpose, the rollout's judge is measured."""
    from mlflow import MlflowClient

    from ml.gate import PASSED_TAG

    client = MlflowClient()
    for version in versions.values():
        client.set_model_version_tag(NAME, version, PASSED_TAG, "true")


def write_lua(path: Path, features: list[str], rows: list[list[float]]) -> Path:
    bodies = ",\n".join(
        "[==[" + json.dumps({"dataframe_split": {"columns": features, "data": [row]}}) + "]==]"
        for row in rows
    )
    path.write_text(LUA.format(bodies=bodies))
    return path


LOADS: list[subprocess.Popen] = []  # every wrk started: none outlives the run


def wrk(url: str, lua: Path, connections: int, seconds: float | None) -> subprocess.Popen:
    """wrk on ``url`` (for ``seconds``, or until :func:`wrk_result` stops it)."""
    duration = f"{int(seconds)}s" if seconds else "3600s"
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}", "--timeout", "10s",
           "-s", str(lua), f"{url}/invocations"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    LOADS.append(proc)
    return proc


def wrk_result(proc: subprocess.Popen, stop: bool = False) -> dict[str, float]:
    if stop:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=3700)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    raw = json.loads(line[len("WRKJSON ") :])
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "requests": raw["requests"],
        "non2xx": raw["status_errors"],
        "socket_errors": raw["socket_errors"],
    }


def batch_requests(server: str) -> tuple[float, float]:
    """The live server's ``model_server_batch_requests`` so far: (requests, model calls)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"_sum": 0.0, "_count": 0.0}
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "model_server_batch_requests":
            for sample in family.samples:
                for suffix in totals:
                    if sample.name.endswith(suffix):
                        totals[suffix] += sample.value
    return totals["_sum"], totals["_count"]


def cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


HAPROXY_CFG = """global
  nbthread 1
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend front
  bind 127.0.0.1:{port}
  default_backend live
backend live
  server live 127.0.0.1:{upstream}
"""


def start_haproxy(workdir: Path, upstream: int) -> tuple[subprocess.Popen, str] | None:
    """A reference hop: HAProxy (Debian's, if installed) in front of the live server, plain
    HTTP keep-alive both sides, no routing rules: what a native proxy costs on this machine."""
    import shutil

    from serving.deploy.supervisor import _accepting, wait_for
    from tests.conftest import free_port

    if shutil.which("haproxy") is None:
        print("   (no haproxy on PATH: apt-get install haproxy for the native-proxy reference)")
        return None
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(port=port, upstream=upstream))
    proc = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    if wait_for(lambda: _accepting("127.0.0.1", port), timeout_s=5.0, interval_s=0.05):
        return proc, f"http://127.0.0.1:{port}"
    proc.kill()
    raise RuntimeError("haproxy did not start")


def start_prometheus(workdir: Path, front: int, state: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from scripts.stacklib import prometheus as prom
    from serving.deploy.local import TARGETS_FILE
    from tests.conftest import free_port

    binary = prom.prometheus_binary()
    if binary is None:
        raise SystemExit("no prometheus binary: scripts/install_prometheus.sh")
    port = free_port()
    rules = workdir / "rollout-judge.yml"
    rules.write_text(prom.rules_yaml(prom.JUDGE_RULE))
    config = prom.prometheus_config(
        f"127.0.0.1:{front}", "127.0.0.1:1", (rules.resolve(),), scrape_interval_s=5,
        tracks_file=state / TARGETS_FILE,
    )  # fmt: skip
    (workdir / "prometheus.yml").write_text(prom.prometheus_yaml(config))
    argv = prom.prometheus_argv(binary, workdir / "prometheus.yml", workdir / "tsdb", port)
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("Prometheus did not start")


def rollout(target, settings, tracking_uri: str, version: str) -> dict[str, Any]:
    """A canary of ``version``: its outcome, or the verdict and what caught it."""
    from ml.settings import RegistrySettings
    from serving.deploy.rollout import Request, run
    from serving.deploy.target import Verdict

    started = time.monotonic()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(  # type: ignore[method-assign]
        f"{time.monotonic() - started:6.1f}s {record.getMessage()}"
    )
    logging.getLogger("serving.deploy.rollout").addHandler(handler)
    logging.getLogger("serving.deploy.rollout").setLevel(logging.INFO)
    request = Request("version", version, reason="bench", strategy="canary")
    try:
        outcome = run(request, target, RegistrySettings(model_name=NAME),
                      tracking_uri=tracking_uri, settings=settings)  # fmt: skip
        result = {"status": outcome.status}
    except Verdict as exc:
        result = {"status": "verdict", "verdict": str(exc)}
    finally:
        logging.getLogger("serving.deploy.rollout").removeHandler(handler)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["steps"] = lines
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk cell")
    parser.add_argument("--bake", type=float, default=20.0, help="canary_bake_s")
    parser.add_argument("--only", choices=("cost", "canary", "planted"), action="append")
    parser.add_argument("--workdir", help="reuse the models trained there by an earlier run")
    args = parser.parse_args(argv)
    parts = set(args.only or ("cost", "canary", "planted"))

    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings
    from tests.conftest import _free_ports

    load = [os.getloadavg()[0]]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rollout-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"== working in {workdir}", flush=True)
    prepared = workdir / "prepared.json"
    if prepared.exists():  # the models of an earlier run in this folder
        models = json.loads(prepared.read_text())
        os.environ["MLFLOW_TRACKING_URI"] = models["tracking_uri"]
        os.chdir(workdir)
    else:
        models = prepare(workdir, args.epochs)
        prepared.write_text(json.dumps(models))
    versions = models["versions"]
    gate_all(versions)
    print(f"== versions: {versions}", flush=True)
    lua = write_lua(workdir / "rows.lua", models["features"], models["rows"])
    front, *slots = _free_ports(3)
    state = workdir / "serving"
    if state.exists():
        import shutil

        shutil.rmtree(state)
    prometheus, prometheus_url = start_prometheus(workdir, front, state)
    settings = DeploySettings(
        local_port=front, local_slot_ports=slots, local_state_dir=str(state),
        prometheus_url=prometheus_url, rollout_strategy="canary", canary_bake_s=args.bake,
    )  # fmt: skip
    target = LocalTarget(settings, models["tracking_uri"])
    report: dict[str, Any] = {"versions": versions, "bake_s": args.bake}
    try:
        target.deploy(f"models:/{NAME}/{versions['stable']}", versions["stable"])
        active = target.read_active()
        server, proxy = active["pid"], int((state / "proxy.pid").read_text())
        direct = f"http://127.0.0.1:{active['port']}"
        if "cost" in parts:
            report["cost"] = measure_cost(target, direct, lua, args, versions, server, proxy)
        if "canary" in parts:
            steady = wrk_result(wrk(target.endpoint, lua, 64, 20))
            report["steady_64"] = steady
            for name in ("good", "shifted"):
                load_gen = wrk(target.endpoint, lua, 64, None)
                result = rollout(target, settings, models["tracking_uri"], versions[name])
                time.sleep(2)
                result["load"] = wrk_result(load_gen, stop=True)
                report[f"canary_{name}"] = result
                print(f"== canary of {name}: {json.dumps(result, indent=1)}", flush=True)
        if "planted" in parts:
            if target.live().version != versions["stable"]:
                target.deploy(f"models:/{NAME}/{versions['stable']}", versions["stable"])
            no_shadow = settings.model_copy(update={"shadow_share": 0.0})
            for name, how in (("shifted", settings), ("errors", settings), ("slow", settings),
                              ("errors", no_shadow)):  # fmt: skip
                load_gen = wrk(target.endpoint, lua, 8, None)
                result = rollout(target, how, models["tracking_uri"], versions[name])
                result["load"] = wrk_result(load_gen, stop=True)
                key = f"planted_{name}" + ("" if how.shadow_share else "_without_shadow")
                report[key] = result
                print(f"== {key}: {json.dumps(result, indent=1)}", flush=True)
    finally:
        for load_gen in LOADS:  # a rollout that raised left its load running
            if load_gen.poll() is None:
                load_gen.kill()
        target.stop_all(forget=True)
        os.killpg(prometheus.pid, signal.SIGTERM)
        load.append(os.getloadavg()[0])
    report["load_average"] = load
    print("\nREPORT " + json.dumps(report, indent=1, default=str))
    return 0


def measure_cost(target, direct: str, lua: Path, args, versions, server: int, proxy: int):
    """Routing: straight vs through the proxy; shadow: mirrored 100% vs 0% (same run)."""
    cells: dict[str, list[dict[str, float]]] = {}

    haproxy = start_haproxy(Path(lua).parent, int(direct.rsplit(":", 1)[1]))

    def cell(name: str, url: str, candidate: int | None = None) -> None:
        hop = haproxy[0].pid if name == "haproxy" else proxy  # type: ignore[index]
        pids = {"server": server, "proxy": hop, "candidate": candidate}
        before = {label: cpu_s(pid) for label, pid in pids.items() if pid}
        batches = batch_requests(direct)
        result = wrk_result(wrk(url, lua, 8, args.duration))
        for label, cpu in before.items():
            spent = cpu_s(pids[label]) - cpu  # type: ignore[arg-type]
            result[f"{label}_cpu_us"] = spent / result["requests"] * 1e6
        summed, counted = (b - a for a, b in zip(batches, batch_requests(direct), strict=True))
        result["requests_per_call"] = summed / counted if counted else 0.0
        cells.setdefault(name, []).append(result)
        shadow = f"  candidate {result['candidate_cpu_us']:5.1f}" if candidate else ""
        print(f"   {name:14s} {result['rps']:8.0f} req/s  p99 {result['p99_ms']:6.2f} ms  "
              f"{result['requests_per_call']:4.1f} req/call  "
              f"proxy {result['proxy_cpu_us']:5.1f} us/req  server "
              f"{result['server_cpu_us']:5.1f}{shadow} us/req  non-2xx {result['non2xx']}",
              flush=True)  # fmt: skip

    wrk_result(wrk(target.endpoint, lua, 8, 5))  # warm-up
    order = [("direct", direct), ("proxy", target.endpoint)]
    if haproxy is not None:
        order.append(("haproxy", haproxy[1]))
    try:
        for round_ in range(args.rounds):
            for name, url in order[round_ % len(order) :] + order[: round_ % len(order)]:
                cell(name, url)
    finally:
        if haproxy is not None:
            haproxy[0].kill()
    live_uri = f"models:/{NAME}/{versions['stable']}"
    target.start_candidate(f"models:/{NAME}/{versions['good']}", versions["good"],
                           live_uri=live_uri)  # fmt: skip
    candidate = int(target.read_active()["candidate"]["pid"])
    try:
        for round_ in range(args.rounds):
            for mirror in (0.0, 1.0) if round_ % 2 == 0 else (1.0, 0.0):
                target.route(0.0, mirror)
                cell(f"mirror {mirror:.0%}", target.endpoint, candidate)
    finally:
        target.drop_candidate()
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in cells.items()
    }

    # Each cost is the median over the rounds of that round's ratio: the rounds drift (the
    # machine's other load, the servers' own state), the cells of one round are neighbours.
    def cost(cell: str, against: str) -> float:
        pairs = zip(cells[cell], cells[against], strict=True)
        return statistics.median(1 - a["rps"] / b["rps"] for a, b in pairs)

    medians["routing_cost"] = cost("proxy", "direct")
    if "haproxy" in cells:
        medians["haproxy_routing_cost"] = cost("haproxy", "direct")
    medians["shadow_cost"] = cost("mirror 100%", "mirror 0%")
    print(f"== cost: {json.dumps(medians, indent=1)}", flush=True)
    return medians


if __name__ == "__main__":
    sys.exit(main())
