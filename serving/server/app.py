"""A model server that speaks MLflow's scoring protocol, faster, with metrics.

``python -m serving.server --model-uri models:/regression-model/3 [--host] [--port] [--workers]``

Routes (a client of ``mlflow models serve`` must not notice the switch):

- ``POST /invocations``  the scoring protocol: JSON (``dataframe_split``, ``dataframe_records``,
  ``instances``, ``inputs``, optional ``params``), CSV (``text/csv``) and Parquet, with the same
  status codes and the same error JSON (``{"error_code": ..., "message": ...}``) as MLflow
- ``GET /ping``, ``GET /health``   200 once ready, 503 before (MLflow: 200 once loaded)
- ``GET /version``   the MLflow version, like MLflow
- ``GET /v1/model``  what is served: ``{name, version, uri, run_id, model_id, flavor, ...}``
- ``GET /metrics``   Prometheus text format (``serving.server.metrics``, ``prometheus_client``);
  with ``--workers N`` any worker answers for all of them (``prometheus_client``'s multiprocess
  mode: each worker keeps its numbers in files in ``$PROMETHEUS_MULTIPROC_DIR``)

Every response carries ``X-Model-Version`` when the model came from the registry.

How a request is answered. The fast path (Keras networks: the project's pyfunc, and the
``tensorflow``/``keras`` flavors, see ``serving.server.loader``) parses the common JSON shapes
straight into a float32 matrix (named columns for the project's pyfunc, rows by position for a
tensor signature; a small request of plain numbers is checked in pure Python and handed over as
is), and the model runs on it through the micro-batcher (``serving.server.batching``); the
answer is laid out as MLflow's scoring server lays out that flavor's (``[{name: v}]`` for the
project's pyfunc, ``[[v]]`` for a ``(None, 1)`` network). The request
path itself only appends one tuple per finished request to a list (and the micro-batcher one
reference to each model call's input rows and output array, for the feature and prediction
histograms); access-log lines and metric updates are made from those records in batches (at
least every 0.25 s, every 256 requests, before every ``/metrics`` answer and at shutdown).
Anything the fast path does not recognise with certainty (CSV, Parquet, unusual shapes, bad
input of any kind) goes through the reference path, which is MLflow's own parsing and
``PyFuncModel.predict`` (schema enforcement included), called the way
``mlflow.pyfunc.scoring_server.invocations`` calls it. So the fast path only ever accepts what
MLflow accepts and answers the same numbers, and every rejection is MLflow's own decision (same
status, same ``error_code``).

A model without the fast path (a scikit-learn pyfunc, say) is micro-batched too where the
warm-up shows it is safe (:class:`PyfuncBatching`, :func:`batching_problem`): concurrent
requests that MLflow parses into frames with the input example's columns and dtypes share one
``pyfunc.predict``, and small ``dataframe_split`` requests of plain numbers for a numeric column
signature skip MLflow's per-request parsing (their rows become one frame per call, by MLflow's
own parser). Each request gets its rows of the answer, written by MLflow's
``predictions_to_json``; a failed shared call re-runs each request alone.

Where this server deliberately differs from MLflow:

- bodies over ``--max-request-bytes`` get 413 (MLflow reads any size);
- a body must have arrived whole within ``--body-timeout-s`` (default 10 s, from when the
  server starts reading it, however it trickles in), else 408 and the connection is closed
  (MLflow sets no limit: a client that sends less than its ``Content-Length`` holds a
  connection for as long as it likes);
- with ``--strict`` (off by default; the Kubernetes Deployment turns it on), requests that
  MLflow accepts only by quietly changing them are a 400 naming the column: a column not in
  the model's input schema (MLflow drops it) and, for a numeric column, a value that is not
  a JSON number (MLflow turns ``true`` into 1.0 and ``"2.5"`` into 2.5). JSON requests are
  checked as decoded, before the fast path or MLflow's parsing runs; CSV and Parquet after
  MLflow's parsing, before the model runs (``StrictInputs``);
- error responses carry no ``stack_trace`` and never echo the request body or the parsed frame;
- ``NaN``/``Infinity`` literals (not JSON) are rejected with a clear 400, and for the Keras
  model missing or non-finite feature values too (MLflow answers ``NaN`` predictions, which is
  not valid JSON either);
- a request without a ``Content-Type`` gets 415 (MLflow fails with a 500);
- readiness waits for a warm-up prediction; SIGTERM drains in-flight requests; access logs are
  JSON lines on stdout, other logs JSON lines on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import inspect
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.server.batching import DEFAULT_MAX_BATCH_ROWS, MicroBatcher
from serving.server.contract import NUMERIC_INPUT_TYPES, VERSION_HEADER
from serving.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.server.metrics import (
    DEFAULT_MAX_FEATURE_HISTOGRAMS,
    MULTIPROCESS_DIR_ENV,
    ServerMetrics,
    clear_directory,
)

if TYPE_CHECKING:
    from serving.server.loader import LoadedModel


try:  # optional: ~3x faster JSON for the hot path
    import orjson

    _fast_loads: Callable[[bytes], Any] = orjson.loads
    _FastDecodeError: type[Exception] = orjson.JSONDecodeError

    _dumps: Callable[[Any], bytes] = orjson.dumps

except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def _fast_loads(body: bytes) -> Any:
        return json.loads(body, parse_constant=_reject_constant)

    _FastDecodeError = ValueError

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


log = logging.getLogger("serving.server")
_perf_counter = time.perf_counter
# float64 -> float32 casts of huge values give inf, which fast_rows then rejects with a clear 400.
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)

CONFIG_ENV = "SERVING_SERVER_CONFIG"
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 10.0
MAX_ERROR_MESSAGE_CHARS = 1000
WARMUP_ATOL = 1e-5

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = "application/vnd.apache.parquet"
_FAST_CONTENT_TYPES = frozenset(
    {b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8"}
)
_FORMAT_KEYS = frozenset({"dataframe_split", "dataframe_records", "instances", "inputs"})
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_ROUTES = {
    "/invocations": "/invocations",
    "/ping": "/ping",
    "/health": "/health",
    "/version": "/version",
    "/metrics": "/metrics",
    "/v1/model": "/v1/model",
}
_GET_ROUTES = frozenset({"/ping", "/health", "/version", "/metrics", "/v1/model"})


# -- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_uri: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    batch_wait_ms: float = 0.0
    batch_mode: str = "auto"
    fast_path: bool = True
    # Concurrent requests to a pyfunc served without the fast path share predict calls.
    pyfunc_batching: bool = True
    # A model's LiteRT artifact, when the runtime is installed (serving.server.slim).
    slim: bool = True
    tf_threads: int = 1
    access_log: bool = True
    request_timeout_s: float = 60.0
    graceful_timeout_s: float = 30.0
    # The whole request body must have arrived this long after the app starts reading it.
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Reject what MLflow quietly coerces or drops (see StrictInputs).
    strict: bool = False
    # Input columns that get a model_server_feature_value histogram (the first N).
    max_feature_histograms: int = DEFAULT_MAX_FEATURE_HISTOGRAMS
    log_level: str = "INFO"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        return cls(**json.loads(text))


# -- replies and errors --------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = _JSON
    rows: int = 0
    error_code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    # (rows, predictions) answered by the reference path, for the distribution histograms.
    observed: tuple[np.ndarray | None, np.ndarray | None] | None = None


class RequestError(Exception):
    """A client error answered as MLflow's error JSON."""

    def __init__(
        self, status: int, error_code: str, message: str, extra: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.extra = extra or {}


@functools.cache
def _invalid_input_fields() -> dict[str, str]:
    """``sqlstate``/``error_class`` that MLflow puts on its invalid-input errors."""
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    return _classification(MlflowInvalidInputException(""))


def _classification(exc: Exception) -> dict[str, str]:
    return {
        key: value
        for key in ("sqlstate", "error_class")
        if isinstance(value := getattr(exc, key, None), str)
    }


def error_reply(
    status: int, error_code: str, message: str, *, extra: dict[str, str] | None = None
) -> Reply:
    """MLflow's error JSON: ``{"error_code", "message"}`` (+ ``sqlstate``/``error_class``)."""
    payload = {"error_code": error_code, "message": sanitize_message(message), **(extra or {})}
    return Reply(status, json.dumps(payload).encode(), _JSON, error_code=error_code)


def _text_reply(status: int, text: str) -> Reply:
    return Reply(status, text.encode(), _TEXT, error_code=None)


NO_PARQUET_READER = (
    "This server cannot read Parquet request bodies: neither pyarrow nor fastparquet is"
    " installed in its image (the slim serving image leaves them out). Send JSON or CSV, or"
    " serve the model from the full serving image."
)


@functools.cache
def _can_read_parquet() -> bool:
    """Whether pandas can read a Parquet body in this process (the slim serving image leaves
    pyarrow out); found at the first Parquet request."""
    for module in ("pyarrow.parquet", "fastparquet"):
        try:
            __import__(module)
        except ImportError:
            continue
        return True
    return False


_ECHO_PATTERNS = (
    # "Failed to predict data '<the whole frame>'. \nError: ..." (scoring_server.invocations)
    (
        re.compile(r"Failed to predict data '.*?'\. ?\n?Error: ", re.S),
        "Failed to predict data. Error: ",
    ),
    # "Failed to enforce schema of data '<the whole frame>' with schema '...'" (models.utils)
    (re.compile(r"of data '.*?' with schema '", re.S), "of data with schema '"),
    # "...valid JSON formatted string. Error: ...\nInput: \n<the whole body>"
    (re.compile(r"\s*Input: \n.*", re.S), ""),
)


def sanitize_message(message: str) -> str:
    """Drop echoed request data from an MLflow error message and bound its length."""
    for pattern, replacement in _ECHO_PATTERNS:
        message = pattern.sub(replacement, message)
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + " ... (truncated)"
    return message


# -- the fast path: JSON -> float32 rows ---------------------------------------------------------


class NonFiniteInput(RequestError):
    def __init__(self, what: str) -> None:
        super().__init__(
            400,
            "BAD_REQUEST",
            f"Invalid input. {what}: every feature value must be a finite number "
            "(null, NaN and Infinity are not accepted).",
            _invalid_input_fields(),
        )


def _numeric_matrix(rows: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(rows)
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.dtype.kind not in "biuf" or arr.ndim != 2:
        return None
    return arr


def _records_matrix(records: Any, features: tuple[str, ...], exact: bool) -> np.ndarray | None:
    if type(records) is not list or not records:
        return None
    n = len(features)
    rows = []
    for record in records:
        if type(record) is not dict or (exact and len(record) != n):
            return None
        try:
            rows.append([record[f] for f in features])
        except KeyError:
            return None
    return _numeric_matrix(rows)


_NO_ORDER: tuple[int, ...] = ()
_IDENTITY = None


@functools.lru_cache(maxsize=256)
def _column_order(columns: tuple, features: tuple[str, ...]) -> tuple[int, ...] | None:
    """Positions of ``features`` in a request's ``columns``; None = already in order;
    ``_NO_ORDER`` = not a plain, complete, duplicate-free list of column names."""
    if len(set(columns)) != len(columns) or any(type(c) is not str for c in columns):
        return _NO_ORDER
    try:
        order = tuple(columns.index(f) for f in features)
    except ValueError:
        return _NO_ORDER
    if columns == features:
        return _IDENTITY
    return order


def _split_matrix(split: Any, features: tuple[str, ...]) -> np.ndarray | None:
    if type(split) is not dict or len(split) != 2:
        return None
    columns, data = split.get("columns"), split.get("data")
    if type(columns) is not list or type(data) is not list or not data:
        return None
    try:
        order = _column_order(tuple(columns), features)
    except TypeError:  # unhashable column "names"
        return None
    if order is _NO_ORDER:
        return None
    arr = _numeric_matrix(data)
    if arr is None or arr.shape[1] != len(columns):
        return None
    if order is not None:
        arr = arr[:, order]
    return arr


def _columns_matrix(
    columns: dict, features: tuple[str, ...], scalars_ok: bool
) -> np.ndarray | None:
    if len(columns) != len(features):
        return None
    try:
        values = [columns[f] for f in features]
    except KeyError:
        return None
    if all(type(v) is list for v in values):
        arr = _numeric_matrix(values)
        if arr is None or arr.shape[1] == 0:
            return None
        return arr.T
    if scalars_ok and all(type(v) in (int, float) for v in values):
        return _numeric_matrix([values])
    return None


# float64 values at least this large round to inf as float32 (half an ulp above FLT_MAX).
_F32_OVERFLOW = 2.0**128 - 2.0**103
# Integers this small are exact in float32, whichever way they get converted.
_F32_EXACT_INT = 2**24
_PLAIN_MAX_ROWS = 16


def _split_data(split: Any, columns: tuple[str, ...], max_rows: int) -> list | None:
    """``split["data"]`` when ``split`` is exactly ``{"columns": <columns, in order>, "data":
    <a list of 1 to max_rows items>}`` (the rows are not looked at), else None."""
    if type(split) is not dict or len(split) != 2:
        return None
    names, data = split.get("columns"), split.get("data")
    if type(names) is not list or type(data) is not list or not 0 < len(data) <= max_rows:
        return None
    if tuple(names) != columns:
        return None
    return data


def _plain_split(split: Any, features: tuple[str, ...]) -> list[list[float]] | None:
    """The common small request, checked without numpy: ``{"columns": <the signature's
    columns, in order>, "data": <a few rows of plain numbers, all finite as float32>}``.

    Returns ``data`` itself (the model converts it to float32 exactly like
    :func:`fast_rows`' matrix), or None: then the general path decides, errors included.
    """
    data = _split_data(split, features, _PLAIN_MAX_ROWS)
    return None if data is None else _plain_rows(data, len(features))


def _plain_rows(data: list, n: int) -> list[list[float]] | None:
    """``data`` if it is rows of ``n`` plain numbers, all finite as float32, else None."""
    for row in data:
        if type(row) is not list or len(row) != n:
            return None
        for value in row:
            if type(value) is float:
                if not -_F32_OVERFLOW < value < _F32_OVERFLOW:  # False for NaN too
                    return None
            elif type(value) is not int or not -_F32_EXACT_INT <= value <= _F32_EXACT_INT:
                return None  # bool, str, null, a big int: the general path decides
    return data


def fast_rows(
    payload: Any, features: tuple[str, ...] | list[str], allow_params: bool
) -> np.ndarray | list[list[float]] | None:
    """``payload`` as rows x features, or None if MLflow must decide.

    Accepts only what MLflow's scoring server accepts for a model whose signature is the
    required numeric columns ``features``, and produces the same values (float64, then float32,
    as the pyfunc does): a float32 matrix, or for a small ``dataframe_split`` request of plain
    numbers its rows as they are (lists of Python numbers that convert to float32 exactly as
    the matrix would). Raises :class:`NonFiniteInput` for values that are not finite.
    """
    if type(payload) is not dict:
        return None
    if type(features) is not tuple:
        features = tuple(features)
    fmt = _payload_format(payload, allow_params)
    if fmt is None:
        return None
    value = payload[fmt]
    if fmt == "dataframe_split":
        plain = _plain_split(value, features)
        if plain is not None:
            return plain
        arr = _split_matrix(value, features)
    elif fmt == "dataframe_records":
        arr = _records_matrix(value, features, exact=False)
    elif type(value) is list:
        arr = _records_matrix(value, features, exact=True)
    elif type(value) is dict:
        arr = _columns_matrix(value, features, scalars_ok=fmt == "inputs")
    else:
        return None
    if arr is None or arr.shape[0] == 0:
        return None
    if arr.dtype is not _F64:
        arr = arr.astype(np.float64)
    rows = arr.astype(np.float32)  # overflow -> inf (the warning is filtered at import)
    if not _all_finite(rows):
        raise NonFiniteInput("A feature value is not finite as float32")
    return rows


def _payload_format(
    payload: dict, allow_params: bool, *, ignore_other_keys: bool = False
) -> str | None:
    """The one input key of a JSON body (``dataframe_split``, ``inputs``, ...), or None when
    there is none, more than one, or another key (``params`` only where allowed; any other key
    with ``ignore_other_keys``, as MLflow's parser ignores them)."""
    fmt = None
    for key in payload:
        if key in _FORMAT_KEYS:
            if fmt is not None:
                return None
            fmt = key
        elif not ignore_other_keys and (key != "params" or not allow_params):
            return None
    return fmt


def tensor_rows(
    payload: Any, width: int, allow_params: bool
) -> np.ndarray | list[list[float]] | None:
    """``payload`` as rows x ``width`` for a model whose signature is one unnamed
    ``float32 [-1, width]`` tensor (the keras/tensorflow flavors), or None if MLflow must decide.

    MLflow feeds such a model its rows by position, whatever the column names: a
    ``dataframe_split`` (without ``index``; ``columns``, if any, ``width`` distinct names) or
    ``instances``/``inputs`` as a list of rows. The values become float32 as MLflow casts
    them; anything else (records, strings, nulls, ragged rows) goes to MLflow. Raises
    :class:`NonFiniteInput` for values that are not finite as float32.
    """
    if type(payload) is not dict:
        return None
    fmt = _payload_format(payload, allow_params)
    if fmt is None:
        return None
    value = payload[fmt]
    if fmt == "dataframe_split":
        if type(value) is not dict or "data" not in value:
            return None
        columns = value.get("columns")
        if len(value) != (1 if columns is None else 2):
            return None
        if columns is not None and (
            type(columns) is not list
            or len(columns) != width
            or any(type(c) is not str for c in columns)
            or len(set(columns)) != width
        ):
            return None
        data = value["data"]
    elif fmt in ("instances", "inputs"):
        data = value
    else:
        return None
    if type(data) is not list or not data:
        return None
    if len(data) <= _PLAIN_MAX_ROWS and _plain_rows(data, width) is not None:
        return data
    arr = _numeric_matrix(data)
    if arr is None or arr.shape[0] == 0 or arr.shape[1] != width:
        return None
    if arr.dtype is not _F64:
        arr = arr.astype(np.float64)
    rows = arr.astype(np.float32)
    if not _all_finite(rows):
        raise NonFiniteInput("A feature value is not finite as float32")
    return rows


_F64 = np.dtype(np.float64)
_SMALL_MATRIX = 64


def _all_finite(rows: np.ndarray) -> bool:
    """No NaN/inf in a float32 matrix.

    inf/nan propagate through a float64 sum of float32 values, which cannot overflow; for a
    small matrix Python's own float sum is cheaper than a numpy reduction."""
    if rows.size <= _SMALL_MATRIX:
        return math.isfinite(sum(rows.ravel().tolist()))
    return math.isfinite(rows.sum(dtype=np.float64))


# -- strict mode: what MLflow quietly coerces or drops is a 400 ----------------------------------

_NUMBER_TYPES = (int, float)  # exact types: type(True) is bool, not int
_NUMBER_OR_NULL = frozenset({int, float, type(None)})
_MAX_NAMED = 5
_MAX_LISTED = 20


def _label(column: Any) -> str:
    text = repr(column)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind_of(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}"
    )


class StrictInputs:
    """Strict mode (``--strict``): requests that MLflow accepts only by quietly changing them.

    Stock MLflow drops columns that are not in the model's input schema and converts what it
    can to the schema's types: a JSON ``true`` in a numeric column becomes 1.0, ``"2.5"`` 2.5.
    Strict mode answers 400 instead, naming the column: for a column not in the schema, and
    for a value of a numeric schema column that is not a JSON number (a boolean, a string, a
    list, an object; ``null`` is a missing value, judged as without strict mode). Only a
    schema of named columns can be checked against; a payload whose shape MLflow rejects
    anyway is left to MLflow (and its error).
    """

    __slots__ = ("_all_numeric", "_expected", "_order", "columns", "numeric")

    def __init__(self, columns: list[str], numeric: list[str]) -> None:
        self.columns = frozenset(columns)
        self.numeric = frozenset(numeric)
        self._order = list(columns)
        self._all_numeric = self.numeric == self.columns  # the Keras model's case
        shown = columns[:_MAX_LISTED]
        self._expected = ", ".join(shown) + (", ..." if len(columns) > len(shown) else "")

    @classmethod
    def from_schema(cls, schema: Any) -> StrictInputs | None:
        """From an MLflow input schema; None without one or without column names."""
        if schema is None or not schema.has_input_names():
            return None
        specs = schema.inputs
        numeric = [s.name for s in specs if _type_name(s) in NUMERIC_INPUT_TYPES]
        return cls([s.name for s in specs], numeric)

    def payload_problem(self, payload: Any) -> str | None:
        """What is wrong with a decoded JSON request, or None (also: MLflow decides)."""
        if type(payload) is not dict:
            return None
        fmt = _payload_format(payload, allow_params=True, ignore_other_keys=True)
        if fmt is None:
            return None
        value = payload[fmt]
        if fmt == "dataframe_split":
            return self._split_problem(value) if type(value) is dict else None
        if type(value) is list:  # records (instances/inputs as a list of objects, too)
            return self._records_problem(value)
        if type(value) is dict and fmt != "dataframe_records":  # columns: {name: values}
            return self._columns_problem(value)
        return None

    def frame_problem(self, frame: Any) -> str | None:
        """What is wrong with a parsed CSV or Parquet request (a DataFrame), or None."""
        columns = list(getattr(frame, "columns", ()))
        if problem := self._unknown(columns):
            return problem
        for column, dtype in frame.dtypes.items():
            if column in self.numeric and dtype.kind not in "iuf":
                got = "booleans" if dtype.kind == "b" else f"non-numeric values ({dtype})"
                return self._not_a_number(column, got)
        return None

    def _split_problem(self, split: dict) -> str | None:
        columns, data = split.get("columns"), split.get("data")
        if type(columns) is not list:
            return None
        if columns != self._order and (problem := self._unknown(columns)):
            return problem
        if type(data) is not list:
            return None
        if self._all_numeric:  # the common case, in one pass in C; below: which column
            try:
                if _NUMBER_OR_NULL.issuperset(map(type, itertools.chain.from_iterable(data))):
                    return None
            except TypeError:  # a row that is not a list
                pass
        numeric = self.numeric
        checks = [(i, column) for i, column in enumerate(columns) if column in numeric]
        for row in data:
            if type(row) is not list:
                return None
            for i, column in checks:
                if i < len(row):
                    value = row[i]
                    if type(value) not in _NUMBER_TYPES and value is not None:
                        return self._not_a_number(column, _kind_of(value))
        return None

    def _records_problem(self, records: list) -> str | None:
        columns, numeric, all_numeric = self.columns, self.numeric, self._all_numeric
        for record in records:
            if type(record) is not dict:
                return None
            if not columns.issuperset(record):
                return self._unknown(list(record))
            if all_numeric and _NUMBER_OR_NULL.issuperset(map(type, record.values())):
                continue
            for column in numeric:
                value = record.get(column)
                if type(value) not in _NUMBER_TYPES and value is not None:
                    return self._not_a_number(column, _kind_of(value))
        return None

    def _columns_problem(self, values_by_column: dict) -> str | None:
        if not self.columns.issuperset(values_by_column):
            return self._unknown(list(values_by_column))
        for column in self.numeric:
            values = values_by_column.get(column)
            for value in values if type(values) is list else (values,):
                if type(value) not in _NUMBER_TYPES and value is not None:
                    return self._not_a_number(column, _kind_of(value))
        return None

    def _unknown(self, names: list) -> str | None:
        columns = self.columns
        unknown = [n for n in names if type(n) is not str or n not in columns]
        if not unknown:
            return None
        listed = ", ".join(_label(n) for n in unknown[:_MAX_NAMED])
        if len(unknown) > _MAX_NAMED:
            listed += f" and {len(unknown) - _MAX_NAMED} more"
        which = f"columns {listed} are" if len(unknown) > 1 else f"column {listed} is"
        return (
            f"Invalid input (strict mode): {which} not in the model's input schema "
            f"({self._expected}). Send only the schema's columns."
        )

    @staticmethod
    def _not_a_number(column: str, got: str) -> str:
        return (
            f"Invalid input (strict mode): column {_label(column)} takes numbers, got {got}. "
            "Booleans and strings are not converted to numbers."
        )


def strict_reply(problem: str) -> Reply:
    return error_reply(400, "BAD_REQUEST", problem, extra=_invalid_input_fields())


def _type_name(spec: Any) -> str:
    return str(getattr(spec.type, "name", spec.type))


# -- the reference path: MLflow's parsing and PyFuncModel.predict ---------------------------------


class _NonFiniteLiteral(ValueError):
    pass


def _reject_literal(name: str) -> Any:
    raise _NonFiniteLiteral(name)


def strict_json(body: bytes) -> Any:
    """``json.loads`` as MLflow does it, except that NaN/Infinity literals are an error.

    Errors are MLflow's invalid-input errors, minus the echo of the body that MLflow adds.
    """
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    try:
        return json.loads(body, parse_constant=_reject_literal)
    except _NonFiniteLiteral as exc:
        raise MlflowInvalidInputException(
            f"{exc} is not a valid JSON number: send finite numbers only "
            "(and leave out rows with missing values)."
        ) from None
    except UnicodeDecodeError as exc:
        raise MlflowInvalidInputException(
            "Ensure that input is a valid JSON formatted string. "
            f"Error: the body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
        ) from None
    except json.JSONDecodeError as exc:
        raise MlflowInvalidInputException(
            f"Ensure that input is a valid JSON formatted string. Error: '{exc!r}'"
        ) from None


def _check_finite(data: Any, features: list[str] | None) -> None:
    """For the Keras model: no missing or non-finite values in the feature columns
    (``features`` None: a tensor model, every column of a frame, or the whole array).

    Only float columns are looked at (MLflow has cast the schema columns already); anything
    else is left to MLflow's schema enforcement.
    """
    import pandas as pd

    if features is None:
        if isinstance(data, np.ndarray):
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise NonFiniteInput("The input has missing or non-finite values")
            return
        if not isinstance(data, pd.DataFrame):
            return
        features = list(data.columns)
    for column in features:
        if isinstance(data, pd.DataFrame):
            values = data[column] if column in data.columns else None
            if not isinstance(values, pd.Series):
                continue
            values = values.to_numpy()
        elif isinstance(data, dict):
            values = data.get(column)
            if values is None:
                continue
            try:
                values = np.asarray(values)
            except (TypeError, ValueError):
                continue
        else:
            return
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise NonFiniteInput(f"Column {column!r} has missing or non-finite values")


def reference_invocations(
    model: LoadedModel,
    body: bytes,
    content_type: str | None,
    *,
    finite: bool,
    inputs: StrictInputs | None = None,
    observe: tuple[str, ...] = (),
    shared: Callable[[Any], Any] | None = None,
) -> Reply:
    """``mlflow.pyfunc.scoring_server.invocations``, with sanitized errors (no stack traces).

    ``finite``: also reject missing/non-finite feature values and non-finite predictions (for
    the Keras model, where they can only mean garbage in, garbage out). ``inputs``: strict
    mode, checked on the request before MLflow converts it (JSON) or before the model runs
    (CSV, Parquet). ``observe``: columns whose values (and the predictions) an answer carries
    in ``Reply.observed``, for the distribution histograms. ``shared``: predicts a request
    without params in a call shared with concurrent requests (:class:`PyfuncBatching`), or
    returns ``NOT_SHARED`` for input it does not batch.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST
    from mlflow.pyfunc import scoring_server as ss
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    if content_type is None:
        return _text_reply(
            415,
            "This predictor only supports the following content types: "
            f"Types: {ss.CONTENT_TYPES}. Got no Content-Type header.",
        )
    type_parts = [part.strip() for part in content_type.split(";")]
    mime_type = type_parts[0]
    parameters = {k: v for pair in type_parts[1:] for k, _, v in [pair.partition("=")]}
    if parameters.get("charset", "utf-8").lower() != "utf-8":
        return _text_reply(415, "The scoring server only supports UTF-8")
    if unexpected := set(parameters).difference({"charset"}):
        return _text_reply(
            415,
            f"Unrecognized content type parameters: {', '.join(sorted(unexpected))}. "
            f"{ss.SCORING_PROTOCOL_CHANGE_INFO}",
        )

    schema = model.input_schema
    unified_llm = False
    try:
        if mime_type == CONTENT_TYPE_CSV:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MlflowInvalidInputException(
                    "Ensure that input is a valid UTF-8 encoded string. "
                    f"Error: byte {exc.start}: {exc.reason}"
                ) from None
            data = ss.parse_csv_input(csv_input=io.StringIO(text), schema=schema)
            params = None
        elif mime_type == CONTENT_TYPE_JSON:
            decoded = strict_json(body)
            if isinstance(decoded, list):
                raise MlflowInvalidInputException(f"{ss.REQUIRED_INPUT_FORMAT}. Received a list.")
            if not isinstance(decoded, dict):
                raise MlflowInvalidInputException(
                    f"{ss.REQUIRED_INPUT_FORMAT}. Received unexpected input type '{type(decoded)}."
                )
            if inputs is not None and (problem := inputs.payload_problem(decoded)):
                return strict_reply(problem)
            parsed = ss._parse_json_data(decoded, model.metadata, schema)
            data, params, unified_llm = parsed.data, parsed.params, parsed.is_unified_llm_input
        elif mime_type == CONTENT_TYPE_PARQUET:
            if not _can_read_parquet():  # not the client's bad data: say what to send instead
                return error_reply(415, "INVALID_PARAMETER_VALUE", NO_PARQUET_READER)
            data = ss.parse_parquet_input(parquet_input=io.BytesIO(body))
            params = None
        else:
            return _text_reply(
                415,
                "This predictor only supports the following content types:"
                f" Types: {ss.CONTENT_TYPES}. Got '{content_type}'.",
            )
        if (
            inputs is not None
            and mime_type != CONTENT_TYPE_JSON
            and (problem := inputs.frame_problem(data))
        ):
            return strict_reply(problem)
        if finite and model.fast is not None:
            fast = model.fast
            _check_finite(data, None if fast.tensor_input else fast.feature_columns)

        predict = model.pyfunc.predict
        try:
            raw = NOT_SHARED
            if shared is not None and not params:
                raw = shared(data)
            if raw is not NOT_SHARED:
                pass
            elif "params" in inspect.signature(predict).parameters:
                raw = predict(data, params=params)
            else:
                if params:
                    log.warning("the model takes no params: %s ignored", sorted(params))
                raw = predict(data)
        except MlflowException as exc:
            # As MLflow words it, minus the repr of the whole input it puts in the middle.
            exc.message = f"Failed to predict data. Error: {exc.message}"
            raise
        except Exception:
            log.warning("model prediction failed", exc_info=True)
            raise MlflowException(
                "Encountered an unexpected error while evaluating the model. Verify that the "
                "serialized input Dataframe is compatible with the model for inference.",
                error_code=BAD_REQUEST,
            ) from None
    except RequestError as exc:
        return error_reply(exc.status, exc.error_code, exc.message, extra=exc.extra)
    except MlflowException as exc:
        return error_reply(
            exc.get_http_status_code(),
            str(exc.error_code),
            exc.message,
            extra=_classification(exc),
        )

    if finite and _has_non_finite(raw):
        return error_reply(
            400,
            "BAD_REQUEST",
            "The model produced a non-finite prediction: check that the feature values are "
            "within float32 range.",
        )
    out = io.StringIO()
    if unified_llm:
        ss.unwrapped_predictions_to_json(raw, out)
    else:
        ss.predictions_to_json(raw, out)
    try:
        rows = len(raw)
    except TypeError:
        rows = 1
    reply = Reply(200, out.getvalue().encode(), _JSON, rows=rows)
    if observe:
        reply.observed = _observed(data, raw, observe)
    return reply


def _observed(
    data: Any, raw: Any, columns: tuple[str, ...]
) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """What the reference path answered, for the histograms: the parsed frame's ``columns``
    as a float64 matrix (NaN where a column is missing or not numeric: not counted) and the
    predictions when they are one number per row. Never raises."""
    import pandas as pd

    try:
        matrix = None
        if isinstance(data, pd.DataFrame) and len(data):
            matrix = np.full((len(data), len(columns)), np.nan)
            for j, column in enumerate(columns):
                values = data[column] if column in data.columns else None
                if isinstance(values, pd.Series) and values.dtype.kind in "iuf":
                    matrix[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
        predictions = None
        if isinstance(raw, pd.DataFrame):
            raw = raw.iloc[:, 0] if raw.shape[1] == 1 else None
        if isinstance(raw, pd.Series):
            raw = raw.to_numpy() if raw.dtype.kind in "iuf" else None
        if raw is not None:
            arr = np.asarray(raw)
            if arr.dtype.kind in "iuf" and (arr.ndim == 1 or arr.shape[1:] == (1,)):
                predictions = arr.astype(np.float64).reshape(-1)
                if matrix is not None and len(predictions) != len(matrix):
                    predictions = None
        if matrix is None and predictions is None:
            return None
        return matrix, predictions
    except Exception:
        log.debug("reference path: nothing recorded for the histograms", exc_info=True)
        return None


def _has_non_finite(raw: Any) -> bool:
    import pandas as pd

    try:
        if isinstance(raw, pd.DataFrame):
            numeric = raw.select_dtypes("number")
            return bool(numeric.size) and not np.isfinite(numeric.to_numpy(np.float64)).all()
        arr = np.asarray(raw)
        return arr.dtype.kind in "fc" and not np.isfinite(arr).all()
    except (TypeError, ValueError):
        return False


# -- micro-batching for any pyfunc ----------------------------------------------------------------

NOT_SHARED = object()
# A pyfunc whose predict on the input example takes at most this long runs on the event loop
# for small batches (see PyfuncBatching).
INLINE_PREDICT_S = 0.005


class PyfuncBatching:
    """Concurrent requests to a pyfunc served without the fast path share one ``predict``.

    Each request is parsed by MLflow as before (in a worker thread); a parsed DataFrame with
    exactly the columns and dtypes of the parsed input example (and the default index) then
    goes to a :class:`MicroBatcher` that concatenates the frames of the requests waiting
    together, calls ``pyfunc.predict`` once (schema enforcement included) in its model thread
    and cuts each request's rows out of the result. If that call fails, each request runs on
    its own (only the bad one fails). Anything else (other columns or dtypes, params, non-frame
    input) is predicted on its own, as before.

    Used only where :func:`batching_problem` found at load that the model answers one row per
    input row and that a shared call answers each part as a call of its own would.
    """

    def __init__(
        self,
        model: LoadedModel,
        key: tuple,
        loop: asyncio.AbstractEventLoop,
        *,
        inline: bool = False,
        **batcher: Any,
    ) -> None:
        self.key = key
        self.loop = loop
        self.timeout_s = batcher.pop("timeout_s", 60.0)
        # Numeric input columns: small JSON requests skip MLflow's per-request parsing
        # (column_rows); the rows of a shared call become one frame the way MLflow parses a
        # dataframe_split (dataframe_from_parsed_json: the frame, then the schema's types).
        self.columns: tuple[str, ...] | None = None
        self._schema = schema = model.input_schema
        names, _ = key
        if (
            schema is not None
            and not schema.is_tensor_spec()
            and schema.has_input_names()
            and tuple(schema.input_names()) == names
            and all(_type_name(s) in NUMERIC_INPUT_TYPES for s in schema.inputs)
        ):
            self.columns = names
        # A model that answers the example within INLINE_PREDICT_S runs on the event loop for
        # small batches (no hand-off to the model thread and back); a slower one never does.
        mode = "auto" if inline else "thread"
        self.batcher = MicroBatcher(
            model.pyfunc.predict,
            mode=mode,
            merge=self._merge,
            take=_take_rows,
            count=_count_rows,
            **batcher,
        )

    def _frame(self, rows: list) -> Any:
        from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

        split = {"columns": list(self.key[0]), "data": rows}
        return dataframe_from_parsed_json(split, "split", self._schema)

    def _merge(self, parts: list) -> Any:
        import pandas as pd

        if len(parts) == 1 and type(parts[0]) is not list:
            return parts[0]
        if all(type(p) is list for p in parts):
            return self._frame([row for p in parts for row in p])
        frames = [self._frame(p) if type(p) is list else p for p in parts]
        return pd.concat(frames, ignore_index=True)

    def __call__(self, data: Any) -> Any:
        """In a worker thread: ``data``'s predictions from a shared call, or NOT_SHARED."""
        if _frame_key(data) != self.key:
            return NOT_SHARED
        done = asyncio.run_coroutine_threadsafe(self.batcher.predict(data), self.loop)
        return done.result(timeout=self.timeout_s)


_F64_EXACT_INT = 2**53
_COLUMN_ROWS_MAX = 64


def column_rows(payload: Any, columns: tuple[str, ...]) -> list[list[float]] | None:
    """A small request for a pyfunc whose signature is the numeric columns ``columns``, as
    its rows: ``{"dataframe_split": {"columns": <columns, in order>, "data": <1-64 rows of
    plain numbers>}}`` (ints exact as float64, no booleans), which MLflow would parse into a
    frame of those columns cast to the schema's types. Otherwise None (MLflow parses it)."""
    if type(payload) is not dict or len(payload) != 1:
        return None
    data = _split_data(payload.get("dataframe_split"), columns, _COLUMN_ROWS_MAX)
    if data is None:
        return None
    n = len(columns)
    for row in data:
        if type(row) is not list or len(row) != n:
            return None
        for value in row:
            if type(value) is not float and (
                type(value) is not int or not -_F64_EXACT_INT <= value <= _F64_EXACT_INT
            ):
                return None
    return data


def _predictions_json(raw: Any) -> bytes:
    """``raw`` as MLflow's scoring server writes predictions."""
    from mlflow.pyfunc import scoring_server as ss

    out = io.StringIO()
    ss.predictions_to_json(raw, out)
    return out.getvalue().encode()


def _predicts_inline(model: Any) -> bool:
    seconds = getattr(model, "predict_seconds", None)
    return seconds is not None and seconds <= INLINE_PREDICT_S


def _frame_key(data: Any) -> tuple | None:
    import pandas as pd

    if type(data) is not pd.DataFrame or not len(data):
        return None
    index = data.index
    if type(index) is not pd.RangeIndex or index.start != 0 or index.step != 1:
        return None
    return tuple(data.columns), tuple(str(t) for t in data.dtypes)


def _concat_frames(frames: list) -> Any:
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _take_rows(outputs: Any, start: int, stop: int) -> Any:
    import pandas as pd

    if isinstance(outputs, pd.DataFrame | pd.Series):
        return outputs.iloc[start:stop]
    if isinstance(outputs, np.ndarray | list):
        return outputs[start:stop]
    raise TypeError(f"cannot split a {type(outputs).__name__} by rows")


def _count_rows(outputs: Any) -> int:
    import pandas as pd

    if isinstance(outputs, pd.DataFrame | pd.Series | np.ndarray | list):
        return len(outputs)
    raise TypeError(f"a {type(outputs).__name__} has no rows")


def batching_problem(model: LoadedModel, example: str) -> tuple[tuple | None, str]:
    """Whether concurrent requests to ``model``'s pyfunc may share a call, checked on the
    parsed ``example``: returns (the request key, note) or (None, why not)."""
    from mlflow.pyfunc import scoring_server as ss

    try:
        parsed = ss._parse_json_data(example, model.metadata, model.input_schema)
    except Exception as exc:
        return None, f"the input example does not parse: {exc}"
    data = parsed.data
    key = _frame_key(data)
    if parsed.is_unified_llm_input or key is None:
        return None, f"the model takes a {type(data).__name__}, not rows of a DataFrame"
    predict = model.pyfunc.predict
    first = data.reset_index(drop=True)
    try:
        predict(first)  # warm
        started = time.perf_counter()
        predict(first)
        model.predict_seconds = time.perf_counter() - started
    except Exception as exc:
        return None, f"predict on the input example failed: {type(exc).__name__}: {exc}"
    second = first.iloc[::-1].reset_index(drop=True)
    if len(first) == 1:  # two different rows, where the example allows
        second = first.copy()
    try:
        alone = [predict(first), predict(second)]
        together = predict(_concat_frames([first, second]))
        n = len(first)
        if _count_rows(together) != 2 * n or any(_count_rows(a) != n for a in alone):
            return None, "the model does not answer one row per input row"
        parts = [_take_rows(together, 0, n), _take_rows(together, n, 2 * n)]
    except Exception as exc:
        return None, f"a shared call on the input example failed: {type(exc).__name__}: {exc}"
    for part, own in zip(parts, alone, strict=True):
        got, want = _as_json(part), _as_json(own)
        if _skeleton(got) != _skeleton(want):
            return None, "a shared call's answer is laid out differently"
        diff = float(np.max(np.abs(np.subtract(_numbers(got), _numbers(want))), initial=0.0))
        if not diff <= WARMUP_ATOL:
            return None, f"a shared call answers differently (max diff {diff:.3g})"
    return key, f"rows of {len(key[0])} columns share a predict call"


def _as_json(raw: Any) -> Any:
    from mlflow.pyfunc import scoring_server as ss

    out = io.StringIO()
    ss.predictions_to_json(raw, out)
    return json.loads(out.getvalue())


# -- logging -------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("absl", "tensorflow", "h5py", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_QUOTED = {k: json.dumps(k).encode() for k in (*_ROUTES, "GET", "POST", "HEAD")}


class _UtcClock:
    """ISO 8601 UTC with milliseconds, like ``datetime.fromtimestamp(t, UTC).isoformat(...)``,
    with the seconds part formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def format(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return b"%s.%03d+00:00" % (self._text, int((now - second) * 1000))


class AccessLog:
    """JSON access lines on stdout, one per request, written in batches.

    The request path only records a tuple per request (see ``ScoringApp``); the lines are
    formatted here, all at once, when the server drains its records (at least every 0.25 s).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._fd = sys.stdout.fileno() if enabled else -1
        self._clock = _UtcClock()
        self._last_client: Any = None
        self._last_client_json = b"null"

    def write_records(self, records: list[tuple], wall_offset: float) -> None:
        """One line per record: ts, method, path, status, duration_ms, bytes_in, bytes_out,
        client (+ rows, error_code). ``wall_offset``: time.time() - time.perf_counter()."""
        clock = self._clock
        lines = []
        for end, seconds, method, path, status, b_in, b_out, client, rows, error in records:
            if client is not self._last_client:
                self._last_client = client
                self._last_client_json = _dumps(client[0] if client else None)
            extra = b""
            if rows:
                extra = b',"rows":%d' % rows
            if error:
                extra += b',"error_code":' + _dumps(error)
            lines.append(
                b'{"ts":"%s","method":%s,"path":%s,"status":%d,"duration_ms":%.3f,'
                b'"bytes_in":%d,"bytes_out":%d,"client":%s%s}\n'
                % (
                    clock.format(end + wall_offset),
                    _QUOTED.get(method) or _dumps(method),
                    _QUOTED.get(path) or _dumps(path),
                    status,
                    seconds * 1000.0,
                    b_in,
                    b_out,
                    self._last_client_json,
                    extra,
                )
            )
        self._write(b"".join(lines))

    def _write(self, data: bytes) -> None:
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError:
            pass


# -- the ASGI application ------------------------------------------------------------------------

RECORDS_FLUSH_S = 0.25
RECORDS_MAX = 256
_METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_CONNECTION_CLOSE = ((b"connection", b"close"),)


@types.coroutine
def _finish_await(waiter, waiting_on):
    """The rest of an ``await`` begun by hand.

    ``waiter`` is an awaitable's ``__await__()`` iterator, stepped once with ``send(None)``,
    which yielded ``waiting_on`` (the future it waits for). Stepping it by hand first tells
    whether it completes without suspending, so that a timer is only set when it does not
    (``asyncio.timeout`` costs ~10 us, more than the rest of a small request's reading). This
    generator then does what ``await`` would have done from there, cancellation included.
    """
    while True:
        try:
            sent = yield waiting_on
        except BaseException as exc:  # CancelledError (the deadline): waiter cleans up, re-raises
            try:
                waiting_on = waiter.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = waiter.send(sent)
            except StopIteration as done:
                return done.value


class ScoringApp:
    """Raw ASGI app (no framework on the hot path). One instance per worker process.

    Every finished request is recorded as one tuple (``serving.server.metrics.R_*`` layout),
    every fast-path model call (and reference-path answer) as its ``(rows, predictions)``; the
    records become access-log lines and metric updates in batches (:meth:`flush_records`), at
    least every 0.25 s, every 256 requests, before each ``/metrics`` answer and at shutdown.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        on_fatal: Callable[[], None] | None = None,
        metrics_dir: str | None = None,
    ):
        self.config = config
        self.metrics = ServerMetrics(routes=_ROUTES, multiprocess_dir=metrics_dir)
        self.model: LoadedModel | None = None
        self.ready = False
        self.load_error: str | None = None
        self.exit_code = 0
        self.on_fatal = on_fatal
        self.batcher: MicroBatcher | None = None
        self.pyfunc_batching: PyfuncBatching | None = None
        self._batch_key: tuple | None = None
        self.access = AccessLog(config.access_log)
        self._features: tuple[str, ...] = ()
        self._strict: StrictInputs | None = None
        self._allow_params = False
        self._output_name = "prediction"
        self._output_layout = "records"
        self._tensor_width = 0  # > 0: the fast path takes rows by position (tensor signature)
        self._one_prediction = b""
        self._one_prediction_end = b"}]}"
        self._common_headers: tuple[tuple[bytes, bytes], ...] = ()
        self._json_headers: dict[int, tuple[tuple[bytes, bytes], ...]] = {}
        self._model_json = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mlflow_version = _mlflow_version().encode()
        self._records: list[tuple] = []
        self._batches: list[tuple[int, int, bool]] = []
        self._pyfunc_batches: list[tuple[int, int, bool]] = []
        # (rows, predictions) of model calls, by reference (the feature histograms).
        self._observed: list[tuple[Any, Any]] = []
        self._observe_columns: tuple[str, ...] = ()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None

    # -- ASGI entry point ---------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        started = _perf_counter()
        metrics = self.metrics
        metrics.in_flight += 1
        path = scope["path"]
        method = scope["method"]
        bytes_in = 0
        try:
            if path == "/invocations":
                if method == "POST":
                    reply, bytes_in = await self._invocations(scope, receive)
                else:
                    reply = Reply(405, _METHOD_NOT_ALLOWED, headers=((b"allow", b"POST"),))
            elif path in _GET_ROUTES:
                if method in ("GET", "HEAD"):
                    reply = self._get(path)
                else:
                    reply = Reply(405, _METHOD_NOT_ALLOWED, headers=((b"allow", b"GET"),))
            else:
                reply = Reply(404, b'{"detail":"Not Found"}')
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            reply = error_reply(500, "INTERNAL_ERROR", "Internal server error.")
        finally:
            metrics.in_flight -= 1
        body = reply.body
        if reply.content_type is _JSON and not reply.headers:
            headers = self._json_headers.get(len(body)) or self._headers_for(len(body))
        else:
            headers = (
                (b"content-type", reply.content_type),
                (b"content-length", b"%d" % len(body)),
                *self._common_headers,
                *reply.headers,
            )
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        end = _perf_counter()
        records = self._records
        records.append(
            (
                end,
                end - started,
                method,
                path,
                reply.status,
                bytes_in,
                len(body),
                scope.get("client"),
                reply.rows,
                reply.error_code,
            )
        )
        if len(records) >= RECORDS_MAX:
            self.flush_records()
        elif self._flush_handle is None:
            loop = self._loop or asyncio.get_running_loop()
            self._flush_handle = loop.call_later(RECORDS_FLUSH_S, self.flush_records)

    def _headers_for(self, length: int) -> tuple[tuple[bytes, bytes], ...]:
        """The response headers of a JSON reply of ``length`` bytes (kept for small sizes)."""
        headers = (
            (b"content-type", _JSON),
            (b"content-length", b"%d" % length),
            *self._common_headers,
        )
        if length < 4096:
            self._json_headers[length] = headers
        return headers

    def flush_records(self) -> None:
        """Turn the recorded requests and batches into metric updates and access-log lines."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batches = self._batches
        if batches:
            self._batches = []
            self.metrics.observe_batches(batches)
        batches = self._pyfunc_batches
        if batches:
            self._pyfunc_batches = []
            self.metrics.observe_batches(batches, fast=False)
        observed = self._observed
        if observed:
            self._observed = []
            self.metrics.observe_rows(observed)
        records = self._records
        if not records:
            return
        self._records = []
        self.metrics.observe_records(records)
        if self.access.enabled:
            self.access.write_records(records, time.time() - _perf_counter())

    def _get(self, path: str) -> Reply:
        if path in ("/ping", "/health"):
            if self.ready:
                return Reply(200, b"\n")
            if self.load_error:
                return error_reply(503, "TEMPORARILY_UNAVAILABLE", "The model failed to load.")
            return error_reply(503, "TEMPORARILY_UNAVAILABLE", "The model is not ready yet.")
        if path == "/version":
            return Reply(200, self._mlflow_version)
        if path == "/metrics":
            self.flush_records()
            metrics = self.metrics
            # With --workers N, which worker answered (the numbers are the whole server's).
            worker = ((b"x-worker-pid", b"%d" % os.getpid()),) if metrics.multiprocess else ()
            return Reply(200, metrics.render(), METRICS_CONTENT_TYPE.encode(), headers=worker)
        # /v1/model
        if self.model is None:
            return error_reply(503, "TEMPORARILY_UNAVAILABLE", "The model is not loaded yet.")
        return Reply(200, self._model_json)

    async def _read_more(self, receive, first: bytes, deadline: float | None) -> bytes | Reply:
        """The rest of a body that came in several messages, all of it by ``deadline``
        (loop time; None: ``body_timeout_s`` from now)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.config.body_timeout_s
        limit = self.config.max_request_bytes
        chunks = [first]
        size = len(first)
        message: dict[str, Any] = {"more_body": True}
        try:
            async with asyncio.timeout_at(deadline):
                while message.get("more_body", False):
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return self._too_large()
                    chunks.append(chunk)
        except TimeoutError:
            return self._body_timeout()
        return b"".join(chunks)

    def _body_timeout(self) -> Reply:
        reply = error_reply(
            408,
            "BAD_REQUEST",
            f"The request body did not arrive within {self.config.body_timeout_s:g} s "
            "(send the whole body promptly, and no less than its Content-Length).",
        )
        reply.headers = _CONNECTION_CLOSE  # what is left of the body never gets read
        return reply

    def _too_large(self) -> Reply:
        return error_reply(
            413,
            "BAD_REQUEST",
            f"The request body is larger than {self.config.max_request_bytes} bytes: "
            "send fewer rows per request.",
        )

    async def _invocations(self, scope, receive) -> tuple[Reply, int]:
        content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                return error_reply(400, "BAD_REQUEST", "Invalid Content-Length header."), 0
            if declared > self.config.max_request_bytes:
                return self._too_large(), 0
        # The body's first message. When it is there already (the common case: the whole
        # body came with the headers), receive() answers without suspending and no timer is
        # set; when it would wait, it waits under the body deadline.
        waiter = receive().__await__()
        deadline = None
        try:
            waiting_on = waiter.send(None)
        except StopIteration as done:
            message = done.value
        else:
            deadline = asyncio.get_running_loop().time() + self.config.body_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await _finish_await(waiter, waiting_on)
            except TimeoutError:
                return self._body_timeout(), 0
        body = message.get("body", b"")
        if message.get("more_body", False):
            more = await self._read_more(receive, body, deadline)
            if isinstance(more, Reply):
                return more, 0
            body = more
        elif len(body) > self.config.max_request_bytes:
            return self._too_large(), 0
        if not self.ready:
            reply = error_reply(503, "TEMPORARILY_UNAVAILABLE", "The model is not ready yet.")
            return reply, len(body)
        strict = self._strict
        batcher = self.batcher
        if batcher is not None and content_type in _FAST_CONTENT_TYPES:
            try:
                payload = _fast_loads(body)
            except _FastDecodeError:
                payload = None
            if payload is not None:
                if strict is not None:
                    if problem := strict.payload_problem(payload):
                        return strict_reply(problem), len(body)
                    strict = None  # checked: the reference path need not do it again
                try:
                    if self._tensor_width:
                        rows = tensor_rows(payload, self._tensor_width, self._allow_params)
                    else:
                        rows = fast_rows(payload, self._features, self._allow_params)
                except RequestError as exc:
                    reply = error_reply(exc.status, exc.error_code, exc.message, extra=exc.extra)
                    return reply, len(body)
                if rows is not None:
                    try:
                        outputs = await batcher.submit(rows)
                    except Exception:
                        log.warning(
                            "fast-path prediction failed; answering through the pyfunc",
                            exc_info=True,
                        )
                    else:
                        return self._predictions_reply(outputs), len(body)
        elif (
            (shared := self.pyfunc_batching) is not None
            and shared.columns is not None
            and content_type in _FAST_CONTENT_TYPES
        ):
            # the pyfunc's all-double columns: rows straight to the shared call
            reply, strict = await self._shared_rows(shared, body, content_type, strict)
            if reply is not None:
                return reply, len(body)
        reply = await self._reference(body, content_type, strict)
        if reply.observed is not None:
            self._observed.append(reply.observed)
        return reply, len(body)

    async def _shared_rows(
        self,
        shared: PyfuncBatching,
        body: bytes,
        content_type: bytes | None,
        strict: StrictInputs | None,
    ) -> tuple[Reply | None, StrictInputs | None]:
        """A small request of plain numbers for a pyfunc of ``double`` columns, answered from
        a shared predict call without MLflow's per-request parsing; (None, strict) when MLflow
        must parse it (strict None: already checked)."""
        try:
            payload = _fast_loads(body)
        except _FastDecodeError:
            return None, strict
        if strict is not None:
            if problem := strict.payload_problem(payload):
                return strict_reply(problem), None
            strict = None
        rows = column_rows(payload, shared.columns or ())
        if rows is None:
            return None, strict
        self.metrics.count_pyfunc_call()
        try:
            raw = await asyncio.wait_for(shared.batcher.submit(rows), self.config.request_timeout_s)
        except TimeoutError:
            return Reply(504, b"Request processing time exceeded limit", _JSON), None
        except Exception:  # the model's own error: answered as MLflow words it
            return await self._reference(body, content_type, None), None
        if self._observe_columns and (seen := _observed(None, raw, ())):
            self._observed.append((rows, seen[1]))
        return Reply(200, _predictions_json(raw), _JSON, rows=len(rows)), None

    def _predictions_reply(self, outputs: np.ndarray) -> Reply:
        values = outputs.tolist()
        if len(values) == 1:
            value = values[0]
            if -math.inf < value < math.inf:
                # = _dumps({"predictions": [{name: value}]}) (or [[value]], [value]): the
                # common one-row answer
                body = self._one_prediction + _dumps(value) + self._one_prediction_end
                return Reply(200, body, _JSON, rows=1)
        elif all(map(math.isfinite, values)):
            layout = self._output_layout
            if layout == "records":
                name = self._output_name
                body = _dumps({"predictions": [{name: v} for v in values]})
            elif layout == "nested":
                body = _dumps({"predictions": [[v] for v in values]})
            else:
                body = _dumps({"predictions": values})
            return Reply(200, body, _JSON, rows=len(values))
        return error_reply(
            400,
            "BAD_REQUEST",
            "The model produced a non-finite prediction: check that the feature values are "
            "within float32 range.",
        )

    async def _reference(
        self, body: bytes, content_type: bytes | None, inputs: StrictInputs | None
    ) -> Reply:
        model = self.model
        assert model is not None
        self.metrics.count_pyfunc_call()
        ctype = content_type.decode("latin-1") if content_type is not None else None
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(
                    reference_invocations,
                    model,
                    body,
                    ctype,
                    finite=model.fast is not None,
                    inputs=inputs,
                    observe=self._observe_columns,
                    shared=self.pyfunc_batching,
                ),
                timeout=self.config.request_timeout_s,
            )
        except TimeoutError:
            return Reply(504, b"Request processing time exceeded limit", _JSON)

    # -- lifecycle ----------------------------------------------------------------------------

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                if self.metrics.multiprocess:
                    self._tick()
                threading.Thread(
                    target=self._load_and_warm, name="model-loader", daemon=True
                ).start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.ready = False
                for batcher in (self.batcher, self.pyfunc_batching):
                    if isinstance(batcher, PyfuncBatching):
                        batcher = batcher.batcher
                    if batcher is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(batcher.close(), timeout=10)
                if self._tick_handle is not None:
                    self._tick_handle.cancel()
                    self._tick_handle = None
                self.flush_records()
                self.metrics.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _tick(self) -> None:
        """With --workers N: bring this worker's numbers up to date for the others' /metrics."""
        self.flush_records()
        self.metrics.publish()
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(RECORDS_FLUSH_S, self._tick)

    def _load_and_warm(self) -> None:
        """Runs in a thread: load, warm up, then flip to ready on the event loop."""
        from serving.server.loader import load_drift_profile, load_model

        cfg = self.config
        loop = self._loop
        assert loop is not None
        try:
            log.info("loading %s", cfg.model_uri)
            model = load_model(
                cfg.model_uri, fast_path=cfg.fast_path, tf_threads=cfg.tf_threads, slim=cfg.slim
            )
            os.environ["_MLFLOW_IS_IN_SERVING_ENVIRONMENT"] = "true"
            started = time.monotonic()
            self._warm_up(model)
            profile = load_drift_profile(model.identity)
            # What loading left behind lives as long as the process: out of the collector's
            # sight, so that a full collection while serving scans only what came after
            # (otherwise ~0.1 s with TensorFlow and MLflow loaded, all requests waiting).
            gc.collect()
            gc.freeze()
            model.load_seconds += time.monotonic() - started
        except Exception as exc:
            log.error("the model could not be served: %s", exc, exc_info=True)
            loop.call_soon_threadsafe(self._fail, str(exc))
            return
        loop.call_soon_threadsafe(self._set_ready, model, profile)

    def _warm_up(self, model: LoadedModel) -> None:
        """A real prediction through both paths; the fast path must agree with the pyfunc
        (same layout, numbers within ``WARMUP_ATOL``), else the pyfunc serves. Ends with one
        log line saying which path serves the model and why."""
        example = model.serving_input_example()
        source = "the input example"
        if example is None:
            example = _synthetic_example(model)
            source = "rows generated from the signature"
        if example is None:
            log.warning("no input example and no numeric signature: warm-up skipped")
            if model.fast is not None:
                model.fast = None
                model.fast_path_note = "disabled: nothing to check it against at load"
            model.batching_note = "no input example to check it on"
            self._log_serving_path(model)
            return
        reference = reference_invocations(
            model, example.encode(), CONTENT_TYPE_JSON, finite=model.fast is not None
        )
        if reference.status != 200:
            raise RuntimeError(
                f"the warm-up prediction on the model's input example failed "
                f"({reference.status}): {reference.body[:500]!r}"
            )
        if model.fast is not None:
            if problem := _fast_path_problem(model.fast, example, reference.body):
                model.fast = None
                model.fast_path_note = f"disabled at warm-up ({source}): {problem}"
            else:
                model.fast_path_note += f"; agrees with pyfunc.predict on {source}"
        if model.fast is not None:
            model.batching_note = "the fast path batches"
        elif not self.config.pyfunc_batching:
            model.batching_note = "disabled"
        else:
            self._batch_key, model.batching_note = batching_problem(model, example)
            model.batched_pyfunc = self._batch_key is not None
            if model.batched_pyfunc:
                where = "on the event loop" if _predicts_inline(model) else "in the model thread"
                model.batching_note += (
                    f", {where} (predict on the example: {model.predict_seconds * 1000:.1f} ms)"
                )
        self._log_serving_path(model)

    @staticmethod
    def _log_serving_path(model: LoadedModel) -> None:
        if model.fast is not None:
            log.info("serving path: keras-fast-path (%s)", model.fast_path_note)
        else:
            log.info(
                "serving path: %s (fast path: %s; batching: %s)",
                model.serving_path,
                model.fast_path_note,
                model.batching_note,
            )

    def _set_ready(self, model: LoadedModel, profile: dict[str, Any] | None = None) -> None:
        self.model = model
        self._observe_columns = self.metrics.set_distributions(
            _input_columns(model), profile, self.config.max_feature_histograms
        )
        if self.config.strict:
            self._strict = StrictInputs.from_schema(model.input_schema)
            if self._strict is None:
                log.warning("strict mode: the model's input schema names no columns to check")
        if model.fast is not None:
            self._features = tuple(model.fast.feature_columns)
            self._output_name = model.fast.output_name
            self._output_layout = model.fast.output_layout
            self._tensor_width = len(self._features) if model.fast.tensor_input else 0
            self._allow_params = not model.has_params_schema
            self.batcher = MicroBatcher(
                model.fast.predict,
                max_batch_rows=self.config.max_batch_rows,
                max_wait_s=self.config.batch_wait_ms / 1000.0,
                mode=self.config.batch_mode,  # type: ignore[arg-type]
                on_batch=self._on_batch,
                on_outputs=self._on_outputs,
            )
        elif getattr(model, "batched_pyfunc", False) and self._batch_key is not None:
            assert self._loop is not None
            self.pyfunc_batching = PyfuncBatching(
                model,
                self._batch_key,
                self._loop,
                max_batch_rows=self.config.max_batch_rows,
                max_wait_s=self.config.batch_wait_ms / 1000.0,
                on_batch=self._on_pyfunc_batch,
                timeout_s=self.config.request_timeout_s,
                inline=_predicts_inline(model),
            )
        identity = model.identity
        if identity.version is not None:
            self._common_headers = ((VERSION_HEADER.lower().encode(), identity.version.encode()),)
            self._json_headers = {}
        self._one_prediction, self._one_prediction_end = {
            "records": (b'{"predictions":[{' + _dumps(self._output_name) + b":", b"}]}"),
            "nested": (b'{"predictions":[[', b"]]}"),
            "flat": (b'{"predictions":[', b"]}"),
        }[self._output_layout]
        description = {**model.describe(), "mlflow_version": self._mlflow_version.decode()}
        self._model_json = json.dumps(description).encode()
        self.metrics.set_model(
            {
                "name": identity.name,
                "version": identity.version,
                "uri": identity.uri,
                "flavor": model.flavor,
                "fast_path": "true" if model.fast is not None else "false",
            },
            model.load_seconds,
        )
        self.metrics.ready = 1
        self.ready = True
        self.metrics.publish()
        log.info("ready: %s", json.dumps(description))

    def _on_batch(self, rows: int, requests: int, fell_back: bool) -> None:
        self._batches.append((rows, requests, fell_back))  # counted in flush_records

    def _on_pyfunc_batch(self, rows: int, requests: int, fell_back: bool) -> None:
        self._pyfunc_batches.append((rows, requests, fell_back))

    def _on_outputs(self, rows: Any, outputs: np.ndarray) -> None:
        """A fast-path model call's input and outputs, by reference: the feature and
        prediction histograms count them in flush_records."""
        self._observed.append((rows, outputs))

    def _fail(self, message: str) -> None:
        self.load_error = message
        self.exit_code = 1
        if self.on_fatal is not None:
            self.on_fatal()


def _mlflow_version() -> str:
    """What ``mlflow.version.VERSION`` says, without importing mlflow (seconds) at start."""
    from importlib import metadata

    try:
        return metadata.version("mlflow")
    except metadata.PackageNotFoundError:
        from mlflow.version import VERSION

        return VERSION


def _input_columns(model: LoadedModel) -> list[str]:
    """The columns the feature histograms are for: the fast path's, in its row order, else
    the input schema's numeric named columns."""
    if model.fast is not None:
        return list(model.fast.feature_columns)
    schema = model.input_schema
    if schema is None or not schema.has_input_names():
        return []
    return [s.name for s in schema.inputs if _type_name(s) in NUMERIC_INPUT_TYPES]


def _synthetic_example(model: LoadedModel) -> str | None:
    """A request for a model without an input example: one all-zeros row for numeric
    columns; for one ``[-1, n]`` tensor, a few seeded random rows (float32 values)."""
    schema = model.input_schema
    if schema is None:
        return None
    if schema.is_tensor_spec():
        specs = schema.inputs
        shape = tuple(specs[0].shape) if len(specs) == 1 else ()
        if len(shape) != 2 or shape[0] != -1 or specs[0].name is not None:
            return None
        rows = np.random.default_rng(0).normal(size=(8, shape[1])).astype(np.float32)
        return json.dumps({"inputs": rows.tolist()})
    if not schema.has_input_names():
        return None
    specs = schema.inputs
    if any(_type_name(s) not in NUMERIC_INPUT_TYPES for s in specs):
        return None
    names = schema.input_names()
    return json.dumps({"dataframe_split": {"columns": names, "data": [[0] * len(names)]}})


def format_predictions(values: np.ndarray, layout: str, name: str) -> bytes:
    """The scoring server's answer for one value per row, laid out as ``layout``."""
    listed = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
    if layout == "records":
        return _dumps({"predictions": [{name: v} for v in listed]})
    if layout == "nested":
        return _dumps({"predictions": [[v] for v in listed]})
    return _dumps({"predictions": listed})


def _skeleton(obj: Any) -> Any:
    """``obj`` with every number replaced by 0: the layout of an answer."""
    if isinstance(obj, dict):
        return {k: _skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_skeleton(v) for v in obj]
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        return 0
    return obj


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in _numbers(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in _numbers(value)]
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def _fast_path_problem(fast: Any, example: str, reference_body: bytes) -> str | None:
    """Why the fast path's answer to ``example`` is not the pyfunc's (None: it is)."""
    payload = json.loads(example)
    try:
        if fast.tensor_input:
            rows = tensor_rows(payload, len(fast.feature_columns), True)
        else:
            rows = fast_rows(payload, fast.feature_columns, True)
    except RequestError as exc:
        return f"the input example is rejected by the fast path: {exc.message}"
    if rows is None:
        return "the input example is not in a fast-path shape"
    got = json.loads(format_predictions(fast.predict(rows), fast.output_layout, fast.output_name))
    expected = json.loads(reference_body)
    if _skeleton(got) != _skeleton(expected):
        return (
            f"the answers differ in layout (fast path {json.dumps(got)[:120]}, "
            f"pyfunc {json.dumps(expected)[:120]})"
        )
    diff = float(np.max(np.abs(np.subtract(_numbers(got), _numbers(expected))), initial=0.0))
    if not diff <= WARMUP_ATOL:
        return f"fast path and pyfunc disagree (max diff {diff:.3g} > {WARMUP_ATOL:g})"
    return None


# -- running it ----------------------------------------------------------------------------------


def _uvicorn_options() -> dict[str, Any]:
    import importlib.util

    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def app_from_env() -> ScoringApp:
    """Factory for ``--workers N`` (each uvicorn worker process builds its own app)."""
    config = ServerConfig.from_json(os.environ[CONFIG_ENV])
    configure_logging(config.log_level)

    def fatal() -> None:  # a worker that cannot serve stops; uvicorn's supervisor restarts it
        os.kill(os.getpid(), signal.SIGTERM)

    return ScoringApp(config, on_fatal=fatal, metrics_dir=os.environ.get(MULTIPROCESS_DIR_ENV))


def _after_shutdown_signal(signum: int, frame: Any) -> None:
    log.info("stopped on signal %s", signal.Signals(signum).name)


def run(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests finish first. Returns the exit code."""
    import uvicorn

    configure_logging(config.log_level)
    common = {
        "host": config.host,
        "port": config.port,
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": max(1, math.ceil(config.graceful_timeout_s)),
        **_uvicorn_options(),
    }
    log.info(
        "starting model server on http://%s:%s for %s (workers=%s, %s)",
        config.host,
        config.port,
        config.model_uri,
        config.workers,
        common["http"] + "/" + common["loop"],
    )
    # prometheus_client's multiprocess mode (see serving.server.metrics): every worker keeps its
    # metrics in files in one directory, and any worker's /metrics answers for all of them:
    # $PROMETHEUS_MULTIPROC_DIR (emptied of old files first) or a temporary directory, removed
    # at exit. The variable must be set before the workers import prometheus_client.
    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        clear_directory(given)
    if config.workers > 1:
        metrics_dir = given or tempfile.mkdtemp(prefix="model-server-metrics-")
        os.environ[CONFIG_ENV] = config.to_json()
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
        try:
            uvicorn.run(
                "serving.server.app:app_from_env", factory=True, workers=config.workers, **common
            )
        finally:
            if not given:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    app = ScoringApp(config, metrics_dir=given)  # $PROMETHEUS_MULTIPROC_DIR set: files there
    server = uvicorn.Server(uvicorn.Config(app, **common))

    def fatal() -> None:
        server.should_exit = True

    app.on_fatal = fatal
    # uvicorn drains, restores the previous handlers and re-raises the signal it caught, so
    # that the default action kills the process (exit status -15). With these no-op handlers
    # in place, a graceful SIGTERM/SIGINT shutdown ends with exit code 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown_signal)
    server.run()
    if app.exit_code == 0 and not server.started:
        return 1
    return app.exit_code
