"""MLflow "models from code" definition of the served regressor.

MLflow copies this file into the model and runs it at load, without this repository: it imports
only keras, tensorflow, numpy, pandas and mlflow, never ``ml``. Not ``keras.Model.predict``: it
builds a data pipeline on every call, which dominates a small request; one ``tf.function`` with
a fixed input signature, traced once at load, is cheaper still than an eager call (figures in
docs/benchmarks.md, "Figures cited by the code").
"""

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

PREDICTION_COLUMN = "prediction"


class KerasRegressor(mlflow.pyfunc.PythonModel):
    """Raw feature columns in, one float64 ``prediction`` column out."""

    def load_context(self, context) -> None:
        model = keras.saving.load_model(context.artifacts["keras_model"], compile=False)
        self._n_features = int(model.input_shape[-1])
        # Column order the network was trained with (set by the trainer via model_config);
        # selecting by name makes the prediction independent of the caller's column order.
        config = context.model_config or {}
        self._feature_columns = list(config.get("feature_columns") or []) or None

        @tf.function(
            input_signature=[tf.TensorSpec(shape=[None, self._n_features], dtype=tf.float32)]
        )
        def forward(features):
            return model(features, training=False)

        self._model = model  # keeps the variables alive for the traced graph
        # Tracing now means no first-request stall; calling the concrete function also skips
        # tf.function's per-call argument matching (a large share of a small call; figures in
        # docs/benchmarks.md).
        self._forward = forward.get_concrete_function()

    # No `from __future__ import annotations` here: MLflow reads this hint at runtime, and a
    # pd.DataFrame hint tells it to keep the DataFrame as is (no type-hint conversion).
    def predict(self, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        # Reindexing costs about as much as the call itself (docs/benchmarks.md): skip it when the
        # input already has the trained order (MLflow's schema enforcement reorders columns to the
        # signature's order before calling us).
        if self._feature_columns is not None and list(frame.columns) != self._feature_columns:
            missing = [c for c in self._feature_columns if c not in frame.columns]
            if missing:
                raise ValueError(f"input is missing feature columns: {missing}")
            frame = frame[self._feature_columns]
        features = frame.to_numpy(dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self._n_features:
            raise ValueError(
                f"expected {self._n_features} feature columns, got shape {features.shape}"
            )
        outputs = self._forward(tf.convert_to_tensor(features)).numpy()
        return pd.DataFrame(
            {PREDICTION_COLUMN: outputs.reshape(-1).astype(np.float64)}, index=frame.index
        )


mlflow.models.set_model(KerasRegressor())
