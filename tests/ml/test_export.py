"""ml.export: the LiteRT artifact reproduces the Keras model, or is not written at all.

The networks are built by ml.model.build_model (untrained: conversion and checking do not
need training) and converted by TensorFlow's real converter, run by the real LiteRT runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml.export import (
    SlimExportError,
    prediction_mismatch,
    probe_rows,
    run_litert,
    write_litert_artifact,
)
from ml.model import build_model
from serving.server.contract import LITERT_CHECK_FILE, LITERT_MODEL_FILE, SLIM_ATOL, SLIM_RTOL

COLUMNS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model():
    import keras

    # Seed 5: some predictions near 0 while the network's last values are near its target mean
    # 120, so LiteRT and Keras differ there by two float32 ulps of 124 (3.5e-5, at -4.2): what
    # the tolerance must allow (it once allowed only 1e-5 + 1e-6 x |that row|, and refused).
    keras.utils.set_random_seed(5)
    return build_model(
        3,
        [8, 4],
        0.01,
        feature_mean=[1.0, -2.0, 0.5],
        feature_variance=[4.0, 1.0, 9.0],
        target_mean=120.0,
        target_std=30.0,
    )


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return (np.random.default_rng(3).normal(size=(400, 3)) * [2, 1, 3]).astype("float32")


@pytest.mark.integration  # TensorFlow and LiteRT
def test_the_artifact_reproduces_keras_and_carries_its_own_check(model, rows, tmp_path):
    diff = write_litert_artifact(
        model,
        tmp_path / "litert",
        feature_columns=COLUMNS,
        output_name="prediction",
        check_rows=rows,
        example_rows=rows[:5],
    )
    assert sorted(p.name for p in (tmp_path / "litert").iterdir()) == [
        LITERT_CHECK_FILE,
        LITERT_MODEL_FILE,
    ]
    keras_out = np.asarray(model(rows, training=False), dtype=np.float64).ravel()
    got = run_litert((tmp_path / "litert" / LITERT_MODEL_FILE).read_bytes(), rows)
    assert prediction_mismatch(keras_out, got) is None
    assert 0 <= diff <= SLIM_ATOL + SLIM_RTOL * np.abs(keras_out).max()

    check = json.loads((tmp_path / "litert" / LITERT_CHECK_FILE).read_text())
    assert check["feature_columns"] == COLUMNS and check["output_name"] == "prediction"
    assert np.array_equal(np.asarray(check["inputs"], dtype=np.float32), rows[:5])
    # The expected outputs are Keras's own, not the runtime's.
    assert np.array_equal(check["outputs"], keras_out[:5])


@pytest.mark.integration  # TensorFlow and LiteRT
def test_a_model_litert_cannot_convert_is_refused_and_nothing_is_written(rows, tmp_path):
    import keras
    import tensorflow as tf

    inputs = keras.Input((3,))
    # No LiteRT builtin op computes this: conversion fails.
    hidden = keras.layers.Lambda(lambda t: tf.math.bessel_i1e(t))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    with pytest.raises(SlimExportError, match="LiteRT conversion failed"):
        write_litert_artifact(
            model,
            tmp_path / "litert",
            feature_columns=COLUMNS,
            output_name="prediction",
            check_rows=rows,
            example_rows=rows[:5],
        )
    assert not (tmp_path / "litert").exists()


@pytest.mark.integration  # TensorFlow and LiteRT
def test_check_rows_of_the_wrong_width_are_a_clear_error(model, rows, tmp_path):
    with pytest.raises(SlimExportError, match="2 features"):
        write_litert_artifact(
            model,
            tmp_path / "litert",
            feature_columns=["a", "b"],
            output_name="prediction",
            check_rows=rows,
            example_rows=rows[:5],
        )


def test_the_tolerance_is_absolute_near_zero_and_relative_for_large_values():
    assert prediction_mismatch(np.array([0.0, 1000.0]), np.array([9e-6, 1000.0009])) is None
    problem = prediction_mismatch(np.array([0.0, 1.0]), np.array([2e-5, 1.0]))
    assert problem is not None and "row 0" in problem
    assert "row 1" in prediction_mismatch(np.array([0.0, 1000.0]), np.array([0.0, 1000.01]))
    assert prediction_mismatch(np.array([1.0]), np.array([np.nan])) == "non-finite predictions"
    assert "2 predictions for 1 rows" in prediction_mismatch(np.array([1.0]), np.ones(2))


@pytest.mark.integration  # TensorFlow and LiteRT
def test_probe_rows_follow_the_training_statistics_the_model_carries(model):
    probes = probe_rows(model, 20_000)
    assert probes.shape == (20_000, 3) and probes.dtype == np.float32
    np.testing.assert_allclose(probes.mean(axis=0), [1.0, -2.0, 0.5], atol=0.1)
    np.testing.assert_allclose(probes.var(axis=0), [4.0, 1.0, 9.0], rtol=0.05)
