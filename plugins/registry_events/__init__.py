"""Registry events: MLflow model-registry webhooks into Airflow, and links back to MLflow.

* :mod:`registry_events.app` - a FastAPI app the Airflow API server mounts at
  ``/registry-events``: it receives MLflow ``model_version_alias.created`` webhooks, checks
  their HMAC signature and age, drops replays and aliases nobody watches, and records an asset
  event that schedules ``deploy_model``.
* :mod:`registry_events.links` - operator extra links from task pages to the MLflow model
  version and training run.
* ``registry_events_plugin.py`` - the ``AirflowPlugin`` that registers both.
"""
