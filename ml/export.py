"""The TensorFlow-free runtime artifact: the trained Keras regressor as a LiteRT flatbuffer.

The model server runs it with ``ai-edge-litert`` and numpy only (``serving/server/slim.py``);
why LiteRT and not ONNX: docs/benchmarks.md ("Slim runtime"). The artifact folder (logged under
``serving.server.contract.LITERT_ARTIFACT_KEY``) holds ``model.tflite`` (float32, no
quantization) and ``check.json``: the feature columns in the network's order, the output column,
and the input example's rows with Keras's predictions, which the server reproduces at load or
refuses the artifact. A conversion that fails or differs from Keras only costs the slim path:
the model is logged without it and served by TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.server.contract import (
    LITERT_CHECK_FILE,
    LITERT_MODEL_FILE,
    SLIM_ATOL,
    SLIM_RTOL,
    slim_allowance,
)

log = logging.getLogger(__name__)

# The converted model is checked against Keras on at most this many rows (the training
# features); more adds time to training, not confidence.
MAX_CHECK_ROWS = 10_000


class SlimExportError(RuntimeError):
    """The model could not be converted, or the conversion does not reproduce Keras."""


def to_litert(model) -> bytes:
    """The Keras model as a LiteRT flatbuffer (float32 builtin ops, no optimizations)."""
    import tensorflow as tf

    # from_keras_model, not from_concrete_functions([...], model): with the model passed as
    # the trackable object TF 2.21 converts garbage (outputs ~1e17, measured), silently.
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = []
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    # The converter exports a SavedModel first and prints its endpoints to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(converter.convert())


def run_litert(model_bytes: bytes, rows: np.ndarray) -> np.ndarray:
    """``rows`` through the LiteRT interpreter (the serving runtime): float64, shape (n,)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes, num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]["index"]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    interpreter.resize_tensor_input(index, rows.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, rows)
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(output), dtype=np.float64).reshape(-1)


def probe_rows(model, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn from the training distribution the model itself carries (its
    ``standardize`` layer's mean and variance, ``ml.model``): check rows when the trainer hands
    over only a few real ones (it streams its data). Empty when the model has no such layer."""
    try:
        layer = model.get_layer("standardize")
        mean = np.asarray(layer.mean, dtype=np.float64).reshape(-1)
        std = np.sqrt(np.asarray(layer.variance, dtype=np.float64).reshape(-1))
    except (ValueError, AttributeError):
        return np.empty((0, 0), dtype=np.float32)
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, mean.size)) * std + mean).astype(np.float32)


def prediction_mismatch(expected: np.ndarray, got: np.ndarray) -> str | None:
    """Why ``got`` does not reproduce ``expected`` (None when it does, within the tolerance)."""
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if expected.shape != got.shape:
        return f"{got.size} predictions for {expected.size} rows"
    if not np.all(np.isfinite(got)):
        return "non-finite predictions"
    diff = np.abs(got - expected)
    allowed = slim_allowance(expected)
    if np.all(diff <= allowed):
        return None
    worst = int(np.argmax(diff))
    return (
        f"max abs difference {float(np.max(diff)):.3g} (row {worst}: {got[worst]!r} vs Keras "
        f"{expected[worst]!r}; allowed {allowed:.3g}: {SLIM_ATOL:g} + {SLIM_RTOL:g} x max |Keras|)"
    )


def write_litert_artifact(
    model,
    directory: Path,
    *,
    feature_columns: Sequence[str],
    output_name: str,
    check_rows: np.ndarray,
    example_rows: np.ndarray,
) -> float:
    """Convert ``model``, check it against Keras on ``check_rows`` (the first
    ``MAX_CHECK_ROWS``; fewer are topped up with :func:`probe_rows`) and ``example_rows``, and
    write ``model.tflite`` + ``check.json`` into ``directory``. Returns the largest absolute
    difference from Keras; raises :class:`SlimExportError` (and writes nothing) on failure."""
    example = np.asarray(example_rows, dtype=np.float32)
    given = np.asarray(check_rows, dtype=np.float32)[:MAX_CHECK_ROWS]
    parts = [given]
    if len(given) < MAX_CHECK_ROWS:
        probes = probe_rows(model, MAX_CHECK_ROWS - len(given))
        if probes.size and probes.shape[1:] == given.shape[1:]:
            parts.append(probes)
    rows = np.concatenate([*parts, example])
    if rows.ndim != 2 or rows.shape[1] != len(feature_columns):
        raise SlimExportError(
            f"check rows have shape {rows.shape}, the model has {len(feature_columns)} features"
        )
    try:
        model_bytes = to_litert(model)
    except Exception as exc:
        raise SlimExportError(f"LiteRT conversion failed: {exc}") from exc
    keras_outputs = np.asarray(model(rows, training=False), dtype=np.float64).reshape(-1)
    try:
        got = run_litert(model_bytes, rows)
    except ImportError as exc:
        raise SlimExportError(f"the LiteRT runtime is not installed here: {exc}") from exc
    except Exception as exc:
        raise SlimExportError(f"the converted model does not run in LiteRT: {exc}") from exc
    if problem := prediction_mismatch(keras_outputs, got):
        raise SlimExportError(f"LiteRT does not reproduce the Keras model: {problem}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LITERT_MODEL_FILE).write_bytes(model_bytes)
    document = {
        "feature_columns": list(feature_columns),
        "output_name": output_name,
        # float32 values as JSON floats: exactly what the network saw (float32 -> float64 is
        # exact, and repr round-trips).
        "inputs": example.astype(np.float64).tolist(),
        "outputs": keras_outputs[len(rows) - len(example) :].tolist(),
    }
    (directory / LITERT_CHECK_FILE).write_text(json.dumps(document))
    return float(np.max(np.abs(got - keras_outputs)))
