"""build_model / set_global_determinism: shapes, output scaling, determinism, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from ml.model import build_model, set_global_determinism

pytestmark = pytest.mark.integration  # TensorFlow: the unit tier never imports it

N_FEATURES = 3


def _build(**overrides):
    kwargs = dict(
        n_features=N_FEATURES,
        hidden_units=[8, 4],
        learning_rate=0.01,
        feature_mean=np.zeros(N_FEATURES),
        feature_variance=np.ones(N_FEATURES),
        target_mean=0.0,
        target_std=1.0,
    )
    kwargs.update(overrides)
    return build_model(**kwargs)


def test_maps_a_feature_batch_to_one_output_per_row():
    model = _build()

    assert model.input_shape == (None, N_FEATURES)
    out = np.asarray(model(np.zeros((5, N_FEATURES), dtype="float32")))
    assert out.shape == (5, 1)


def test_compiles_with_adam_mse_and_rmse():
    model = _build(learning_rate=0.003)

    config = model.get_compile_config()
    assert config["optimizer"]["class_name"] == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.003)
    assert config["loss"] == "mse"
    assert [m["config"]["name"] for m in config["metrics"]] == ["rmse"]


def test_untrained_output_is_in_target_units():
    # Inputs far from zero; the Normalization layer brings them back to ~N(0, 1).
    mean, variance = np.array([100.0, -50.0, 7.0]), np.array([400.0, 25.0, 0.01])
    set_global_determinism(0)
    model = _build(feature_mean=mean, feature_variance=variance, target_mean=1000.0, target_std=5.0)
    rng = np.random.default_rng(0)
    x = (mean + np.sqrt(variance) * rng.normal(size=(2000, N_FEATURES))).astype("float32")

    out = np.asarray(model(x)).ravel()

    # A fresh net's standardized output is O(1), so the rescaled output sits near
    # target_mean with a spread of a few target_std at most.
    assert abs(out.mean() - 1000.0) < 3 * 5.0
    assert out.std() < 5 * 5.0


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    set_global_determinism(7)
    first = _build().get_weights()
    set_global_determinism(7)
    second = _build().get_weights()
    set_global_determinism(8)
    third = _build().get_weights()

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, c) for a, c in zip(first, third, strict=True))


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_features": 0},
        {"hidden_units": []},
        {"hidden_units": [8, 0]},
        {"learning_rate": 0.0},
        {"feature_mean": np.zeros(N_FEATURES + 1)},
        {"feature_variance": np.ones(N_FEATURES - 1)},
        {"feature_variance": np.array([1.0, -1.0, 1.0])},
        {"feature_mean": np.array([0.0, np.nan, 0.0])},
        {"target_std": 0.0},
        {"target_std": float("inf")},
        {"target_mean": float("nan")},
    ],
)
def test_rejects_bad_arguments(overrides):
    with pytest.raises(ValueError):
        _build(**overrides)
