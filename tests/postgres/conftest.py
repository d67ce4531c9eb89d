"""The PostgreSQL tier: a throwaway PostgreSQL server, and an `mlflow server` backed by it.

The server is the stack's own (``LocalPostgres`` of ``scripts/stacklib/postgres.py``, as
``PIPELINE_DB=postgres make run`` starts it): initdb in a temp dir, run as the ``postgres``
system user when the tests run as root, on a free port. Where it cannot start (no server
binaries, or root without a ``postgres`` user) every test of the tier is skipped with that one
reason, which ``pytest -ra`` shows as one SKIPPED line; ``scripts/install_postgres.sh`` (run by
``make test``) installs what it needs. A server that should start and does not is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent
# A throwaway server: durability is not what these tests are about.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
CANNOT_START = "PostgreSQL cannot start here"


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every test of the tier skipped for that reason at one place, so that
    `pytest -ra` folds them into one SKIPPED line (it folds by location and reason)."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and CANNOT_START in report.longrepr[2]:
        gate = _skip_unless_postgres_can_start.__code__
        report.longrepr = (gate.co_filename, gate.co_firstlineno, report.longrepr[2])
    return report


def _skip_unless_postgres_can_start() -> None:
    from scripts.stacklib.postgres import LocalPostgres

    reason = LocalPostgres.unavailable()
    if reason is not None:
        pytest.skip(f"{CANNOT_START}: {reason}")


@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """A running throwaway PostgreSQL server (``LocalPostgres``); removed at the end."""
    from scripts.stacklib.postgres import LocalPostgres

    _skip_unless_postgres_can_start()
    # Not pytest's tmp_path: its folders are 0700, and the server's user must reach its own;
    # /tmp (sticky, world-enterable) rather than $TMPDIR, which may be a private folder.
    root = Path(tempfile.mkdtemp(prefix="pipeline-pg-test-", dir="/tmp"))
    os.chmod(root, 0o711)
    pg = LocalPostgres(root / "pg", free_port(), settings=FAST)
    log = root / "postgres.log"
    try:
        pg.prepare()
        try:
            pg.start(log)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{_tail(log)}") from None
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_mlflow(postgres, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on database ``mlflow`` of the throwaway server, two workers (two
    processes writing to the database), webhooks enabled as ``make run`` enables them."""
    from scripts.stack import mlflow_server_argv, mlflow_webhook_env
    from scripts.stacklib.processes import spawn
    from serving.deploy.local import stop_group

    root = tmp_path_factory.mktemp("pg-mlflow")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env.update(mlflow_webhook_env(root))
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_BACKEND_STORE_URI": postgres.ensure_database("mlflow"),
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # webhooks are created after the server started
        }
    )
    log = root / "server.log"
    argv = mlflow_server_argv(root / "artifacts", port, workers=2)
    proc = spawn(argv, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # the first start creates MLflow's schema
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server on PostgreSQL did not start:\n{_tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(proc.pid, timeout_s=20)
        proc.wait(timeout=10)


def airflow_cli(args: list[str], env: dict[str, str], timeout_s: float = 600):
    """Run ``airflow <args>``; the completed process (output captured)."""
    return subprocess.run(
        [str(BIN / "airflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
