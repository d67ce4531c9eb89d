"""The embedded local stack: MLflow server + Airflow standalone + the local model endpoint.

    python scripts/stack.py up       start what is not running yet (reuses what is)
    python scripts/stack.py run      trigger train_and_deploy, follow it, print where things are
    python scripts/stack.py down     stop every process the stack started, children included
    python scripts/stack.py status   what is running

All state lives under .local/ (or $PIPELINE_STATE_DIR): SQLite databases, MLflow artifacts,
Airflow home, data partitions, logs and pid files. Each service runs in its own process group
so that `down` stops its children too (Airflow standalone forks a scheduler, a DAG processor,
a triggerer, an API server and LocalExecutor workers).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("PIPELINE_STATE_DIR", ROOT / ".local")).resolve()
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MLFLOW_PORT = int(os.environ.get("MLFLOW_PORT", "5000"))
AIRFLOW_PORT = int(os.environ.get("AIRFLOW_PORT", "8080"))
DAG_ID = "train_and_deploy"
MLFLOW_URL = f"http://{HOST}:{MLFLOW_PORT}"
AIRFLOW_URL = f"http://{HOST}:{AIRFLOW_PORT}"
AIRFLOW_HOME = STATE / "airflow"
PIDS = STATE / "pids"
LOGS = STATE / "logs"


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def stack_env() -> dict[str, str]:
    """Environment shared by every process of the stack (and so by every Airflow task)."""
    env = dict(os.environ)
    env.update(
        {
            # `mlflow server` / `mlflow models serve` look for uvicorn on PATH.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "PIPELINE_STATE_DIR": str(STATE),
            "MLFLOW_TRACKING_URI": MLFLOW_URL,
            "AIRFLOW_HOME": str(AIRFLOW_HOME),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # A small machine: the default parallelism (32) starts 32 worker processes.
            "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "4"),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__API__PORT": str(AIRFLOW_PORT),
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": AIRFLOW_URL,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW_CONN_MLFLOW_DEFAULT": env.get("AIRFLOW_CONN_MLFLOW_DEFAULT", MLFLOW_URL),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # MLflow 3 starts ~7 job-runner processes (GenAI jobs) by default; unused here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    return env


# --- process groups ------------------------------------------------------------------------


def _pid(name: str) -> int | None:
    """The pid of a service we started, if that process is still there (not a zombie)."""
    from serving.deploy.local import process_is

    try:
        pid = int((PIDS / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if process_is(pid) else None


def _start(name: str, argv: list[str], env: dict[str, str]) -> int:
    PIDS.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_file = open(LOGS / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    (PIDS / f"{name}.pid").write_text(str(proc.pid))
    say(f"started {name} (pid {proc.pid}, log {LOGS / f'{name}.log'})")
    return proc.pid


def _stop_group(name: str, grace_s: float = 20.0) -> None:
    """SIGTERM the service's whole process group and every child (Airflow's scheduler and
    workers, MLflow's uvicorn worker), wait, then SIGKILL what is left."""
    from serving.deploy.local import stop_group

    pid = _pid(name)
    pidfile = PIDS / f"{name}.pid"
    if pid is not None:
        stop_group(pid, timeout_s=grace_s)
        say(f"stopped {name}")
    pidfile.unlink(missing_ok=True)


def _wait_http(url: str, what: str, timeout_s: float, pid_name: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _pid(pid_name) is None:
            raise SystemExit(f"{what} exited during start-up; see {LOGS / f'{pid_name}.log'}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{what} did not answer {url} in {timeout_s:.0f}s; see {LOGS}")


# --- services ------------------------------------------------------------------------------


def up() -> None:
    env = stack_env()
    STATE.mkdir(parents=True, exist_ok=True)
    # Registry promotions: MLflow may deliver webhooks to the local Airflow API server, and both
    # sides share a generated secret (.local/webhook-secret unless PIPELINE_WEBHOOK_SECRET is set).
    env.update(mlflow_webhook_env(STATE))
    secret = env.get("PIPELINE_WEBHOOK_SECRET") or webhook_secret(STATE)
    env["PIPELINE_WEBHOOK_SECRET"] = secret
    if _pid("mlflow") is None:
        (STATE / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        _start(
            "mlflow",
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{STATE / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                str(STATE / "mlflow" / "artifacts"),
                "--serve-artifacts",
                "--host",
                HOST,
                "--port",
                str(MLFLOW_PORT),
                "--workers",
                "1",
            ],
            env,
        )
    else:
        say("mlflow already running")
    _wait_http(f"{MLFLOW_URL}/health", "MLflow server", 120, "mlflow")
    say(f"MLflow ready at {MLFLOW_URL}")

    if _pid("airflow") is None:
        AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
        _start("airflow", [str(VENV_BIN / "airflow"), "standalone"], env)
    else:
        say("airflow already running")
    # While Airflow boots: the local target serves again what it served before `make stop`.
    _resume_serving(env)
    _wait_http(f"{AIRFLOW_URL}/api/v2/monitor/health", "Airflow", 300, "airflow")
    say(f"Airflow ready at {AIRFLOW_URL}")
    _rollout_pool(env)
    _enable_promotions(secret)


def _resume_serving(env: dict[str, str]) -> None:
    """Start the local target's proxy, which starts the recorded model server again."""
    result = subprocess.run(
        [sys.executable, "-m", "serving.deploy", "resume"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        live = json.loads(result.stdout)
    except ValueError:
        say(f"local target did not resume: {result.stderr.strip()[-500:]}")
        return
    if live.get("version"):
        state = "answering" if live.get("healthy") else f"NOT answering ({live.get('detail')})"
        say(f"local target: version {live['version']} {state}")


def _rollout_pool(env: dict[str, str]) -> None:
    """The one-slot pool every rollout task runs in (one rollout at a time, across DAGs)."""
    from serving.deploy.settings import DeploySettings

    pool = DeploySettings().rollout_pool
    subprocess.run(
        [str(VENV_BIN / "airflow"), "pools", "set", pool, "1", "one model rollout at a time"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    say(f"Airflow pool {pool}: 1 slot")


def restore_champion(tracking_uri: str = MLFLOW_URL) -> dict[str, Any] | None:
    """Serve what @champion names, through the rollout path, before a new run starts.

    Usually the resumed local target already serves it and this ends in seconds as
    "unchanged"; after a lost state folder, or a promotion the stack missed, it deploys.
    """
    from ml.settings import RegistrySettings
    from serving.deploy.rollout import RolloutError, VerificationFailed, run_request
    from serving.deploy.settings import DeploySettings

    request = {"kind": "champion", "reason": "make run: serve @champion before the new run"}
    try:
        outcome = run_request(
            request, DeploySettings(), RegistrySettings(), tracking_uri=tracking_uri
        )
    except (RolloutError, VerificationFailed) as exc:
        say(f"could not restore @champion: {exc}")
        return None
    if outcome["status"] != "skipped":
        say(f"@champion v{outcome['version']} is served ({outcome['status']})")
    return outcome


# --- registry promotions: MLflow webhook -> Airflow plugin -> deploy_model ------------------------

WEBHOOK_NAME = "airflow-registry-events"
WEBHOOK_EVENTS = ["model_version_alias.created"]
WEBHOOK_PATH = "/registry-events/mlflow-webhook"


def _secret_file(path: Path, make: Any) -> str:
    """Read a generated secret, creating it (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(make())
    return path.read_text().strip()


def webhook_secret(state: Path) -> str:
    """The HMAC secret MLflow signs webhooks with and the plugin checks them with."""
    return _secret_file(state / "webhook-secret", lambda: secrets.token_urlsafe(32))


def mlflow_webhook_env(state: Path) -> dict[str, str]:
    """Environment of an MLflow server that may deliver webhooks to this machine.

    MLflow refuses http:// and private/loopback webhook URLs unless told otherwise, and encrypts
    stored webhook secrets with a key that must survive restarts (a random one per process
    otherwise, and stored secrets become unreadable).
    """
    key = _secret_file(
        state / "mlflow" / "webhook-encryption.key",
        lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),  # a Fernet key
    )
    return {
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key,
    }


def register_mlflow_webhook(mlflow_url: str, url: str, secret: str) -> dict[str, Any]:
    """Create or update (idempotent, by name) the MLflow webhook that feeds deploy_model.

    Ends with MLflow's own test delivery (a signed example event, which the plugin answers
    with "ignored"), so a wrong URL or secret shows up now rather than at the first promotion.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    existing = [hook for hook in client.list_webhooks(max_results=100) if hook.name == WEBHOOK_NAME]
    if existing:
        hook = client.update_webhook(
            existing[0].webhook_id, url=url, events=WEBHOOK_EVENTS, secret=secret, status="ACTIVE"
        )
        for duplicate in existing[1:]:
            client.delete_webhook(duplicate.webhook_id)
    else:
        hook = client.create_webhook(
            name=WEBHOOK_NAME,
            url=url,
            events=WEBHOOK_EVENTS,
            secret=secret,
            description="Alias moves -> Airflow registry_events plugin -> deploy_model",
        )
    test = client.test_webhook(hook.webhook_id)
    return {
        "webhook_id": hook.webhook_id,
        "url": url,
        "test_ok": bool(test.success),
        "test_status": test.response_status,
        "test_body": (test.response_body or test.error_message or "")[:300],
    }


def _enable_promotions(secret: str) -> None:
    url = f"{AIRFLOW_URL}{WEBHOOK_PATH}"
    try:
        result = register_mlflow_webhook(MLFLOW_URL, url, secret)
    except Exception as exc:  # e.g. an MLflow server started earlier without the webhook env
        say(
            f"could not register the MLflow webhook ({exc.__class__.__name__}: {exc}); "
            "promotions in the MLflow UI will not deploy until `make stop && make run`"
        )
        return
    if result["test_ok"]:
        say(f"MLflow webhook -> {url} (test delivery answered {result['test_status']})")
    else:
        say(
            f"MLflow webhook -> {url} registered, but its test delivery failed "
            f"({result['test_status']}: {result['test_body']})"
        )


def down() -> None:
    env = stack_env()
    # Model servers and the local front proxy run in their own sessions (they outlive tasks).
    # The local target keeps what it serves on disk: `make run` serves it again.
    subprocess.run([sys.executable, "-m", "serving.deploy", "stop"], env=env, cwd=ROOT, check=False)
    for name in ("airflow", "mlflow"):
        _stop_group(name)


def status() -> None:
    for name in ("mlflow", "airflow"):
        pid = _pid(name)
        say(f"{name}: {'running, pid ' + str(pid) if pid else 'stopped'}")
    subprocess.run([sys.executable, "-m", "serving.deploy", "status"], env=stack_env(), check=False)


# --- a pipeline run ------------------------------------------------------------------------


def _airflow_password() -> str:
    path = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(1)
    return json.loads(path.read_text())["admin"]


def _api() -> httpx.Client:
    password = _airflow_password()
    token = httpx.post(
        f"{AIRFLOW_URL}/auth/token",
        json={"username": "admin", "password": password},
        timeout=30,
    )
    token.raise_for_status()
    return httpx.Client(
        base_url=f"{AIRFLOW_URL}/api/v2",
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        timeout=30,
    )


def _wait_for_dag(api: httpx.Client, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = api.get(f"/dags/{DAG_ID}")
        if response.status_code == 200:
            return response.json()
        time.sleep(2)
    errors = api.get("/importErrors").json()
    raise SystemExit(f"{DAG_ID} was not parsed in {timeout_s:.0f}s; import errors: {errors}")


def run(conf: dict) -> int:
    os.environ.update({k: v for k, v in stack_env().items() if k.startswith("PIPELINE_")})
    restore_champion()
    api = _api()
    dag = _wait_for_dag(api)
    if dag["is_paused"]:
        api.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        say(f"unpaused {DAG_ID} (nightly schedule {dag.get('timetable_summary')})")
    response = api.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
    response.raise_for_status()
    run_id = response.json()["dag_run_id"]
    say(f"triggered {DAG_ID} run {run_id}; follow it at {AIRFLOW_URL}/dags/{DAG_ID}")
    state, tasks = _follow(api, run_id)
    return _report(state, tasks, run_id)


def _follow(api: httpx.Client, run_id: str, timeout_s: float = 3600) -> tuple[str, dict]:
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    state = "queued"
    while time.monotonic() < deadline:
        state = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        instances = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()
        # In the order things happened; tasks not started yet (skipped ones) come last.
        ordered = sorted(
            instances["task_instances"],
            key=lambda ti: (ti["start_date"] is None, ti["start_date"] or "", ti["task_id"]),
        )
        for ti in ordered:
            if ti["state"] and seen.get(ti["task_id"]) != ti["state"]:
                seen[ti["task_id"]] = ti["state"]
                say(f"  {ti['task_id']:<18} {ti['state']}")
        if state in ("success", "failed"):
            return state, seen
        time.sleep(3)
    raise SystemExit(f"run {run_id} did not finish in {timeout_s:.0f}s (state {state})")


def _report(state: str, tasks: dict[str, str], run_id: str) -> int:
    print()
    say(f"run {run_id}: {state}")
    print(f"  Airflow UI : {AIRFLOW_URL}  (login admin / {_airflow_password()})")
    print(f"  MLflow UI  : {MLFLOW_URL}")
    if state != "success":
        failed = [t for t, s in tasks.items() if s in ("failed", "upstream_failed")]
        print(f"  failed tasks: {', '.join(failed)}; logs in the Airflow UI or {AIRFLOW_HOME}/logs")
        return 1
    if tasks.get("not_deployed") == "success":
        print("  The gate rejected the new version: not deployed (see the gate task's log).")
    endpoint = f"http://{HOST}:{os.environ.get('PIPELINE_DEPLOY_LOCAL_PORT', '5001')}"
    if tasks.get("rollout_local") == "success" or tasks.get("not_deployed") == "success":
        _print_prediction(endpoint)
    return 0


def _print_prediction(endpoint: str) -> None:
    import mlflow
    from mlflow.models import Model

    from ml.settings import RegistrySettings

    mlflow.set_tracking_uri(MLFLOW_URL)
    registry = RegistrySettings()
    uri = f"models:/{registry.model_name}@{registry.champion_alias}"
    try:
        example = Model.load(uri).load_input_example()
    except Exception as exc:  # no champion yet (first run rejected)
        print(f"  No @{registry.champion_alias} model to call yet ({exc.__class__.__name__}).")
        return
    body = json.dumps({"dataframe_split": example.head(1).to_dict(orient="split", index=False)})
    answer = httpx.post(
        f"{endpoint}/invocations",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    print(f"  Model      : {endpoint}/invocations  (serves {uri})")
    print("  Try it:")
    print(f"    curl -s {endpoint}/invocations -H 'Content-Type: application/json' \\")
    print(f"      -d '{body}'")
    print(f"    -> {answer.status_code} {answer.text.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--conf", default="{}", help="JSON conf (Params) for the run")
    args = parser.parse_args()
    if args.command == "up":
        up()
    elif args.command == "down":
        down()
    elif args.command == "status":
        status()
    else:
        return run(json.loads(args.conf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
