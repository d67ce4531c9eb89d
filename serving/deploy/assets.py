"""What the DAGs and the ``registry_events`` plugin agree on, defined once (no Airflow import).

* the asset an alias move is recorded on (the plugin writes events, ``deploy_model`` is
  scheduled on it), and the one a version registered outside the pipeline is recorded on
  (``gate_new_version``);
* the MLflow UI links a rollout task returns (the plugin's operator links read them).

Both sides import this module; neither imports the other.
"""

from __future__ import annotations

from urllib.parse import quote

ASSET_URI_SCHEME = "mlflow"
# Key of the links dict in a task's return value (``{"model_version": url, "run": url}``).
LINKS_KEY = "links"


def alias_asset(model_name: str, alias: str) -> dict[str, str]:
    """``name``/``uri`` of the Airflow asset that stands for "``@alias`` of ``model_name``
    moved"."""
    alias = alias.removeprefix("@")
    return {
        "name": f"mlflow-alias/{model_name}@{alias}",
        "uri": f"{ASSET_URI_SCHEME}://models/{quote(model_name, safe='')}/aliases/"
        f"{quote(alias, safe='')}",
    }


def version_asset(model_name: str) -> dict[str, str]:
    """``name``/``uri`` of the Airflow asset that stands for "a version of ``model_name`` was
    registered outside the pipeline" (``gate_new_version`` is scheduled on it)."""
    return {
        "name": f"mlflow-versions/{model_name}",
        "uri": f"{ASSET_URI_SCHEME}://models/{quote(model_name, safe='')}/versions",
    }


def mlflow_ui_links(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    run_id: str | None = None,
    experiment_id: str | None = None,
) -> dict[str, str]:
    """Browser links to a model version (and its training run) in the MLflow UI."""
    if not tracking_uri.lower().startswith(("http://", "https://")):
        return {}  # a database URI has no UI
    base = tracking_uri.rstrip("/")
    links = {"model_version": f"{base}/#/models/{quote(name, safe='')}/versions/{version}"}
    if run_id and experiment_id:
        links["run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return links
