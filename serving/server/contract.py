"""What the pipeline and the model server agree on, defined once.

The server package imports nothing outside itself, so the agreement lives here and the
pipeline (``ml``, ``serving.deploy``) imports it, never the other way round. The one copy that
cannot import it is ``ml/keras_pyfunc.py``: MLflow runs that file on its own at load time
(models from code), so it repeats ``PREDICTION_COLUMN`` and a unit test keeps the two equal.
"""

from __future__ import annotations

from typing import Any

# The Keras regressor this pipeline logs (ml.train): a models-from-code pyfunc whose code file
# and class the server recognises for its fast path, with the .keras file under this key.
KERAS_ARTIFACT_KEY = "keras_model"
KERAS_CODE_FILE = "keras_pyfunc.py"
KERAS_PYTHON_MODEL_CLASS = "KerasRegressor"
# The pyfunc's single output column.
PREDICTION_COLUMN = "prediction"
# MLflow signature column types the fast path accepts as float32 features.
NUMERIC_INPUT_TYPES = frozenset({"double", "float", "long", "integer"})


def is_numeric_column(spec: Any) -> bool:
    """Whether an MLflow schema column (a ``ColSpec``) has one of ``NUMERIC_INPUT_TYPES``."""
    return str(getattr(spec.type, "name", spec.type)) in NUMERIC_INPUT_TYPES


# The pinned model URI the serving image loads at start (Kubernetes sets it in the pod spec).
MODEL_URI_ENV = "SERVING_MODEL_URI"
# Every response names the registry version it came from.
VERSION_HEADER = "X-Model-Version"
# The drift profile the pipeline logs with each training run (ml.evaluate), in that run's
# artifacts: {"columns": {<column>: {"edges": [...], ...}, ...}}. The server takes its feature
# and prediction histogram buckets from it; the predictions' column is this pseudo-column.
DRIFT_PROFILE_ARTIFACT = "drift/profile.json"
DRIFT_PROFILE_PREDICTION = "__prediction__"
# The TensorFlow-free runtime artifact logged next to the Keras model (ml.export): a pyfunc
# artifact folder holding the LiteRT flatbuffer and the check the server runs at load (the
# input example's rows, the Keras predictions for them, the feature and output columns).
LITERT_ARTIFACT_KEY = "litert_model"
LITERT_MODEL_FILE = "model.tflite"
LITERT_CHECK_FILE = "check.json"
# How close the runtime's predictions must be to Keras's, per row: |got - keras| <= ATOL +
# RTOL * max |keras| over the rows compared. The relative part is ~8 float32 ulps of the
# outputs' scale, not of the row's own value: a float32 network cannot promise 1e-5 absolute
# once predictions are in the hundreds (one ulp at 1000 is 6e-5), and a prediction near 0 from
# a network whose outputs are near 120 carries the rounding of 120 (2 ulps there: 3e-5).
SLIM_ATOL = 1e-5
SLIM_RTOL = 1e-6


def slim_allowance(expected: Any) -> float:
    """The largest |runtime - Keras| allowed on any of these rows (``expected``: a NumPy array
    of Keras's finite predictions): ``SLIM_ATOL + SLIM_RTOL * max |expected|``."""
    return SLIM_ATOL + SLIM_RTOL * float(abs(expected).max(initial=0.0))


# The payload log (serving.server.payload): a sampled share of what the server answered, one
# row per answered row, as daily partitions `<path>/date=YYYY-MM-DD/payload-*.parquet|jsonl`
# that the pipeline reads (ml.quality). Columns: the model's input columns, PREDICTION_COLUMN
# and these. Labels come back as partitions of (PAYLOAD_REQUEST_ID, [PAYLOAD_ROW,] label).
REQUEST_ID_HEADER = "X-Request-Id"
PAYLOAD_REQUEST_ID = "request_id"
PAYLOAD_ROW = "row"  # the row's position in its request (0 for a one-row request)
PAYLOAD_VERSION = "model_version"
PAYLOAD_LATENCY_MS = "latency_ms"
PAYLOAD_SERVED_AT = "served_at"  # unix seconds
PAYLOAD_FILE_PREFIX = "payload-"
PAYLOAD_FORMATS = ("parquet", "jsonl")

# A shadow's mirrored request carries the live version's answer to it (the front proxy adds
# it after the caller got that answer); the shadow records how far its own answer is from it.
LIVE_ANSWER_HEADER = "X-Live-Answer"
# The local front proxy merges mirrored requests that wait (serving.deploy.mirror); a merged one
# says how many it carries, and the shadow counts it as that many requests (answered or not,
# and in its latency histogram), so the rollout judge's request count and 5xx share stay per
# mirrored request. Taken only beside LIVE_ANSWER_HEADER, and only from 1 to this many.
MIRRORED_REQUESTS_HEADER = "X-Mirrored-Requests"
MAX_MIRRORED_REQUESTS = 4096
