"""The embedded local stack: MLflow server + Airflow standalone + the local model endpoint.

    python scripts/stack.py up       start what is not running yet (reuses what is)
    python scripts/stack.py run      trigger train_and_deploy, follow it, print where things are
    python scripts/stack.py down     stop every process of the stack, whoever started it
    python scripts/stack.py status   what is running
    python scripts/stack.py resume   serve again what the local target served before a stop

All state lives under .local/ (or $PIPELINE_STATE_DIR), its owner's only (umask 077). `up`,
`run`, `resume` and `down` take turns on .local/stack.lock; `down` first stops an `up` or `run`
in progress. Every process the stack starts carries PIPELINE_STACK_STATE=<state dir> in its
environment, and so does what those start: `down` finds them all (scripts/stacklib/processes.py).
PIPELINE_DB=postgres: Airflow and MLflow on PostgreSQL (the stack's own server, or the databases
PIPELINE_AIRFLOW_DB_URL / PIPELINE_MLFLOW_DB_URL name). Prometheus runs when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's scripts, ml and serving first
from scripts.stacklib import api as api  # noqa: E402  (tests set its retry wait)
from scripts.stacklib import distributed as dist  # noqa: E402
from scripts.stacklib import processes as procs  # noqa: E402
from scripts.stacklib import prometheus as prom  # noqa: E402
from scripts.stacklib.airflow_api import Airflow, airflow_password, trigger_and_follow  # noqa: E402
from scripts.stacklib.airflow_api import rollout_pool as _rollout_pool  # noqa: E402
from scripts.stacklib.postgres import LocalPostgres, airflow_db_env, describe_db, with_psycopg  # noqa: E402
from scripts.stacklib.processes import make_private, say  # noqa: E402
from scripts.stacklib.run_summary import print_timings, report  # noqa: E402
from scripts.stacklib.run_summary import prometheus_line as prometheus_line  # noqa: E402
from scripts.stacklib.run_summary import task_timings as task_timings  # noqa: E402
from scripts.stacklib.services import Services, wait_http  # noqa: E402
from scripts.stacklib.services import stale_since_install as stale_since_install  # noqa: E402
from scripts.stacklib.webhook import WEBHOOK_PATH as WEBHOOK_PATH  # noqa: E402
from scripts.stacklib.webhook import enable_promotions, mlflow_webhook_env, webhook_secret  # noqa: E402
from scripts.stacklib.webhook import register_mlflow_webhook as register_mlflow_webhook  # noqa: E402
from serving.deploy.local import wait_for as wait_until  # noqa: E402, F401  (tests use it)

STATE = Path(os.environ.get("PIPELINE_STATE_DIR", ROOT / ".local")).resolve()
VENV_BIN = Path(sys.executable).parent
INSTALL_STAMP = VENV_BIN.parent / ".installed"  # written by `make install` (the Makefile's STAMP)
# PIPELINE_EXECUTOR=celery: the distributed shape; its services listen where its workers reach them.
SHAPE = dist.Shape(STATE) if dist.enabled() else None
HOST = SHAPE.host if SHAPE else "127.0.0.1"
MLFLOW_PORT = int(os.environ.get("MLFLOW_PORT", "5000"))
AIRFLOW_PORT = int(os.environ.get("AIRFLOW_PORT", "8080"))
MLFLOW_URL, AIRFLOW_URL = f"http://{HOST}:{MLFLOW_PORT}", f"http://{HOST}:{AIRFLOW_PORT}"
AIRFLOW_HOME = STATE / "airflow"
AIRFLOW_PASSWORDS = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
LOGS, PG_ROOT = STATE / "logs", STATE / "postgres"
PIDS = STATE / "pids"  # an older stack.py's pid files: `down` stops their process groups too
PG_PORT = int(os.environ.get("PIPELINE_PG_PORT", "15432"))
PROMETHEUS_PORT = int(os.environ.get("PROMETHEUS_PORT", "9090"))
PROMETHEUS_URL, PROMETHEUS_ROOT = f"http://{HOST}:{PROMETHEUS_PORT}", STATE / "prometheus"
PROMETHEUS_RETENTION = os.environ.get("PROMETHEUS_RETENTION", "2d")
PROMETHEUS_INTERVAL_S = int(os.environ.get("PROMETHEUS_INTERVAL_S", "10"))


def stack_env() -> dict[str, str]:
    """Environment shared by every process of the stack (and so by every Airflow task)."""
    env = dict(os.environ)
    # airflow_local_settings.py: the scheduler imports MLflow once, before it forks the
    # LocalExecutor's workers, so that tasks start with it loaded (see that file).
    path = [str(ROOT / "scripts" / "airflow_settings"), str(ROOT), env.get("PYTHONPATH", "")]
    env.update(
        {
            procs.MARKER: str(STATE),
            # `mlflow server` / `mlflow models serve` look for uvicorn on PATH.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in path if p),
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
            # Task logs: the owner's only, like the rest of the state (Airflow's default is 0o664).
            "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o600",
            "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o700",
            "AIRFLOW_CONN_MLFLOW_DEFAULT": env.get("AIRFLOW_CONN_MLFLOW_DEFAULT", MLFLOW_URL),
            # monitor_drift also scores what the model server answered, from its histograms.
            "PIPELINE_DRIFT_PROMETHEUS_URL": env.get(
                "PIPELINE_DRIFT_PROMETHEUS_URL", PROMETHEUS_URL
            ),
            # The rollout judge (shadow and canary strategies) asks it too.
            "PIPELINE_DEPLOY_PROMETHEUS_URL": env.get(
                "PIPELINE_DEPLOY_PROMETHEUS_URL", PROMETHEUS_URL
            ),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # MLflow 3 starts ~7 job-runner processes (GenAI jobs) by default; unused here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    return env | airflow_db_env(database_urls()["airflow"]) | (SHAPE.env() if SHAPE else {})


# --- where the two servers keep their data: SQLite (default) or PostgreSQL ------------------


def database_urls() -> dict[str, str | None]:
    """Airflow's metadata DB and MLflow's backend store: PIPELINE_AIRFLOW_DB_URL /
    PIPELINE_MLFLOW_DB_URL, else the stack's own PostgreSQL (PIPELINE_DB=postgres), else
    SQLite in the state dir (Airflow: None, its default file in AIRFLOW_HOME)."""
    local = local_postgres()
    sqlite = {"airflow": None, "mlflow": f"sqlite:///{STATE / 'mlflow' / 'mlflow.db'}"}
    urls: dict[str, str | None] = {}
    for name in ("airflow", "mlflow"):
        given = os.environ.get(f"PIPELINE_{name.upper()}_DB_URL")
        urls[name] = with_psycopg(given) if given else local.url(name) if local else sqlite[name]
    return urls


def local_postgres() -> LocalPostgres | None:
    """The stack's own PostgreSQL server, when PIPELINE_DB=postgres needs one."""
    kind = os.environ.get("PIPELINE_DB", "").strip().lower() or ("postgres" if SHAPE else "sqlite")
    if kind not in ("sqlite", "postgres", "postgresql"):
        raise SystemExit(f"PIPELINE_DB={kind!r}: use sqlite (the default) or postgres")
    given = [os.environ.get(f"PIPELINE_{name}_DB_URL") for name in ("AIRFLOW", "MLFLOW")]
    return None if kind == "sqlite" or all(given) else LocalPostgres(PG_ROOT, PG_PORT)


# --- processes (scripts/stacklib/services.py) of STATE, LOGS and PIDS as they are at the call ---


def _services() -> Services:
    return Services(STATE, LOGS, PIDS)


def _processes() -> dict[psutil.Process, str]:
    return _services().processes()


def _of(service: str) -> list[psutil.Process]:
    return _services().of(service)


def _start(service: str, argv: list[str], env: dict | None = None, **popen: Any):
    return _services().start(service, argv, env, **popen)


def _stop(service: str) -> None:
    _services().stop(service)


def _wait_http(url: str, what: str, timeout_s: float, alive, each=lambda: None) -> None:
    wait_http(url, what, timeout_s, alive, LOGS, each)


def _tighten_state() -> None:
    """What an older checkout left world-readable: the state dir and each folder in it 0700
    (not postgres/, which its server's user must enter), logs and secrets 0600."""
    LOGS.mkdir(parents=True, exist_ok=True)  # PostgreSQL's log goes there before any service's
    folders = [p for p in STATE.iterdir() if p.is_dir() and p != PG_ROOT]
    files = ["airflow/airflow.cfg", "airflow/airflow.db", "mlflow/mlflow.db", "webhook-secret"]
    make_private(STATE, *folders, AIRFLOW_HOME / "logs", *LOGS.glob("*"), AIRFLOW_PASSWORDS)
    make_private(*(STATE / name for name in files))


# --- services ------------------------------------------------------------------------------


def mlflow_server_argv(
    artifacts: Path | str, port: int, host: str = HOST, workers: int = 1
) -> list[str]:
    """`mlflow server` as the stack runs it; the backend store comes from the environment
    (MLFLOW_BACKEND_STORE_URI), so that a database password is not on the command line."""
    return [
        str(VENV_BIN / "mlflow"), "server", "--artifacts-destination", str(artifacts),
        "--serve-artifacts", "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def _postgres_up() -> None:
    """The stack's own PostgreSQL (initdb on first use) and its two databases."""
    pg = local_postgres()
    if pg is None:
        return
    if pg.unavailable():
        raise SystemExit(f"PIPELINE_DB=postgres: {pg.unavailable()}")
    if pg.os_user() is not None:
        os.chmod(STATE, 0o711)  # the server's user must reach .local/postgres (not list .local)
    try:
        if _of("postgres"):
            say("postgres already running")
        else:
            pg.prepare()
            pg.start(LOGS / "postgres.log", {procs.MARKER: str(STATE), procs.SERVICE: "postgres"})
            say(f"started postgres (log {LOGS / 'postgres.log'})")
        for name in ("airflow", "mlflow"):
            pg.ensure_database(name)
    except (RuntimeError, OSError) as exc:
        raise SystemExit(f"PostgreSQL: {exc}; see {LOGS / 'postgres.log'}") from None
    say(f"PostgreSQL ready at {pg.host}:{pg.port} (databases airflow, mlflow; data {pg.data})")


def _prometheus_up() -> bool:
    """Start the stack's Prometheus, or reload a running one whose config or rules changed (the
    rules: the PrometheusRule's groups, written out). The pipeline runs without it: when it
    cannot start, the stack goes on and says why."""
    binary = prom.prometheus_binary()
    if binary is None:
        say("Prometheus not started: no `prometheus` binary (scripts/install_prometheus.sh ")
        say("installs Debian's package; or set PROMETHEUS_BIN)")
        return False
    from serving.deploy.local import TARGETS_FILE
    from serving.deploy.settings import DeploySettings

    deploy, config_file = DeploySettings(), PROMETHEUS_ROOT / "prometheus.yml"
    front = f"{deploy.local_host}:{deploy.local_port}"
    rules_file = PROMETHEUS_ROOT / "rules.yml"
    config = prom.prometheus_config(
        front,
        f"{HOST}:{AIRFLOW_PORT}",
        [rules_file],
        scrape_interval_s=PROMETHEUS_INTERVAL_S,
        tracks_file=Path(deploy.local_state_dir).resolve() / TARGETS_FILE,
    )
    try:
        rules = prom.rules_yaml()
    except (OSError, ValueError) as exc:
        say(f"Prometheus not started, the stack goes on without it: {exc}")
        return False
    changed = procs.write_private_text(rules_file, rules)
    changed |= procs.write_private_text(config_file, prom.prometheus_yaml(config))
    if changed and _of("prometheus"):
        _of("prometheus")[0].send_signal(signal.SIGHUP)  # rereads prometheus.yml and the rules
        say("prometheus: its configuration or rules changed, reloaded")
    data = PROMETHEUS_ROOT / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    argv = prom.prometheus_argv(
        binary, config_file, data, PROMETHEUS_PORT, HOST, retention=PROMETHEUS_RETENTION
    )
    # Nothing of the stack's environment (secrets included) is any use to it.
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    alive = _start("prometheus", argv, env, cwd=PROMETHEUS_ROOT)
    try:
        _wait_http(f"{PROMETHEUS_URL}/-/ready", "Prometheus", 60, alive)
    except SystemExit as exc:
        say(f"Prometheus is not running, the stack goes on without it: {exc}")
        return False
    say(f"Prometheus ready at {PROMETHEUS_URL} (scrapes {front} and {AIRFLOW_URL}; {rules_file})")
    return True


def _resume_serving() -> None:
    """The local target serves again what it served before a stop: its proxy starts the
    recorded model server (waits until it answers, at most the health timeout)."""
    from serving.deploy.local import DeployError, LocalTarget
    from serving.deploy.settings import DeploySettings

    if SHAPE:  # the serving host's to do
        return SHAPE.serving_cli("resume")
    try:
        live = LocalTarget(DeploySettings(), MLFLOW_URL).resume()
    except DeployError as exc:
        return say(f"local target did not resume: {exc}")
    if live.version:
        state = "answering" if live.healthy else f"NOT answering ({live.detail})"
        say(f"local target: version {live.version} {state}")


def up() -> None:
    with procs.stack_lock(STATE, "up"):
        _tighten_state()
        if SHAPE:  # first: it says what the machine lacks before anything starts
            SHAPE.up(_start, _wait_http)
        _postgres_up()
        # Registry promotions: MLflow delivers webhooks to the Airflow API server, both sides
        # share a secret (.local/webhook-secret unless PIPELINE_WEBHOOK_SECRET is set).
        secret = os.environ.get("PIPELINE_WEBHOOK_SECRET") or webhook_secret(STATE)
        os.environ.update({**mlflow_webhook_env(STATE), "PIPELINE_WEBHOOK_SECRET": secret})
        urls = database_urls()
        say(
            "databases: "
            + ", ".join(
                f"{name} on {describe_db(u, str(AIRFLOW_HOME / 'airflow.db'))}"
                for name, u in urls.items()
            )
        )
        (STATE / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        argv = mlflow_server_argv(
            SHAPE.artifacts if SHAPE else STATE / "mlflow/artifacts", MLFLOW_PORT
        )
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": str(urls["mlflow"])}
        alive = _start("mlflow", argv, env | (SHAPE.store.client_env() if SHAPE else {}))
        # A first start on PostgreSQL creates MLflow's schema (a few dozen migrations).
        _wait_http(f"{MLFLOW_URL}/health", "MLflow server", 240, alive)
        say(f"MLflow ready at {MLFLOW_URL}")
        if stale_since_install(next(iter(_of("airflow")), None), INSTALL_STAMP):
            say("airflow started before the venv was reinstalled (its scheduler preloads MLflow):")
            say("restarting it, so that its tasks run what is installed now")
            _stop("airflow")
        AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
        if SHAPE:
            alive = SHAPE.airflow_up(_start, dict(os.environ), VENV_BIN / "airflow")
        else:
            alive = _start("airflow", [str(VENV_BIN / "airflow"), "standalone"])
        # While Airflow boots: the local target serves again, and Prometheus scrapes it.
        _resume_serving()
        _prometheus_up()
        protect = lambda: make_private(AIRFLOW_PASSWORDS)  # noqa: E731
        _wait_http(f"{AIRFLOW_URL}/api/v2/monitor/health", "Airflow", 300, alive, protect)
        protect()
        say(f"Airflow ready at {AIRFLOW_URL}")
        _rollout_pool(_airflow())
        enable_promotions(MLFLOW_URL, AIRFLOW_URL, secret)


def resume() -> None:
    with procs.stack_lock(STATE, "resume"):
        _resume_serving()


def down() -> None:
    with procs.stack_lock(STATE, "down", interrupt=True):
        stopped = procs.stop_all(_processes)
        for line in stopped:
            say(f"stopped {line}")
        for pidfile in PIDS.glob("*.pid"):
            pidfile.unlink()
        say("stopped the stack" if stopped else f"nothing of the stack of {STATE} was running")
        dist.Network(STATE).down()  # the worker hosts' namespaces, if a celery stack made them
    from serving.deploy.settings import DeploySettings

    with socket.socket() as sock:
        if sock.connect_ex((HOST, port := DeploySettings().local_port)) == 0:
            say(f"port {port} is still taken, by a process outside the stack of {STATE}")


def status() -> None:
    if holder := procs.lock_holder(STATE):
        say(f"the stack lock is held by {holder}")
    for name in ("postgres", "mlflow", "airflow", "prometheus", *(dist.SERVICES if SHAPE else ())):
        found = _of(name)
        if found or name != "postgres" or (PG_ROOT / "data").exists():
            say(
                f"{name}: running, pid {found[0].pid} (+{len(found) - 1})"
                if found
                else f"{name}: stopped"
            )
        for line in (
            prom.prometheus_targets(PROMETHEUS_URL) if found and name == "prometheus" else []
        ):
            say(f"  {line}")
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    live = LocalTarget(DeploySettings(), MLFLOW_URL).status()
    if live is None:
        return say("local target: nothing deployed")
    health = "answering" if live["healthy"] else "NOT answering"
    say(f"local target: version {live['version']} at {live['endpoint']}, {health}")
    say(f"  slot port {live['port']}, pid {live.get('pid')}, restarts {live.get('restarts', 0)}")


# --- Airflow's REST API, a pipeline run -----------------------------------------------------


def _airflow_password() -> str:
    return airflow_password(AIRFLOW_PASSWORDS)


def _airflow() -> Airflow:
    return Airflow(AIRFLOW_URL, _airflow_password())


RESTORE = {"kind": "champion", "reason": "make run: serve @champion before the new run"}


def restore_champion(tracking_uri: str = MLFLOW_URL) -> dict[str, Any] | None:
    """Serve what @champion names, through the rollout path, before a new run starts: usually
    "unchanged" in seconds (the resumed target serves it); after a lost state folder, or a
    promotion the stack missed, it deploys."""
    from ml.settings import RegistrySettings
    from serving.deploy.rollout import run_request
    from serving.deploy.settings import DeploySettings
    from serving.deploy.target import RequestRejected, RolloutError, TargetRejected, Verdict

    try:
        outcome = run_request(
            RESTORE, DeploySettings(), RegistrySettings(), tracking_uri=tracking_uri
        )
    # Every way a rollout ends without serving: a verdict (tagged; reconcile and the run's
    # own rollout decide again), a refusal or a fault. The run starts all the same.
    except (Verdict, RequestRejected, TargetRejected, RolloutError) as exc:
        return say(f"could not restore @champion: {exc}")
    if outcome["status"] != "skipped":
        say(f"@champion v{outcome['version']} is served ({outcome['status']})")
    return outcome


def run(conf: dict) -> int:
    with procs.stack_lock(STATE, "run"):
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a summary, not bars
        restore = json.dumps(RESTORE)  # on the serving host, with the celery stack
        SHAPE.serving_cli("rollout", "--request", restore) if SHAPE else restore_champion()
        password = _airflow_password()
        api = Airflow(AIRFLOW_URL, password)
        run_id, seen = trigger_and_follow(api, conf, AIRFLOW_URL)
        print_timings(api, run_id)
        return report(
            api,
            api.run(run_id)["state"],
            seen,
            run_id,
            airflow_url=AIRFLOW_URL,
            mlflow_url=MLFLOW_URL,
            password=password,
            prometheus_url=PROMETHEUS_URL if _of("prometheus") else None,
            task_logs=AIRFLOW_HOME / "logs",
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("up", "down", "status", "resume"):
        sub.add_parser(command)
    sub.add_parser("run").add_argument("--conf", default="{}", help="JSON conf (Params)")
    args = parser.parse_args()
    # `down` stops a starting `up` or a running `run` with SIGTERM: say so, and end (its lock
    # goes with the process; an exception could be caught on the way, a wait goes on).
    signal.signal(
        signal.SIGTERM, lambda *_: (say("stopped (SIGTERM, e.g. make stop)"), os._exit(143))
    )
    os.umask(procs.PRIVATE_UMASK)  # what the stack and its processes write is the owner's only
    os.environ.update(stack_env())  # and so also what is started from this process
    if args.command == "run":
        return run(json.loads(args.conf))
    {"up": up, "down": down, "status": status, "resume": resume}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
