"""The embedded local stack: MLflow server + Airflow standalone + the local model endpoint.

    python scripts/stack.py up       start what is not running yet (reuses what is)
    python scripts/stack.py run      trigger train_and_deploy, follow it, print where things are
    python scripts/stack.py down     stop every process the stack started, children included
    python scripts/stack.py status   what is running

All state lives under .local/ (or $PIPELINE_STATE_DIR): SQLite databases, MLflow artifacts,
Airflow home, data partitions, logs and pid files. Each service runs in its own process group
so that `down` stops its children too (Airflow standalone forks a scheduler, a DAG processor,
a triggerer, an API server and LocalExecutor workers).

PIPELINE_DB=postgres puts Airflow's metadata DB and MLflow's backend store on PostgreSQL: a
private server (data directory, unix socket and generated passwords under .local/postgres/,
port $PIPELINE_PG_PORT, default 15432) with one database and one login role for each, or
an existing server named by PIPELINE_AIRFLOW_DB_URL / PIPELINE_MLFLOW_DB_URL.

A Prometheus (Debian's /usr/bin/prometheus, or $PROMETHEUS_BIN) runs next to them on
127.0.0.1:$PROMETHEUS_PORT (default 9090), data under .local/prometheus/, with a generated
prometheus.yml: it scrapes the live model server through the local front port (job
model-server), the Airflow plugin's registry and drift exporter (job registry), and evaluates
docker/prometheus/rules.yml. Without the binary the stack runs without it (and says so).

What the stack writes is readable by its owner only (umask 077: logs, pid files, the generated
Airflow admin password, secrets); `run` prints the admin password once.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

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
AIRFLOW_SETTINGS_DIR = ROOT / "scripts" / "airflow_settings"
PIDS = STATE / "pids"
LOGS = STATE / "logs"
AIRFLOW_PASSWORDS = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
# What the stack's processes create is their owner's only (0600 files, 0700 directories).
PRIVATE_UMASK = 0o077
PG_ROOT = STATE / "postgres"
PG_PORT = int(os.environ.get("PIPELINE_PG_PORT", "15432"))
PROMETHEUS_PORT = int(os.environ.get("PROMETHEUS_PORT", "9090"))
PROMETHEUS_URL = f"http://{HOST}:{PROMETHEUS_PORT}"
PROMETHEUS_ROOT = STATE / "prometheus"
# How long the local Prometheus keeps samples (a laptop's stack, not an archive).
PROMETHEUS_RETENTION = os.environ.get("PROMETHEUS_RETENTION", "2d")
# Scrape and rule evaluation interval (seconds).
PROMETHEUS_INTERVAL_S = int(os.environ.get("PROMETHEUS_INTERVAL_S", "10"))
# The project's alert rules (serving.deploy.manifests.RULES_FILE), evaluated by that Prometheus.
PROMETHEUS_RULES = ROOT / "docker" / "prometheus" / "rules.yml"
# Where the Airflow plugin's exporter answers (plugins/registry_events: URL_PREFIX + /metrics).
REGISTRY_METRICS_PATH = "/registry-events/metrics"


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
            # airflow_local_settings.py: the scheduler imports MLflow once, before it forks the
            # LocalExecutor's workers, so tasks start with it loaded (see that file).
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(AIRFLOW_SETTINGS_DIR), env.get("PYTHONPATH", "")) if p
            ),
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
            # monitor_drift also scores what the model server answered, from the stack's own
            # Prometheus (its histograms; not scored while Prometheus does not answer).
            "PIPELINE_DRIFT_PROMETHEUS_URL": env.get(
                "PIPELINE_DRIFT_PROMETHEUS_URL", PROMETHEUS_URL
            ),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # MLflow 3 starts ~7 job-runner processes (GenAI jobs) by default; unused here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    env.update(airflow_db_env(database_urls()["airflow"]))
    return env


def airflow_db_env(url: str | None) -> dict[str, str]:
    """Airflow's settings for its metadata DB at ``url`` (None: its default, SQLite in
    AIRFLOW_HOME). On PostgreSQL, Airflow's async engine gets the same psycopg 3 URL (SQLAlchemy
    picks psycopg's async mode for it); derived, it would ask for asyncpg, which is not here."""
    if url is None:
        return {}
    env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    if url.startswith("postgresql+psycopg://"):
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = url
    return env


# --- where the two servers keep their data: SQLite (default) or PostgreSQL ------------------


def db_kind() -> str:
    """``sqlite`` (the default) or ``postgres``, from PIPELINE_DB."""
    kind = os.environ.get("PIPELINE_DB", "").strip().lower() or "sqlite"
    if kind == "postgresql":
        kind = "postgres"
    if kind not in ("sqlite", "postgres"):
        raise SystemExit(f"PIPELINE_DB={kind!r}: use sqlite (the default) or postgres")
    return kind


def with_psycopg(url: str) -> str:
    """A PostgreSQL URL with the installed driver (psycopg 3): SQLAlchemy would pick psycopg2
    for a bare ``postgresql://``, and that is not installed."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def database_urls() -> dict[str, str | None]:
    """Airflow's metadata DB and MLflow's backend store, as SQLAlchemy URLs.

    PIPELINE_AIRFLOW_DB_URL / PIPELINE_MLFLOW_DB_URL name an existing database; otherwise
    PIPELINE_DB=postgres means the stack's own server, and the default is SQLite under the
    state dir (Airflow: None, its default file in AIRFLOW_HOME).
    """
    given = {
        "airflow": os.environ.get("PIPELINE_AIRFLOW_DB_URL"),
        "mlflow": os.environ.get("PIPELINE_MLFLOW_DB_URL"),
    }
    local = local_postgres()
    urls: dict[str, str | None] = {}
    for name, url in given.items():
        if url:
            urls[name] = with_psycopg(url)
        elif local is not None:
            urls[name] = local.url(name)
        else:
            urls[name] = (
                None if name == "airflow" else f"sqlite:///{STATE / 'mlflow' / 'mlflow.db'}"
            )
    return urls


def local_postgres() -> LocalPostgres | None:
    """The stack's own PostgreSQL server, when PIPELINE_DB=postgres needs one."""
    if db_kind() != "postgres":
        return None
    if os.environ.get("PIPELINE_AIRFLOW_DB_URL") and os.environ.get("PIPELINE_MLFLOW_DB_URL"):
        return None  # both on an existing server
    return LocalPostgres(PG_ROOT, PG_PORT)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


class LocalPostgres:
    """A private PostgreSQL server: data directory, unix socket and passwords under ``root``.

    It runs as the ``postgres`` system user when started by root (PostgreSQL refuses to run as
    root; the Debian package creates that user), as the current user otherwise. It listens on
    ``host:port`` (password auth, SCRAM) and on a socket in ``root/run``. Each client gets its
    own database and login role of the same name, with a generated password in a 0600 file
    under ``root/secrets`` (so is the superuser's).
    """

    SUPERUSER = "postgres"

    def __init__(
        self,
        root: Path,
        port: int,
        host: str = HOST,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.port = port
        self.host = host
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.secrets = self.root / "secrets"
        # Server settings (-c name=value) on top of the defaults below.
        self.settings = {"max_connections": "200", **(settings or {})}

    # -- what it needs --------------------------------------------------------------------

    @staticmethod
    def bin_dir() -> Path | None:
        """Where initdb, postgres and pg_ctl are: $PIPELINE_PG_BIN_DIR, the newest Debian
        /usr/lib/postgresql/<major>/bin, or next to a `postgres` on PATH."""
        configured = os.environ.get("PIPELINE_PG_BIN_DIR")
        if configured:
            candidates = [Path(configured)]
        else:
            candidates = sorted(
                Path("/usr/lib/postgresql").glob("*/bin"),
                key=lambda path: _version_key(path.parent.name),
                reverse=True,
            )
            on_path = shutil.which("postgres")
            if on_path:
                candidates.append(Path(on_path).parent)
        for candidate in candidates:
            if all(
                os.access(candidate / tool, os.X_OK) for tool in ("initdb", "postgres", "pg_ctl")
            ):
                return candidate
        return None

    @staticmethod
    def os_user() -> pwd.struct_passwd | None:
        """The user the server runs as: ``postgres`` when we are root, else None (ourselves).
        Raises KeyError when root and there is no such user."""
        if os.geteuid() != 0:
            return None
        return pwd.getpwnam(os.environ.get("PIPELINE_PG_OS_USER", "postgres"))

    @classmethod
    def unavailable(cls) -> str | None:
        """Why a server cannot be started on this machine, or None when it can."""
        if cls.bin_dir() is None:
            return (
                "no PostgreSQL server binaries (initdb, postgres, pg_ctl) under "
                "/usr/lib/postgresql/*/bin or on PATH: run scripts/install_postgres.sh "
                "(apt-get install postgresql)"
            )
        try:
            cls.os_user()
        except KeyError:
            return (
                "running as root and there is no `postgres` system user to run PostgreSQL as "
                "(it refuses to run as root); `apt-get install postgresql` creates it"
            )
        return None

    def _bin(self, tool: str) -> str:
        found = self.bin_dir()
        if found is None:
            raise SystemExit(f"PostgreSQL: {self.unavailable()}")
        return str(found / tool)

    def popen_kwargs(self) -> dict[str, Any]:
        """How to run its programs: as the server's user, in ``root``, with a small env."""
        kwargs: dict[str, Any] = {
            "cwd": self.root,
            "env": {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"},
            "umask": PRIVATE_UMASK,
        }
        user = self.os_user()
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        return kwargs

    # -- passwords and URLs --------------------------------------------------------------

    def password(self, role: str) -> str:
        return _secret_file(self.secrets / f"{role}.password", lambda: secrets.token_urlsafe(24))

    def url(self, name: str) -> str:
        """SQLAlchemy URL of database ``name`` as its own role (psycopg 3 driver)."""
        return (
            f"postgresql+psycopg://{quote(name, safe='')}:{quote(self.password(name), safe='')}"
            f"@{self.host}:{self.port}/{quote(name, safe='')}"
        )

    # -- life cycle ----------------------------------------------------------------------

    def prepare(self) -> None:
        """Directories owned by the server's user, reachable by it; initdb on first use."""
        user = self.os_user()
        self.root.mkdir(parents=True, exist_ok=True)
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        for path in (self.data, self.sockets):
            path.mkdir(mode=0o700, exist_ok=True)
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
            os.chmod(path, 0o700)
        if user is not None:
            os.chmod(self.root, 0o711)  # it may enter, not list (secrets/ stays ours)
            _check_reachable(self.root, user)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        user = self.os_user()
        # The superuser's password, in a file the server's user can read, only during initdb.
        pwfile = self.root / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password(self.SUPERUSER) + "\n")
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            result = subprocess.run(
                [
                    self._bin("initdb"),
                    "--pgdata",
                    str(self.data),
                    "--username",
                    self.SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth",
                    "scram-sha-256",
                    "--encoding",
                    "UTF8",
                    "--no-locale",
                ],
                capture_output=True,
                text=True,
                check=False,
                **self.popen_kwargs(),
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb {self.data} failed ({result.returncode}); remove that directory to "
                f"start over:\n{(result.stdout + result.stderr)[-2000:]}"
            )

    def server_argv(self) -> list[str]:
        """The server in the foreground (its process group is what the stack stops)."""
        argv = [
            self._bin("postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"unix_socket_directories={self.sockets}",
        ]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _connect(self, dbname: str = "postgres", timeout_s: int = 5) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.SUPERUSER,
            password=self.password(self.SUPERUSER),
            dbname=dbname,
            connect_timeout=timeout_s,
            autocommit=True,
        )

    def wait_ready(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Until the superuser can log in; RuntimeError if the server died or took too long."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self._connect(timeout_s=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                error = exc
            if not alive():
                raise RuntimeError(f"PostgreSQL exited during start-up ({error})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not accept logins in {timeout_s:.0f}s: {error}")
            time.sleep(0.5)

    def ensure_database(self, name: str) -> str:
        """Role ``name`` (password from its secret file, set again on every call) owning
        database ``name``; returns its URL."""
        from psycopg import sql

        with self._connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            conn.execute(
                sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                    sql.SQL("ALTER" if exists else "CREATE"),
                    sql.Identifier(name),
                    sql.Literal(self.password(name)),
                )
            )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(name)
                    )
                )
        return self.url(name)

    def stop(self, timeout_s: int = 60) -> None:
        """Fast shutdown (`pg_ctl stop -m fast`): sessions are ended, then a checkpoint."""
        if not (self.data / "postmaster.pid").exists():
            return
        subprocess.run(
            [
                self._bin("pg_ctl"),
                "stop",
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "-t",
                f"{timeout_s}",
            ],
            capture_output=True,
            check=False,
            **self.popen_kwargs(),
        )


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """``user`` may enter ``path`` and every directory above it, or PermissionError saying
    where not."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise PermissionError(
                f"PostgreSQL runs as {user.pw_name}, which cannot enter {directory} "
                f"(mode {stat.S_IMODE(st.st_mode):o}): `chmod o+x {directory}`, or set "
                "PIPELINE_STATE_DIR to a directory it can reach"
            )


# --- process groups ------------------------------------------------------------------------


def _pid(name: str) -> int | None:
    """The pid of a service we started, if that process is still there (not a zombie)."""
    from serving.deploy.local import process_is

    try:
        pid = int((PIDS / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if process_is(pid) else None


# Written by `make install` (the Makefile's STAMP) each time the venv is (re)installed.
INSTALL_STAMP = VENV_BIN.parent / ".installed"


def stale_since_install(name: str, stamp: Path = INSTALL_STAMP) -> bool:
    """Whether the running service ``name`` started before the venv was last installed.

    Airflow's scheduler imports MLflow before it forks the LocalExecutor's task processes
    (scripts/airflow_settings): after a reinstall they would run the old MLflow from memory
    against the new files on disk. Such a service is restarted by ``up``.
    """
    import psutil

    pid = _pid(name)
    if pid is None:
        return False
    try:
        installed = stamp.stat().st_mtime
        started = psutil.Process(pid).create_time()
    except (OSError, psutil.Error):
        return False
    return installed > started


def open_private(path: Path, mode: str = "ab") -> IO[Any]:
    """Open ``path`` (created if missing) readable and writable by its owner only: 0600, also
    when it existed with a wider mode (the Airflow log holds the admin password)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def make_private(*paths: Path) -> None:
    """chmod what exists of ``paths``: files 0600, directories 0700 (not recursive)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def _tighten_state() -> None:
    """State written before the stack made its files private (0644 logs, password file).

    Every folder directly under the state dir becomes 0700 (task logs, model-server logs and
    data below them with it), except the PostgreSQL folder, which its server's user must reach:
    with PIPELINE_DB=postgres the state dir itself is 0711 (entered, not listed).
    """
    folders = [p for p in STATE.iterdir() if p.is_dir() and p != PG_ROOT] if STATE.is_dir() else []
    make_private(
        STATE,
        *folders,
        LOGS,
        PIDS,
        AIRFLOW_HOME,
        AIRFLOW_HOME / "logs",
        STATE / "mlflow",
        *(LOGS.glob("*") if LOGS.is_dir() else ()),
        *(PIDS.glob("*") if PIDS.is_dir() else ()),
        AIRFLOW_PASSWORDS,
        AIRFLOW_HOME / "airflow.cfg",
        AIRFLOW_HOME / "airflow.db",
        STATE / "mlflow" / "mlflow.db",
        STATE / "webhook-secret",
    )


def spawn(argv: list[str], env: dict[str, str], log: Path, **popen: Any) -> subprocess.Popen:
    """Start ``argv`` in its own session (so it stops as a group), output appended to ``log``
    (0600), with umask 077 so that what it writes is private too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    popen.setdefault("cwd", ROOT)
    popen.setdefault("umask", PRIVATE_UMASK)
    with open_private(log) as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            argv,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **popen,
        )


def _start(name: str, argv: list[str], env: dict[str, str], **popen: Any) -> int:
    PIDS.mkdir(parents=True, exist_ok=True)
    proc = spawn(argv, env, LOGS / f"{name}.log", **popen)
    with open_private(PIDS / f"{name}.pid", "w") as fh:
        fh.write(str(proc.pid))
    say(f"started {name} (pid {proc.pid}, log {LOGS / f'{name}.log'})")
    return proc.pid


def _recorded_pid(name: str) -> int | None:
    try:
        return int((PIDS / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _leftovers(leader: int) -> list[Any]:
    """Live processes still in the session and process group ``leader`` started (each
    service's own: start_new_session), once ``leader`` itself is gone."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == leader:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if (
                os.getpgid(proc.pid) == leader
                and os.getsid(proc.pid) == leader
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
    return found


def _stop_group(name: str, grace_s: float = 20.0) -> None:
    """SIGTERM the service's whole process group and every child (Airflow's scheduler and
    workers, MLflow's uvicorn worker), wait, then SIGKILL what is left.

    Also when the process we started is already gone (killed by its pid alone, or crashed):
    its children may still hold the port (MLflow's uvicorn worker did), so what is left of
    its group is stopped too.
    """
    import psutil

    from serving.deploy.local import stop_group

    pid = _pid(name)
    if pid is not None:
        stop_group(pid, timeout_s=grace_s)
        say(f"stopped {name}")
    recorded = _recorded_pid(name)
    left = _leftovers(recorded) if recorded is not None else []
    if left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(recorded, signal.SIGTERM)
        _, alive = psutil.wait_procs(left, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        say(f"stopped what was left of {name}'s process group (pids {[p.pid for p in left]})")
    (PIDS / f"{name}.pid").unlink(missing_ok=True)


def _wait_http(
    url: str, what: str, timeout_s: float, pid_name: str, each: Callable[[], None] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if each is not None:
            each()
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


def mlflow_server_argv(artifacts: Path, port: int, host: str = HOST, workers: int = 1) -> list[str]:
    """`mlflow server` as the stack runs it. The backend store comes from the environment
    (MLFLOW_BACKEND_STORE_URI), so that a database password is not on the command line."""
    return [
        str(VENV_BIN / "mlflow"),
        "server",
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def _postgres_up() -> None:
    """Start the stack's own PostgreSQL (initdb on first use) and its two databases."""
    pg = local_postgres()
    if pg is None:
        return
    reason = pg.unavailable()
    if reason is not None:
        raise SystemExit(f"PIPELINE_DB=postgres: {reason}")
    if pg.os_user() is not None:
        os.chmod(STATE, 0o711)  # the server's user must reach .local/postgres (not list .local)
    try:
        if _pid("postgres") is None:
            _stop_group("postgres")
            pg.prepare()
            popen = pg.popen_kwargs()
            _start("postgres", pg.server_argv(), popen.pop("env"), **popen)
        else:
            say("postgres already running")
        pg.wait_ready(60, alive=lambda: _pid("postgres") is not None)
        for name in ("airflow", "mlflow"):
            pg.ensure_database(name)
    except (RuntimeError, PermissionError) as exc:
        raise SystemExit(f"PostgreSQL: {exc}; see {LOGS / 'postgres.log'}") from None
    say(f"PostgreSQL ready at {pg.host}:{pg.port} (databases airflow, mlflow; data {pg.data})")


# --- Prometheus ----------------------------------------------------------------------------

MODEL_SERVER_JOB = "model-server"  # the job the alert rules select (docs/operations.md, Alerts)
REGISTRY_JOB = "registry"


def _seconds(value: int) -> str:
    return f"{int(value)}s"


def prometheus_config(
    model_server: str,
    registry: str,
    rule_files: list[Path] | tuple[Path, ...] = (PROMETHEUS_RULES,),
    *,
    scrape_interval_s: int = 10,
    registry_metrics_path: str = REGISTRY_METRICS_PATH,
) -> dict[str, Any]:
    """The local Prometheus' configuration (pure; :func:`prometheus_yaml` writes it).

    ``model_server`` is ``host:port`` of the live model server as its clients reach it: the
    local target's front port, and only that. Each blue/green slot is down between rollouts,
    and a slot scraped as job ``model-server`` would fire ModelServerDown. ``registry`` is
    ``host:port`` of the Airflow API server, whose registry_events plugin exports the alias and
    drift gauges at ``registry_metrics_path``. ``rule_files`` must be absolute paths (a
    relative one would be read relative to the config file's folder, under the state dir).
    """
    if scrape_interval_s < 1:
        raise ValueError(f"scrape interval of {scrape_interval_s}s: at least 1s")
    relative = [str(path) for path in rule_files if not Path(path).is_absolute()]
    if relative:
        raise ValueError(f"rule files must be absolute paths: {relative}")
    interval = _seconds(scrape_interval_s)
    return {
        "global": {
            "scrape_interval": interval,
            # At most the interval (Prometheus refuses a longer one), at most 10 s.
            "scrape_timeout": _seconds(min(scrape_interval_s, 10)),
            "evaluation_interval": interval,
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": MODEL_SERVER_JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [model_server]}],
            },
            {
                "job_name": REGISTRY_JOB,
                "metrics_path": registry_metrics_path,
                "static_configs": [{"targets": [registry]}],
            },
        ],
    }


def prometheus_yaml(config: dict[str, Any]) -> str:
    """``config`` as prometheus.yml, with a header saying where it comes from."""
    import yaml

    header = (
        "# Generated by scripts/stack.py (prometheus_config) at every `make run`: edits are lost.\n"
        "# Jobs: model-server (the live model server, through the local front port) and registry\n"
        "# (the Airflow plugin's exporter); rule_files: the project's alert rules.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def prometheus_argv(
    binary: str,
    config_file: Path,
    data_dir: Path,
    port: int,
    host: str = HOST,
    retention: str = PROMETHEUS_RETENTION,
) -> list[str]:
    """The Prometheus server as the stack runs it: loopback only, its own data folder, short
    retention; ``--web.enable-lifecycle`` lets ``curl -X POST .../-/reload`` reread the config
    and the rule file."""
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={retention}",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
    ]


def prometheus_binary() -> str | None:
    """$PROMETHEUS_BIN, else `prometheus` on PATH (Debian's package: /usr/bin/prometheus)."""
    configured = os.environ.get("PROMETHEUS_BIN")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("prometheus")


def write_private_text(path: Path, text: str) -> bool:
    """Replace ``path`` (0600, in a 0700 folder) with ``text`` atomically; False when it
    already held exactly that."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            make_private(path)
            return False
    tmp = path.with_name(f".{path.name}.tmp")
    with open_private(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return True


def _prometheus_up() -> bool:
    """Start the stack's Prometheus (or reload a running one whose config changed). Monitoring
    is not what the pipeline needs to run: when it cannot start, the stack goes on without it
    and says why."""
    binary = prometheus_binary()
    if binary is None:
        say(
            "Prometheus not started: no `prometheus` binary (scripts/install_prometheus.sh "
            "installs Debian's package; or set PROMETHEUS_BIN)"
        )
        return False
    from serving.deploy.settings import DeploySettings

    serving = DeploySettings()
    config_file = PROMETHEUS_ROOT / "prometheus.yml"
    config = prometheus_config(
        f"{serving.local_host}:{serving.local_port}",
        f"{HOST}:{AIRFLOW_PORT}",
        scrape_interval_s=PROMETHEUS_INTERVAL_S,
    )
    changed = write_private_text(config_file, prometheus_yaml(config))
    pid = _pid("prometheus")
    if pid is None:
        _stop_group("prometheus")
        data = PROMETHEUS_ROOT / "data"
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = prometheus_argv(binary, config_file, data, PROMETHEUS_PORT)
        # Nothing of the stack's environment (secrets included) is any use to it.
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
        _start("prometheus", argv, env, cwd=PROMETHEUS_ROOT)
    elif changed:
        os.kill(pid, signal.SIGHUP)  # rereads prometheus.yml and the rule file
        say("prometheus already running: its configuration changed, reloaded")
    else:
        say("prometheus already running")
    try:
        _wait_http(f"{PROMETHEUS_URL}/-/ready", "Prometheus", 60, "prometheus")
    except SystemExit as exc:
        say(f"Prometheus is not running, the stack goes on without it: {exc}")
        return False
    say(
        f"Prometheus ready at {PROMETHEUS_URL} (jobs {MODEL_SERVER_JOB}: "
        f"{serving.local_host}:{serving.local_port}, {REGISTRY_JOB}: "
        f"{AIRFLOW_URL}{REGISTRY_METRICS_PATH}; rules {PROMETHEUS_RULES})"
    )
    return True


def prometheus_targets(url: str = PROMETHEUS_URL) -> list[dict[str, str]]:
    """The active scrape targets' job, URL, health and last error ([] when it does not answer)."""
    try:
        response = httpx.get(f"{url}/api/v1/targets", params={"state": "active"}, timeout=3)
        targets = response.json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []
    return [
        {
            "job": str(t.get("labels", {}).get("job", "")),
            "url": str(t.get("scrapeUrl", "")),
            "health": str(t.get("health", "")),
            "error": str(t.get("lastError", "")),
        }
        for t in targets
    ]


def _protect_airflow_passwords() -> None:
    """The generated admin password file, 0600 as soon as it appears."""
    make_private(AIRFLOW_PASSWORDS)


def up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    _tighten_state()
    _postgres_up()
    env = stack_env()
    # Registry promotions: MLflow may deliver webhooks to the local Airflow API server, and both
    # sides share a generated secret (.local/webhook-secret unless PIPELINE_WEBHOOK_SECRET is set).
    env.update(mlflow_webhook_env(STATE))
    secret = env.get("PIPELINE_WEBHOOK_SECRET") or webhook_secret(STATE)
    env["PIPELINE_WEBHOOK_SECRET"] = secret
    urls = database_urls()
    say("databases: " + ", ".join(f"{name} on {_describe_db(url)}" for name, url in urls.items()))
    if _pid("mlflow") is None:
        _stop_group("mlflow")  # what a crashed server left behind would hold the port
        (STATE / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        mlflow_env = {**env, "MLFLOW_BACKEND_STORE_URI": str(urls["mlflow"])}
        _start(
            "mlflow", mlflow_server_argv(STATE / "mlflow" / "artifacts", MLFLOW_PORT), mlflow_env
        )
    else:
        say("mlflow already running")
    # A first start on PostgreSQL creates MLflow's schema (a few dozen migrations).
    _wait_http(f"{MLFLOW_URL}/health", "MLflow server", 240, "mlflow")
    say(f"MLflow ready at {MLFLOW_URL}")

    if stale_since_install("airflow"):
        say("airflow started before the venv was reinstalled (its scheduler preloads MLflow):")
        say("restarting it, so that its tasks run what is installed now")
        _stop_group("airflow")
    if _pid("airflow") is None:
        _stop_group("airflow")
        AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
        _protect_airflow_passwords()
        _start("airflow", [str(VENV_BIN / "airflow"), "standalone"], env)
    else:
        say("airflow already running")
    # While Airflow boots: the local target serves again what it served before `make stop`,
    # and Prometheus starts scraping it.
    _resume_serving(env)
    _prometheus_up()
    _wait_http(
        f"{AIRFLOW_URL}/api/v2/monitor/health",
        "Airflow",
        300,
        "airflow",
        each=_protect_airflow_passwords,
    )
    _protect_airflow_passwords()
    say(f"Airflow ready at {AIRFLOW_URL}")
    _rollout_pool(env)
    _enable_promotions(secret)


def _describe_db(url: str | None) -> str:
    """Where a database is, without its password."""
    if url is None:
        return f"SQLite ({AIRFLOW_HOME / 'airflow.db'})"
    if url.startswith("sqlite:"):
        return f"SQLite ({url.split(':///', 1)[-1]})"
    from sqlalchemy.engine import make_url

    return f"PostgreSQL ({make_url(url).render_as_string(hide_password=True)})"


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
    # First: what it would record of the others stopping is no outage (and alert state it
    # keeps across restarts would carry it into the next `make run`).
    _stop_group("prometheus")
    # Model servers and the local front proxy run in their own sessions (they outlive tasks).
    # The local target keeps what it serves on disk: `make run` serves it again.
    subprocess.run([sys.executable, "-m", "serving.deploy", "stop"], env=env, cwd=ROOT, check=False)
    for name in ("airflow", "mlflow"):
        _stop_group(name)
    # Last, once its clients are gone; whatever PIPELINE_DB says now (it may differ from `up`).
    if _pid("postgres") is not None:
        LocalPostgres(PG_ROOT, PG_PORT).stop()
        say("stopped postgres (fast shutdown)")
    _stop_group("postgres")  # what pg_ctl did not stop, and a pid file left behind


def status() -> None:
    for name in ("postgres", "mlflow", "airflow", "prometheus"):
        pid = _pid(name)
        if name == "postgres" and pid is None and not (PG_ROOT / "data").exists():
            continue  # never used
        recorded = _recorded_pid(name)
        left = _leftovers(recorded) if pid is None and recorded is not None else []
        if pid and name == "prometheus":
            say(f"{name}: running, pid {pid}, {PROMETHEUS_URL}")
            for target in prometheus_targets():
                error = f" ({target['error']})" if target["error"] else ""
                say(f"  {target['job']:<13} {target['url']}: {target['health']}{error}")
        elif pid:
            say(f"{name}: running, pid {pid}")
        elif left:
            say(f"{name}: stopped, but {len(left)} process(es) of its group are left: make stop")
        else:
            say(f"{name}: stopped")
    subprocess.run([sys.executable, "-m", "serving.deploy", "status"], env=stack_env(), check=False)


# --- a pipeline run ------------------------------------------------------------------------


def _airflow_password() -> str:
    path = AIRFLOW_PASSWORDS
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(1)
    _protect_airflow_passwords()
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
    _print_timings(api, run_id)
    return _report(state, tasks, run_id)


def task_timings(dag_run: dict, instances: list[dict]) -> list[tuple[str, str, float, float]]:
    """``(task, state, start, seconds)`` of the tasks that ran, in start order; ``start`` is
    seconds after the run was queued (the trigger)."""
    from datetime import datetime

    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    t0 = at(dag_run.get("queued_at") or dag_run["start_date"])
    # Airflow stamps a skipped task's start and end too: it did not run.
    ran = [
        ti
        for ti in instances
        if ti.get("start_date") and ti.get("end_date") and ti.get("state") != "skipped"
    ]
    ran.sort(key=lambda ti: ti["start_date"])
    return [
        (
            ti["task_id"],
            ti["state"],
            at(ti["start_date"]) - t0,
            at(ti["end_date"]) - at(ti["start_date"]),
        )
        for ti in ran
    ]


def _print_timings(api: httpx.Client, run_id: str) -> None:
    try:
        dag_run = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
        instances = api.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()
        rows = task_timings(dag_run, instances["task_instances"])
    except Exception as exc:  # only a summary: the run's outcome is reported below anyway
        say(f"task timings unavailable ({exc.__class__.__name__}: {exc})")
        return
    if not rows:
        return
    say("task timings (start: seconds after the trigger):")
    for task_id, state, start, took in rows:
        say(f"  {task_id:<18} {state:<8} start {start:6.1f} s  took {took:6.1f} s")
    last = max(start + took for _, _, start, took in rows)
    say(f"  trigger to the last task's end: {last:.1f} s")


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
    if _pid("prometheus") is not None:
        print(f"  Prometheus : {PROMETHEUS_URL}  (scrape targets: /targets, alert rules: /alerts)")
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
    # Everything the stack writes (and every process it starts writes) is the owner's only.
    os.umask(PRIVATE_UMASK)
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
