"""The model server: what the serving image contains, and nothing else.

Imports stop at this package's own dependencies (numpy, MLflow's pyfunc loader, uvicorn,
orjson, TensorFlow for Keras models): never ``ml``, ``serving.deploy``, Airflow or the
Kubernetes client (a test enforces it). ``python -m serving.server`` runs it.
"""
