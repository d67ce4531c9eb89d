"""The reference path: MLflow's own parsing and ``PyFuncModel.predict``, for every request the
fast paths do not take (CSV, Parquet, unusual JSON shapes, bad input of any kind).

:func:`reference_invocations` is ``mlflow.pyfunc.scoring_server.invocations`` with the same
status codes and ``error_code`` values, and these differences: errors carry no stack trace and
never echo the request (``serving.server.replies``); NaN/Infinity literals are a clear 400; a
JSON body the server decoded already is not decoded again; strict mode is checked before the
model runs; and for a Keras model, missing or non-finite
feature values and non-finite predictions are a 400 (MLflow answers ``NaN``, not JSON).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.server.compat import parse_json_data
from serving.server.jsoncodec import UNDECODED
from serving.server.replies import (
    JSON_TYPE,
    NonFiniteInput,
    Reply,
    RequestError,
    classification,
    error_reply,
    non_finite_prediction_reply,
    request_error_reply,
    text_reply,
)
from serving.server.strict import StrictInputs, strict_reply

if TYPE_CHECKING:
    from serving.server.loader import LoadedModel

log = logging.getLogger("serving.server")

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = "application/vnd.apache.parquet"
# What a ``shared`` predict returns for input it does not take (serving.server.pyfunc_batching).
NOT_SHARED = object()

NO_PARQUET_READER = (
    "This server cannot read Parquet request bodies: neither pyarrow nor fastparquet is"
    " installed in its image (the slim serving image leaves them out). Send JSON or CSV, or"
    " serve the model from the full serving image."
)


@functools.cache
def can_read_parquet() -> bool:
    """Whether pandas can read a Parquet body in this process (the slim serving image leaves
    pyarrow out); found at the first Parquet request."""
    for module in ("pyarrow.parquet", "fastparquet"):
        with contextlib.suppress(ImportError):
            __import__(module)
            return True
    return False


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
    model: LoadedModel, body: bytes, content_type: str | None, *, finite: bool,
    inputs: StrictInputs | None = None, observe: tuple[str, ...] = (),
    shared: Callable[[Any], Any] | None = None, payload: Any = UNDECODED,
) -> Reply:  # fmt: skip
    """``mlflow.pyfunc.scoring_server.invocations``, with sanitized errors (no stack traces).

    ``finite``: also reject missing/non-finite feature values and non-finite predictions (for
    the Keras model, where they can only mean garbage in, garbage out). ``inputs``: strict
    mode, checked on the request before MLflow converts it (JSON) or before the model runs
    (CSV, Parquet). ``observe``: columns whose values (and the predictions) an answer carries
    in ``Reply.observed``, for the distribution histograms. ``shared``: predicts a request
    without params in a call shared with concurrent requests (``PyfuncBatching``), or
    returns :data:`NOT_SHARED` for input it does not batch. ``payload``: the JSON body decoded
    already, as ``json.loads`` reads it (``serving.server.jsoncodec.as_mlflow_reads``), used
    instead of decoding ``body`` again; :data:`~serving.server.jsoncodec.UNDECODED`: decode it.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST
    from mlflow.pyfunc import scoring_server as ss
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    supported = (
        f"This predictor only supports the following content types: Types: {ss.CONTENT_TYPES}."
    )
    if content_type is None:
        return text_reply(415, f"{supported} Got no Content-Type header.")
    type_parts = [part.strip() for part in content_type.split(";")]
    mime_type = type_parts[0]
    parameters = {k: v for pair in type_parts[1:] for k, _, v in [pair.partition("=")]}
    if parameters.get("charset", "utf-8").lower() != "utf-8":
        return text_reply(415, "The scoring server only supports UTF-8")
    if unexpected := set(parameters).difference({"charset"}):
        return text_reply(
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
            decoded = strict_json(body) if payload is UNDECODED else payload
            if isinstance(decoded, list):
                raise MlflowInvalidInputException(f"{ss.REQUIRED_INPUT_FORMAT}. Received a list.")
            if not isinstance(decoded, dict):
                raise MlflowInvalidInputException(
                    f"{ss.REQUIRED_INPUT_FORMAT}. Received unexpected input type '{type(decoded)}."
                )
            if inputs is not None and (problem := inputs.payload_problem(decoded)):
                return strict_reply(problem)
            data, params, unified_llm = parse_json_data(decoded, model.metadata, schema)
        elif mime_type == CONTENT_TYPE_PARQUET:
            if not can_read_parquet():  # not the client's bad data: say what to send instead
                return error_reply(415, "INVALID_PARAMETER_VALUE", NO_PARQUET_READER)
            data = ss.parse_parquet_input(parquet_input=io.BytesIO(body))
            params = None
        else:
            return text_reply(415, f"{supported} Got '{content_type}'.")
        check_frame = inputs is not None and mime_type != CONTENT_TYPE_JSON
        if check_frame and (problem := inputs.frame_problem(data)):
            return strict_reply(problem)
        if finite and model.fast is not None:
            fast = model.fast
            _check_finite(data, None if fast.tensor_input else fast.feature_columns)

        predict = model.pyfunc.predict
        try:
            raw = shared(data) if shared is not None and not params else NOT_SHARED
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
        return request_error_reply(exc)
    except MlflowException as exc:
        status, code = exc.get_http_status_code(), str(exc.error_code)
        return error_reply(status, code, exc.message, extra=classification(exc))

    if finite and _has_non_finite(raw):
        return non_finite_prediction_reply()
    out = io.StringIO()
    (ss.unwrapped_predictions_to_json if unified_llm else ss.predictions_to_json)(raw, out)
    try:
        rows = len(raw)
    except TypeError:
        rows = 1
    reply = Reply(200, out.getvalue().encode(), JSON_TYPE, rows=rows)
    if observe:
        reply.observed = observed(data, raw, observe)
    return reply


def observed(
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
