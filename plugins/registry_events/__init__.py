"""Registry events: MLflow model-registry webhooks into Airflow, and links back to MLflow.

* :mod:`registry_events.app` - a FastAPI app the Airflow API server mounts at
  ``/registry-events``: it receives MLflow webhooks, checks their HMAC signature and age,
  drops replays and what nobody watches, and records asset events: a ``@champion`` move
  schedules ``deploy_model``, a version registered outside the pipeline ``gate_new_version``.
* :mod:`registry_events.approvals` - an ``approval`` tag set in MLflow answers the approval
  task waiting for that version.
* :mod:`registry_events.exporter` - ``/registry-events/metrics`` for Prometheus.
* :mod:`registry_events.links` - operator extra links from task pages to the MLflow model
  version and training run.
* ``registry_events_plugin.py`` - the ``AirflowPlugin`` that registers both.
"""
