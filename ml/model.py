"""The network: a small dense regressor that carries its own input and output scaling.

Scaling lives inside the model (a Normalization layer in front, a Rescaling layer at the
end) so the saved ``.keras`` file maps raw features to target units on its own: serving
needs no preprocessing code, and nothing can drift between training and serving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

# The input's name, so a saved model documents what it expects.
INPUT_NAME = "features"
OUTPUT_NAME = "prediction"


def build_model(
    n_features: int, hidden_units: Sequence[int], learning_rate: float, *,
    feature_mean: Sequence[float] | np.ndarray, feature_variance: Sequence[float] | np.ndarray,
    target_mean: float, target_std: float,
) -> keras.Model:  # fmt: skip
    """Build and compile the regressor.

    Pure: the scaling statistics are passed in (computed by the caller on the training
    split only), never learned from data here. The dense stack learns a *standardized*
    target; the last layer maps it back with ``y = z * target_std + target_mean``, so an
    untrained net already predicts roughly the target mean and loss/RMSE are in target
    units.
    """
    mean = np.asarray(feature_mean, dtype="float32").reshape(-1)
    variance = np.asarray(feature_variance, dtype="float32").reshape(-1)
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if len(hidden_units) == 0 or any(int(u) < 1 for u in hidden_units):
        raise ValueError(f"hidden_units needs >= 1 layer of >= 1 unit, got {list(hidden_units)}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
    if mean.shape != (n_features,) or variance.shape != (n_features,):
        got = f"got {mean.size} and {variance.size}"
        raise ValueError(f"feature_mean and feature_variance need {n_features} values each, {got}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
        raise ValueError("feature_mean and feature_variance must be finite")
    if np.any(variance < 0):
        raise ValueError("feature_variance must be >= 0")
    if not math.isfinite(target_mean):
        raise ValueError(f"target_mean must be finite, got {target_mean}")
    if not (target_std > 0 and math.isfinite(target_std)):
        raise ValueError(f"target_std must be a positive number, got {target_std}")

    import keras

    inputs = keras.Input(shape=(n_features,), dtype="float32", name=INPUT_NAME)
    x = keras.layers.Normalization(mean=mean, variance=variance, name="standardize")(inputs)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(int(units), activation="relu", name=f"hidden_{i}")(x)
    z = keras.layers.Dense(1, name="standardized_target")(x)
    # Rescaling is a built-in layer, so loading the .keras file needs no custom objects.
    outputs = keras.layers.Rescaling(
        scale=float(target_std), offset=float(target_mean), name=OUTPUT_NAME
    )(z)

    model = keras.Model(inputs=inputs, outputs=outputs, name="regressor")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="mse",
        metrics=[keras.metrics.RootMeanSquaredError(name="rmse")],
    )
    return model


def set_global_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and make TF ops deterministic: same seed, same
    data -> same weights, same predictions (call before building a model)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Some TF kernels (e.g. reductions) otherwise pick non-deterministic algorithms.
    tf.config.experimental.enable_op_determinism()
