"""Serving, in two rooms that ship to different places.

* :mod:`serving.server` - the model server, and the only code in the serving image.
* :mod:`serving.deploy` - rollouts: targets (local, Kubernetes), verification, the rollout pod,
  manifests and every pipeline pod; runs in Airflow workers and in the pipeline image.

This file stays empty of imports: importing ``serving.server`` must not pull in the deploy side.
"""
