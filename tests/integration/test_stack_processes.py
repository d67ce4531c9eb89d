"""scripts/stack.py's process handling with a real `mlflow server`: `make stop` frees the port.

MLflow's CLI process starts uvicorn as a child, and the child is what listens. Stopping only
the CLI's pid once left that worker serving the port; the stack stops the whole process group,
and what is left of it when the CLI itself already died.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """scripts/stack.py with its pid and log folders in ``tmp_path``."""
    from scripts import stack

    monkeypatch.setattr(stack, "PIDS", tmp_path / "pids")
    monkeypatch.setattr(stack, "LOGS", tmp_path / "logs")
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
    pid = stack._start("mlflow", argv, env)
    try:
        stack._wait_http(f"http://127.0.0.1:{port}/health", "MLflow", 180, "mlflow")
    except SystemExit as exc:
        stack._stop_group("mlflow")
        pytest.fail(f"{exc}: {(tmp_path / 'logs' / 'mlflow.log').read_text()[-3000:]}")
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
        stack._stop_group("mlflow")
        assert _survivors(family) == []
        assert not _listening(port)
        assert not (tmp_path / "pids" / "mlflow.pid").exists()
    finally:
        _cleanup(family)


def test_stop_ends_what_is_left_of_the_group_when_the_cli_already_died(stack, tmp_path):
    """The CLI gone (killed by its pid alone, or crashed): its uvicorn worker still serves."""
    pid, port, family = _start_mlflow(stack, tmp_path)
    try:
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=10)  # reaped, as init would reap it
        assert _listening(port), "the orphaned worker should still be serving"
        stack._stop_group("mlflow")
        assert _survivors(family) == []
        assert not _listening(port)
    finally:
        _cleanup(family)


@pytest.mark.parametrize(("component", "preloaded"), [("scheduler", True), ("api-server", False)])
def test_the_scheduler_and_so_every_task_it_forks_starts_with_mlflow_loaded(
    stack, component, preloaded, tmp_path
):
    """The stack's airflow_local_settings.py, on the PYTHONPATH the stack gives Airflow: the
    scheduler (parent of the LocalExecutor's workers and their tasks) imports MLflow when
    Airflow loads its settings; the other components do not pay for it."""
    import subprocess

    code = (
        "import sys, airflow.settings\n"
        "print('airflow_local_settings' in sys.modules, 'mlflow' in sys.modules)\n"
    )
    env = {**stack.stack_env(), "AIRFLOW_HOME": str(tmp_path / "airflow")}
    done = subprocess.run(
        [sys.executable, "-c", code, component],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", str(preloaded)]
