"""scripts/stack.py's process handling with real servers: `make stop` frees the ports.

MLflow's CLI process starts uvicorn as a child, and the child is what listens. Stopping only
the CLI's pid once left that worker serving the port; `down` stops every process of the
stack's state folder, the worker too, also when the CLI itself already died. And `down`
during an `up` that is still starting leaves nothing running either.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """scripts/stack.py with its state folder in ``tmp_path``."""
    from scripts import stack

    for name, path in {
        "STATE": tmp_path,
        "PIDS": tmp_path / "pids",
        "LOGS": tmp_path / "logs",
    }.items():
        monkeypatch.setattr(stack, name, path)
    return stack


def _start_mlflow(stack, tmp_path: Path) -> tuple[int, int, list[psutil.Process]]:
    """``mlflow server`` through the stack's own helpers; (pid, port, its processes)."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = stack.mlflow_server_argv(tmp_path / "artifacts", port)
    alive = stack._start("mlflow", argv, env)
    try:
        stack._wait_http(f"http://127.0.0.1:{port}/health", "MLflow", 180, alive)
    except SystemExit as exc:
        stack.down()
        pytest.fail(f"{exc}: {(tmp_path / 'logs' / 'mlflow.log').read_text()[-3000:]}")
    pid = stack._of("mlflow")[0].pid
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return pid, port, family


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _survivors(family: list[psutil.Process]) -> list[str]:
    alive = []
    for proc in family:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def _cleanup(family: list[psutil.Process]) -> None:
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def test_stop_ends_mlflow_and_its_uvicorn_worker_and_frees_the_port(stack, tmp_path):
    _, port, family = _start_mlflow(stack, tmp_path)
    try:
        assert len(family) >= 2, "expected the CLI and its uvicorn child"
        assert _listening(port)
        stack.down()
        assert _survivors(family) == []
        assert not _listening(port)
        assert stack._of("mlflow") == []
    finally:
        _cleanup(family)


def test_stop_ends_what_is_left_when_the_cli_already_died(stack, tmp_path):
    """The CLI gone (killed by its pid alone, or crashed): its uvicorn worker still serves."""
    pid, port, family = _start_mlflow(stack, tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=10)  # reaped, as init would reap it
        assert _listening(port), "the orphaned worker should still be serving"
        stack.down()
        assert _survivors(family) == []
        assert not _listening(port)
    finally:
        _cleanup(family)


@pytest.mark.parametrize(
    ("component", "executor", "preloaded"),
    [
        ("scheduler", "LocalExecutor", True),
        ("api-server", "LocalExecutor", False),
        ("scheduler", "CeleryExecutor", False),
    ],
)
def test_the_scheduler_and_so_every_task_it_forks_starts_with_mlflow_loaded(
    stack, component, executor, preloaded, tmp_path
):
    """The stack's airflow_local_settings.py, on the PYTHONPATH the stack gives Airflow: the
    scheduler (parent of the LocalExecutor's workers and their tasks) imports MLflow when
    Airflow loads its settings; the other components do not pay for it, nor does a scheduler
    whose tasks run on Celery workers (PIPELINE_EXECUTOR=celery)."""
    import subprocess

    code = (
        "import sys, airflow.settings\n"
        "print('airflow_local_settings' in sys.modules, 'mlflow' in sys.modules)\n"
    )
    env = {**stack.stack_env(), "AIRFLOW_HOME": str(tmp_path / "airflow")}
    env["AIRFLOW__CORE__EXECUTOR"] = executor
    done = subprocess.run(
        [sys.executable, "-c", code, component],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", str(preloaded)]


# -- `make stop` while `make run` is still starting ------------------------------------------

STACK = Path(__file__).resolve().parents[2] / "scripts" / "stack.py"


def _of_state(state: Path) -> list[psutil.Process]:
    """Every live process whose environment or command line names ``state`` (the test's own
    check, independent of how the stack finds its processes)."""
    mark = str(state)
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"], ad_value=None):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        words = [*(proc.info["cmdline"] or []), *(proc.info["environ"] or {}).values()]
        if any(mark in word for word in words):
            found.append(proc)
    return found


def _describe(procs: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:150]}" for p in procs]


def test_down_while_up_is_still_starting_leaves_nothing_running(tmp_path, free_ports):
    """`stack.py up` in the background, on the test's own state folder and ports, with a
    local target to resume (an active.json, as `make stop` leaves it). Its front proxy is
    frozen the moment it appears, before it wrote its pid file (a slow start on a busy
    machine), and `stack.py down` runs then. Once `down` returned and the proxy may go on,
    no process of that state folder is left and the front port is free."""
    state = tmp_path / "state"
    serving = state / "serving"
    serving.mkdir(parents=True)
    front, slot_a, slot_b, mlflow_port, airflow_port, prometheus_port = free_ports(6)
    server = [
        sys.executable, "-m", "serving.server", "--model-uri", "models:/absent/1",
        "--host", "127.0.0.1", "--port", str(slot_a), "--workers", "1",
    ]  # fmt: skip
    active = {"version": "1", "model_uri": "models:/absent/1", "port": slot_a, "pid": None}
    active.update(cmd=server, tracking_uri=f"http://127.0.0.1:{mlflow_port}", restarts=0)
    (serving / "active.json").write_text(json.dumps(active))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "PIPELINE_"))
    }
    env.update(
        PIPELINE_STATE_DIR=str(state),
        MLFLOW_PORT=str(mlflow_port),
        AIRFLOW_PORT=str(airflow_port),
        PROMETHEUS_PORT=str(prometheus_port),
        PROMETHEUS_BIN=str(tmp_path / "no-prometheus"),  # stripped: the stack runs without it
        PIPELINE_DEPLOY_LOCAL_PORT=str(front),
        PIPELINE_DEPLOY_LOCAL_SLOT_PORTS=f"{slot_a},{slot_b}",
        PIPELINE_DEPLOY_HEALTH_TIMEOUT_S="10",
    )
    up_log = tmp_path / "up.log"
    with open(up_log, "wb") as out:
        up = subprocess.Popen([sys.executable, str(STACK), "up"], env=env, stdout=out, stderr=out)
    try:
        proxy = None
        deadline = time.monotonic() + 300
        while proxy is None:
            assert up.poll() is None, f"up ended before it started the proxy:\n{up_log.read_text()}"
            assert time.monotonic() < deadline, f"no proxy in 300 s:\n{up_log.read_text()}"
            proxy = next(
                (p for p in _of_state(state) if "serving.deploy" in (p.info["cmdline"] or [])
                 and "proxy" in p.info["cmdline"]),
                None,
            )  # fmt: skip
            time.sleep(0.02)
        proxy.suspend()
        assert not (serving / "proxy.pid").exists()  # the case this test is about
        down = subprocess.Popen(
            [sys.executable, str(STACK), "down"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # A few seconds into `down`, the proxy goes on (well within the 20 s its starter
        # gives it to listen): `down` must have stopped it, or stop it still.
        time.sleep(6)
        with contextlib.suppress(psutil.NoSuchProcess):
            proxy.resume()
        said = down.communicate(timeout=300)[0]
        assert down.returncode == 0, said
        up.wait(timeout=300)  # `up` does not go on starting things after `down`
        time.sleep(2)  # what a surviving proxy would do now: listen, start a model server
        left = _of_state(state)
        assert _describe(left) == [], f"{said}\n--- up ---\n{up_log.read_text()[-3000:]}"
        assert not _listening(front)
        assert not _listening(slot_a)
        # It waited for the stack lock, said who held it, and stopped that `up` first.
        assert "held by `stack.py up`" in said, said
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for proc in _of_state(state):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
                proc.kill()
