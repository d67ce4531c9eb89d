"""Airflow local settings of the embedded stack (``scripts/stack.py`` puts this folder on the
Airflow processes' ``PYTHONPATH``; a production deployment has its own).

With the LocalExecutor every task runs in a process forked from a worker, which was forked
from the scheduler, and the task then imports what it needs. MLflow's import (~3 s here,
pandas included) was most of what the registry-only tasks (``load_window``, ``register``,
``gate``, ...) spent. Imported once in the scheduler before it forks its workers, it is
already loaded in every task (shared copy-on-write pages), so such a task costs its registry
calls. Importing MLflow starts no thread, so forking after it is safe. Only the scheduler:
the API server, DAG processor and triggerer never use it.
"""

from __future__ import annotations

import os
import sys


def _preload_for_tasks() -> None:
    # Only the LocalExecutor forks tasks from the scheduler (PIPELINE_EXECUTOR=celery: no).
    local = os.environ.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor") == "LocalExecutor"
    if sys.argv[1:2] == ["scheduler"] and local:
        import mlflow  # noqa: F401


_preload_for_tasks()
