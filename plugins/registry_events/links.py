"""Operator extra links from Airflow task pages to the MLflow UI.

The task that pins the version (``resolve`` in ``deploy_model``) returns a dict with
``links: {"model_version": url, "run": url}`` (built by ``serving.promotion.mlflow_ui_links``).
When a linked task finishes, Airflow's task runner calls :meth:`get_link` and stores the URL in
XCom; the UI shows it as a button on the task page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


@attrs.define()
class _ResolvedVersionLink(BaseOperatorLink):
    """A link read from the ``links`` of the version-pinning task's return value."""

    link_key: ClassVar[str]
    source_task_id: str = "resolve"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        value: Any = XCom.get_one(
            key="return_value",
            dag_id=ti_key.dag_id,
            task_id=self.source_task_id,
            run_id=ti_key.run_id,
        )
        links = value.get("links") if isinstance(value, dict) else None
        return str((links or {}).get(self.link_key) or "")


@attrs.define()
class MlflowModelVersionLink(_ResolvedVersionLink):
    name = "MLflow model version"
    link_key = "model_version"


@attrs.define()
class MlflowRunLink(_ResolvedVersionLink):
    name = "MLflow training run"
    link_key = "run"


def link_to_mlflow(*tasks: Any, source_task_id: str = "resolve") -> None:
    """Add the MLflow model-version and run links to ``tasks`` (operators or ``@task`` results)."""
    links = [
        MlflowModelVersionLink(source_task_id=source_task_id),
        MlflowRunLink(source_task_id=source_task_id),
    ]
    for task in tasks:
        operator = getattr(task, "operator", task)
        operator.operator_extra_links = [*operator.operator_extra_links, *links]
