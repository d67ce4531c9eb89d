"""Pyfunc models of the synthetic data for the governance tests: they score on the pipeline's
holdout, and serve, in seconds (no TensorFlow).

:class:`Oracle` predicts the synthetic load (``ml/synthetic.py``) without its noise, plus a
constant ``bias``: with bias 0 the holdout RMSE is about the noise (1.0), and every unit of
bias makes it worse, so a test picks a version better or worse than ``@champion``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from ml.schema import SYNTHETIC_FEATURES


class Oracle(PythonModel):
    def __init__(self, bias: float) -> None:
        self.bias = float(bias)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        x = model_input
        t, h = x["temperature_c"].to_numpy(float), x["hour_of_day"].to_numpy(float)
        wk = x["is_weekend"].to_numpy(float)
        load = (
            30.0
            - 4.0 * wk
            + 0.05 * (t - 18.0) ** 2
            + 8.0 * (1.0 - 0.6 * wk) * np.exp(-(((h - 8.0) / 2.5) ** 2))
            + 12.0 * np.exp(-(((h - 19.0) / 3.0) ** 2))
            + 0.012 * (x["humidity_pct"].to_numpy(float) - 40.0) * np.clip(t - 22.0, 0.0, None)
            + 0.025 * x["wind_speed_ms"].to_numpy(float) * np.clip(12.0 - t, 0.0, None)
            - 0.012 * x["solar_wm2"].to_numpy(float)
        )
        return np.clip(load, 0.0, None) + self.bias


def example() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = rng.uniform([-5, 20, 0, 0, 0, 0], [35, 100, 23, 1, 15, 900], size=(8, 6))
    rows[:, 2:4] = np.round(rows[:, 2:4])
    return pd.DataFrame(rows, columns=SYNTHETIC_FEATURES)


def log_oracle(bias: float, registered_name: str) -> str:
    """Log an :class:`Oracle` in a new run of the active experiment and register it, as a
    notebook would (no pipeline tags, no gate); returns the version."""
    import cloudpickle
    import mlflow

    import tests.integration.governance_models as this_module

    cloudpickle.register_pickle_by_value(this_module)
    with mlflow.start_run(run_name=f"notebook: oracle {bias:+g}"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=Oracle(bias),
            input_example=example(),
            pip_requirements=["mlflow"],  # skips requirement inference (~5 s a model)
        )
    return str(mlflow.register_model(info.model_uri, registered_name).version)
