"""MLflow's scoring protocol, the common JSON shapes: read straight into rows, and answered.

The fast paths use these instead of MLflow's parsing. Each reader (:func:`fast_rows` for
required numeric columns, :func:`tensor_rows` for one unnamed ``float32 [-1, n]`` tensor,
:func:`column_rows` for micro-batched pyfuncs) accepts only what MLflow's scoring server
accepts for that model, produces the same values, and returns None for anything else (the
reference path, MLflow's own parsing, then decides; errors included).
:func:`format_predictions` lays an answer out as the scoring server does.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np

from serving.server.jsoncodec import dumps
from serving.server.replies import NonFiniteInput

# float64 -> float32 casts of huge values give inf, which fast_rows then rejects with a clear 400.
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)

FORMAT_KEYS = frozenset({"dataframe_split", "dataframe_records", "instances", "inputs"})
# Answers to the fast path and a pyfunc's must agree this closely (warm-up checks).
WARMUP_ATOL = 1e-5


def payload_format(
    payload: dict, allow_params: bool, *, ignore_other_keys: bool = False
) -> str | None:
    """The one input key of a JSON body (``dataframe_split``, ``inputs``, ...), or None when
    there is none, more than one, or another key (``params`` only where allowed; any other key
    with ``ignore_other_keys``, as MLflow's parser ignores them)."""
    fmt = None
    for key in payload:
        if key in FORMAT_KEYS:
            if fmt is not None:
                return None
            fmt = key
        elif not ignore_other_keys and (key != "params" or not allow_params):
            return None
    return fmt


# -- JSON -> float32 rows ------------------------------------------------------------------------


def _numeric_matrix(rows: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(rows)
    except (ValueError, TypeError, OverflowError):
        return None
    return arr if arr.dtype.kind in "biuf" and arr.ndim == 2 else None


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
    return _IDENTITY if columns == features else order


def split_matrix(split: Any, features: tuple[str, ...]) -> np.ndarray | None:
    """A ``dataframe_split`` value as a numeric matrix with ``features`` in order, or None."""
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
    return arr if order is None else arr[:, order]


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
    return data if tuple(names) == columns else None


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
    fmt = payload_format(payload, allow_params)
    if fmt is None:
        return None
    value = payload[fmt]
    if fmt == "dataframe_split":
        # The common small request, checked without numpy: the signature's columns in order
        # and a few rows of plain numbers, returned as they are (the model converts them to
        # float32 exactly like the matrix below).
        data = _split_data(value, features, _PLAIN_MAX_ROWS)
        if data is not None and _plain_rows(data, len(features)) is not None:
            return data
        arr = split_matrix(value, features)
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
    return _finite_float32(arr)


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
    fmt = payload_format(payload, allow_params)
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
            type(columns) is not list or len(columns) != width
            or any(type(c) is not str for c in columns) or len(set(columns)) != width
        ):  # fmt: skip
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
    return _finite_float32(arr)


_F64 = np.dtype(np.float64)
_SMALL_MATRIX = 64


def _finite_float32(arr: np.ndarray) -> np.ndarray:
    """A numeric matrix as the pyfunc casts it (float64, then float32); raises
    :class:`NonFiniteInput` where a value is not finite as float32."""
    if arr.dtype is not _F64:
        arr = arr.astype(np.float64)
    rows = arr.astype(np.float32)  # overflow -> inf (the warning is filtered at import)
    if not _all_finite(rows):
        raise NonFiniteInput("A feature value is not finite as float32")
    return rows


def _all_finite(rows: np.ndarray) -> bool:
    """No NaN/inf in a float32 matrix.

    inf/nan propagate through a float64 sum of float32 values, which cannot overflow; for a
    small matrix Python's own float sum is cheaper than a numpy reduction."""
    if rows.size <= _SMALL_MATRIX:
        return math.isfinite(sum(rows.ravel().tolist()))
    return math.isfinite(rows.sum(dtype=np.float64))


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


# -- answers -------------------------------------------------------------------------------------


def format_predictions(values: np.ndarray, layout: str, name: str) -> bytes:
    """The scoring server's answer for one value per row, laid out as ``layout``:
    ``records`` ``[{name: v}]``, ``nested`` ``[[v]]`` or ``flat`` ``[v]``."""
    listed = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
    if layout == "records":
        return dumps({"predictions": [{name: v} for v in listed]})
    if layout == "nested":
        return dumps({"predictions": [[v] for v in listed]})
    return dumps({"predictions": listed})


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


def answer_difference(got: Any, expected: Any) -> float | None:
    """How far the decoded answer ``got`` is from ``expected``: the largest absolute difference
    of their numbers, or None when they are laid out differently."""
    if _skeleton(got) != _skeleton(expected):
        return None
    return float(np.max(np.abs(np.subtract(_numbers(got), _numbers(expected))), initial=0.0))
