"""Airflow's metadata DB on PostgreSQL: `airflow db migrate`, then a DAG run written to it.

Real ``airflow`` processes (this test process keeps its SQLite metadata DB: Airflow reads its
configuration once per process) on database ``airflow`` of the throwaway server, as
``PIPELINE_DB=postgres make run`` configures them. The DAG is ``reconcile_deployment`` against
the PostgreSQL-backed MLflow server, for a model with no ``@champion``: ``check`` logs that
there is nothing to converge to, returns no conf, and ``trigger_deploy_model`` is skipped.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.postgres.conftest import airflow_cli

pytestmark = [pytest.mark.postgres, pytest.mark.integration]

DAG_ID = "reconcile_deployment"
DAGS = Path(__file__).resolve().parents[2] / "dags"


def test_airflow_migrates_and_runs_a_dag_on_postgres(postgres, pg_mlflow, tmp_path):
    import psycopg

    from scripts.stacklib.postgres import airflow_db_env

    url = postgres.ensure_database("airflow")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env.update(
        {
            "AIRFLOW_HOME": str(tmp_path / "airflow"),
            "AIRFLOW_CONN_MLFLOW_DEFAULT": pg_mlflow,
            "PIPELINE_REGISTRY_MODEL_NAME": f"pg-airflow-{uuid.uuid4().hex[:8]}",
            "PIPELINE_DEPLOY_TARGET": "local",
            "PIPELINE_DEPLOY_LOCAL_PORT": str(free_port()),
            "PIPELINE_DEPLOY_LOCAL_STATE_DIR": str(tmp_path / "serving"),
            # As the stack sets them: the sync and the async engine on psycopg 3.
            **airflow_db_env(url),
        }
    )
    migrate = airflow_cli(["db", "migrate"], env)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]

    test = airflow_cli(["dags", "test", DAG_ID, "-f", str(DAGS / f"{DAG_ID}.py")], env)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]

    # What Airflow wrote to PostgreSQL, read back with the airflow role's own login.
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        assert version is not None
        runs = conn.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = %s", (DAG_ID,)
        ).fetchall()
        assert [state for _, state in runs] == ["success"], test.stdout[-3000:]
        run_id = runs[0][0]
        states = dict(
            conn.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = %s AND run_id = %s",
                (DAG_ID, run_id),
            ).fetchall()
        )
        assert states == {"check": "success", "trigger_deploy_model": "skipped"}, states
        # check returns deploy_model's conf, or nothing when there is nothing to trigger.
        returned = conn.execute(
            "SELECT value FROM xcom WHERE dag_id = %s AND run_id = %s AND task_id = 'check' "
            "AND key = 'return_value'",
            (DAG_ID, run_id),
        ).fetchone()
        assert returned is None or returned[0] in (None, "null"), returned
    # Why, in the check's task log.
    assert "nothing to converge to" in test.stdout + test.stderr, test.stdout[-3000:]
