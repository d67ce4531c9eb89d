"""Operator extra links from Airflow task pages to the MLflow UI.

A task that rolls a version out returns a dict with ``links: {"model_version": url, "run":
url}`` (``serving.deploy.assets``: the key and the URLs are defined there, next to the asset
both sides share). These links are registered for every operator (``global_operator_extra_links``)
so that no DAG has to import this plugin; on a task whose return value has no such links they
are empty, and the UI shows no button.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


@attrs.define()
class _ReturnedLink(BaseOperatorLink):
    """A link read from the ``links`` of the task's own return value."""

    link_key: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # Global links are resolved by the API server, which reads XCom from the metadata DB.
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.execute(
                XComModel.get_many(
                    key="return_value",
                    run_id=ti_key.run_id,
                    dag_ids=ti_key.dag_id,
                    task_ids=ti_key.task_id,
                    map_indexes=ti_key.map_index,
                ).with_only_columns(XComModel.value)
            ).first()
        value: Any = row.value if row is not None else None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return ""
        # Imported here, not at plugin load (see registry_events.app.registry_settings).
        from serving.deploy.assets import LINKS_KEY

        links = value.get(LINKS_KEY) if isinstance(value, dict) else None
        return str((links or {}).get(self.link_key) or "")


@attrs.define()
class MlflowModelVersionLink(_ReturnedLink):
    name = "MLflow model version"
    link_key = "model_version"


@attrs.define()
class MlflowRunLink(_ReturnedLink):
    name = "MLflow training run"
    link_key = "run"
