"""What the server answers: :class:`Reply`, and MLflow's error shapes.

Errors are MLflow's error JSON (``{"error_code": ..., "message": ...}``, plus ``sqlstate`` and
``error_class`` where MLflow sets them), with the echo of the request that MLflow puts into some
messages taken out, and the length bounded (:func:`sanitize_message`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np

MAX_ERROR_MESSAGE_CHARS = 1000
JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"


@dataclasses.dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    rows: int = 0
    error_code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    # (rows, predictions) answered by the reference path, for the distribution histograms.
    observed: tuple[np.ndarray | None, np.ndarray | None] | None = None
    # (rows, predictions) of an answer, for the payload log (set while it is on).
    answered: tuple = ()


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


class NonFiniteInput(RequestError):
    def __init__(self, what: str) -> None:
        super().__init__(
            400,
            "BAD_REQUEST",
            f"Invalid input. {what}: every feature value must be a finite number "
            "(null, NaN and Infinity are not accepted).",
            invalid_input_fields(),
        )


@functools.cache
def invalid_input_fields() -> dict[str, str]:
    """``sqlstate``/``error_class`` that MLflow puts on its invalid-input errors."""
    from mlflow.utils.proto_json_utils import MlflowInvalidInputException

    return classification(MlflowInvalidInputException(""))


def classification(exc: Exception) -> dict[str, str]:
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
    return Reply(status, json.dumps(payload).encode(), JSON_TYPE, error_code=error_code)


def request_error_reply(exc: RequestError) -> Reply:
    return error_reply(exc.status, exc.error_code, exc.message, extra=exc.extra)


def text_reply(status: int, text: str) -> Reply:
    return Reply(status, text.encode(), TEXT_TYPE, error_code=None)


def non_finite_prediction_reply() -> Reply:
    return error_reply(
        400,
        "BAD_REQUEST",
        "The model produced a non-finite prediction: check that the feature values are "
        "within float32 range.",
    )


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
