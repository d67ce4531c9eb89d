"""scripts/stack.py without servers: private state files, and where the databases are."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """scripts/stack.py with its state under ``tmp_path`` and no database settings."""
    from scripts import stack

    state = tmp_path / "state"
    for name, path in {
        "STATE": state,
        "PIDS": state / "pids",
        "LOGS": state / "logs",
        "AIRFLOW_HOME": state / "airflow",
        "AIRFLOW_PASSWORDS": state / "airflow" / "simple_auth_manager_passwords.json.generated",
        "PG_ROOT": state / "postgres",
    }.items():
        monkeypatch.setattr(stack, name, path)
    for var in ("PIPELINE_DB", "PIPELINE_AIRFLOW_DB_URL", "PIPELINE_MLFLOW_DB_URL"):
        monkeypatch.delenv(var, raising=False)
    return stack


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_private_makes_new_and_existing_files_owner_only(stack, tmp_path):
    old = tmp_path / "old.log"
    old.write_text("before\n")
    old.chmod(0o644)
    with stack.procs.open_private(old) as fh:
        fh.write(b"after\n")
    assert _mode(old) == 0o600
    assert old.read_text() == "before\nafter\n"  # appended
    with stack.procs.open_private(tmp_path / "new.log") as fh:
        fh.write(b"x")
    assert _mode(tmp_path / "new.log") == 0o600


def test_make_private_files_and_directories_and_skips_missing(stack, tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir(mode=0o755)
    file.write_text("secret")
    file.chmod(0o644)
    stack.procs.make_private(folder, file, tmp_path / "missing")
    assert (_mode(folder), _mode(file)) == (0o700, 0o600)


def test_tighten_state_fixes_what_an_older_stack_left_world_readable(stack):
    """Logs (Airflow's holds the admin password) and the generated password file were 0644."""
    for path in (stack.LOGS / "airflow.log", stack.AIRFLOW_PASSWORDS):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        path.chmod(0o644)
    task_logs = stack.AIRFLOW_HOME / "logs" / "dag_id=x"
    task_logs.mkdir(parents=True)
    (stack.STATE / "serving").mkdir(mode=0o755)
    stack.PG_ROOT.mkdir(mode=0o711)  # its server's user must enter it
    stack._tighten_state()
    for path in (stack.LOGS / "airflow.log", stack.AIRFLOW_PASSWORDS):
        assert _mode(path) == 0o600, path
    for folder in (
        stack.STATE,
        stack.LOGS,
        stack.AIRFLOW_HOME,
        stack.AIRFLOW_HOME / "logs",
        stack.STATE / "serving",
    ):
        assert _mode(folder) == 0o700, folder
    assert _mode(stack.PG_ROOT) == 0o711


def test_started_processes_log_privately_write_private_files_and_carry_the_stack_mark(
    stack, tmp_path
):
    """What a service writes (Airflow's generated password file) is 0600 via the umask, its
    log (where `airflow standalone` prints that password) is 0600 too, and it carries the mark
    by which `down` finds it and all it starts."""
    written = tmp_path / "written.json"
    code = (
        f"import json, os; json.dump({{'admin': 's3cret'}}, open({str(written)!r}, 'w')); "
        "print('Login with username: admin  password: s3cret', flush=True); "
        f"print('mark', os.environ[{stack.procs.MARKER!r}], os.environ[{stack.procs.SERVICE!r}])"
    )
    alive = stack._start("probe", [sys.executable, "-c", code], dict(os.environ))
    assert stack.wait_until(lambda: not alive(), 30, 0.1)
    assert json.loads(written.read_text()) == {"admin": "s3cret"}
    assert _mode(written) == 0o600
    log = stack.LOGS / "probe.log"
    assert "password: s3cret" in log.read_text()
    assert f"mark {stack.STATE} probe" in log.read_text()
    assert _mode(log) == 0o600


def test_the_generated_password_file_is_made_private_and_still_read(stack):
    stack.AIRFLOW_PASSWORDS.parent.mkdir(parents=True)
    stack.AIRFLOW_PASSWORDS.write_text(json.dumps({"admin": "pw"}))
    stack.AIRFLOW_PASSWORDS.chmod(0o644)
    assert stack._airflow_password() == "pw"  # what `make run` prints once
    assert _mode(stack.AIRFLOW_PASSWORDS) == 0o600


# -- where the databases are ----------------------------------------------------------------


def test_sqlite_is_the_default(stack, monkeypatch):
    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", raising=False)  # the tests' own
    urls = stack.database_urls()
    assert urls == {"airflow": None, "mlflow": f"sqlite:///{stack.STATE / 'mlflow' / 'mlflow.db'}"}
    env = stack.stack_env()
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env
    assert "MLFLOW_BACKEND_STORE_URI" not in env


def test_postgres_switch_gives_each_server_its_own_database_role_and_password(stack, monkeypatch):
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("PIPELINE_DB", "postgres")
    monkeypatch.setattr(stack, "PG_PORT", 15999)
    urls = stack.database_urls()
    parsed = {name: make_url(url) for name, url in urls.items()}
    for name, url in parsed.items():
        assert url.drivername == "postgresql+psycopg"
        assert (url.host, url.port, url.username, url.database) == ("127.0.0.1", 15999, name, name)
        secret = stack.PG_ROOT / "secrets" / f"{name}.password"
        assert url.password == secret.read_text().strip()
        assert _mode(secret) == 0o600
    assert parsed["airflow"].password != parsed["mlflow"].password
    assert stack.database_urls() == urls  # stable: read back, not generated again
    env = stack.stack_env()
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == urls["airflow"]
    # Airflow's async engine on the same driver (derived, it would want asyncpg).
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] == urls["airflow"]
    # MLflow's database password is given to the MLflow server only, not to every task.
    assert urls["mlflow"] not in env.values()
    assert "MLFLOW_BACKEND_STORE_URI" not in env
    # Logged without the password.
    assert parsed["mlflow"].password not in stack.describe_db(urls["mlflow"])


def test_existing_postgres_urls_win_and_get_the_installed_driver(stack, monkeypatch):
    monkeypatch.setenv("PIPELINE_DB", "postgres")
    monkeypatch.setenv("PIPELINE_AIRFLOW_DB_URL", "postgresql://af:pw@db.internal:5432/airflow")
    monkeypatch.setenv("PIPELINE_MLFLOW_DB_URL", "postgres://ml:pw@db.internal/mlflow")
    assert stack.local_postgres() is None  # no server of our own
    assert stack.database_urls() == {
        "airflow": "postgresql+psycopg://af:pw@db.internal:5432/airflow",
        "mlflow": "postgresql+psycopg://ml:pw@db.internal/mlflow",
    }
    assert not stack.PG_ROOT.exists()


def test_one_existing_url_and_the_local_server_for_the_other(stack, monkeypatch):
    monkeypatch.setenv("PIPELINE_DB", "postgres")
    monkeypatch.setenv("PIPELINE_MLFLOW_DB_URL", "postgresql+psycopg://ml:pw@db.internal/mlflow")
    urls = stack.database_urls()
    assert urls["mlflow"] == "postgresql+psycopg://ml:pw@db.internal/mlflow"
    assert urls["airflow"].startswith("postgresql+psycopg://airflow:")


def test_an_unknown_database_kind_is_refused(stack, monkeypatch):
    monkeypatch.setenv("PIPELINE_DB", "mysql")
    with pytest.raises(SystemExit, match="PIPELINE_DB='mysql'"):
        stack.database_urls()


def test_postgres_unavailable_says_why(stack, monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_PG_BIN_DIR", str(tmp_path))  # no initdb/postgres/pg_ctl here
    reason = stack.LocalPostgres.unavailable()
    assert reason is not None and "scripts/install_postgres.sh" in reason
    if os.geteuid() == 0:
        monkeypatch.delenv("PIPELINE_PG_BIN_DIR")
        monkeypatch.setenv("PIPELINE_PG_OS_USER", "no-such-user-here")
        if stack.LocalPostgres.bin_dir() is not None:
            assert "postgres` system user" in stack.LocalPostgres.unavailable()


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only for root")
def test_a_directory_the_server_user_cannot_enter_is_named(stack, tmp_path):
    import pwd

    from scripts.stacklib.postgres import _check_reachable

    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres system user")
    closed = tmp_path / "closed"
    (closed / "pg").mkdir(parents=True)
    closed.chmod(0o700)
    with pytest.raises(PermissionError, match=str(closed)):
        _check_reachable(closed / "pg", user)


def test_task_timings_are_in_start_order_from_the_trigger_and_skip_tasks_that_never_ran(stack):
    dag_run = {"queued_at": "2026-11-29T20:00:00Z", "start_date": "2026-11-29T20:00:01Z"}
    instances = [
        {
            "task_id": "register",
            "state": "success",
            "start_date": "2026-11-29T20:01:10.5Z",
            "end_date": "2026-11-29T20:01:11.5Z",
        },
        {
            "task_id": "load_window",
            "state": "success",
            "start_date": "2026-11-29T20:00:02+00:00",
            "end_date": "2026-11-29T20:00:03.25+00:00",
        },
        {"task_id": "not_deployed", "state": "skipped", "start_date": None, "end_date": None},
        {
            "task_id": "unchanged",
            "state": "skipped",
            "start_date": "2026-11-29T20:00:04Z",
            "end_date": "2026-11-29T20:00:04Z",
        },
    ]
    assert stack.task_timings(dag_run, instances) == [
        ("load_window", "success", 2.0, 1.25),
        ("register", "success", 70.5, 1.0),
    ]


def test_a_service_started_before_the_venv_was_reinstalled_is_stale(stack, tmp_path):
    """Airflow's scheduler preloads MLflow and forks every task from itself: after a reinstall
    (`make install`, a new lock) tasks would run the old MLflow from memory against the new
    files. `up` restarts such a service; one started after the install is left alone."""
    import subprocess

    import psutil

    stamp = tmp_path / ".installed"
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leader = psutil.Process(service.pid)
        started = leader.create_time()
        stamp.touch()
        os.utime(stamp, (started - 60,) * 2)  # installed before the service started
        assert stack.stale_since_install(leader, stamp) is False
        os.utime(stamp, (started + 5,) * 2)  # reinstalled after the service started
        assert stack.stale_since_install(leader, stamp) is True
        assert stack.stale_since_install(None, stamp) is False  # not running: nothing stale
        stamp.unlink()
        assert stack.stale_since_install(leader, stamp) is False  # never installed by make
    finally:
        service.kill()
        service.wait()


# -- the stack lock, and finding the stack's processes ------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from scripts.stacklib.processes import stack_lock
with stack_lock(Path({state!r}), {command!r}):
    print("holding", flush=True)
    time.sleep({hold_s})
"""


def _holder(tmp_path: Path, state: Path, command: str, hold_s: float):
    """A process whose command line ends in stack.py (as `make run` starts it) holding the
    stack lock of ``state`` as ``command`` for ``hold_s``."""
    import subprocess

    script = tmp_path / "bin" / "stack.py"
    script.parent.mkdir(exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(HOLDER.format(root=root, state=str(state), command=command, hold_s=hold_s))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "holding\n"
    return proc


def test_a_second_command_waits_for_the_lock_and_says_who_holds_it(stack, tmp_path, capsys):
    from scripts.stacklib.processes import lock_holder, stack_lock

    holder = _holder(tmp_path, stack.STATE, "run", hold_s=1.5)
    try:
        assert f"`stack.py run` (pid {holder.pid}," in lock_holder(stack.STATE)
        with stack_lock(stack.STATE, "up"):  # waits: a run is not interrupted by `up`
            assert holder.wait(timeout=5) == 0  # it ended on its own, then the lock was ours
            assert "`stack.py up`" in lock_holder(stack.STATE)
        assert lock_holder(stack.STATE) is None
        said = capsys.readouterr().out
        assert f"held by `stack.py run` (pid {holder.pid}" in said
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["up", "run", "resume"])
def test_down_stops_a_holder_that_starts_the_stack_or_runs_the_pipeline(
    stack, tmp_path, capsys, command
):
    from scripts.stacklib.processes import stack_lock

    holder = _holder(tmp_path, stack.STATE, command, hold_s=60)
    try:
        started = time.monotonic()
        with stack_lock(stack.STATE, "down", interrupt=True):
            assert time.monotonic() - started < 15  # not the 60 s it would hold the lock
        assert f"stopping `stack.py {command}` (pid {holder.pid}) first" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


def test_down_waits_for_another_down(stack, tmp_path, capsys):
    from scripts.stacklib.processes import stack_lock

    holder = _holder(tmp_path, stack.STATE, "down", hold_s=1.5)
    try:
        with stack_lock(stack.STATE, "down", interrupt=True):
            assert holder.wait(timeout=5) == 0  # it ran to its end
        said = capsys.readouterr().out
        assert f"held by `stack.py down` (pid {holder.pid}" in said
        assert "stopping" not in said
    finally:
        holder.kill()
        holder.wait()


# A service that starts children and sleeps; a child that sets its process title as Airflow's
# do (setproctitle overwrites the environment /proc shows), one that does not.
PARENT = (
    "import subprocess, sys, time; "
    "kids = [subprocess.Popen([sys.executable, '-c', code]) for code in sys.argv[1:]]; "
    "time.sleep(60)"
)
TITLED = (
    "import setproctitle, time; setproctitle.setproctitle('airflow worker' + ' ' * 200); "
    "time.sleep(60)"
)
PLAIN = "import time; time.sleep(60)"


def test_the_stack_processes_are_found_by_their_mark_and_stopped_and_nothing_else(stack, tmp_path):
    """Found: a service with the stack's mark and a child that hid its environment; the
    children of a service that died (orphans, one of them hidden too: its session is still the
    service's); a model server of the local target started by someone else (its own setting
    names the folder, no mark). Not found: processes that only look related (the stack's
    folder in a variable, a model server of another folder, a shell with the local target's
    setting exported)."""
    import signal
    import subprocess

    import psutil

    from scripts.stacklib import processes

    serving, sleep = stack.STATE / "serving", [sys.executable, "-c", PLAIN]
    base = {k: v for k, v in os.environ.items() if "PIPELINE_" not in k}
    mark, py = {processes.MARKER: str(stack.STATE)}, sys.executable
    target, elsewhere = "PIPELINE_DEPLOY_LOCAL_STATE_DIR", str(tmp_path)
    started = {
        "mlflow": ([py, "-c", PARENT, TITLED], {**mark, processes.SERVICE: "mlflow"}),
        "airflow": ([py, "-c", PARENT, TITLED, PLAIN], {**mark, processes.SERVICE: "airflow"}),
        "server": ([*sleep, "serving.server"], {target: str(serving)}),
        "state-var": (sleep, {"PIPELINE_STATE_DIR": str(stack.STATE)}),
        "other-server": ([*sleep, "serving.server"], {target: elsewhere}),
        "shell": (sleep, {target: str(serving)}),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(argv, env={**base, **extra}, start_new_session=True)
        for name, (argv, extra) in started.items()
    }
    kids: list[psutil.Process] = []
    try:
        for name, count in (("mlflow", 1), ("airflow", 2)):
            service = psutil.Process(procs[name].pid)
            assert stack.wait_until(lambda s=service, n=count: len(s.children()) == n, 10, 0.05)
            kids += service.children()
        titled = lambda: [k for k in kids if "worker" in k.name()]  # noqa: E731
        assert stack.wait_until(lambda: len(titled()) == 2, 10, 0.05)
        assert all(processes.MARKER not in kid.environ() for kid in titled())
        procs["airflow"].send_signal(signal.SIGKILL)  # its children live on, orphans
        procs["airflow"].wait()

        def find():
            return processes.stack_processes(stack.STATE, serving, {})

        found = {proc.pid: name for proc, name in find().items()}
        assert found == {
            procs["mlflow"].pid: "mlflow",
            **{
                kid.pid: ("mlflow" if kid.ppid() == procs["mlflow"].pid else "airflow")
                for kid in kids
            },
            procs["server"].pid: "model-server",
        }
        assert sorted(found.values()).count("airflow") == 2
        stopped = processes.stop_all(find)
        assert stopped == ["airflow (2 processes)", "mlflow, model-server (3 processes)"]
        assert psutil.wait_procs(kids, timeout=5)[1] == []
        assert procs["server"].wait(5) is not None and procs["mlflow"].wait(5) is not None
        for name in ("state-var", "other-server", "shell"):
            assert procs[name].poll() is None, name
    finally:
        for proc in [*procs.values()]:
            proc.kill()
            proc.wait()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.kill()


@pytest.mark.parametrize("kind", ["VerificationFailed", "RequestRejected", "RolloutError"])
def test_restoring_champion_says_why_it_could_not_and_lets_the_run_start(
    stack, monkeypatch, capsys, kind
):
    """``make run`` restores @champion through the rollout path first; a verdict, a refusal
    or a fault ends that in one line, not a traceback."""
    import serving.deploy.rollout as rollout
    from serving.deploy import target

    asked = []

    def run_request(request, deploy, registry, *, tracking_uri):
        asked.append(request)
        if kind == "VerificationFailed":
            raise target.VerificationFailed("row 0 off")
        raise getattr(target, kind)("no")

    monkeypatch.setattr(rollout, "run_request", run_request)
    assert stack.restore_champion("http://mlflow.example:5000") is None
    assert [r["kind"] for r in asked] == ["champion"]
    assert "could not restore @champion" in capsys.readouterr().out


def _airflow(stack, answers: list[int]):
    """stack.Airflow on an httpx MockTransport answering ``answers`` in turn (its requests)."""
    import httpx

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        status = answers[min(len(seen), len(answers)) - 1]
        body = {"create": {"success": ["rollout"], "errors": []}} if status == 200 else {}
        return httpx.Response(status, json=body)

    api = stack.Airflow.__new__(stack.Airflow)
    api.http = httpx.Client(
        base_url="http://airflow/api/v2", transport=httpx.MockTransport(handler)
    )
    return api, seen


def test_the_rollout_pool_is_created_even_when_airflow_first_answers_500(stack, monkeypatch):
    # Seen on a fresh clone's first `make run`: Airflow on SQLite answered the pool's PATCH with
    # 500 (database locked while its own processes started) and `make run` stopped there.
    monkeypatch.setattr(stack.api, "RETRY_WAIT_S", 0.0)
    api, seen = _airflow(stack, [500, 500, 200])
    stack._rollout_pool(api)
    assert seen == ["PATCH"] * 3


def test_a_call_that_is_not_safe_to_repeat_is_not_repeated(stack, monkeypatch):
    import httpx

    monkeypatch.setattr(stack.api, "RETRY_WAIT_S", 0.0)
    api, seen = _airflow(stack, [500, 200])
    with pytest.raises(httpx.HTTPStatusError):
        api("POST", "/dags/train_and_deploy/dagRuns", json={})
    assert seen == ["POST"]
