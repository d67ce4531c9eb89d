"""Helpers for tests that need this repo's DAGs in the test Airflow DB (assets, schedules)."""

from __future__ import annotations

import os
import sys
from typing import Any

# Airflow puts the plugins folder on sys.path when it initialises; do it for plain imports too.
_PLUGINS = os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"]
if _PLUGINS not in sys.path:
    sys.path.append(_PLUGINS)


def sync_dags_to_db() -> None:
    """Parse the DAG folder and write DAGs, assets and schedules to the metadata DB.

    What the DAG processor does; the settings (model name, alias) are read from the
    environment at parse time, so call this after setting them.
    """
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        assert bag.import_errors == {}, bag.import_errors
        sync_bag_to_db(bag, bundle.name, bundle.version)


def asset_events(uri: str) -> list[dict[str, Any]]:
    """``extra`` of every event recorded on the asset ``uri``, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent.extra)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetModel.uri == uri)
            .order_by(AssetEvent.id)
        )
        return [dict(extra or {}) for extra in rows]


def queued_for(uri: str) -> list[str]:
    """DAG ids the scheduler will create a run for because of events on ``uri``."""
    from airflow.models.asset import AssetDagRunQueue, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return list(
            session.scalars(
                select(AssetDagRunQueue.target_dag_id)
                .join(AssetModel, AssetModel.id == AssetDagRunQueue.asset_id)
                .where(AssetModel.uri == uri)
            )
        )


def clear_queue() -> None:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(delete(AssetDagRunQueue))
