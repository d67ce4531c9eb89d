"""One place that points MLflow at this deployment's tracking server."""

from __future__ import annotations


def use_mlflow(tracking_uri: str) -> None:
    """Point MLflow's process-wide tracking *and* registry URIs at ``tracking_uri``.

    ``models:/`` URIs are resolved against the global registry URI (an explicit
    ``registry_uri=`` argument does not reach every code path, e.g. ``download_artifacts``),
    and a stray ``MLFLOW_REGISTRY_URI`` would otherwise win over the tracking URI.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
