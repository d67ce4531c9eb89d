"""Verify a live endpoint: it answers, and it serves *this* model (parity with a local load).

The parity check sends real rows (the holdout) through the MLflow scoring protocol and compares
the answers with ``mlflow.pyfunc.load_model(model_uri).predict`` on the same rows, so a rollout
that left the old version running, or a server that mangles inputs, fails loudly.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

if TYPE_CHECKING:
    import pandas as pd


class VerificationError(RuntimeError):
    """The endpoint is down, or does not serve the expected model."""


def verify_endpoint(
    endpoint: str,
    model_uri: str,
    frame: pd.DataFrame,
    feature_columns: list[str],
    *,
    atol: float = 1e-5,
    timeout_s: float = 30,
) -> dict[str, Any]:
    """Smoke + parity test ``endpoint`` against ``model_uri`` on ``frame[feature_columns]``.

    Returns ``{"endpoint", "rows", "max_abs_diff"}``; raises :class:`VerificationError` saying
    what differed (status and body excerpt, prediction count, max abs diff and first mismatch).
    """
    import mlflow.pyfunc

    base = endpoint.rstrip("/")
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing}")
    features = frame[list(feature_columns)]
    if features.empty:
        raise ValueError("verify_endpoint needs at least one row")

    with httpx.Client(timeout=timeout_s) as client:
        try:
            ping = client.get(f"{base}/ping")
        except httpx.HTTPError as exc:
            raise VerificationError(f"GET {base}/ping failed: {exc!r}") from exc
        if ping.status_code != 200:
            raise VerificationError(
                f"GET {base}/ping returned {ping.status_code}: {_excerpt(ping.text)}"
            )
        try:
            resp = client.post(
                f"{base}/invocations",
                content=_dataframe_split_payload(features),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise VerificationError(f"POST {base}/invocations failed: {exc!r}") from exc
    if resp.status_code != 200:
        raise VerificationError(
            f"POST {base}/invocations returned {resp.status_code}: {_excerpt(resp.text)}"
        )
    try:
        body = resp.json()
        remote = _as_array(body["predictions"] if isinstance(body, dict) else body)
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationError(
            f"unexpected /invocations response ({exc}): {_excerpt(resp.text)}"
        ) from exc

    local = _as_array(mlflow.pyfunc.load_model(model_uri).predict(features))

    rows = len(features)
    if remote.shape != local.shape:
        raise VerificationError(
            f"{base} returned predictions of shape {remote.shape} for {rows} rows; "
            f"{model_uri} locally gives shape {local.shape}"
        )
    diff = np.abs(remote - local)
    # NaN on exactly one side is a mismatch; NaN on both sides agrees.
    both_nan = np.isnan(remote) & np.isnan(local)
    diff = np.where(both_nan, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs_diff = float(diff.max()) if diff.size else 0.0
    if max_abs_diff > atol:
        bad = np.argwhere(diff > atol)
        first = tuple(int(i) for i in bad[0])
        row = first[0]
        raise VerificationError(
            f"{base} does not serve {model_uri}: {len(bad)} of {diff.size} predictions differ "
            f"by more than atol={atol:g}; max abs diff {max_abs_diff:.6g}; first mismatch at "
            f"row {row} (frame index {frame.index[row]!r}): endpoint {remote[first]!r} vs "
            f"local {local[first]!r}"
        )
    return {"endpoint": base, "rows": rows, "max_abs_diff": max_abs_diff}


def _dataframe_split_payload(features: pd.DataFrame) -> str:
    """``{"dataframe_split": ...}`` with exact floats (repr round-trips) and NaN as null."""
    data = features.astype(object).where(features.notna(), None).to_numpy().tolist()
    payload = {"dataframe_split": {"columns": [str(c) for c in features.columns], "data": data}}
    return json.dumps(payload, default=_json_default, allow_nan=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _as_array(predictions: Any) -> np.ndarray:
    """Predictions as floats, shape (n,) for one output, (n, k) for k outputs.

    Accepts what pyfunc returns locally (ndarray, Series, DataFrame, list) and what the scoring
    server returns (a list of numbers, of ``{"prediction": x}`` / single-key dicts, or lists).
    """
    import pandas as pd

    if isinstance(predictions, pd.DataFrame):
        if "prediction" in predictions.columns and predictions.shape[1] > 1:
            predictions = predictions["prediction"]
        predictions = predictions.to_numpy()
    elif isinstance(predictions, pd.Series):
        predictions = predictions.to_numpy()
    elif isinstance(predictions, dict):
        if len(predictions) != 1:
            raise TypeError(f"cannot compare multi-output predictions {list(predictions)}")
        predictions = next(iter(predictions.values()))
    if isinstance(predictions, list):
        predictions = [_item(p) for p in predictions]
    arr = np.asarray(predictions, dtype=float)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    return arr


def _item(value: Any) -> Any:
    if isinstance(value, dict):
        if "prediction" in value:
            return _item(value["prediction"])
        if len(value) == 1:
            return _item(next(iter(value.values())))
        raise TypeError(f"cannot compare prediction item {value!r}")
    if value is None:
        return math.nan
    if isinstance(value, list) and len(value) == 1:
        return _item(value[0])
    return value


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
