"""JSON for the request path: orjson where it is installed (~3x faster), else ``json``.

:data:`loads` raises :data:`DecodeError` for anything that is not JSON, NaN/Infinity literals
included. A body decoded here for the fast paths is handed on to the reference path (MLflow's
parsing) as it is, so that no body is decoded twice (:func:`as_mlflow_reads`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# What the reference path gets instead of a decoded body: it then decodes the body itself.
UNDECODED: Any = object()

try:
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
    DecodeError: type[Exception] = orjson.JSONDecodeError
    dumps: Callable[[Any], bytes] = orjson.dumps
    # orjson reads an integer literal beyond 64 bits as a float, where ``json`` (so MLflow)
    # keeps it an int. Such a literal has at least 19 digits in a row; where the body holds
    # none, both decoders give the same value (orjson refuses, rather than reads differently,
    # everything else ``json`` reads otherwise: 1e400, lone surrogates, a byte order mark).
    _MAYBE_LOSSY: re.Pattern[bytes] | None = re.compile(rb"\d{19}")

except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
    _MAYBE_LOSSY = None

    def _reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def loads(body: bytes) -> Any:
        return json.loads(body, parse_constant=_reject_constant)

    DecodeError = ValueError

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def as_mlflow_reads(payload: Any, body: bytes) -> Any:
    """``payload`` (what :data:`loads` made of ``body``) when ``json.loads``, MLflow's
    decoder, reads ``body`` as the same value; else :data:`UNDECODED`."""
    if payload is UNDECODED or (_MAYBE_LOSSY is not None and _MAYBE_LOSSY.search(body)):
        return UNDECODED
    return payload
