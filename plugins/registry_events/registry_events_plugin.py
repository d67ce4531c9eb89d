"""Airflow plugin entry point: mounts the registry-events app and registers the MLflow links.

Airflow loads this file by path (see ``.airflowignore`` next to it); everything else is
imported as the ``registry_events`` package.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from registry_events.app import URL_PREFIX, app
from registry_events.links import MlflowModelVersionLink, MlflowRunLink


class RegistryEventsPlugin(AirflowPlugin):
    name = "registry_events"
    fastapi_apps = [
        {"app": app, "url_prefix": URL_PREFIX, "name": "MLflow registry events"},
    ]
    # On every operator: no DAG imports this plugin (see registry_events.links).
    global_operator_extra_links = [MlflowModelVersionLink(), MlflowRunLink()]
