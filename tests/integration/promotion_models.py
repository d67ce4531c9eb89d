"""Tiny pyfunc models for the promotion tests: they serve in seconds (no TensorFlow).

``deploy_model`` is model-agnostic: it needs a registered version with a signature and an
input example. Log them with :func:`log_version`: the classes are pickled by value, so a model
server or an Airflow worker loads them without importing this test package.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

FEATURES = ["x1", "x2", "x3"]


def example() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(rng.normal(size=(8, len(FEATURES))), columns=FEATURES)


class Linear(PythonModel):
    """Deterministic: the endpoint and a local load agree exactly."""

    def __init__(self, weights: list[float]) -> None:
        self.weights = np.asarray(weights, dtype=float)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        return model_input[FEATURES].to_numpy(dtype=float) @ self.weights


class Noisy(PythonModel):
    """Answers every request (passes the deploy smoke test) but never agrees with itself."""

    def predict(self, context, model_input: pd.DataFrame, params=None):
        return np.random.default_rng().normal(size=len(model_input))


def log_version(
    model: PythonModel, registered_name: str, profile: dict | None = None, *, gated: bool = True
) -> str:
    """Log ``model`` in a new run of the active experiment and register it; returns the version.

    ``profile``: a drift profile (``ml.drift.profile_frame``) logged with the run, as training
    does: the model server takes its histogram buckets from it. ``gated``: tagged as a version
    whose gate passed (``gate.passed``), which the rollout path requires before it puts a
    version live (``ml.gate.uncleared``).
    """
    import cloudpickle
    import mlflow

    import tests.integration.promotion_models as this_module

    cloudpickle.register_pickle_by_value(this_module)
    with mlflow.start_run():
        if profile is not None:
            mlflow.log_dict(profile, "drift/profile.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            input_example=example(),
            pip_requirements=["mlflow"],  # skips requirement inference (~5 s a model)
        )
    tags = {"gate.passed": "true"} if gated else None
    return str(mlflow.register_model(info.model_uri, registered_name, tags=tags).version)
