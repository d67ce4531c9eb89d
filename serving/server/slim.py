"""The slim path: the Keras regressor's LiteRT artifact (``ml/export.py``), run with
``ai-edge-litert`` and numpy. Nothing here imports TensorFlow or Keras (a test checks
``sys.modules``), so it serves from ``docker/serving-slim.Dockerfile``.

:func:`load_slim` gives the loader, over one interpreter, a :class:`LiteRTPath` (the fast
path's ``predict(rows)`` interface, micro-batched the same way) and an MLflow ``PyFuncModel``
from the model's own metadata (so CSV, Parquet, odd JSON and bad requests still meet MLflow's
parsing and schema enforcement). The artifact's check rows must come out within ``SLIM_ATOL +
SLIM_RTOL * max |keras|`` of the Keras predictions, or the loader falls back to the full path.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.server.contract import (
    LITERT_ARTIFACT_KEY,
    LITERT_CHECK_FILE,
    LITERT_MODEL_FILE,
    SLIM_ATOL,
    SLIM_RTOL,
    slim_allowance,
)

RUNTIME_MODULE = "ai_edge_litert"


class SlimUnavailable(Exception):
    """This model cannot take the slim path (the message says why; not an error)."""


class LiteRTPath:
    """One LiteRT interpreter over the network: float32 rows in, float64 predictions out.

    The interpreter is not thread-safe and has one input shape at a time: calls are serialised
    by a lock (uncontended: the micro-batcher makes one call at a time), and the input is
    resized only when a call's row count differs from the previous one's.
    """

    engine = "litert"
    # The fast-path interface the server reads (serving.server.loader.KerasFastPath): named
    # feature columns in, [{output_name: value}, ...] out, like the pyfunc it stands in for.
    tensor_input = False
    output_layout = "records"

    def __init__(
        self, model_file: str, feature_columns: list[str], output_name: str, *, threads: int = 1
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=model_file, num_threads=max(threads, 1))
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            shape = f"{len(inputs)} inputs and {len(outputs)} outputs"
            raise SlimUnavailable(f"the LiteRT model has {shape}, not 1 and 1")
        signature = tuple(int(d) for d in inputs[0]["shape_signature"])
        if len(signature) != 2 or signature[1] != len(feature_columns):
            why = f"input shape {signature}, but the model has {len(feature_columns)} feature"
            raise SlimUnavailable(f"the LiteRT model takes {why} columns")
        self._input = inputs[0]["index"]
        self._output = outputs[0]["index"]
        self._shape: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        self.feature_columns = list(feature_columns)
        self.n_features = len(feature_columns)
        self.output_name = output_name

    def predict(self, rows: Any) -> np.ndarray:
        """``rows``: (n, n_features) numbers. Returns float64, shape (n,)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} feature columns, got shape {rows.shape}")
        with self._lock:
            interpreter = self._interpreter
            if rows.shape != self._shape:
                interpreter.resize_tensor_input(self._input, rows.shape, strict=True)
                interpreter.allocate_tensors()
                self._shape = rows.shape
            interpreter.set_tensor(self._input, rows)
            interpreter.invoke()
            # get_tensor copies: the next call cannot overwrite a returned result.
            out = interpreter.get_tensor(self._output)
        return out.reshape(-1).astype(np.float64)


class SlimPyfuncImpl:
    """The ``model_impl`` of the slim ``PyFuncModel``: a schema-enforced DataFrame in, one
    float64 column out, like the Keras pyfunc (``ml/keras_pyfunc.py``) it stands in for."""

    def __init__(self, path: LiteRTPath) -> None:
        self._path = path

    def predict(self, data, params=None):
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        columns = self._path.feature_columns
        if list(frame.columns) != columns:
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise ValueError(f"input is missing feature columns: {missing}")
            frame = frame[columns]
        outputs = self._path.predict(frame.to_numpy(dtype=np.float32))
        return pd.DataFrame({self._path.output_name: outputs}, index=frame.index)


@dataclass
class SlimModel:
    path: LiteRTPath
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    note: str


def runtime_available() -> bool:
    try:
        return importlib.util.find_spec(RUNTIME_MODULE) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules entry set to None)
        return False


def load_slim(local_path: str, meta, *, threads: int = 1) -> SlimModel:
    """The slim path for the downloaded model at ``local_path`` (its MLmodel is ``meta``).

    Raises :class:`SlimUnavailable` saying why when the model has no LiteRT artifact, the
    runtime is not installed, or the artifact does not reproduce its check predictions.
    """
    conf = (meta.flavors or {}).get("python_function") or {}
    artifact = ((conf.get("artifacts") or {}).get(LITERT_ARTIFACT_KEY) or {}).get("path")
    if not artifact:
        raise SlimUnavailable(f"no {LITERT_ARTIFACT_KEY!r} artifact")
    if not runtime_available():
        raise SlimUnavailable(f"the LiteRT runtime ({RUNTIME_MODULE}) is not installed")
    folder = Path(local_path) / artifact
    try:
        check = json.loads((folder / LITERT_CHECK_FILE).read_text())
        columns = [str(c) for c in check["feature_columns"]]
        output_name = str(check["output_name"])
        rows = np.asarray(check["inputs"], dtype=np.float32)
        expected = np.asarray(check["outputs"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SlimUnavailable(f"unreadable {LITERT_CHECK_FILE} in the artifact: {exc}") from exc
    if meta.get_params_schema() is not None:
        raise SlimUnavailable("the model declares params")
    try:
        path = LiteRTPath(str(folder / LITERT_MODEL_FILE), columns, output_name, threads=threads)
        got = path.predict(rows)
    except SlimUnavailable:
        raise
    except Exception as exc:
        raise SlimUnavailable(f"the LiteRT model does not load or run: {exc}") from exc
    diff = np.abs(got - expected) if got.shape == expected.shape else None
    if diff is None or not np.all(diff <= slim_allowance(expected)):
        detail = "a different number of rows" if diff is None else f"max diff {diff.max():.3g}"
        why = f"does not reproduce the Keras predictions of its check rows ({detail})"
        raise SlimUnavailable(f"the LiteRT model {why}")
    try:
        from mlflow.pyfunc import PyFuncModel

        pyfunc = PyFuncModel(model_meta=meta, model_impl=SlimPyfuncImpl(path))
    except Exception as exc:
        raise SlimUnavailable(f"MLflow cannot wrap the LiteRT model as a pyfunc: {exc}") from exc
    within = f"{len(expected)} check rows within {SLIM_ATOL:g} + {SLIM_RTOL:g} x max |keras|"
    return SlimModel(
        path, pyfunc, f"litert runtime, no TensorFlow ({within}, max diff {float(diff.max()):.2g})"
    )
